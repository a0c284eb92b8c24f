"""The cluster's pure rules: attempts, lost jobs, failed nodes, the prime."""

import pytest

from lclusterd import core
from lclusterd.core import CANCELLED, FAILED, LOST, QUEUED, RUNNING, STARTING, SUCCEEDED

U1, U2, U3 = (f"{n}0000000-0000-4000-8000-000000000000" for n in "123")


def job(state=QUEUED, job_uuid=U1, submitted_at=100.0, **changes):
    return core.Job(uuid=job_uuid, command="true", uid=0, gid=0, user="root",
                    submitted_at=submitted_at, state=state, **changes)


def run_on(j, node, start):
    """Claim and start j on node at time start."""
    j = core.transition(j, STARTING, now=start, node=node)
    return core.transition(j, RUNNING, started_at=start + 0.1)


def test_claim_opens_an_attempt_and_the_end_closes_it():
    j = run_on(job(), "n1", 10.0)
    assert j.attempts == ({"node": "n1", "started_at": 10.1, "ended_at": None, "outcome": None},)
    done = core.transition(j, SUCCEEDED, ended_at=12.0)
    assert done.attempts == ({"node": "n1", "started_at": 10.1, "ended_at": 12.0,
                              "outcome": SUCCEEDED},)


def test_lost_job_is_requeued_while_it_has_attempts_then_fails_node_lost():
    j = job(max_attempts=3)
    for attempt, node in enumerate(("n1", "n2", "n3"), start=1):
        j = core.lose(run_on(j, node, 10.0 * attempt), node, 10.0 * attempt + 5)
        assert len(j.attempts) == attempt
        assert j.attempts[-1]["outcome"] == LOST and j.attempts[-1]["node"] == node
        assert j.attempts[-1]["ended_at"] == 10.0 * attempt + 5
    assert j.state == FAILED and j.reason == core.NODE_LOST and j.ended_at == 35.0
    assert [a["node"] for a in j.attempts] == ["n1", "n2", "n3"]


def test_lost_job_requeued_forgets_its_node():
    j = core.lose(run_on(job(), "n1", 10.0), "n1", 11.0)
    assert j.state == QUEUED and j.node is None and j.started_at is None
    assert "n1" in j.reason and "attempt 2 of 3" in j.reason


def test_one_attempt_only():
    j = core.lose(run_on(job(max_attempts=1), "n1", 10.0), "n1", 11.0)
    assert j.state == FAILED and j.reason == core.NODE_LOST


@pytest.mark.parametrize("state", [QUEUED, SUCCEEDED, FAILED])
def test_only_starting_or_running_jobs_can_be_lost(state):
    with pytest.raises(core.IllegalTransition):
        core.lose(job(state), "n1", 1.0)


@pytest.mark.parametrize("value", [0, -1, core.MAX_ATTEMPTS + 1, "3", 2.5, True, None])
def test_bad_attempts_refused(value):
    with pytest.raises(core.InvalidInput):
        core.validate_attempts(value)


def test_lost_jobs_are_live_jobs_of_nodes_without_a_lease():
    jobs = [job(RUNNING, U1, node="dead"), job(STARTING, U2, node="dead"),
            job(RUNNING, U3, node="alive"), job(SUCCEEDED, node="dead"), job(QUEUED)]
    assert core.lost_jobs(jobs, {"alive"}) == [U1, U2]
    assert core.lost_jobs(jobs, {"alive", "dead"}) == []


def test_failed_nodes_are_members_without_lease_not_yet_recorded():
    assert core.failed_nodes({"a", "b", "c"}, {"a"}, {"b"}) == ["c"]
    assert core.failed_nodes({"a"}, {"a"}, {}) == []


@pytest.mark.parametrize("holds,free,action", [
    (False, 2, "campaign"), (True, 0, "resign"), (True, 1, "keep"), (False, 0, "idle")])
def test_prime_policy(holds, free, action):
    assert core.prime_action(holds, free) == action


def test_node_rows():
    members = {n: {"name": n, "address": f"http://{n}:7800", "slots": 2} for n in ("a", "b", "c")}
    live = {"a": {**members["a"], "running": 2, "free": 0}, "b": {**members["b"], "running": 0, "free": 2}}
    rows = core.node_rows(members, live, {"c": {"name": "c", "at": 50.0}}, "b")
    assert [(r["name"], r["state"], r["running"], r["failed_at"]) for r in rows] == [
        ("a", "ready", 2, None), ("b", "primed", 0, None), ("c", "failed", 0, 50.0)]
    assert rows[0]["address"] == "http://a:7800" and rows[0]["slots"] == 2
    assert [r["free"] for r in rows] == [0, 2, 0]
    assert [r["enforces"] for r in rows] == [None] * 3  # older nodes do not say
    live["a"]["enforces"] = ["cpu", "memory", "pids"]
    assert core.node_rows(members, live, {}, None)[0]["enforces"] == ["cpu", "memory", "pids"]


