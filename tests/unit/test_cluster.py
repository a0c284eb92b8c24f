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


# --- the node against etcd in memory (tests.memstore) and fake units -------------

import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess
import threading  # noqa: E402
import time  # noqa: E402

from lclusterd import node as node_module  # noqa: E402
from lclusterd.node import Caller, Node  # noqa: E402
from lclusterd.store import NoSpace, Unavailable  # noqa: E402
from tests.memstore import MemStore  # noqa: E402

ACTIVE = core.UnitStatus("active", "running", "success", 0, 0)
EXITED = core.UnitStatus("active", "exited", "success", core.CLD_EXITED, 0)
KILLED = core.UnitStatus("failed", "failed", "signal", core.CLD_KILLED, 9)
ROOT = Caller(0, 0, "root")


class CountingStore(MemStore):
    """Counts lease renewals (the heartbeat's calls)."""

    renewals = 0

    def renew(self, lease, timeout=None):
        self.renewals += 1
        return super().renew(lease, timeout)


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


def make_node(tmp_path, store=None, units=None, name="me", slots=2, **kw):
    cfg = config.from_mapping({"node_name": name, "slots": str(slots), "lease_ttl": "8",
                               "cpus": "4", "memory": "8G"}, exists=lambda path: False)
    return Node(cfg, store if store is not None else MemStore(), units or FakeUnits(),
                run_dir=str(tmp_path / name), machine=f"machine-of-{name}", **kw)


def register(n, ttl=8):
    """What keep_lease does once: a lease, and the registration under it."""
    lease = n.store.grant(ttl)
    info = n.membership.registration()
    n.store.register(info, lease)
    n.membership.lease, n.membership._published = lease, info
    return lease


def other_node(store, name="other", ttl=60, **info):
    """Another live node's registration."""
    lease = store.grant(ttl)
    store.register({"name": name, "slots": 2, "cpus": 4.0, "memory": 8 << 30, **info}, lease)
    return lease


def put(store, j):
    """A record as it stands (any state), with its index keys."""
    store.submit(j)


def on(node_name, state=RUNNING, job_uuid=U1, **changes):
    j = core.transition(job(job_uuid=job_uuid), STARTING, now=1.0, node=node_name)
    return j if state == STARTING else core.transition(j, RUNNING, started_at=1.1, **changes)


async def dispatch(n):
    """A pass of the placer (prime and placement), then of the node's loop."""
    if await n.membership.hold_prime():
        await n.placer.place()
    await n.runner.start_assigned()
    await n.runner.sweep()  # START_UNIT: what the watch did not start


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
    put(n.store, on("other"))  # taken over by another node while we were cut off
    n.runner.mine = {U1}  # what we held before the fence
    asyncio.run(n.runner.sweep())
    assert n.mine == set() and n.membership.registration()["running"] == 0
    assert n.membership.registration()["free"] == 2


def test_a_unit_whose_record_is_gone_is_stopped_and_released(tmp_path, caplog):
    """Issue 10 item 10: it would hold its slot for ever."""
    n = make_node(tmp_path)
    n.units.loaded[U1] = ACTIVE  # a job unit; its record deleted (etcdctl del)
    n.runner.mine = {U1}
    asyncio.run(n.runner.sweep())
    assert n.units.released == [U1] and f"job {U1}: its record is gone from etcd" in caplog.text
    asyncio.run(n.runner.sweep())  # its slot is free once the unit is gone
    assert n.mine == set()


def test_the_reservation_of_a_record_deleted_by_hand_is_dropped(tmp_path, caplog):
    """Found by the cluster tests: the record deleted (etcdctl del) after its
    job was placed here left assigned/me/<uuid>, a slot lost for good."""
    n = make_node(tmp_path)
    queued = job()
    n.store.submit(queued)
    [_] = n.store.update_many([(queued, on("me", STARTING), n.store.get(U1)[1])])
    n.units.loaded[U1] = ACTIVE
    with n.store._lock:  # the record alone, as etcdctl del does
        n.store._apply([("delete", f"{n.store.prefix}/jobs/{U1}")])
    asyncio.run(n.runner.sweep())
    assert n.store.assigned("me") == {"me": {}}
    assert f"job {U1}: its record is gone from etcd; its reservation here is dropped" in caplog.text


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
    register(n)
    put(n.store, job(job_uuid=U1))
    asyncio.run(dispatch(n))
    failed = n.store.get(U1)[0]
    assert failed.state == FAILED and "could not be started" in failed.reason
    assert type(error).__name__ in failed.reason and "\n" not in failed.reason
    assert n.mine == set() and n.store.queued(10) == [] and n.store.assigned() == {}
    asyncio.run(dispatch(n))  # nothing placed again
    assert n.store.get(U1)[0].state == FAILED and len(n.store.get(U1)[0].attempts) == 1


