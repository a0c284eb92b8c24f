"""lclusterd/scheduler.py: placement, dependencies, arrays, drains, reasons.

Harness is an in-memory cluster in the style of Nomad's scheduler/testing.go:
build nodes and a queue, run plan(), apply the plan as the applier would
(records to starting, assigned keys), end jobs, repeat; every applied plan
is checked against the invariants (no over-commit, drains, labels, limits,
throttles)."""

import collections
import dataclasses
import random
import uuid as uuidlib

import pytest

from lclusterd import core, scheduler
from lclusterd.core import CANCELLED, FAILED, QUEUED, RUNNING, STARTING, SUCCEEDED
from lclusterd.scheduler import Load, NodeView, Waiting

G = 1024 ** 3
M = 1024 ** 2


def node(name, cpus=4.0, memory=8 * G, slots=4, labels=None, drained=False,
         enforces=scheduler.ENFORCES):
    return NodeView(name=name, cpus=cpus, memory=memory, slots=slots, labels=labels or {},
                    drained=drained, enforces=frozenset(enforces))


class Harness:
    """Records, assigned keys and nodes, changed only as the store would."""

    def __init__(self, nodes, placement="spread", rng=None):
        self.nodes = {n.name: n for n in nodes}
        self.placement = placement
        self.jobs = {}  # uuid -> Job (deleted records are absent)
        self.assigned = {}  # node -> {uuid: reservation}, as store.assigned()
        self.clock = 1000.0
        self.rng = rng or random.Random(0)
        self.runs = collections.Counter()  # node -> jobs placed there
        self.plans = []

    def submit(self, **fields):
        self.clock += 0.001
        uuid = str(uuidlib.UUID(int=self.rng.getrandbits(128), version=4))
        job = core.Job(uuid=uuid, command="true", uid=1000, gid=1000, user="alice",
                       submitted_at=self.clock, **fields)
        self.jobs[uuid] = job
        return job

    def array(self, count, **fields):
        array_id = str(uuidlib.UUID(int=self.rng.getrandbits(128), version=4))
        return [self.submit(array=array_id, array_index=i, **fields) for i in range(count)]

    def queue(self):
        return sorted((j for j in self.jobs.values() if j.state == QUEUED), key=core.queue_rank)

    def parents(self, queue):
        return {p: self.jobs.get(p) for job in queue for p in job.after}

    def views(self):
        return list(self.nodes.values())

    def plan(self):
        queue = self.queue()
        return scheduler.plan(queue, self.views(), scheduler.loads(self.assigned),
                              self.parents(queue), scheduler.array_live(self.assigned),
                              placement=self.placement)

    def step(self):
        """One pass: plan, check it, apply it."""
        plan = self.plan()
        before = {name: set(jobs) for name, jobs in self.assigned.items()}
        for uuid, reason in plan.cancel:
            self.jobs[uuid] = core.transition(self.jobs[uuid], CANCELLED, ended_at=self.clock,
                                              reason=reason)
        for uuid, name in plan.assign:
            job = self.jobs[uuid]
            assert job.state == QUEUED
            self.jobs[uuid] = core.transition(job, STARTING, now=self.clock, node=name)
            self.assigned.setdefault(name, {})[uuid] = {"cpus": job.cpus, "memory": job.memory,
                                                        "array": job.array}
            self.runs[name] += 1
        assert not {u for u, _ in plan.assign} & {u for u, _ in plan.cancel}
        assert not {u for u, _ in plan.assign} & set(plan.waiting)
        self.check(before)
        self.plans.append(plan)
        return plan

    def end(self, uuid, state=SUCCEEDED):
        job = self.jobs[uuid]
        self.jobs[uuid] = core.transition(job, state, ended_at=self.clock)
        del self.assigned[job.node][uuid]

    def live(self):
        return [u for jobs in self.assigned.values() for u in jobs]

    def check(self, before):
        """The invariants, after every applied plan."""
        arrays = collections.Counter()
        for name, jobs in self.assigned.items():
            n = self.nodes[name]
            records = [self.jobs[u] for u in jobs]
            assert len(records) <= n.slots, f"{name}: {len(records)} jobs on {n.slots} slots"
            assert sum(j.cpus or 0 for j in records) <= n.cpus + 1e-9, f"{name}: cpus over-committed"
            assert sum(j.memory or 0 for j in records) <= n.memory, f"{name}: memory over-committed"
            new = set(jobs) - before.get(name, set())
            assert not (new and n.drained), f"{name} is drained and got {len(new)} jobs"
            labels = core.node_labels(name, n.labels)
            for j in records:
                assert all(labels.get(k) == v for k, _, v in (c.partition("=") for c in j.constraints))
                assert j.memory is None or "memory" in n.enforces
                assert j.cpus is None or "cpu" in n.enforces
                assert j.tasks is None or "pids" in n.enforces
                if j.array:
                    arrays[j.array] += 1
        for array_id, live in arrays.items():
            limit = next(j.max_running for j in self.jobs.values() if j.array == array_id)
            assert limit is None or live <= limit, f"array {array_id}: {live} live over {limit}"

    def run_all(self, rounds=1000):
        """Plan and end every placed job, until nothing moves."""
        for _ in range(rounds):
            plan = self.step()
            for uuid in self.live():
                self.end(uuid)
            if not plan.assign and not plan.cancel:
                return