def test_reconcile_fences_units_whose_job_went_to_another_node():
    units = {U1: core.UnitStatus("active", "running", "success", 0, 0),
             U2: core.UnitStatus("active", "running", "success", 0, 0)}
    jobs = {U1: job(RUNNING, U1, node="other"), U2: job(QUEUED, U2)}
    assert core.reconcile(jobs, units, node="me") == [(core.RELEASE_UNIT, U1),
                                                      (core.RELEASE_UNIT, U2)]
    mine = {U1: job(RUNNING, U1, node="me")}
    assert core.reconcile(mine, {U1: units[U1]}, node="me") == []
    # Its unit gone here and the job another node's: nothing for us to record.
    assert core.reconcile({U1: job(RUNNING, U1, node="other")}, {}, node="me") == []
    assert core.reconcile({U1: job(RUNNING, U1, node="me")}, {}, node="me") == [
        (core.RECORD_VANISHED, U1)]


# --- the cluster's settings ----------------------------------------------------

from lclusterd import config  # noqa: E402


def test_cluster_settings_parse():
    c = config.from_mapping({"listen": "0.0.0.0:7800", "node_name": "n1", "lease_ttl": "4",
                             "etcd_ca": "/ca.pem", "etcd_cert": "/c.pem", "etcd_key": "/c.key"},
                            exists=lambda path: True)
    assert c.listen == ("0.0.0.0", 7800) and c.lease_ttl == 4
    assert c.address == "http://n1:7800"  # from listen's port and the node's name
    assert config.from_mapping({"listen": "10.0.0.5:99"}).address == "http://10.0.0.5:99"
    assert config.from_mapping({}).listen is None and config.from_mapping({}).lease_ttl == 10


@pytest.mark.parametrize("key,value", [("listen", "7800"), ("listen", "host:99999"),
                                       ("lease_ttl", "1"), ("lease_ttl", "x"),
                                       ("etcd_cert", "/c.pem")])
def test_bad_cluster_settings_refused(key, value):
    with pytest.raises(config.ConfigError):
        config.from_mapping({key: value})


def test_queue_rank_sorts_by_priority_then_submission():
    jobs = [job(job_uuid=U1, priority=0, submitted_at=1.0), job(job_uuid=U2, priority=5, submitted_at=3.0),
            job(job_uuid=U3, priority=0, submitted_at=2.0)]
    assert [j.uuid for j in sorted(jobs, key=core.queue_rank)] == [U2, U1, U3]
    low, high = job(priority=core.MIN_PRIORITY), job(priority=core.MAX_PRIORITY)
    assert core.queue_rank(high) < core.queue_rank(low)


@pytest.mark.parametrize("value", [core.MIN_PRIORITY - 1, core.MAX_PRIORITY + 1, "1", 1.5, True])
def test_bad_priority_refused(value):
    with pytest.raises(core.InvalidInput):
        core.validate_priority(value)


# --- the token file (daemon.read_token) -------------------------------------------

from lclusterd import daemon  # noqa: E402


def test_token_file_must_be_root_only(tmp_path):
    token = tmp_path / "token"
    assert daemon.read_token(str(token), required=False) is None
    with pytest.raises(daemon.StartupError, match="does not exist"):
        daemon.read_token(str(token), required=True)
    token.write_text("s3cret-s3cret-s3cret\n")
    token.chmod(0o644)
    with pytest.raises(daemon.StartupError, match="readable by root only"):
        daemon.read_token(str(token), required=True)
    token.chmod(0o600)
    assert daemon.read_token(str(token), required=True) == "s3cret-s3cret-s3cret"
    token.write_text("short\n")
    with pytest.raises(daemon.StartupError, match="too short"):
        daemon.read_token(str(token), required=True)


# --- the node against fakes of etcd and systemd -----------------------------------

import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess
import threading  # noqa: E402
import time  # noqa: E402

from lclusterd import node as node_module  # noqa: E402
from lclusterd.node import Caller, Node  # noqa: E402
from lclusterd.store import Unavailable  # noqa: E402

ACTIVE = core.UnitStatus("active", "running", "success", 0, 0)
EXITED = core.UnitStatus("active", "exited", "success", core.CLD_EXITED, 0)
KILLED = core.UnitStatus("failed", "failed", "signal", core.CLD_KILLED, 9)
ROOT = Caller(0, 0, "root")


class FakeStore:
    """etcd as a dict: records guarded by revisions, like store.Store."""

    def __init__(self):
        self.jobs, self.rev = {}, 0
        self.live, self.members, self.failed = {}, {}, {}
        self.prime, self.renewals, self.submitted = None, 0, []
        self.existing = None  # what submit_many answers (contract C5)

    def _bump(self):
        self.rev += 1
        return self.rev

    def get(self, u):
        return self.jobs.get(u)

    def all_jobs(self):
        return list(self.jobs.values())

    def queued(self, limit):
        return sorted((r for r in self.jobs.values() if r[0].state == QUEUED),
                      key=lambda r: core.queue_rank(r[0]))[:limit]

    def submit_many(self, jobs, idempotency_key=None):
        self.submitted.append((jobs, idempotency_key))
        if self.existing is not None:
            return self.existing
        for j in jobs:
            self.jobs[j.uuid] = (j, self._bump())
        return None

    def update(self, old, new, revision, prime=None):
        if self.jobs.get(new.uuid, (None, None))[1] != revision:
            return False
        self.jobs[new.uuid] = (new, self._bump())
        return self.rev

    def put(self, job):
        self.jobs[job.uuid] = (job, self._bump())

    def grant(self, ttl):
        return 77

    def renew(self, lease, timeout=None):
        self.renewals += 1
        return True

    def queued_count(self, uid):
        return sum(j.state == QUEUED and j.uid == uid for j, _ in self.jobs.values())

    def register(self, info, lease):
        self.live[info["name"]] = self.members[info["name"]] = info

    def update_registration(self, info, lease):
        self.live[info["name"]] = info

    def cluster(self):
        return dict(self.live), dict(self.members), dict(self.failed), self.prime

    nospace = False  # etcd's NOSPACE alarm

    def ping(self):
        pass

    def check_space(self):
        if self.nospace:
            raise NoSpace("etcd is out of space (quota 2097152 bytes): its NOSPACE alarm is raised")

    def record_failed(self, name, at):
        self.failed[name] = {"name": name, "at": at}
        return True

    def campaign(self, name, lease):
        self.prime = self.prime or name
        return self.prime == name

    def resign(self, name):
        if self.prime == name:
            self.prime = None

    def lock(self, name, holder, ttl):
        return True

    def compact(self):
        self.compactions = getattr(self, "compactions", 0) + 1

    def delete(self, records):
        return 0