def test_systemd_refusing_says_so(tmp_path):
    from lclusterd.units import Refused
    n = make_node(tmp_path)
    n.units.start_error = Refused("Unit lcluster-job@x.service already exists.")
    register(n)
    put(n.store, job(job_uuid=U1))
    asyncio.run(dispatch(n))
    assert n.store.get(U1)[0].reason == "systemd refused to start it: Unit lcluster-job@x.service already exists."


def test_a_job_assigned_here_is_started_from_the_watch_or_the_sweep(tmp_path):
    """K2: starting = assigned to us; our runner starts it (the watch's
    event), or the sweep does (core.START_UNIT) if the event was missed."""
    n = make_node(tmp_path)
    register(n)
    put(n.store, on("me", STARTING, job_uuid=U1))
    n.runner.assignment_events([(U1, False)])
    asyncio.run(n.runner.start_assigned())
    assert n.units.started == [U1] and n.store.get(U1)[0].state == STARTING
    asyncio.run(n.runner.record_ends({}))  # running is written with the next write, or soon
    assert n.store.get(U1)[0].state == STARTING
    n.runner.started[U1] = n.runner.started[U1][:3] + (0.0,)  # due now
    asyncio.run(n.runner.record_ends({}))
    assert n.store.get(U1)[0].state == RUNNING
    put(n.store, on("me", STARTING, job_uuid=U2))  # no event
    asyncio.run(n.runner.sweep())
    assert n.units.started == [U1, U2] and n.runner.started
    asyncio.run(n.runner.record_ends({U1: EXITED}))  # (an end takes the starts with it)
    assert n.store.get(U2)[0].state == RUNNING and not n.runner.started
    n.membership.lease = None  # cut off: what is assigned to us may be another's by now
    put(n.store, on("me", STARTING, job_uuid=U3))
    n.runner.assignment_events([(U3, False)])
    asyncio.run(n.runner.start_assigned())
    asyncio.run(n.runner.sweep())
    assert n.units.started == [U1, U2]


KEY = core.signing_key("a-cluster-token-of-some-length")


def test_submit_signs_and_a_record_that_does_not_verify_never_runs(tmp_path, caplog):
    """Contract C3: a record written by someone with etcd access but no token."""
    n = make_node(tmp_path, signing_key=KEY)
    register(n)
    mine = asyncio.run(n.submit("echo hi", Caller(1000, 1000, "alice")))
    assert core.verify(n.store.get(mine.uuid)[0], KEY)
    forged = job(job_uuid=U2, submitted_at=0.0)  # uid 0: "run me as root"
    put(n.store, forged)
    asyncio.run(dispatch(n))
    assert n.units.started == [mine.uuid]
    record = n.store.get(U2)[0]
    assert record.state == FAILED and record.reason == core.UNSIGNED
    assert core.UNSIGNED in caplog.text


def test_submit_refuses_a_limit_no_node_can_enforce(tmp_path):
    """Contract C4 (issue 9 item 17), now for the cluster: refused only when
    no registered node enforces it; else placed on one that does."""
    n = make_node(tmp_path, enforceable=frozenset({"cpu", "pids"}))
    register(n)
    with pytest.raises(core.InvalidInput, match=r"^no node enforces --memory \(its memory cgroup controller\)$"):
        asyncio.run(n.submit("true", ROOT, {"memory": "64M"}))
    assert n.store.all_jobs() == []
    asyncio.run(n.submit("true", ROOT, {"cpus": "0.5", "tasks": "10"}))
    assert n.membership.registration()["enforces"] == ["cpu", "pids"]
    other_node(n.store, enforces=["cpu", "memory", "pids"])
    n.verbs._live = None  # (read at most once a poll_interval)
    big = asyncio.run(n.submit("true", ROOT, {"memory": "64M"}))
    asyncio.run(dispatch(n))
    assert n.store.get(big.uuid)[0].node == "other" and big.uuid not in n.units.started


def test_submit_refuses_a_job_that_could_never_fit(tmp_path):
    """Issue 11 item 3: refused at submission with the reason; nothing written."""
    n = make_node(tmp_path)
    register(n)
    with pytest.raises(core.InvalidInput, match=r"^no node has 16.0G of memory; the most: me 8.0G$"):
        asyncio.run(n.submit("true", ROOT, {"memory": "16G"}))
    with pytest.raises(core.InvalidInput, match="no node has gpu=1"):
        asyncio.run(n.submit("true", ROOT, {"constraints": ["gpu=1"]}))
    assert n.store.all_jobs() == []