# --- placement -------------------------------------------------------------------

def test_one_plan_spreads_many_jobs_evenly_and_never_over_commits():
    h = Harness([node("n1"), node("n2"), node("n3")])
    for _ in range(20):
        h.submit()
    plan = h.step()
    assert len(plan.assign) == 12 and len(plan.waiting) == 8  # 3 x 4 slots
    assert collections.Counter(name for _, name in plan.assign) == {"n1": 4, "n2": 4, "n3": 4}
    assert all(w.kind == "resources" for w in plan.waiting.values())


def test_one_plan_fills_100_nodes_of_16_slots_evenly():
    """The bench's scale case: one pass places a full cluster's worth, each node its share."""
    h = Harness([node(f"n{i:03d}", cpus=16.0, slots=16) for i in range(100)])
    for _ in range(2000):
        h.submit()
    plan = h.step()
    assert len(plan.assign) == 1600
    assert set(collections.Counter(name for _, name in plan.assign).values()) == {16}


def test_assignments_follow_the_queue_order():
    h = Harness([node("n1", slots=2)])
    low = h.submit(priority=-5)
    first, second = h.submit(), h.submit()
    high = h.submit(priority=10)
    plan = h.step()
    assert [u for u, _ in plan.assign] == [high.uuid, first.uuid]
    assert set(plan.waiting) == {second.uuid, low.uuid}


@pytest.mark.parametrize("seed", range(10))
def test_spread_evens_out_short_jobs_one_at_a_time(seed):
    """Each job ends before the next comes (the bench's sleep 0.1 jobs): every
    node is idle for each, and still each node gets within 25% of the mean."""
    h = Harness([node("n1"), node("n2"), node("n3")], rng=random.Random(seed))
    for _ in range(600):
        h.submit()
        h.step()
        for uuid in h.live():
            h.end(uuid)
    mean = 600 / 3
    assert all(abs(h.runs[n] - mean) <= 0.25 * mean for n in ("n1", "n2", "n3")), h.runs


def test_spread_evens_out_short_overlapping_jobs():
    h = Harness([node("n1"), node("n2"), node("n3")])
    for i in range(300):
        h.submit()
        h.step()
        live = h.live()
        if len(live) > 2:  # a few run at once; the oldest ends
            h.end(min(live, key=lambda u: h.jobs[u].submitted_at))
    mean = 100
    assert all(abs(h.runs[n] - mean) <= 25 for n in ("n1", "n2", "n3")), h.runs


def test_spread_weighs_cpus_and_memory_not_only_slots():
    h = Harness([node("n1", cpus=4.0), node("n2", cpus=4.0)])
    big = h.submit(cpus=3.0)
    h.step()
    small = [h.submit(cpus=0.5) for _ in range(3)]
    plan = h.step()
    busy = h.jobs[big.uuid].node
    # n(busy) is 75% loaded by cpus: the small ones go to the other until it is as loaded
    assert [name for _, name in plan.assign].count(busy) == 0
    assert len(plan.assign) == 3 and small


def test_pack_fills_one_node_first():
    h = Harness([node("n2"), node("n1"), node("n3")], placement="pack")
    jobs = [h.submit() for _ in range(6)]
    plan = h.step()
    assert [name for _, name in plan.assign] == ["n1"] * 4 + ["n2"] * 2
    assert len(jobs) == 6
    # with n1 full and a job of n2 ended, pack still prefers the busier n2 over idle n3
    h.end(next(u for u, name in plan.assign if name == "n2"))
    h.submit()
    assert [name for _, name in h.step().assign] == ["n2"]


