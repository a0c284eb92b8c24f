"""The whole node, several at once: an in-memory cluster (after Nomad's
scheduler/testing.go harness). Every Node runs its real loops (the node's
loop, the placer, the heartbeat) in one event loop, against one MemStore
with the watches wired as the daemon wires them; only systemd is a fake,
whose units "run" for the seconds their command sleeps.

What it proves (issue 11): jobs spread across nodes; no node over-committed
(slots, cpus, memory) under concurrent submissions from every node, with a
prime change in the middle; no job running twice; a dead node's jobs
requeued; dependencies cascade; an array's throttle; drain and resume.
"""

import asyncio
import re

import pytest

from lclusterd import config, core
from lclusterd.node import Caller, Node
from tests.memstore import MemStore

ROOT = Caller(0, 0, "root")
RUNNING_UNIT = core.UnitStatus("active", "running", "success", 0, 0)
EXITED = core.UnitStatus("active", "exited", "success", core.CLD_EXITED, 0)
FAILED_UNIT = core.UnitStatus("failed", "failed", "exit-code", core.CLD_EXITED, 1)


class World:
    """What the fake units of every node see: who runs what, checked at every start."""

    def __init__(self):
        self.running = {}  # uuid -> node name
        self.starts = []  # (uuid, node) in order
        self.violations = []
        self.most = {}  # node -> most jobs at once
        self.started_at, self.ended_at = {}, {}  # uuid -> loop time its unit started, ended


class SimUnits:
    """One node's systemd: a unit runs for the seconds its command sleeps
    ("sleep 0.2"; "false" fails at once), then stays loaded with its result
    (RemainAfterExit) until released, and says so through on_change."""

    connected = True

    def __init__(self, world, node_name, capacity):
        self.world, self.name, self.capacity = world, node_name, capacity
        self.loaded, self.timers, self.reserved = {}, {}, {}
        self.on_change = lambda job_uuid: None

    async def connect(self):
        pass

    async def list(self):
        return dict(self.loaded)

    async def status(self, u):
        return self.loaded.get(u)

    async def start(self, job, properties):
        world = self.world
        if job.uuid in world.running:
            world.violations.append(f"{job.uuid} started on {self.name} while running on "
                                    f"{world.running[job.uuid]}")
        world.running[job.uuid] = self.name
        world.starts.append((job.uuid, self.name))
        world.started_at[job.uuid] = asyncio.get_running_loop().time()
        self.loaded[job.uuid] = RUNNING_UNIT
        self.reserved[job.uuid] = (job.cpus or 0.0, job.memory or 0)
        slots, cpus, memory = self.capacity
        live = [u for u, s in self.loaded.items() if not s.finished]
        used_cpus = sum(self.reserved[u][0] for u in live)
        used_memory = sum(self.reserved[u][1] for u in live)
        if len(live) > slots or used_cpus > cpus + 1e-9 or used_memory > memory:
            world.violations.append(f"{self.name} over-committed: {len(live)} jobs, "
                                    f"{used_cpus} cpus, {used_memory} bytes")
        world.most[self.name] = max(world.most.get(self.name, 0), len(live))
        found = re.match(r"sleep ([0-9.]+)", job.command)
        seconds = float(found.group(1)) if found else 0.0
        status = FAILED_UNIT if job.command == "false" else EXITED
        self.timers[job.uuid] = asyncio.get_running_loop().call_later(seconds, self._end, job.uuid, status)

    def _end(self, job_uuid, status):
        self.timers.pop(job_uuid, None)
        if job_uuid in self.loaded:
            self.loaded[job_uuid] = status
            self.world.ended_at[job_uuid] = asyncio.get_running_loop().time()
            self.world.running.pop(job_uuid, None)
            self.on_change(job_uuid)

    async def release(self, u, status=None):
        timer = self.timers.pop(u, None)
        if timer is not None:
            timer.cancel()
        if self.loaded.pop(u, None) is not None and self.world.running.get(u) == self.name:
            del self.world.running[u]

    async def kill(self, u):
        await self.release(u)

    async def stop_and_wait(self, u, timeout):
        await self.release(u)
        return True

    def power_off(self):
        for u in list(self.loaded):
            timer = self.timers.pop(u, None)
            if timer is not None:
                timer.cancel()
            if self.world.running.get(u) == self.name:
                del self.world.running[u]
        self.loaded.clear()