def test_concurrent_submissions_share_one_read_of_the_registrations(tmp_path):
    """Issue 13 item 2: 32 clients at once read the nodes once, not 32 times."""
    n = make_node(tmp_path)
    register(n)
    reads = []
    cluster = n.store.cluster
    n.store.cluster = lambda: reads.append(1) or cluster()

    async def many():
        await asyncio.gather(*(n.submit("true", ROOT) for _ in range(32)))
    asyncio.run(many())
    assert len(reads) == 1 and len(n.store.all_jobs()) == 32
    def refused():
        raise core.Conflict("etcd said no")
    n.store.cluster = refused
    n.verbs._live = None
    with pytest.raises(core.Conflict):  # a failed read fails its submissions; the next reads again
        asyncio.run(many())
    n.store.cluster = cluster
    asyncio.run(n.submit("true", ROOT))
    assert len(n.store.all_jobs()) == 33


def test_submit_with_a_known_idempotency_key_returns_the_first_jobs(tmp_path):
    """Contract C5: the store writes nothing and names what it queued first."""
    n = make_node(tmp_path)
    array, first = asyncio.run(n.submit("true", ROOT, count=2, idempotency_key="k1"))
    again = asyncio.run(n.submit("true", ROOT, count=2, idempotency_key="k1"))
    assert again == (array, first) and len(n.store.all_jobs()) == 2
    asyncio.run(n.submit("true", ROOT))
    assert len(n.store.all_jobs()) == 3


def test_submit_past_the_users_quota_is_refused(tmp_path):
    """Contract C6."""
    n = make_node(tmp_path)
    n.config.max_queued_per_user = 3
    alice = Caller(os.getuid() or 1000, 1000, "alice")
    asyncio.run(n.submit("true", alice, count=2))
    with pytest.raises(core.QuotaExceeded, match="alice has 2 job.s. queued; at most 3"):
        asyncio.run(n.submit("true", alice, count=2))
    assert len(n.store.all_jobs()) == 2
    asyncio.run(n.submit("true", ROOT, count=5))  # root is trusted


def test_registration_names_the_machine_and_its_capacity(tmp_path):
    """Contract C2: a restart of this node is told from a namesake elsewhere; K3."""
    info = make_node(tmp_path).membership.registration()
    assert info["machine"] == "machine-of-me"
    assert (info["cpus"], info["memory"], info["labels"]) == (4.0, 8 << 30, {"node": "me"})
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
    store = CountingStore()
    n = make_node(tmp_path, store=store, lease_stores=[store])
    n.config.lease_ttl = 2  # a renewal every 0.25 s
    other_node(store)
    before = time.monotonic()
    run_heartbeat(n, 0.7)
    fence = json.loads((tmp_path / "me" / "fence.json").read_text())
    assert fence["node"] == "me" and fence["pid"] == os.getpid() and fence["others_live"] is True
    assert store.renewals >= 2
    # The last renewal was sent within the last HEARTBEAT x TTL.
    assert before + 0.25 < fence["deadline"] - 2 * node_module.FENCE_AFTER <= time.monotonic()
    assert not (tmp_path / "me" / "fence.json.tmp").exists()


def test_a_dead_etcd_member_does_not_delay_the_renewal(tmp_path):
    """Issue 9 item 8: every endpoint is asked at once; a member that does not
    answer (cut off, or without a leader) costs nothing."""
    class Hanging(MemStore):
        def renew(self, lease, timeout=None):
            time.sleep(1.5)
            raise Unavailable("etcd is unreachable at http://10.0.0.1:2379 (timeout)")
    alive = CountingStore()
    lease = alive.grant(8)
    n = make_node(tmp_path, lease_stores=[Hanging(), alive])

    async def renew():
        t = time.monotonic()
        ok = await n.membership._renew(lease, 1.0)
        return ok, time.monotonic() - t
    ok, took = asyncio.run(renew())
    assert ok and took < 0.5 and alive.renewals == 1
    n2 = make_node(tmp_path, lease_stores=[Hanging()])
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(n2.membership._renew(lease, 0.2))