def test_memory_is_reserved_and_never_over_committed():
    h = Harness([node("n1", memory=8 * G), node("n2", memory=2 * G + 512 * M)])
    jobs = [h.submit(memory=3 * G) for _ in range(3)]
    plan = h.step()
    assert [name for _, name in plan.assign] == ["n1", "n1"]  # n2 has only 2.5G
    assert plan.waiting[jobs[2].uuid] == Waiting(
        "resources", "no node has 3.0G free; most free: n2 2.5G")


def test_a_job_that_does_not_fit_does_not_block_the_ones_behind_it():
    h = Harness([node("n1", memory=4 * G)])
    big = h.submit(memory=3 * G)
    h.step()
    bigger = h.submit(memory=2 * G, priority=5)
    small = h.submit(memory=512 * M)
    plan = h.step()
    assert plan.assign == ((small.uuid, "n1"),)
    assert plan.waiting[bigger.uuid].kind == "resources"
    assert big.uuid in h.assigned["n1"]


def test_cpus_fill_exactly_with_float_sums():
    h = Harness([node("n1", cpus=1.0, slots=20)])
    for _ in range(12):
        h.submit(cpus=0.1)
    plan = h.step()
    assert len(plan.assign) == 10  # 10 x 0.1 is 1.0, not over it
    [reason] = set(plan.waiting.values())
    assert reason == Waiting("resources", "no node has 0.1 CPUs free; most free: n1 0 CPUs")  # not 1.1e-16


def test_constraints_pick_labelled_nodes_and_node_is_implied():
    h = Harness([node("n1", labels={"rack": "a"}), node("n2", labels={"rack": "b", "gpu": "1"}),
                 node("n3", labels={"rack": "b"})])
    gpu = [h.submit(constraints=("gpu=1",)) for _ in range(3)]
    rack_b = h.submit(constraints=("rack=b",))
    pinned = h.submit(constraints=("node=n1",))
    nowhere = h.submit(constraints=("gpu=2",))
    plan = h.step()
    placed = dict(plan.assign)
    assert [placed[j.uuid] for j in gpu] == ["n2"] * 3
    assert placed[rack_b.uuid] == "n3" and placed[pinned.uuid] == "n1"
    assert plan.waiting[nowhere.uuid] == Waiting("constraint", "no node has gpu=2")


def test_drained_nodes_get_nothing_and_their_jobs_run_on():
    h = Harness([node("n1"), node("n2", drained=True)])
    for _ in range(6):
        h.submit()
    plan = h.step()
    assert {name for _, name in plan.assign} == {"n1"} and len(plan.assign) == 4
    pinned = h.submit(constraints=("node=n2",))
    assert h.step().waiting[pinned.uuid] == Waiting("drained", "every node that fits is drained")


def test_a_node_that_cannot_enforce_a_limit_gets_no_job_asking_for_it():
    h = Harness([node("n1", enforces=("cpu", "pids")), node("n2")])
    with_memory = [h.submit(memory=256 * M) for _ in range(4)]
    plan = h.step()
    assert {name for _, name in plan.assign} == {"n2"} and len(with_memory) == 4
    h2 = Harness([node("n1", enforces=("cpu",))])
    tasks = h2.submit(tasks=10)
    assert h2.step().waiting[tasks.uuid] == Waiting(
        "constraint", "no node enforces --tasks (its pids cgroup controller)")
    plain = h2.submit()
    assert dict(h2.step().assign) == {plain.uuid: "n1"}


# --- arrays ------------------------------------------------------------------------

def test_an_array_never_runs_more_than_max_running():
    h = Harness([node("n1", slots=8), node("n2", slots=8)])
    members = h.array(10, max_running=3)
    other = h.submit()
    plan = h.step()
    assert len(plan.assign) == 4 and other.uuid in dict(plan.assign)
    array = members[0].array
    assert plan.waiting[members[3].uuid] == Waiting("throttled", f"array {array[:8]}: 3 of 3 running")
    done = 0
    while any(h.jobs[j.uuid].state == QUEUED for j in members):
        h.end(h.live()[0])
        done += 1
        h.step()
        assert sum(1 for j in members if h.jobs[j.uuid].state == STARTING) <= 3
    assert done <= 10