class FakeUnits:
    """systemd's job units as a dict."""

    connected = True

    def __init__(self):
        self.loaded, self.started, self.released, self.killed = {}, [], [], []
        self.start_error = None

    async def connect(self):
        pass

    async def list(self):
        return dict(self.loaded)

    async def status(self, u):
        return self.loaded.get(u)

    async def start(self, job, properties):
        if self.start_error is not None:
            raise self.start_error
        self.started.append(job.uuid)
        self.loaded[job.uuid] = ACTIVE

    async def release(self, u, status=None):
        self.released.append(u)
        self.loaded.pop(u, None)

    async def kill(self, u):
        self.killed.append(u)

    async def stop_and_wait(self, u, timeout):
        self.loaded.pop(u, None)
        return True


from lclusterd.store import NoSpace  # noqa: E402


def make_node(tmp_path, store=None, units=None, **kw):
    cfg = config.from_mapping({"node_name": "me", "slots": "2", "lease_ttl": "8"},
                              exists=lambda path: False)
    return Node(cfg, store or FakeStore(), units or FakeUnits(), run_dir=str(tmp_path),
                machine="machine-of-me", **kw)


def on(node_name, state=RUNNING, job_uuid=U1, **changes):
    j = core.transition(job(job_uuid=job_uuid), STARTING, now=1.0, node=node_name)
    return j if state == STARTING else core.transition(j, RUNNING, started_at=1.1, **changes)


def test_nospace_shows_in_health_status_and_nodes_though_reads_work(tmp_path):
    """Issue 10 item 9: etcd out of space still answers reads."""
    n = make_node(tmp_path)
    n.store.nospace = True
    for ask in (n.ping, n.nodes):
        with pytest.raises(NoSpace):
            asyncio.run(ask())
    assert n.etcd_error.startswith("etcd is out of space")  # STATUS= says it
    n.store.nospace = False
    asyncio.run(n.ping())
    assert n.etcd_error is None


def test_a_lost_job_gives_its_slot_back(tmp_path):
    """Issue 9 item 7: fenced here, requeued and now running elsewhere, the
    job no longer holds a slot of ours (nor shows in our registration)."""
    n = make_node(tmp_path)
    n.store.put(on("other"))  # taken over by another node while we were cut off
    n.mine = {U1}  # what we held before the fence
    asyncio.run(n.sweep())
    assert n.mine == set() and n.registration()["running"] == 0
    assert n.registration()["free"] == 2


def test_a_unit_whose_record_is_gone_is_stopped_and_released(tmp_path, caplog):
    """Issue 10 item 10: it would hold its slot for ever."""
    n = make_node(tmp_path)
    n.units.loaded[U1] = ACTIVE  # a job unit; its record deleted (etcdctl del)
    n.mine = {U1}
    asyncio.run(n.sweep())
    assert n.units.released == [U1] and f"job {U1}: its record is gone from etcd" in caplog.text
    asyncio.run(n.sweep())  # its slot is free once the unit is gone
    assert n.mine == set()


def test_reconcile_releases_units_of_records_looked_for_and_gone():
    assert core.reconcile({}, {U1: ACTIVE}, gone={U1}) == [(core.RELEASE_ORPHAN, U1)]
    assert core.reconcile({}, {U1: ACTIVE}, in_flight={U1}, gone={U1}) == []
    assert core.reconcile({}, {}, gone={U1}) == []


@pytest.mark.parametrize("error", [UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed"),
                                   RuntimeError("boom"), ValueError("bad\nvalue")])
def test_any_failure_to_start_a_unit_fails_the_attempt_for_good(tmp_path, error):
    """Issue 10 item 7: never a requeue loop, whatever the exception."""
    n = make_node(tmp_path)
    n.units.start_error = error
    n.lease = 77
    queued = job(job_uuid=U1)
    n.store.put(queued)
    asyncio.run(n.fill_slots())
    failed = n.store.get(U1)[0]
    assert failed.state == FAILED and "could not be started" in failed.reason
    assert type(error).__name__ in failed.reason and "\n" not in failed.reason
    assert n.mine == set() and n.store.queued(10) == []
    asyncio.run(n.fill_slots())  # nothing claimed again
    assert n.store.get(U1)[0].state == FAILED and len(n.store.get(U1)[0].attempts) == 1