def test_the_node_fences_at_its_deadline_and_marks_what_it_killed(tmp_path):
    """Issue 9 item 9: stopped by the deadline from the last confirmed renewal;
    a unit killed by a fence is lost, not failed (contract C1's markers)."""
    class Silent(MemStore):
        def renew(self, lease, timeout=None):
            raise Unavailable("etcd is unreachable")
    store = Silent()
    other_node(store)
    n = make_node(tmp_path, store=store, lease_stores=[store])
    n.config.lease_ttl = 2
    n.units.loaded[U1] = ACTIVE
    n.units.loaded[U2] = EXITED  # done, its end not recorded yet: not killed, not lost
    put(store, on("me"))
    killed_at = []
    n.units.kill = lambda u: killed_at.append((u, time.monotonic())) or asyncio.sleep(0)
    t = time.monotonic()
    run_heartbeat(n, 1.4)
    # Registered at t, never renewed: killed FENCE_AFTER x TTL later (then registered afresh).
    ((killed, at),) = killed_at
    assert killed == U1 and 1.0 <= at - t <= 1.1
    fenced = tmp_path / "me" / "fenced"
    assert (fenced / U1).exists() and not (fenced / U2).exists()
    # The record: lost (requeued), never failed; the marker is then done with.
    asyncio.run(n.runner.record_end(U1, KILLED))
    assert n.store.get(U1)[0].state == QUEUED and "lost" in n.store.get(U1)[0].reason
    assert not (fenced / U1).exists()


def test_a_unit_killed_by_lclusterd_fence_is_recorded_lost(tmp_path):
    """Contract C1: the marker the fence writes while the daemon was down."""
    n = make_node(tmp_path)
    put(n.store, on("me"))
    fenced = tmp_path / "me" / "fenced"
    fenced.mkdir(parents=True)
    (fenced / U1).touch()
    n.units.loaded[U1] = KILLED
    asyncio.run(n.runner.sweep())
    record = n.store.get(U1)[0]
    assert record.state == QUEUED and record.attempts[-1]["outcome"] == LOST
    assert not (fenced / U1).exists() and n.mine == set()
    # A stale marker (its unit gone, its job no longer ours) is removed.
    (fenced / U2).touch()
    asyncio.run(n.runner.sweep())
    assert not (fenced / U2).exists()


def test_a_dead_nodes_jobs_are_requeued_only_after_the_guard(tmp_path):
    """Issue 9 item 9: no earlier than the lease's expiry (seen: its
    registration gone) plus REQUEUE_GUARD x TTL; found by its assignments."""
    n = make_node(tmp_path)
    register(n)
    n.config.lease_ttl = 2  # guard 0.5 s
    n.store.revoke(other_node(n.store, "dead"))  # a member whose lease is gone
    put(n.store, on("dead"))
    put(n.store, on("me", job_uuid=U2))

    async def watch():
        assert await n.membership.hold_prime()  # the primed node judges the others
        await n.membership.watch_cluster()
        first = n.store.get(U1)[0].state
        await asyncio.sleep(0.3)
        await n.membership.watch_cluster()
        second = n.store.get(U1)[0].state
        await asyncio.sleep(0.3)
        await n.membership.watch_cluster()
        return first, second, n.store.get(U1)[0].state
    assert asyncio.run(watch()) == (RUNNING, RUNNING, QUEUED)
    assert "dead" in n.store.cluster()[2]  # shown failed at once
    assert n.store.get(U2)[0].state == RUNNING and n.store.assigned() == {"me": {U2: {
        "cpus": 0.0, "memory": 0, "array": None}}} or list(n.store.assigned()) == ["me"]


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

    class Taken(MemStore):
        def register(self, info, lease, timeout=None):
            assert info["machine"] == "machine-of-me"
            raise etcd_store.NameTaken("me", "http://10.0.0.9:7800")
    n = make_node(tmp_path, store=Taken(), lease_stores=[MemStore()])
    with pytest.raises(etcd_store.NameTaken, match="10.0.0.9"):
        run_heartbeat(n, 0.5)
    assert n.lease is None


def test_prune_compacts_etcds_history(tmp_path):
    """Contract C7 (issue 10 item 9): once a prune interval, by one node."""
    class Compacting(MemStore):
        compactions = 0

        def compact(self, margin=100):
            self.compactions += 1
            return super().compact(margin)
    n = make_node(tmp_path, store=Compacting())
    asyncio.run(n.history.prune())
    assert n.store.compactions == 1


def test_prune_deletes_old_records_and_their_index_keys(tmp_path):
    n = make_node(tmp_path)
    n.config.max_finished_jobs = 1
    for u, at in ((U1, time.time() - 2), (U2, time.time() - 1)):
        j = core.transition(on("me", job_uuid=u), SUCCEEDED, ended_at=at)
        put(n.store, j)
    assert asyncio.run(n.history.prune()) == 1
    assert [j.uuid for j, _ in n.store.all_jobs()] == [U2]


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
    put(n.store, on("me", state))
    before = n.store.get(U1)
    with pytest.raises(UnitsUnavailable):
        asyncio.run(n.remove(U1, ROOT))
    assert n.store.get(U1) == before