def test_an_array_without_max_running_is_not_throttled():
    h = Harness([node("n1", slots=8)])
    h.array(5)
    assert len(h.step().assign) == 5


def test_loads_and_array_live_from_the_assigned_keys():
    assigned = {"n1": {"a": {"cpus": 1.5, "memory": G, "array": "x"},
                       "b": {"cpus": None, "memory": None, "array": None}},
                "n2": {"c": {"cpus": 0.5, "memory": None, "array": "x"}}, "n3": {}}
    assert scheduler.loads(assigned) == {"n1": Load(1.5, G, 2), "n2": Load(0.5, 0, 1), "n3": Load()}
    assert scheduler.array_live(assigned) == {"x": 2}


def test_node_views_from_registrations_and_drains():
    live = {"n1": {"name": "n1", "slots": 4, "cpus": 2.0, "memory": 4 * G, "labels": {"rack": "a"},
                   "enforces": ["cpu", "memory"]},
            "n0": {"name": "n0", "slots": 2}}  # an older node: no capacity, no enforces
    old, new = scheduler.node_views(live, drains={"n1": {"reason": "x"}})
    assert new == NodeView("n1", 2.0, 4 * G, 4, {"rack": "a", "node": "n1"}, True,
                           frozenset({"cpu", "memory"}))
    assert (old.cpus, old.memory, old.labels, old.drained, old.enforces) == (
        2.0, core.MAX_MEMORY, {"node": "n0"}, False, scheduler.ENFORCES)


# --- dependencies ------------------------------------------------------------------

def finished(h, state):
    """A parent that ran and ended in state."""
    job = h.submit()
    h.jobs[job.uuid] = dataclasses.replace(job, state=state)
    return h.jobs[job.uuid]


@pytest.mark.parametrize("mode, states, status", [
    ("ok", [SUCCEEDED, SUCCEEDED], "ready"),
    ("ok", [SUCCEEDED, RUNNING], "wait"),
    ("ok", [SUCCEEDED, FAILED], "never"),
    ("ok", [RUNNING, CANCELLED], "never"),  # at once, not when the other ends
    ("ok", [None], "never"),
    ("any", [SUCCEEDED, FAILED, CANCELLED], "ready"),
    ("any", [FAILED, QUEUED], "wait"),
    ("any", [None, SUCCEEDED], "ready"),  # gone: ended, outcome unknown
    ("failed", [FAILED, CANCELLED], "ready"),
    ("failed", [FAILED, STARTING], "wait"),
    ("failed", [FAILED, SUCCEEDED], "never"),
    ("failed", [None], "never"),
    ("ok", [core.WARNED], "wait"),  # a warned job has not ended yet
])
def test_dependency_modes(mode, states, status):
    h = Harness([])
    parents = {}
    for state in states:
        p = h.submit()
        parents[p.uuid] = None if state is None else dataclasses.replace(p, state=state)
    child = h.submit(after=tuple(parents), after_mode=mode)
    assert scheduler.dependency(child, parents)[0] == status


def test_dependency_texts():
    h = Harness([])
    a, b = finished(h, FAILED), h.submit()
    child = h.submit(after=(b.uuid, a.uuid), after_mode="ok")
    assert scheduler.dependency(child, {a.uuid: a, b.uuid: b}) == (
        "never", f"dependency failed: {a.uuid[:8]} failed")
    assert scheduler.dependency(dataclasses.replace(child, after_mode="any"), {a.uuid: a, b.uuid: b}) == (
        "wait", f"waiting for {b.uuid[:8]}")
    assert scheduler.dependency(child, {a.uuid: None, b.uuid: b}) == (
        "never", f"dependency failed: {a.uuid[:8]} is gone (its outcome is unknown)")
    ok = finished(h, SUCCEEDED)
    assert scheduler.dependency(h.submit(after=(ok.uuid,), after_mode="failed"), {ok.uuid: ok}) == (
        "never", f"dependency failed: {ok.uuid[:8]} succeeded (--after-failed)")
    assert scheduler.dependency(h.submit(), {}) == ("ready", "")


def test_a_parent_not_read_makes_it_wait_never_run_or_cancel():
    h = Harness([])
    child = h.submit(after=(str(uuidlib.uuid4()),), after_mode="ok")
    assert scheduler.dependency(child, {})[0] == "wait"