def test_systemd_refusing_says_so(tmp_path):
    from lclusterd.units import Refused
    n = make_node(tmp_path)
    n.units.start_error = Refused("Unit lcluster-job@x.service already exists.")
    n.lease = 77
    n.store.put(job(job_uuid=U1))
    asyncio.run(n.fill_slots())
    assert n.store.get(U1)[0].reason == "systemd refused to start it: Unit lcluster-job@x.service already exists."


KEY = core.signing_key("a-cluster-token-of-some-length")


def test_submit_signs_and_a_record_that_does_not_verify_never_runs(tmp_path, caplog):
    """Contract C3: a record written by someone with etcd access but no token."""
    n = make_node(tmp_path, signing_key=KEY)
    mine = asyncio.run(n.submit("echo hi", Caller(1000, 1000, "alice")))
    assert core.verify(n.store.get(mine.uuid)[0], KEY)
    forged = job(job_uuid=U2, submitted_at=0.0)  # uid 0: "run me as root"
    n.store.put(forged)
    n.lease = 77
    asyncio.run(n.fill_slots())
    assert n.units.started == [mine.uuid]
    record = n.store.get(U2)[0]
    assert record.state == FAILED and record.reason == core.UNSIGNED
    assert core.UNSIGNED in caplog.text


def test_submit_refuses_a_limit_this_node_cannot_enforce(tmp_path):
    """Contract C4 (issue 9 item 17)."""
    n = make_node(tmp_path, enforceable=frozenset({"cpu", "pids"}))
    with pytest.raises(core.InvalidInput, match=r"^this node cannot enforce --memory "
                                                r"\(no writable memory cgroup controller\)$"):
        asyncio.run(n.submit("true", ROOT, {"memory": "64M"}))
    assert n.store.jobs == {}
    asyncio.run(n.submit("true", ROOT, {"cpus": "0.5", "tasks": "10"}))
    assert n.registration()["enforces"] == ["cpu", "pids"]
    # Queued at a node that can, at the head of the queue: this one runs what
    # it can and leaves the prime for a while, to a node that can run it.
    n.store.put(job(job_uuid=U2, submitted_at=0.0, memory=64 * 2 ** 20))
    n.lease = 77

    async def passes():
        await n.fill_slots()
        first = (n.store.get(U2)[0].state, len(n.units.started), n.store.prime)
        await n.fill_slots()  # within YIELD_PRIME: no campaign
        return first, n.store.prime
    assert asyncio.run(passes()) == ((QUEUED, 1, None), None)


def test_submit_with_a_known_idempotency_key_returns_the_first_jobs(tmp_path):
    """Contract C5: the store writes nothing and names what it queued first."""
    n = make_node(tmp_path)
    first = asyncio.run(n.submit("true", ROOT, count=2, idempotency_key="k1"))
    assert n.store.submitted[-1][1] == "k1"
    n.store.existing = [j.uuid for j in first]
    again = asyncio.run(n.submit("true", ROOT, count=2, idempotency_key="k1"))
    assert [j.uuid for j in again] == [j.uuid for j in first] and len(n.store.jobs) == 2
    asyncio.run(n.submit("true", ROOT))
    assert n.store.submitted[-1][1] is None


def test_submit_past_the_users_quota_is_refused(tmp_path):
    """Contract C6."""
    n = make_node(tmp_path)
    n.config.max_queued_per_user = 3
    alice = Caller(os.getuid() or 1000, 1000, "alice")
    asyncio.run(n.submit("true", alice, count=2))
    with pytest.raises(core.QuotaExceeded, match="alice has 2 job.s. queued; at most 3"):
        asyncio.run(n.submit("true", alice, count=2))
    assert len(n.store.jobs) == 2
    asyncio.run(n.submit("true", ROOT, count=5))  # root is trusted


def test_registration_names_the_machine(tmp_path):
    """Contract C2: a restart of this node is told from a namesake elsewhere."""
    assert make_node(tmp_path).registration()["machine"] == "machine-of-me"
    (tmp_path / "machine-id").write_text("0123abcd\n")
    assert node_module.machine_id(str(tmp_path / "machine-id")) == "0123abcd"
    assert node_module.machine_id(str(tmp_path / "nothing")) is None


# --- the heartbeat: the fence file, the deadline, fast failover ------------------

def run_heartbeat(n, seconds):
    async def go():
        stopping = asyncio.Event()
        task = asyncio.create_task(n.keep_lease(stopping))
        await asyncio.sleep(seconds)
        stopping.set()
        await task
    asyncio.run(go())


def test_fence_file_after_registration_and_each_renewal(tmp_path):
    """Contract C1: the deadline is the last confirmed renewal's send time +
    FENCE_AFTER x TTL, on CLOCK_MONOTONIC."""
    n = make_node(tmp_path)
    n.config.lease_ttl = 2  # a renewal every 0.25 s
    n.store.live["other"] = {"name": "other"}
    before = time.monotonic()
    run_heartbeat(n, 0.7)
    fence = json.loads((tmp_path / "fence.json").read_text())
    assert fence["node"] == "me" and fence["pid"] == os.getpid() and fence["others_live"] is True
    assert n.store.renewals >= 2
    # The last renewal was sent within the last HEARTBEAT x TTL.
    assert before + 0.25 < fence["deadline"] - 2 * node_module.FENCE_AFTER <= time.monotonic()
    assert not (tmp_path / "fence.json.tmp").exists()