def test_removejob_whose_stop_loses_the_bus_stays_cancelled_and_says_why(tmp_path):
    """Cancelled is written before the stop; a stop that then fails leaves it
    to the sweep (RELEASE_UNIT once systemd answers), and the record says so."""
    n = make_node(tmp_path, units=BusDownUnits(status_fails=False))
    n.units.loaded[U1] = ACTIVE
    put(n.store, on("me"))
    removed = asyncio.run(n.remove(U1, ROOT))
    assert removed.state == CANCELLED and n.store.get(U1)[0] == removed
    assert removed.reason.startswith("removed by root; its unit is stopped once systemd answers")
    assert "\n" not in removed.reason and n.store.assigned() == {}
    assert core.reconcile({U1: removed}, {U1: ACTIVE}, set(), "me", 10.0, 5) == [(core.RELEASE_UNIT, U1)]


def test_removejob_of_a_queued_job_needs_no_systemd(tmp_path):
    n = make_node(tmp_path, units=BusDownUnits())
    put(n.store, job(job_uuid=U1))
    assert asyncio.run(n.remove(U1, ROOT)).state == CANCELLED


def idle_passes(n, passes):
    """What the node's loop and the placer do on every pass, a sweep included."""
    async def go():
        for _ in range(passes):
            await n.runner.sweep()
            await n.membership.watch_cluster()
            await n.membership.publish()
            await n.runner.record_changed()
            await n.runner.start_assigned()
            if await n.membership.hold_prime():
                await n.placer.place()
    asyncio.run(go())


def test_an_idle_primed_node_writes_nothing_per_pass(tmp_path):
    """Issue 13 item 3: it re-campaigned (a transaction) every CLAIM_POLL."""
    n = make_node(tmp_path)
    register(n)
    before = n.store.revision
    idle_passes(n, 1)
    assert n.primed and n.store.revision == before + 1  # the campaign
    idle_passes(n, 50)
    assert n.store.revision == before + 1 and n.primed
    n.store.resign("me")  # deleted by hand: the next pass sees it, and we take it again
    idle_passes(n, 1)
    assert n.primed and n.store.cluster()[3] == "me"
    n.store.revoke(n.membership.lease)  # expired: the prime under it is gone with it
    register(n)  # registered afresh
    before = n.store.revision
    assert asyncio.run(n.membership.hold_prime()) and n.store.revision == before + 1


def test_an_idle_node_whose_prime_another_holds_writes_nothing(tmp_path):
    n = make_node(tmp_path)
    register(n)
    theirs = other_node(n.store)
    n.store.campaign("other", theirs)
    idle_passes(n, 1)  # one campaign, lost (it writes nothing)
    before = n.store.revision
    idle_passes(n, 50)
    assert n.store.revision == before and not n.primed
    n.store.revoke(theirs)  # the other node died: the prime's watch says it is free
    n.membership.prime_events([("", True)])
    idle_passes(n, 1)
    assert n.primed


def test_only_the_primed_node_reads_the_whole_cluster_each_sweep(tmp_path):
    """Every node reading every registration every sweep was N² reads."""
    store = ClusterCounting()
    n = make_node(tmp_path, store=store)
    register(n)
    theirs = other_node(store)
    store.campaign("other", theirs)
    idle_passes(n, 1)
    reads = store.reads
    idle_passes(n, 20)
    assert store.reads == reads and not n.primed and n.membership.others_live
    store.revoke(theirs)  # the watch's event missed: the read once a lease_ttl finds the prime free
    n.membership._next_look = 0.0
    idle_passes(n, 1)
    assert n.primed
    reads = store.reads
    idle_passes(n, 3)
    assert store.reads == reads + 3  # primed: it judges the others, every sweep


class ClusterCounting(MemStore):
    reads = 0

    def cluster(self):
        self.reads += 1
        return super().cluster()


def test_the_primed_node_keeps_the_prime_when_its_node_is_full(tmp_path):
    """It schedules the cluster now: full itself, it places on the others."""
    n = make_node(tmp_path, slots=1)
    register(n)
    other_node(n.store)
    for u in (U1, U2, U3):
        put(n.store, job(job_uuid=u))
    asyncio.run(dispatch(n))
    assert n.primed and n.store.cluster()[3] == "me"
    placed = {u: n.store.get(u)[0].node for u in (U1, U2, U3)}
    assert sorted(placed.values()) == ["me", "other", "other"] and len(n.units.started) == 1
    assert n.placer.writes == 1  # the three in one guarded transaction
    before = n.store.revision
    asyncio.run(n.placer.place())  # nothing to place: no transaction
    assert n.store.revision == before and n.placer.writes == 1