class Cluster:
    def __init__(self, tmp_path, names, slots=2, cpus=4, memory="8G", labels=None,
                 unit_class=SimUnits, **settings):
        self.store, self.world, self.nodes, self.tasks, self.watches = MemStore(), World(), {}, {}, {}
        for name in names:
            cfg = config.from_mapping({"node_name": name, "slots": str(slots), "lease_ttl": "2",
                                       "poll_interval": "0.2", "cpus": str(cpus), "memory": memory,
                                       "labels": (labels or {}).get(name, ""),
                                       **settings}, exists=lambda path: False)
            units = unit_class(self.world, name, (slots, cfg.cpus, cfg.memory))
            node = Node(cfg, self.store, units, run_dir=str(tmp_path / name), machine=f"m-{name}",
                        lease_stores=[self.store])
            units.on_change = node.unit_changed
            self.nodes[name] = node

    async def start(self, name=None):
        loop = asyncio.get_running_loop()
        for n in [name] if name else list(self.nodes):
            node, stopping = self.nodes[n], asyncio.Event()
            self.watches[n] = node.watches(loop)
            self.tasks[n] = (stopping, [asyncio.create_task(c) for c in (
                node.keep_lease(stopping), node.run(stopping), node.place(stopping))])
        await self.until(lambda: all(self.nodes[n].lease for n in self.tasks))

    async def power_off(self, name):
        """The machine stops: its loops, its watches and its units, at once."""
        stopping, tasks = self.tasks.pop(name)
        for cancel in self.watches.pop(name):
            cancel()
        # (stopping too: Python 3.11's wait_for can swallow a cancellation
        # that comes as its wait ends, and the loop would go on)
        stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.nodes[name].units.power_off()

    async def stop(self):
        for name in list(self.tasks):
            stopping, tasks = self.tasks.pop(name)
            stopping.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for cancel in self.watches.pop(name):
                cancel()
        for node in self.nodes.values():
            node.close()

    async def until(self, predicate, timeout=15.0):
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not predicate():
            if loop.time() > end:
                raise AssertionError("timed out waiting")
            await asyncio.sleep(0.02)

    def jobs(self):
        return {job.uuid: job for job, _ in self.store.all_jobs()}

    def all_ended(self, uuids):
        jobs = self.jobs()
        return all(jobs[u].terminal for u in uuids)

    def primed(self):
        return self.store.cluster()[3]


def run(tmp_path, names, scenario, **settings):
    async def go():
        cluster = Cluster(tmp_path, names, **settings)
        try:
            await cluster.start()
            result = await scenario(cluster)
        finally:
            await cluster.stop()
        # Checked at every start in the units: none while running elsewhere, none over capacity.
        assert cluster.world.violations == []
        return result
    return asyncio.run(go())


def test_jobs_spread_across_nodes_and_none_is_over_committed(tmp_path):
    async def scenario(c):
        submitted = await asyncio.gather(*(
            c.nodes[name].submit(f"sleep 0.{i % 3 + 1}", ROOT, {"cpus": "1", "memory": "1G"})
            for i in range(30) for name in c.nodes))
        uuids = [j.uuid for j in submitted]
        await c.until(lambda: c.all_ended(uuids))
        return {c.jobs()[u].state for u in uuids}, c.world.most
    states, most = run(tmp_path, ["n1", "n2", "n3"], scenario, slots=3)
    assert states == {core.SUCCEEDED} and set(most) == {"n1", "n2", "n3"}