def test_a_dead_etcd_member_does_not_delay_the_renewal(tmp_path):
    """Issue 9 item 8: every endpoint is asked at once; a member that does not
    answer (cut off, or without a leader) costs nothing."""
    class Hanging(FakeStore):
        def renew(self, lease, timeout=None):
            time.sleep(1.5)
            raise Unavailable("etcd is unreachable at http://10.0.0.1:2379 (timeout)")
    alive = FakeStore()
    n = make_node(tmp_path, lease_stores=[Hanging(), alive])

    async def renew():
        t = time.monotonic()
        ok = await n._renew(77, 1.0)
        return ok, time.monotonic() - t
    ok, took = asyncio.run(renew())
    assert ok and took < 0.5 and alive.renewals == 1
    n2 = make_node(tmp_path, lease_stores=[Hanging()])
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(n2._renew(77, 0.2))


def test_the_node_fences_at_its_deadline_and_marks_what_it_killed(tmp_path):
    """Issue 9 item 9: stopped by the deadline from the last confirmed renewal;
    a unit killed by a fence is lost, not failed (contract C1's markers)."""
    class Silent(FakeStore):
        def renew(self, lease, timeout=None):
            raise Unavailable("etcd is unreachable")
    store = Silent()
    store.live["other"] = {"name": "other"}
    n = make_node(tmp_path, store=store, lease_stores=[store])
    n.config.lease_ttl = 2
    n.units.loaded[U1] = ACTIVE
    n.units.loaded[U2] = EXITED  # done, its end not recorded yet: not killed, not lost
    store.put(on("me"))
    killed_at = []
    n.units.kill = lambda u: killed_at.append((u, time.monotonic())) or asyncio.sleep(0)
    t = time.monotonic()
    run_heartbeat(n, 1.4)
    # Registered at t, never renewed: killed FENCE_AFTER x TTL later (then registered afresh).
    ((killed, at),) = killed_at
    assert killed == U1 and 1.0 <= at - t <= 1.1
    assert (tmp_path / "fenced" / U1).exists() and not (tmp_path / "fenced" / U2).exists()
    # The record: lost (requeued), never failed; the marker is then done with.
    asyncio.run(n._record_end(U1, KILLED))
    assert n.store.get(U1)[0].state == QUEUED and "lost" in n.store.get(U1)[0].reason
    assert not (tmp_path / "fenced" / U1).exists()


def test_a_unit_killed_by_lclusterd_fence_is_recorded_lost(tmp_path):
    """Contract C1: the marker the fence writes while the daemon was down."""
    n = make_node(tmp_path)
    n.store.put(on("me"))
    (tmp_path / "fenced").mkdir()
    (tmp_path / "fenced" / U1).touch()
    n.units.loaded[U1] = KILLED
    asyncio.run(n.sweep())
    record = n.store.get(U1)[0]
    assert record.state == QUEUED and record.attempts[-1]["outcome"] == LOST
    assert not (tmp_path / "fenced" / U1).exists() and n.mine == set()
    # A stale marker (its unit gone, its job no longer ours) is removed.
    (tmp_path / "fenced" / U2).touch()
    asyncio.run(n.sweep())
    assert not (tmp_path / "fenced" / U2).exists()


def test_a_dead_nodes_jobs_are_requeued_only_after_the_guard(tmp_path):
    """Issue 9 item 9: no earlier than the lease's expiry (seen: its
    registration gone) plus REQUEUE_GUARD x TTL."""
    n = make_node(tmp_path)
    n.lease = 77
    n.config.lease_ttl = 2  # guard 0.5 s
    n.store.live["me"] = n.store.members["me"] = {"name": "me"}
    n.store.members["dead"] = {"name": "dead"}
    n.store.put(on("dead"))

    async def watch():
        await n.watch_cluster()
        first = n.store.get(U1)[0].state
        await asyncio.sleep(0.3)
        await n.watch_cluster()
        second = n.store.get(U1)[0].state
        await asyncio.sleep(0.3)
        await n.watch_cluster()
        return first, second, n.store.get(U1)[0].state
    assert asyncio.run(watch()) == (RUNNING, RUNNING, QUEUED)
    assert "dead" in n.store.failed  # shown failed at once


def test_the_designed_fencing_margin():
    """README's figure: stopped here at least this long before it can start elsewhere."""
    margin = (1 - node_module.FENCE_AFTER + node_module.REQUEUE_GUARD)
    assert margin * 8 >= 2 + 0.2 + 1  # TTL 8 (the cluster tests): > 2 s + the fence's poll + slack
    assert node_module.HEARTBEAT < node_module.FENCE_AFTER / 3  # an election costs renewals, not the budget


# --- network namespaces ------------------------------------------------------------

from lclusterd import netns  # noqa: E402


class FakeIp:
    """iproute2's ip as netns.ensure runs it: namespaces in a set."""

    def __init__(self, refuse_lo=False):
        self.made, self.inside, self.most, self.refuse_lo = set(), 0, 0, refuse_lo
        self.lock = threading.Lock()

    def listnetns(self):
        return list(self.made)

    def __call__(self, *args):
        if args[:2] == ("netns", "add"):
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            time.sleep(0.05)
            with self.lock:
                self.inside -= 1
            if args[2] in self.made:
                return subprocess.CompletedProcess(args, 1, "", "Cannot create namespace file "
                                                   f'"/run/netns/{args[2]}": File exists\n')
            self.made.add(args[2])
            return subprocess.CompletedProcess(args, 0, "", "")
        code = 2 if self.refuse_lo else 0
        return subprocess.CompletedProcess(args, code, "", "RTNETLINK answers: Operation not permitted\n")