def test_counters_count_submissions_starts_and_ends_as_they_happen(tmp_path):
    """Issue 12 item 2: what GET /metrics shows, counted by the node."""
    n = make_node(tmp_path)
    register(n)
    _, jobs = asyncio.run(n.submit("true", ROOT, count=3, idempotency_key="k"))
    assert n.counters.submitted == 3
    asyncio.run(n.submit("true", ROOT, count=3, idempotency_key="k"))  # the client's retry
    assert n.counters.submitted == 3
    asyncio.run(dispatch(n))  # 2 slots: 2 started
    assert n.counters.started == 2 and n.counters.dispatch_buckets()[-1] == ("+Inf", 2)
    started = [u for u in n.units.started]
    n.units.loaded[started[0]] = EXITED
    n.unit_changed(started[0])
    asyncio.run(n.runner.record_changed())
    asyncio.run(n.remove(started[1], ROOT))
    asyncio.run(n.remove(started[1], ROOT))  # again: already over, counted once
    assert n.counters.ended[SUCCEEDED] == 1 and n.counters.ended[CANCELLED] == 1
    queued = next(j.uuid for j in jobs if j.uuid not in started)
    asyncio.run(n.remove(queued, ROOT))  # never ran on a node: no end of this node's
    assert sum(n.counters.ended.values()) == 2


def test_counters_count_a_failed_start_and_a_lost_attempt(tmp_path):
    n = make_node(tmp_path)
    register(n)
    n.units.start_error = RuntimeError("boom")
    put(n.store, job(job_uuid=U1))
    asyncio.run(dispatch(n))
    assert n.counters.started == 0 and n.counters.ended[FAILED] == 1
    put(n.store, on("me", job_uuid=U2))  # running here; its unit gone (a reboot)
    asyncio.run(n.runner.sweep())
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
    class Flaky(MemStore):
        too_large = cluster_down = False

        def cluster(self):
            if self.cluster_down:
                raise Unavailable("etcd is unreachable at http://127.0.0.1:2379 (connection refused)")
            time.sleep(0.03)  # one slow call: past the 0.025 s bucket
            return super().cluster()

        def warned(self):
            if self.too_large:
                raise TooLarge("etcd refused the request: too large")
            return super().warned()
    n = make_node(tmp_path, store=Flaky())
    asyncio.run(n.nodes())  # check_space, cluster, drains, assigned, warned: 5 calls, no error
    s = scrape(n)
    assert sample(s, "lclusterd_etcd_request_seconds_count") == 5
    assert sample(s, "lclusterd_etcd_request_seconds_bucket", le="0.025") <= 4
    # (not 0.05: under a loaded CI machine a 0.03 s sleep may take longer)
    assert sample(s, "lclusterd_etcd_request_seconds_bucket", le="1") == 5
    assert sample(s, "lclusterd_etcd_request_seconds_sum") >= 0.03
    for kind in metrics.ETCD_ERROR_KINDS:
        assert sample(s, "lclusterd_etcd_request_errors_total", kind=kind) == 0
    n.store.cluster_down = True
    with pytest.raises(Unavailable):
        asyncio.run(n.nodes())
    n.store.cluster_down, n.store.nospace = False, True
    with pytest.raises(NoSpace):
        asyncio.run(n.nodes())
    n.store.nospace, n.store.too_large = False, True
    with pytest.raises(TooLarge):
        asyncio.run(n.nodes())
    s = scrape(n)
    assert sample(s, "lclusterd_etcd_request_errors_total", kind="unreachable") == 1
    assert sample(s, "lclusterd_etcd_request_errors_total", kind="nospace") == 1
    assert sample(s, "lclusterd_etcd_request_errors_total", kind="other") == 1
    # 5 + (2 up to the unreachable cluster) + (1: check_space) + 5, failed calls timed too.
    assert sample(s, "lclusterd_etcd_request_seconds_count") == 13