def test_the_plan_runs_children_after_their_parents_and_cancels_a_failed_chain():
    h = Harness([node("n1", slots=8)])
    a = h.submit()
    ok_child = h.submit(after=(a.uuid,), after_mode="ok")
    any_child = h.submit(after=(a.uuid,), after_mode="any")
    failed_child = h.submit(after=(a.uuid,), after_mode="failed")
    grandchild = h.submit(after=(ok_child.uuid,), after_mode="ok")
    plan = h.step()
    assert plan.assign == ((a.uuid, "n1"),)
    assert plan.waiting[ok_child.uuid] == Waiting("dependency", f"waiting for {a.uuid[:8]}")
    h.end(a.uuid, FAILED)
    plan = h.step()
    assert {u for u, _ in plan.assign} == {any_child.uuid, failed_child.uuid}
    # the ok child and, in the same plan, its own child (Flux's chain)
    assert plan.cancel == ((ok_child.uuid, f"dependency failed: {a.uuid[:8]} failed"),
                           (grandchild.uuid, f"dependency failed: {ok_child.uuid[:8]} cancelled"))


def test_a_chain_in_any_queue_order_is_cancelled_over_passes():
    h = Harness([node("n1")])
    a = finished(h, CANCELLED)
    child = h.submit(after=(a.uuid,), after_mode="ok")
    grandchild = h.submit(after=(child.uuid,), after_mode="ok", priority=50)  # ahead of its parent
    h.step()
    h.step()
    assert h.jobs[child.uuid].state == h.jobs[grandchild.uuid].state == CANCELLED


# --- why a job waits ---------------------------------------------------------------

def explain(h, job, ahead=0, total=1):
    queue = h.queue()
    return scheduler.explain(job, h.views(), scheduler.loads(h.assigned), h.parents(queue),
                             scheduler.array_live(h.assigned), ahead, total)


def test_explain_each_kind():
    h = Harness([node("n1", memory=4 * G, labels={"rack": "a"}), node("n2", memory=4 * G),
                 node("n3", labels={"ssd": "yes"}, drained=True)])
    parent = h.submit(memory=3 * G + 900 * M)
    h.step()
    assert explain(h, h.submit(after=(parent.uuid,), after_mode="ok")) == Waiting(
        "dependency", f"waiting for {parent.uuid[:8]}")
    members = h.array(3, max_running=1)
    h.step()
    assert explain(h, members[1]) == Waiting("throttled", f"array {members[0].array[:8]}: 1 of 1 running")
    assert explain(h, h.submit(constraints=("gpu=1",))) == Waiting("constraint", "no node has gpu=1")
    assert explain(h, h.submit(constraints=("ssd=yes",))) == Waiting(
        "drained", "every node that fits is drained")
    placed = dict(h.plans[0].assign)[parent.uuid]
    other = "n2" if placed == "n1" else "n1"
    free = 4 * G - (h.jobs[members[0].uuid].memory or 0)
    assert explain(h, h.submit(memory=8 * G)) == Waiting(
        "resources", f"no node has 8.0G free; most free: {other} {core.human_size(free)}")
    assert explain(h, h.submit(), ahead=3, total=10) == Waiting("priority", "3 of 10 ahead")
    assert explain(h, h.submit(), ahead=0, total=1) is None  # next to go


def test_explain_slots_and_cpus():
    h = Harness([node("n1", slots=2, cpus=2.0), node("n2", slots=2, cpus=2.0)])
    h.submit(cpus=1.5)
    h.submit(cpus=1.75)
    h.step()
    assert explain(h, h.submit(cpus=1.0)) == Waiting(
        "resources", f"no node has 1 CPU free; most free: {h.plans[0].assign[0][1]} 0.5 CPUs")
    h.submit()
    h.submit()
    h.step()
    assert explain(h, h.submit()) == Waiting("resources", "no free slot: 4 of 4 in use on the 2 nodes that fit")


def test_explain_resources_when_no_single_node_has_it_all():
    h = Harness([node("n1", cpus=4.0, memory=1 * G), node("n2", cpus=1.0, memory=8 * G)])
    assert explain(h, h.submit(cpus=2.0, memory=4 * G)) == Waiting(
        "resources", "no node has its cpus, memory and a slot free at once")