def test_concurrent_submissions_from_every_node_with_a_prime_change_in_the_middle(tmp_path):
    """Issue 11 item 1: never over-committed (slots, cpus, memory), no job
    running twice, all done; the primed node dies half-way."""
    async def scenario(c):
        async def submit_from(name, count):
            made = []
            for i in range(count):
                made.append(await c.nodes[name].submit(
                    "sleep 0.05", ROOT, {"cpus": "1.5", "memory": "3G"}))
                await asyncio.sleep(0)
            return made
        first = await asyncio.gather(*(submit_from(n, 20) for n in c.nodes))
        prime = c.primed()
        await c.until(lambda: sum(j.terminal for j in c.jobs().values()) >= 20)
        await c.power_off(prime)
        alive = [n for n in c.nodes if n != prime]
        second = await asyncio.gather(*(submit_from(n, 20) for n in alive))
        uuids = [j.uuid for batch in first + second for j in batch]
        await c.until(lambda: c.all_ended(uuids), timeout=30)
        jobs = c.jobs()
        return prime, c.primed(), {jobs[u].state for u in uuids}, c.world.most
    prime, new_prime, states, most = run(tmp_path, ["n1", "n2", "n3"], scenario, slots=4)
    assert new_prime not in (None, prime)
    assert states == {core.SUCCEEDED}
    # 4 cpus, 8G: two jobs of 1.5 cpus and 3G at once, whatever the slots say
    assert max(most.values()) == 2


def test_every_job_runs_once_and_spreads(tmp_path):
    async def scenario(c):
        made = await asyncio.gather(*(c.nodes[n].submit("sleep 0.1", ROOT) for n in c.nodes
                                      for _ in range(12)))
        await c.until(lambda: c.all_ended([j.uuid for j in made]))
        return c.world.starts
    starts = run(tmp_path, ["n1", "n2", "n3"], scenario, slots=4)
    assert len(starts) == 36 and len({u for u, _ in starts}) == 36  # none twice
    per_node = {n: sum(1 for _, where in starts if where == n) for n in ("n1", "n2", "n3")}
    assert all(6 <= count <= 18 for count in per_node.values()), per_node


def test_a_dead_nodes_jobs_are_requeued_and_run_elsewhere(tmp_path):
    async def scenario(c):
        made = [await c.nodes["n1"].submit("sleep 2", ROOT, {"constraints": []}) for _ in range(4)]
        await c.until(lambda: all(j.state == core.RUNNING for j in c.jobs().values()))
        victim = next(n for n in c.nodes if any(j.node == n for j in c.jobs().values()))
        lost = [j.uuid for j in c.jobs().values() if j.node == victim]
        await c.power_off(victim)
        await c.until(lambda: c.all_ended([j.uuid for j in made]), timeout=30)
        jobs = c.jobs()
        return victim, {u: [a["node"] for a in jobs[u].attempts] for u in lost}, \
            {jobs[j.uuid].state for j in made}
    victim, attempts, states = run(tmp_path, ["n1", "n2", "n3"], scenario)
    assert states == {core.SUCCEEDED}
    for nodes in attempts.values():
        assert nodes[0] == victim and nodes[-1] != victim and len(nodes) == 2


def test_dependencies_run_in_order_and_a_failed_parent_cancels_the_chain(tmp_path):
    async def scenario(c):
        n1, n2 = c.nodes["n1"], c.nodes["n2"]
        a = await n1.submit("sleep 0.2", ROOT)
        b = await n2.submit("true", ROOT, {"after": [a.uuid[:8]]})  # a prefix resolves
        bad = await n1.submit("false", ROOT)
        child = await n2.submit("true", ROOT, {"after": [bad.uuid]})
        grandchild = await n1.submit("true", ROOT, {"after": [child.uuid]})
        on_failure = await n2.submit("true", ROOT, {"after": [bad.uuid], "after_mode": "failed"})
        anyway = await n1.submit("true", ROOT, {"after": [bad.uuid, a.uuid], "after_mode": "any"})
        uuids = [j.uuid for j in (a, b, bad, child, grandchild, on_failure, anyway)]
        await c.until(lambda: c.all_ended(uuids))
        jobs = c.jobs()
        return [jobs[u] for u in uuids]
    a, b, bad, child, grandchild, on_failure, anyway = run(tmp_path, ["n1", "n2"], scenario)
    assert (a.state, b.state, bad.state) == (core.SUCCEEDED, core.SUCCEEDED, core.FAILED)
    assert b.started_at >= a.ended_at
    assert child.state == core.CANCELLED and child.reason == f"dependency failed: {bad.uuid[:8]} failed"
    assert grandchild.state == core.CANCELLED and child.uuid[:8] in grandchild.reason
    assert on_failure.state == core.SUCCEEDED and anyway.state == core.SUCCEEDED