def test_netns_ensure_makes_one_namespace_under_concurrent_asks(monkeypatch):
    """Issue 9 item 14: two jobs asking for a new ns:X at once."""
    fake = FakeIp()
    monkeypatch.setattr(netns, "netns", fake)
    monkeypatch.setattr(netns, "_ip", fake)
    results = []
    threads = [threading.Thread(target=lambda: results.append(netns.ensure("x"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True] and fake.most == 1


def test_netns_ensure_tolerates_eexist_and_translates_errors(monkeypatch):
    fake = FakeIp()
    looks = iter([[], ["x"]])  # not there at the first look; made by someone else meanwhile
    monkeypatch.setattr(netns, "_ip", fake)
    monkeypatch.setattr(netns, "netns", type("Listing", (), {"listnetns": lambda self: next(looks)})())
    fake.made.add("x")
    assert netns.ensure("x") is False  # ip says it exists: not an error

    broken = FakeIp(refuse_lo=True)
    monkeypatch.setattr(netns, "_ip", broken)
    monkeypatch.setattr(netns, "netns", broken)
    with pytest.raises(netns.Error, match="Operation not permitted") as e:
        netns.ensure("y")
    assert isinstance(e.value, OSError)


def test_a_node_name_live_on_another_machine_ends_the_heartbeat(tmp_path):
    """Contract C2 (issue 9 item 10): the daemon exits 78 on it."""
    from lclusterd import store as etcd_store

    class Taken(FakeStore):
        def register(self, info, lease, timeout=None):
            assert info["machine"] == "machine-of-me"
            raise etcd_store.NameTaken("me", "http://10.0.0.9:7800")
    n = make_node(tmp_path, store=Taken(), lease_stores=[FakeStore()])
    with pytest.raises(etcd_store.NameTaken, match="10.0.0.9"):
        run_heartbeat(n, 0.5)
    assert n.lease is None


def test_prune_compacts_etcds_history(tmp_path):
    """Contract C7 (issue 10 item 9): once a prune interval, by one node."""
    n = make_node(tmp_path)
    asyncio.run(n.prune())
    assert n.store.compactions == 1


def test_the_heartbeat_gets_a_store_per_etcd_endpoint():
    """The real Store's shape (made lazily: no connection here)."""
    from lclusterd.store import Store
    tls = {"ca_cert": "/ca.pem", "cert_cert": "/c.pem", "cert_key": "/c.key"}
    store = Store(["https://a:2379", "https://b:2379", "https://c:2379"], "/p", tls=tls)
    stores = node_module.endpoint_stores(store)
    assert [s.endpoints for s in stores] == [["https://a:2379"], ["https://b:2379"], ["https://c:2379"]]
    assert {s.prefix for s in stores} == {"/p"} and all(s.tls == tls for s in stores)
    single = Store(["http://127.0.0.1:2379"])
    assert node_module.endpoint_stores(single) == [single]


class BusDownUnits(FakeUnits):
    """systemd's bus gone: status (and stop, with stop_fails) raise units.Unavailable."""

    def __init__(self, status_fails=True, stop_fails=True):
        super().__init__()
        self.status_fails, self.stop_fails = status_fails, stop_fails

    async def status(self, u):
        from lclusterd.units import Unavailable as UnitsUnavailable
        if self.status_fails:
            raise UnitsUnavailable("systemd is unreachable: not connected to the system bus")
        return await super().status(u)

    async def stop_and_wait(self, u, timeout):
        from lclusterd.units import Unavailable as UnitsUnavailable
        if self.stop_fails:
            raise UnitsUnavailable("systemd is unreachable: the system bus went away")
        return await super().stop_and_wait(u, timeout)


@pytest.mark.parametrize("state", [STARTING, RUNNING])
def test_removejob_with_the_bus_down_writes_nothing(tmp_path, state):
    """Issue 9 item 15: the API answers 503 (units.Unavailable) and the
    record still says what is true: the job runs."""
    from lclusterd.units import Unavailable as UnitsUnavailable
    n = make_node(tmp_path, units=BusDownUnits())
    n.store.put(on("me", state))
    before = n.store.get(U1)
    with pytest.raises(UnitsUnavailable):
        asyncio.run(n.remove(U1, ROOT))
    assert n.store.get(U1) == before


def test_removejob_whose_stop_loses_the_bus_stays_cancelled_and_says_why(tmp_path):
    """Cancelled is written before the stop; a stop that then fails leaves it
    to the sweep (RELEASE_UNIT once systemd answers), and the record says so."""
    n = make_node(tmp_path, units=BusDownUnits(status_fails=False))
    n.units.loaded[U1] = ACTIVE
    n.store.put(on("me"))
    removed = asyncio.run(n.remove(U1, ROOT))
    assert removed.state == CANCELLED and n.store.get(U1)[0] == removed
    assert removed.reason.startswith("removed by root; its unit is stopped once systemd answers")
    assert "\n" not in removed.reason
    assert core.reconcile({U1: removed}, {U1: ACTIVE}, set(), "me", 10.0, 5) == [(core.RELEASE_UNIT, U1)]


def test_removejob_of_a_queued_job_needs_no_systemd(tmp_path):
    n = make_node(tmp_path, units=BusDownUnits())
    n.store.put(job(job_uuid=U1))
    assert asyncio.run(n.remove(U1, ROOT)).state == CANCELLED


class CountingStore(FakeStore):
    """Counts the calls that write to etcd (a transaction with a put or a delete)."""

    WRITES = ("submit_many", "update", "register", "update_registration", "record_failed",
              "campaign", "resign", "lock", "delete")

    def __init__(self):
        super().__init__()
        self.writes = []

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name in CountingStore.WRITES:
            def counted(*args, **kw):
                self.writes.append(name)
                return attr(*args, **kw)
            return counted
        return attr


def idle_passes(n, passes):
    """What Node.run does on every pass, a sweep included (the most it does)."""
    if n._published is None:
        n._published = n.registration()  # as keep_lease registered it
    async def go():
        for _ in range(passes):
            await n.sweep()
            await n.watch_cluster()
            await n.publish()
            await n.record_changed()
            await n.fill_slots()
    asyncio.run(go())


def test_an_idle_primed_node_writes_nothing_per_pass(tmp_path):
    """Issue 13 item 3: it re-campaigned (a transaction) every CLAIM_POLL."""
    n = make_node(tmp_path, store=CountingStore())
    n.lease = 77
    idle_passes(n, 1)
    assert n.primed and n.store.writes == ["campaign"]
    n.store.writes.clear()
    idle_passes(n, 50)
    assert n.store.writes == [] and n.primed
    n.store.prime = None  # deleted by hand: the next sweep sees it, and we take it again
    idle_passes(n, 1)
    assert n.store.writes == ["campaign"] and n.primed and n.store.prime == "me"
    n.lease = 78  # registered afresh: the prime under the old lease is gone with it
    n.store.writes.clear()
    asyncio.run(n.fill_slots())
    assert n.store.writes == ["campaign"]


def test_an_idle_node_whose_prime_another_holds_writes_nothing(tmp_path):
    n = make_node(tmp_path, store=CountingStore())
    n.lease, n.store.prime = 77, "other"
    asyncio.run(n.fill_slots())  # one campaign, lost
    assert n.store.writes == ["campaign"] and not n.primed
    idle_passes(n, 50)
    assert n.store.writes == ["campaign"] and not n.primed
    n.store.prime = None  # the other node resigned (full) or died: a sweep sees it free
    idle_passes(n, 1)
    assert n.primed and n.store.writes == ["campaign", "campaign"]


def test_a_primed_node_still_claims_and_resigns_when_full(tmp_path):
    n = make_node(tmp_path, store=CountingStore())
    n.lease = 77
    idle_passes(n, 1)
    for u in (U1, U2):
        n.store.put(job(job_uuid=u))
    asyncio.run(n.fill_slots())
    assert set(n.units.started) == {U1, U2}
    asyncio.run(n.fill_slots())  # full now
    assert not n.primed and n.store.prime is None


def test_counters_count_submissions_starts_and_ends_as_they_happen(tmp_path):
    """Issue 12 item 2: what GET /metrics shows, counted by the node."""
    n = make_node(tmp_path)
    n.lease = 77
    jobs = asyncio.run(n.submit("true", ROOT, count=3))
    assert n.counters.submitted == 3
    n.store.existing = [j.uuid for j in jobs]  # the client's retry, same Idempotency-Key
    asyncio.run(n.submit("true", ROOT, count=3, idempotency_key="k"))
    assert n.counters.submitted == 3
    asyncio.run(n.fill_slots())  # 2 slots: 2 started
    assert n.counters.started == 2 and n.counters.dispatch_buckets()[-1] == ("+Inf", 2)
    started = [u for u in n.units.started]
    n.units.loaded[started[0]] = EXITED
    n.unit_changed(started[0])
    asyncio.run(n.record_changed())
    asyncio.run(n.remove(started[1], ROOT))
    asyncio.run(n.remove(started[1], ROOT))  # again: already over, counted once
    assert n.counters.ended[SUCCEEDED] == 1 and n.counters.ended[CANCELLED] == 1
    queued = next(j.uuid for j in jobs if j.uuid not in started)
    asyncio.run(n.remove(queued, ROOT))  # never ran on a node: no end of this node's
    assert sum(n.counters.ended.values()) == 2


def test_counters_count_a_failed_start_and_a_lost_attempt(tmp_path):
    n = make_node(tmp_path)
    n.lease = 77
    n.units.start_error = RuntimeError("boom")
    n.store.put(job(job_uuid=U1))
    asyncio.run(n.fill_slots())
    assert n.counters.started == 0 and n.counters.ended[FAILED] == 1
    n.store.put(on("me", job_uuid=U2))  # running here; its unit gone (a reboot)
    asyncio.run(n.sweep())
    assert n.store.get(U2)[0].state == QUEUED and n.counters.ended[LOST] == 1


# --- GET /metrics after known events (issue 12 item 2) ---------------------------

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lclusterd import metrics  # noqa: E402
from lclusterd.store import TooLarge  # noqa: E402


def scrape(n):
    """{(sample name, frozenset(labels)): value} of the node's metrics, read
    back with prometheus_client's own text parser."""
    jobs = [j for j, _ in n.store.all_jobs()]
    data = metrics.render(metrics.snapshot(n.config.node_name, jobs, n.counters,
                                           slots=n.config.slots, cpus=2.0, memory_bytes=2 ** 30,
                                           primed=n.primed))
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(data.decode()) for s in family.samples}


def sample(samples, name, **labels):
    return samples[(name, frozenset({"node": "me", **labels}.items()))]


def test_metrics_count_etcd_errors_by_kind_and_time_every_call(tmp_path):
    class Flaky(FakeStore):
        down = too_large = False

        def cluster(self):
            if self.down:
                raise Unavailable("etcd is unreachable at http://127.0.0.1:2379 (connection refused)")
            time.sleep(0.03)  # one slow call: past the 0.025 s bucket
            return super().cluster()

        def warned(self):
            if self.too_large:
                raise TooLarge("etcd refused the request: too large")
            return {}
    n = make_node(tmp_path, store=Flaky())
    asyncio.run(n.nodes())  # check_space, cluster, warned: 3 calls, no error
    s = scrape(n)
    assert sample(s, "lclusterd_etcd_request_seconds_count") == 3
    assert sample(s, "lclusterd_etcd_request_seconds_bucket", le="0.025") <= 2
    assert sample(s, "lclusterd_etcd_request_seconds_bucket", le="0.05") == 3
    assert sample(s, "lclusterd_etcd_request_seconds_sum") >= 0.03
    for kind in metrics.ETCD_ERROR_KINDS:
        assert sample(s, "lclusterd_etcd_request_errors_total", kind=kind) == 0
    n.store.down = True
    with pytest.raises(Unavailable):
        asyncio.run(n.nodes())
    n.store.down, n.store.nospace = False, True
    with pytest.raises(NoSpace):
        asyncio.run(n.nodes())
    n.store.nospace, n.store.too_large = False, True
    with pytest.raises(TooLarge):
        asyncio.run(n.nodes())
    s = scrape(n)
    assert sample(s, "lclusterd_etcd_request_errors_total", kind="unreachable") == 1
    assert sample(s, "lclusterd_etcd_request_errors_total", kind="nospace") == 1
    assert sample(s, "lclusterd_etcd_request_errors_total", kind="other") == 1
    # 3 + (2 up to the unreachable cluster) + (1: check_space) + 3, failed calls timed too.
    assert sample(s, "lclusterd_etcd_request_seconds_count") == 9


def test_metrics_count_prime_changes(tmp_path):
    n = make_node(tmp_path)
    n.lease = 77
    asyncio.run(n.fill_slots())  # campaign: taken
    assert n.primed and sample(scrape(n), "lclusterd_prime_changes_total") == 1
    asyncio.run(n.fill_slots())  # kept: no change
    for u in (U1, U2):
        n.store.put(job(job_uuid=u))
    asyncio.run(n.fill_slots())  # both started, still primed
    asyncio.run(n.fill_slots())  # full: resigned
    s = scrape(n)
    assert not n.primed and sample(s, "lclusterd_prime_changes_total") == 2
    assert sample(s, "lclusterd_primed") == 0
    asyncio.run(n.fence("test"))  # not primed: a fence changes nothing here
    assert sample(scrape(n), "lclusterd_prime_changes_total") == 2


def test_metrics_count_fences_and_the_jobs_they_lost(tmp_path):
    n = make_node(tmp_path)
    asyncio.run(n.fence("alone"))  # nobody to take our jobs: nothing stopped, no fence counted
    assert sample(scrape(n), "lclusterd_fenced_total") == 0
    n.store.put(on("me"))
    n.units.loaded[U1] = ACTIVE
    n.units.loaded[U2] = EXITED  # finished before the fence: keeps its result
    n.store.put(on("me", job_uuid=U2))
    n._others_live = True
    asyncio.run(n.fence("could not renew our lease"))
    assert n.units.killed == [U1]
    asyncio.run(n.sweep())  # U1's unit is gone (stopped): lost; U2 succeeded
    s = scrape(n)
    assert n.store.get(U1)[0].state == QUEUED and n.store.get(U2)[0].state == SUCCEEDED
    assert sample(s, "lclusterd_fenced_total") == 1
    assert sample(s, "lclusterd_fenced_jobs_total") == 1
    assert sample(s, "lclusterd_jobs_ended_total", result="lost") == 1
    # lclusterd-fence killed U3's unit while the daemon was down (its marker).
    U4 = "40000000-0000-4000-8000-000000000000"
    n.store.put(on("me", job_uuid=U3))
    n.units.loaded[U3] = KILLED
    (tmp_path / "fenced" / U3).touch()
    # U4's unit vanished without a fence (a reboot): lost, not fenced.
    n.store.put(on("me", job_uuid=U4))
    n.mine.add(U4)
    asyncio.run(n.sweep())
    s = scrape(n)
    assert n.store.get(U3)[0].state == QUEUED and n.store.get(U4)[0].state == QUEUED
    assert sample(s, "lclusterd_fenced_total") == 1
    assert sample(s, "lclusterd_fenced_jobs_total") == 2
    assert sample(s, "lclusterd_jobs_ended_total", result="lost") == 3