def test_explain_without_any_live_node():
    h = Harness([])
    for fields in ({}, {"memory": G}, {"constraints": ("gpu=1",)}):
        assert explain(h, h.submit(**fields)) == Waiting("resources", "no node is up")
    assert set(h.step().waiting.values()) == {Waiting("resources", "no node is up")}


# --- refused at submission -----------------------------------------------------------

@pytest.mark.parametrize("fields, reason", [
    ({}, None),
    ({"memory": 8 * G}, None),
    ({"memory": 9 * G}, "no node has 9.0G of memory; the most: n1 8.0G"),
    ({"cpus": 16.0}, "no node has 16 CPUs; the most: n2 8 CPUs"),
    ({"constraints": ("gpu=1",)}, None),
    ({"constraints": ("gpu=2",)}, "no node has gpu=2"),
    ({"constraints": ("gpu=1", "rack=a")}, "no node has gpu=1 and rack=a"),
    ({"constraints": ("gpu=1",), "memory": 6 * G}, "no node has 6.0G of memory; the most: n2 4.0G"),
    ({"tasks": 50}, "no node enforces --tasks (its pids cgroup controller)"),
    ({"cpus": 8.0, "memory": 8 * G}, "no node has 8.0G and 8 CPUs and a slot at once"),
])
def test_never_fits(fields, reason):
    nodes = [node("n1", cpus=4.0, memory=8 * G, labels={"rack": "a"}, enforces=("cpu", "memory")),
             node("n2", cpus=8.0, memory=4 * G, labels={"gpu": "1"}, drained=True,
                  enforces=("cpu", "memory"))]
    job = Harness([]).submit(**fields)
    assert scheduler.never_fits(job, nodes) == reason


def test_never_fits_ignores_load_and_judges_nothing_without_nodes():
    job = Harness([]).submit(memory=64 * G)
    assert scheduler.never_fits(job, []) is None


# --- the whole thing, at random ------------------------------------------------------

def random_nodes(rng):
    nodes = []
    for i in range(rng.randint(1, 6)):
        labels = {}
        if rng.random() < 0.5:
            labels["rack"] = rng.choice("ab")
        if rng.random() < 0.3:
            labels["gpu"] = "1"
        enforces = {c for c in ("memory", "cpu", "pids") if rng.random() < 0.9}
        nodes.append(node(f"n{i}", cpus=rng.choice([0.5, 1.0, 2.0, 4.0, 8.0]),
                          memory=rng.choice([512 * M, 1 * G, 4 * G, 16 * G]),
                          slots=rng.randint(1, 8), labels=labels, drained=rng.random() < 0.2,
                          enforces=enforces))
    return nodes


def random_job(h, rng):
    fields = {"priority": rng.choice([0, 0, 0, 5, -5])}
    if rng.random() < 0.5:
        fields["cpus"] = rng.choice([0.1, 0.25, 0.5, 1.0, 2.0, 4.0])
    if rng.random() < 0.5:
        fields["memory"] = rng.choice([64 * M, 256 * M, 1 * G, 3 * G])
    if rng.random() < 0.1:
        fields["tasks"] = 100
    if rng.random() < 0.3:
        fields["constraints"] = (rng.choice(["rack=a", "rack=b", "gpu=1", "node=n0"]),)
    earlier = list(h.jobs)
    if earlier and rng.random() < 0.3:
        fields["after"] = tuple(rng.sample(earlier, min(len(earlier), rng.randint(1, 2))))
        fields["after_mode"] = rng.choice(["ok", "any", "failed"])
    if rng.random() < 0.15:
        return h.array(rng.randint(2, 6), max_running=rng.choice([None, 1, 2]), **fields)
    return [h.submit(**fields)]