def test_unknown_parent_is_refused_and_nothing_written(tmp_path):
    async def scenario(c):
        with pytest.raises(core.InvalidInput, match="no job matches 'deadbeef'"):
            await c.nodes["n1"].submit("true", ROOT, {"after": ["deadbeef"]})
        return c.jobs()
    assert run(tmp_path, ["n1"], scenario) == {}


def test_an_array_runs_at_most_max_running_members_at_once(tmp_path):
    async def scenario(c):
        seen = []
        array, members = await c.nodes["n1"].submit("sleep 0.1", ROOT, {"max_running": 2}, count=8)
        while not c.all_ended([j.uuid for j in members]):
            seen.append(sum(1 for u in c.world.running if u in {j.uuid for j in members}))
            await asyncio.sleep(0.01)
        found = await c.nodes["n2"].find_array(array)
        return array, members, seen, found
    array, members, seen, found = run(tmp_path, ["n1", "n2"], scenario, slots=4)
    assert max(seen) == 2 and len(members) == 8
    assert [j.array_index for j in found["jobs"]] == list(range(8))
    assert {j.state for j in found["jobs"]} == {core.SUCCEEDED} and found["max_running"] == 2


def test_an_array_from_commands_and_its_removal(tmp_path):
    async def scenario(c):
        array, members = await c.nodes["n1"].submit(None, ROOT, commands=["sleep 5"] * 3 + ["sleep 5"])
        await c.until(lambda: sum(j.state == core.RUNNING for j in c.jobs().values()) == 4)
        removed = await c.nodes["n2"].remove(array, ROOT)
        await c.until(lambda: not c.world.running)
        return array, members, removed
    array, members, removed = run(tmp_path, ["n1", "n2"], scenario)
    assert removed["id"] == array and sorted(removed["cancelled"]) == sorted(j.uuid for j in members)
    assert {j.state for j in removed["jobs"]} == {core.CANCELLED}


def test_drain_places_nothing_new_there_and_resume_lifts_it(tmp_path):
    async def scenario(c):
        n1 = c.nodes["n1"]
        with pytest.raises(core.Forbidden):
            await n1.drain("n2", "disk", Caller(1000, 1000, "alice"))
        with pytest.raises(LookupError):
            await n1.drain("nope", "disk", ROOT)
        await n1.drain("n2", "new disk", ROOT)
        made = [await n1.submit("sleep 0.05", ROOT) for _ in range(6)]
        await c.until(lambda: c.all_ended([j.uuid for j in made]))
        rows = {r["name"]: r for r in await n1.nodes()}
        waiting = await n1.submit("true", ROOT, {"constraints": ["node=n2"]})
        await asyncio.sleep(0.3)
        why = await n1.waiting([c.jobs()[waiting.uuid]])
        await n1.resume("n2", ROOT)
        await c.until(lambda: c.all_ended([waiting.uuid]))
        return {c.jobs()[j.uuid].node for j in made}, rows["n2"], why[waiting.uuid]
    nodes, row, why = run(tmp_path, ["n1", "n2"], scenario)
    assert nodes == {"n1"}
    assert row["state"] == "drained" and row["drain_reason"] == "new disk"
    assert why["kind"] == "drained" and why["total"] == 1


def test_forget_drops_only_a_failed_node(tmp_path):
    async def scenario(c):
        with pytest.raises(core.Busy):
            await c.nodes["n1"].forget("n2", ROOT)
        await c.power_off("n2")
        await c.until(lambda: "n2" in c.store.cluster()[2], timeout=10)
        await c.nodes["n1"].forget("n2", ROOT)
        return [r["name"] for r in await c.nodes["n1"].nodes()]
    assert run(tmp_path, ["n1", "n2"], scenario) == ["n1"]


def test_a_job_waits_with_its_reason_and_place_in_the_queue(tmp_path):
    async def scenario(c):
        n1 = c.nodes["n1"]
        hog = [await n1.submit("sleep 1", ROOT, {"memory": "6G"}) for _ in range(2)]
        await c.until(lambda: sum(j.state == core.RUNNING for j in c.jobs().values()) == 2)
        big = await n1.submit("true", ROOT, {"memory": "4G"})
        await asyncio.sleep(0.2)
        why = await n1.waiting([c.jobs()[big.uuid]])
        await c.until(lambda: c.all_ended([j.uuid for j in hog] + [big.uuid]))
        return why[big.uuid]
    why = run(tmp_path, ["n1", "n2"], scenario)
    assert why["kind"] == "resources" and why["text"].startswith("no node has 4.0G free")
    assert (why["ahead"], why["total"]) == (0, 1)