def test_metrics_count_prime_changes(tmp_path):
    n = make_node(tmp_path)
    register(n)
    asyncio.run(n.membership.hold_prime())  # campaign: taken
    assert n.primed and sample(scrape(n), "lclusterd_prime_changes_total") == 1
    for u in (U1, U2):
        put(n.store, job(job_uuid=u))
    asyncio.run(dispatch(n))  # both started, still primed (kept while the lease lives)
    asyncio.run(dispatch(n))
    assert n.primed and sample(scrape(n), "lclusterd_prime_changes_total") == 1
    asyncio.run(n.membership.fence("test"))  # alone: keeps its jobs, gives the prime up
    s = scrape(n)
    assert not n.primed and sample(s, "lclusterd_prime_changes_total") == 2
    assert sample(s, "lclusterd_primed") == 0


def test_metrics_count_fences_and_the_jobs_they_lost(tmp_path):
    n = make_node(tmp_path)
    asyncio.run(n.membership.fence("alone"))  # nobody to take our jobs: nothing stopped, no fence counted
    assert sample(scrape(n), "lclusterd_fenced_total") == 0
    put(n.store, on("me"))
    n.units.loaded[U1] = ACTIVE
    n.units.loaded[U2] = EXITED  # finished before the fence: keeps its result
    put(n.store, on("me", job_uuid=U2))
    n.membership.others_live = True
    asyncio.run(n.membership.fence("could not renew our lease"))
    assert n.units.killed == [U1]
    asyncio.run(n.runner.sweep())  # U1's unit is gone (stopped): lost; U2 succeeded
    s = scrape(n)
    assert n.store.get(U1)[0].state == QUEUED and n.store.get(U2)[0].state == SUCCEEDED
    assert sample(s, "lclusterd_fenced_total") == 1
    assert sample(s, "lclusterd_fenced_jobs_total") == 1
    assert sample(s, "lclusterd_jobs_ended_total", result="lost") == 1
    # lclusterd-fence killed U3's unit while the daemon was down (its marker).
    U4 = "40000000-0000-4000-8000-000000000000"
    put(n.store, on("me", job_uuid=U3))
    n.units.loaded[U3] = KILLED
    (tmp_path / "me" / "fenced" / U3).touch()
    # U4's unit vanished without a fence (a reboot): lost, not fenced.
    put(n.store, on("me", job_uuid=U4))
    n.runner.mine.add(U4)
    asyncio.run(n.runner.sweep())
    s = scrape(n)
    assert n.store.get(U3)[0].state == QUEUED and n.store.get(U4)[0].state == QUEUED
    assert sample(s, "lclusterd_fenced_total") == 1
    assert sample(s, "lclusterd_fenced_jobs_total") == 2
    assert sample(s, "lclusterd_jobs_ended_total", result="lost") == 3


def test_remove_of_an_unknown_uuid_says_no_job_matches(tmp_path):
    n = make_node(tmp_path)
    with pytest.raises(LookupError, match=f"^no job matches '{U1}'$"):
        asyncio.run(n.remove(U1, ROOT))
    alice = Caller(1000, 1000, "alice")
    array, _ = asyncio.run(n.submit("true", ROOT, count=2))
    with pytest.raises(core.Forbidden):  # root's array
        asyncio.run(n.remove(array, alice))
    assert {j.state for j, _ in n.store.all_jobs()} == {QUEUED}


def test_the_placer_reads_past_a_head_that_waits(tmp_path):
    """More jobs waiting at the head (dependencies) than free slots plus
    LOOKAHEAD: the ones behind them are placed all the same."""
    from lclusterd import placer
    n = make_node(tmp_path, slots=2)
    register(n)
    parent = on("me", job_uuid=U1)
    put(n.store, parent)
    waiting = [job(job_uuid=f"{i:08x}-0000-4000-8000-000000000000", submitted_at=200.0 + i,
                   after=(U1,)) for i in range(placer.LOOKAHEAD + 10)]
    for j in waiting:
        put(n.store, j)
    behind = job(job_uuid=U2, submitted_at=900.0)
    put(n.store, behind)
    asyncio.run(dispatch(n))
    assert n.store.get(U2)[0].state in (STARTING, RUNNING)
    assert all(n.store.get(j.uuid)[0].state == QUEUED for j in waiting)


def test_a_placer_pass_assigns_at_most_max_assign(tmp_path, monkeypatch):
    from lclusterd import placer
    monkeypatch.setattr(placer, "MAX_ASSIGN", 2)
    n = make_node(tmp_path, slots=8)
    register(n)
    for u in (U1, U2, U3):
        put(n.store, job(job_uuid=u))
    assert asyncio.run(n.membership.hold_prime())
    assert asyncio.run(n.placer.place())
    assert sorted(n.store.get(u)[0].state for u in (U1, U2, U3)) == [QUEUED, STARTING, STARTING]
    asyncio.run(n.placer.place())
    assert {n.store.get(u)[0].state for u in (U1, U2, U3)} == {STARTING}