@pytest.mark.parametrize("seed", range(150))
def test_random_clusters_never_over_commit_and_every_job_is_accounted_for(seed):
    rng = random.Random(seed)
    h = Harness(random_nodes(rng), placement=rng.choice(["spread", "pack"]), rng=rng)
    for _ in range(rng.randint(10, 60)):
        random_job(h, rng)
    for _ in range(200):
        h.step()  # check() runs on every applied plan
        for uuid in h.live():  # random ends, random outcomes
            if rng.random() < 0.4:
                h.end(uuid, rng.choice([SUCCEEDED, SUCCEEDED, FAILED]))
        if rng.random() < 0.2:  # drains come and go
            name = rng.choice(list(h.nodes))
            h.nodes[name] = dataclasses.replace(h.nodes[name], drained=not h.nodes[name].drained)
        if rng.random() < 0.2:
            random_job(h, rng)
        if rng.random() < 0.05 and h.jobs:  # a finished record expires
            done = [u for u, j in h.jobs.items() if j.terminal]
            if done:
                del h.jobs[rng.choice(done)]
    # Undrain everything and let it all finish: what stays queued never fits,
    # or waits for a parent that stays queued itself.
    h.nodes = {n: dataclasses.replace(v, drained=False) for n, v in h.nodes.items()}
    for uuid in h.live():
        h.end(uuid)
    h.run_all()
    stuck = {j.uuid: j for j in h.queue()}
    parents = h.parents(list(stuck.values()))
    for job in stuck.values():
        status, _ = scheduler.dependency(job, parents)
        if status == "wait":
            assert any(p in stuck for p in job.after), job
        else:
            assert status == "ready"
            assert scheduler.never_fits(job, h.views()) is not None, job
            reason = scheduler.explain(job, h.views(), {}, parents, {}, 0, len(stuck))
            assert reason is not None and reason.kind in ("constraint", "resources"), (job, reason)


def reference_choice(job, nodes, loads, placement, seed):
    """The rule as written in the module's docstring, by scanning every node:
    what plan()'s heaps must agree with."""
    import hashlib
    best = None
    for n in nodes:
        load = loads.get(n.name) or Load()
        labels = core.node_labels(n.name, n.labels)
        if n.drained or not all(labels.get(k) == v for k, _, v in (c.partition("=") for c in job.constraints)):
            continue
        if any(getattr(job, f) is not None and c not in n.enforces
               for f, c in (("memory", "memory"), ("cpus", "cpu"), ("tasks", "pids"))):
            continue
        after = load.plus(job)
        if after.jobs > n.slots or after.cpus > n.cpus + 1e-9 or after.memory > n.memory:
            continue
        share = max(after.jobs / n.slots, after.cpus / n.cpus, after.memory / n.memory)
        if placement == "pack":
            key = (-share, -load.jobs, n.name)
        else:
            key = (share, load.jobs, hashlib.blake2b(f"{seed}/{n.name}".encode(), digest_size=8).digest())
        if best is None or key < best[0]:
            best = (key, n.name)
    return best and best[1]


@pytest.mark.parametrize("seed", range(60))
def test_the_plan_agrees_with_a_scan_of_every_node(seed):
    rng = random.Random(1000 + seed)
    nodes = random_nodes(rng)
    placement = rng.choice(["spread", "pack"])
    h = Harness(nodes, placement=placement, rng=rng)
    for _ in range(rng.randint(5, 80)):
        fields = {}
        if rng.random() < 0.5:
            fields["cpus"] = rng.choice([0.1, 0.5, 1.0, 2.0])
        if rng.random() < 0.5:
            fields["memory"] = rng.choice([64 * M, 256 * M, 1 * G])
        if rng.random() < 0.2:
            fields["constraints"] = (rng.choice(["rack=a", "rack=b", "gpu=1"]),)
        h.submit(**fields)
    queue = h.queue()
    loads = {n.name: Load(jobs=rng.randint(0, n.slots // 2)) for n in nodes if rng.random() < 0.5}
    plan = scheduler.plan(queue, nodes, loads, {}, {}, placement)
    expected, current = [], dict(loads)
    for job in queue:
        name = reference_choice(job, nodes, current, placement, queue[0].uuid)
        if name:
            expected.append((job.uuid, name))
            current[name] = (current.get(name) or Load()).plus(job)
    assert list(plan.assign) == expected


@pytest.mark.parametrize("seed", range(20))
def test_a_plan_depends_only_on_what_it_is_shown(seed):
    """A new primed node (a leader change) plans from the same snapshot as
    the old one would have: same answer, whatever the order nodes are listed in."""
    rng = random.Random(2000 + seed)
    nodes = random_nodes(rng)
    h = Harness(nodes, placement=rng.choice(["spread", "pack"]), rng=rng)
    for _ in range(30):
        random_job(h, rng)
    queue = h.queue()
    args = (scheduler.loads(h.assigned), h.parents(queue), scheduler.array_live(h.assigned))
    shuffled = nodes[:]
    rng.shuffle(shuffled)
    assert scheduler.plan(queue, nodes, *args, h.placement) == scheduler.plan(queue, shuffled, *args,
                                                                               h.placement)