def test_removing_a_queued_parent_cancels_its_dependents_at_once(tmp_path):
    async def scenario(c):
        n1 = c.nodes["n1"]
        await n1.drain("n1", "hold everything", ROOT)  # nothing runs: all stay queued
        parent = await n1.submit("true", ROOT)
        child = await n1.submit("true", ROOT, {"after": [parent.uuid]})
        grandchild = await n1.submit("true", ROOT, {"after": [child.uuid], "after_mode": "any"})
        await n1.remove(parent.uuid, ROOT)
        jobs = c.jobs()
        return [jobs[j.uuid] for j in (parent, child, grandchild)]
    parent, child, grandchild = run(tmp_path, ["n1"], scenario)
    assert parent.state == child.state == core.CANCELLED
    assert child.reason == f"dependency failed: {parent.uuid[:8]} cancelled"
    assert grandchild.state == core.QUEUED  # after-any: its parent ended; it runs once n1 resumes


def test_a_slot_is_reused_at_once_when_its_job_ends(tmp_path):
    """The end is recorded when systemd says so, its assignment's deletion
    wakes the placer, the new assignment wakes the runner: no step waits
    for poll_interval (2 s here, the default)."""
    async def scenario(c):
        n1 = c.nodes["n1"]
        await asyncio.sleep(0.5)  # the prime taken, the first sweep done
        made = [await n1.submit("sleep 1", ROOT) for _ in range(3)]
        await c.until(lambda: c.all_ended([j.uuid for j in made]), timeout=20)
        w = c.world
        return [w.started_at[b.uuid] - w.ended_at[a.uuid] for a, b in zip(made, made[1:])]
    gaps = run(tmp_path, ["n1"], scenario, slots=1, poll_interval="2")
    assert max(gaps) < 0.1, gaps
    # systemd's signal came before its end could be read (the state read
    # before the exit code): read again soon, not at the next sweep.
    gaps = run(tmp_path, ["n1"], scenario, slots=1, poll_interval="2", unit_class=LateExitUnits)
    assert max(gaps) < 0.1, gaps


class LateExitUnits(SimUnits):
    """Its end signalled once, readable as an end only 30 ms later."""

    def _end(self, job_uuid, status):
        if job_uuid not in self.loaded:
            return
        self.loaded[job_uuid] = core.UnitStatus("active", "exited", "success", 0, 0)
        self.on_change(job_uuid)
        asyncio.get_running_loop().call_later(0.03, self._late, job_uuid, status)

    def _late(self, job_uuid, status):  # no signal this time
        self.timers.pop(job_uuid, None)
        if job_uuid in self.loaded:
            self.loaded[job_uuid] = status
            self.world.running.pop(job_uuid, None)
            self.world.ended_at[job_uuid] = asyncio.get_running_loop().time() - 0.03


def test_the_dependents_of_jobs_ending_together_are_read_together(tmp_path):
    """The primed node reads the dependents of what ended at most once a
    placer.DEPENDENTS_EVERY (a read every pass was an etcd call every job or
    two: make bench); a failed parent's dependent is still cancelled."""
    from lclusterd import placer

    async def scenario(c):
        reads, read = [], c.store.dependents_many

        def counted(parents):
            reads.append(len(parents))
            return read(parents)
        c.store.dependents_many = counted
        n1 = c.nodes["n1"]
        await asyncio.sleep(0.5)  # the prime taken
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        jobs = [await n1.submit("sleep 0.05", ROOT) for _ in range(40)]
        bad = await n1.submit("false", ROOT)
        child = await n1.submit("true", ROOT, {"after": [bad.uuid]})
        await c.until(lambda: c.all_ended([j.uuid for j in jobs + [bad, child]]), timeout=20)
        return reads, loop.time() - t0, c.jobs()[child.uuid]
    reads, seconds, child = run(tmp_path, ["n1"], scenario, slots=4)
    assert child.state == core.CANCELLED
    assert len(reads) <= seconds / placer.DEPENDENTS_EVERY + 2, (reads, seconds)