class ReindexCounting(MemStore):
    reindexed = 0
    positions = 0

    def reindex(self):
        self.reindexed += 1
        return super().reindex()

    def queue_position(self, job):
        self.positions += 1
        return super().queue_position(job)


def test_taking_the_prime_reindexes_once(tmp_path):
    """Records of an older lclusterd lack assigned/ keys: the new primed node writes them."""
    store = ReindexCounting()
    n = make_node(tmp_path, store=store)
    register(n)
    assert asyncio.run(n.membership.hold_prime()) and store.reindexed == 1
    assert asyncio.run(n.membership.hold_prime()) and store.reindexed == 1
    store.resign("me")
    n.membership.primed = False
    assert asyncio.run(n.membership.hold_prime())
    register(n)  # a new lease: the prime taken afresh
    n.membership.primed = False
    assert asyncio.run(n.membership.hold_prime()) and store.reindexed == 2


def test_waiting_reads_the_queue_positions_once(tmp_path):
    store = ReindexCounting()
    n = make_node(tmp_path, store=store)
    register(n)
    jobs = [job(job_uuid=u, submitted_at=100.0 + i) for i, u in enumerate((U1, U2, U3))]
    for j in jobs:
        put(store, j)
    answer = asyncio.run(n.waiting(jobs))
    assert [answer[u]["ahead"] for u in (U1, U2, U3)] == [0, 1, 2] and store.positions == 0


def test_what_is_kept_per_job_is_kept_for_live_jobs_only(tmp_path):
    """A record moved by another node's write (cancelled, requeued) leaves
    nothing behind here after a sweep."""
    n = make_node(tmp_path)
    register(n)
    put(n.store, job(job_uuid=U1))
    asyncio.run(dispatch(n))
    assert U1 in n.applier.written
    found, rev = n.store.get(U1)
    n.store.update(found, core.transition(found, CANCELLED, ended_at=5.0, reason="elsewhere"), rev)
    n.units.loaded.pop(U1)  # its unit gone too
    asyncio.run(n.runner.sweep())
    assert n.applier.written == {} and n.runner.recheck == {} and n.mine == set()


def test_a_node_that_ended_a_tenth_of_the_cap_prunes_before_its_interval(tmp_path):
    """make bench's 100,000 jobs at ~130/s: a 300 s interval let the records
    grow to 5 times max_finished_jobs, and the node's RSS with them."""
    n = make_node(tmp_path)
    n.config.max_finished_jobs = 100
    passes = []

    async def prune():
        passes.append(1)
        return 0
    n.history.prune = prune
    asyncio.run(n.history.prune_when_due(0.0))  # the first look
    assert len(passes) == 1
    n.counters.ended["succeeded"] += 9
    asyncio.run(n.history.prune_when_due(1.0))
    assert len(passes) == 1  # 9 ends: the interval still counts
    n.counters.ended["failed"] += 1
    asyncio.run(n.history.prune_when_due(2.0))
    assert len(passes) == 2  # 10 = a tenth of the cap
    asyncio.run(n.history.prune_when_due(3.0))
    assert len(passes) == 2


class DependentsCounting(MemStore):
    """Counts the reads of dependents: one call per parent, or per generation."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def dependents(self, parent_uuid):
        self.reads.append("dependents")
        return super().dependents(parent_uuid)

    def dependents_many(self, parent_uuids):
        self.reads.append("dependents_many")
        return {p: MemStore.dependents(self, p) for p in parent_uuids}


def test_the_dependents_of_many_ended_jobs_are_read_in_one_call():
    """The primed node looks at every job that ended (make bench: an etcd
    call a job was its dependents' read): one read per generation."""
    import asyncio

    from lclusterd import metrics, placer
    from lclusterd.applier import Applier
    store = DependentsCounting()
    parents = [job(job_uuid=u) for u in (U1, U2, U3)]
    child = job(job_uuid="40000000-0000-4000-8000-000000000000", after=(U1, U2),
                after_mode=core.AFTER_OK)
    store.submit_many(parents + [child])
    for p in parents[:2]:
        current, rev = store.get(p.uuid)
        store.update(current, core.transition(current, CANCELLED, ended_at=101.0, reason="x"), rev)
    applier = Applier(store, metrics.Counters(), "n1")
    cancelled = asyncio.run(placer.cancel_dependents(applier, [U1, U2, U3], lambda: 102.0))
    assert cancelled == [child.uuid]
    assert store.get(child.uuid)[0].state == CANCELLED
    assert store.reads == ["dependents_many", "dependents_many"]  # the parents', then the child's
