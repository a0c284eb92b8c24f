"""One contract for both stores: lclusterd.store.Store on a real etcd and
tests.memstore.MemStore. Every test runs against each (the `any_store`
fixture), so the in-memory store that the node's unit tests use answers as
etcd does (issue 11 item 7; contract K4 in the team's brief)."""

import threading
import time
import uuid

import etcd3
import pytest

from lclusterd import core
from lclusterd import store as etcd_store
from lclusterd.store import LeaseExpired, NameTaken, Store
from tests.memstore import MemStore

WAIT = 10  # seconds a watch may take to call back (it takes milliseconds)


class Clock:
    """A clock the test moves: MemStore's leases expire by it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture(params=["memory", "etcd"])
def kind(request):
    return request.param


@pytest.fixture
def any_store(request, kind, prefix):
    if kind == "memory":
        s = MemStore(prefix=prefix, clock=Clock())
    else:
        s = Store([request.getfixturevalue("etcd").endpoint], prefix=prefix)
    yield s
    s.close()


def make_job(submitted_at=None, command="echo hello", **changes):
    job = core.new_job(command, 1000, 1000, "alice", now=submitted_at or time.time(),
                       submitter="alice", submitter_uid=1000)
    return core.dataclasses.replace(job, **changes) if changes else job


def assign(job, node="n1", now=None):
    return core.transition(job, core.STARTING, now=now or time.time(), node=node)


def queued_uuids(s, limit=1000):
    return [job.uuid for job, _ in s.queued(limit)]


class Events:
    """What a watch delivered, for a test to wait on."""

    def __init__(self):
        self.seen, self.calls, self.cond = [], [], threading.Condition()

    def __call__(self, events):
        with self.cond:
            self.calls.append(list(events))
            self.seen.extend(events)
            self.cond.notify_all()

    def wait_for(self, wanted):
        deadline = time.monotonic() + WAIT
        with self.cond:
            while not all(e in self.seen for e in wanted):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"watch delivered {self.seen}, not {wanted}")
                self.cond.wait(left)


# --- guarded updates -----------------------------------------------------------

def test_update_is_guarded_by_the_records_revision(any_store):
    job = make_job()
    any_store.submit(job)
    _, rev = any_store.get(job.uuid)
    claimed = assign(job)
    new_rev = any_store.update(job, claimed, rev)
    assert new_rev and new_rev > rev
    assert any_store.get(job.uuid) == (claimed, new_rev)
    assert any_store.update(job, assign(job, "n2"), rev) is False  # stale revision
    assert any_store.get(job.uuid)[0].node == "n1"
    assert queued_uuids(any_store) == []


def test_update_with_prime_needs_the_prime(any_store):
    lease = any_store.grant(60)
    job = make_job()
    any_store.submit(job)
    _, rev = any_store.get(job.uuid)
    assert any_store.update(job, assign(job), rev, prime="n1") is False  # nobody primed
    assert any_store.campaign("n2", lease)
    assert any_store.update(job, assign(job), rev, prime="n1") is False  # another's
    assert any_store.update(job, assign(job), rev, prime="n2")


def test_update_many_writes_each_guarded_change(any_store):
    jobs = [make_job(submitted_at=1000.0 + i) for i in range(5)]
    any_store.submit_many(jobs)
    revs = {u: rev for u, (_, rev) in any_store.get_many([j.uuid for j in jobs]).items()}
    # One of them moves under us (a user cancels it)
    moved = jobs[2]
    any_store.update(moved, core.transition(moved, core.CANCELLED, now=1.0), revs[moved.uuid])
    changes = [(j, assign(j, "n1"), revs[j.uuid]) for j in jobs]
    results = any_store.update_many(changes)
    assert results[2] is None
    written = [r for i, r in enumerate(results) if i != 2]
    assert all(isinstance(r, int) and r > max(revs.values()) for r in written)
    found = any_store.get_many([j.uuid for j in jobs])
    assert [found[j.uuid][0].state for j in jobs] == [core.STARTING, core.STARTING, core.CANCELLED,
                                                      core.STARTING, core.STARTING]
    for j, r in zip(jobs, results):
        if r is not None:
            assert found[j.uuid][1] == r
    assert set(any_store.assigned()["n1"]) == {j.uuid for i, j in enumerate(jobs) if i != 2}
    assert queued_uuids(any_store) == []


def test_update_many_under_a_prime_not_held_writes_nothing(any_store):
    lease = any_store.grant(60)
    assert any_store.campaign("n2", lease)
    jobs = [make_job(submitted_at=1000.0 + i) for i in range(3)]
    any_store.submit_many(jobs)
    found = any_store.get_many([j.uuid for j in jobs])
    changes = [(j, assign(j), found[j.uuid][1]) for j in jobs]
    assert any_store.update_many(changes, prime="n1") == [None, None, None]
    assert queued_uuids(any_store) == [j.uuid for j in jobs]
    assert any_store.assigned() == {}
    results = any_store.update_many(changes, prime="n2")
    assert all(results)


def test_update_many_past_one_transaction(any_store):
    """More changes than one etcd transaction takes: several, all written."""
    jobs = [make_job(submitted_at=1000.0 + i) for i in range(150)]
    for i in range(0, len(jobs), core.MAX_BATCH):
        any_store.submit_many(jobs[i:i + core.MAX_BATCH])
    found = any_store.get_many([j.uuid for j in jobs])
    assert len(found) == 150
    results = any_store.update_many([(j, assign(j, f"n{i % 3}"), found[j.uuid][1])
                                     for i, j in enumerate(jobs)])
    assert all(results)
    assert sum(len(v) for v in any_store.assigned().values()) == 150
    assert any_store.queue_position(jobs[0]) == (0, 0)


def test_update_many_of_large_records_stays_under_etcds_request_limit(any_store):
    """30 records of 64 KiB: 2 MiB, more than etcd takes in one request (1.5 MiB)."""
    jobs = [make_job(submitted_at=1000.0 + i, command="x" * core.MAX_COMMAND_BYTES) for i in range(30)]
    for i in range(0, 30, 15):
        any_store.submit_many(jobs[i:i + 15])
    found = any_store.get_many([j.uuid for j in jobs])
    results = any_store.update_many([(j, assign(j), found[j.uuid][1]) for j in jobs])
    assert all(results) and len(set(results)) >= 2  # two transactions at least
    assert len(any_store.assigned()["n1"]) == 30


def test_racing_placers_assign_each_job_once(any_store):
    """Four threads place the same 100 jobs, each on its own node, from the
    same read: every job ends on exactly one node, and the index agrees."""
    jobs = [make_job(submitted_at=1000.0 + i) for i in range(100)]
    for i in range(0, 100, 50):
        any_store.submit_many(jobs[i:i + 50])
    heads = any_store.queued(100)
    won = {}

    def place(name):
        results = any_store.update_many([(job, assign(job, name), rev) for job, rev in heads])
        won[name] = [job.uuid for (job, _), r in zip(heads, results) if r is not None]
    threads = [threading.Thread(target=place, args=(f"n{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(u for uuids in won.values() for u in uuids) == sorted(j.uuid for j in jobs)
    found = any_store.get_many([j.uuid for j in jobs])
    assigned = any_store.assigned()
    for name, uuids in won.items():
        assert all(found[u][0].node == name for u in uuids)
        assert set(assigned.get(name, {})) == set(uuids)


def test_update_many_refuses_one_job_twice(any_store):
    job = make_job()
    any_store.submit(job)
    _, rev = any_store.get(job.uuid)
    with pytest.raises(ValueError):
        any_store.update_many([(job, assign(job), rev), (job, assign(job, "n2"), rev)])


def test_get_many_answers_those_that_exist(any_store):
    jobs = [make_job() for _ in range(3)]
    any_store.submit_many(jobs)
    missing = str(uuid.uuid4())
    found = any_store.get_many([jobs[0].uuid, missing, jobs[2].uuid])
    assert set(found) == {jobs[0].uuid, jobs[2].uuid}
    assert found[jobs[0].uuid] == any_store.get(jobs[0].uuid)
    assert any_store.get_many([]) == {}


def test_assigned_and_queue_reads_both_at_once_paged_past_a_page(request, kind, prefix):
    """The placer's first read: every assignment (more than a page here)
    and the queue's first keys' uuids, then the records of those still queued."""
    s = (MemStore(prefix=prefix, clock=Clock(), page_keys=3) if kind == "memory" else
         Store([request.getfixturevalue("etcd").endpoint], prefix=prefix, page_keys=3))
    try:
        jobs = [make_job(submitted_at=1000.0 + i) for i in range(9)]
        s.submit_many(jobs)
        revs = s.get_many([j.uuid for j in jobs[:5]])
        s.update_many([(j, assign(j, f"n{i % 2}"), revs[j.uuid][1]) for i, j in enumerate(jobs[:5])])
        waiting = [j.uuid for j in jobs[5:]]
        assigned, first = s.assigned_and_queue(2)
        assert assigned == s.assigned() and sum(len(v) for v in assigned.values()) == 5
        assert first == waiting[:2]
        assert s.assigned_and_queue(10)[1] == waiting[:3]  # a page at most, as queued()
        assert s.assigned_and_queue(0) == (assigned, [])
        found = s.queued_jobs([waiting[1], jobs[0].uuid, str(uuid.uuid4()), waiting[0]])
        assert [(j.uuid, rev) for j, rev in found] == [
            (u, s.get(u)[1]) for u in (waiting[1], waiting[0])]  # placed and missing left out
    finally:
        s.close()


# --- the assigned index through the lifecycle -------------------------------------

def test_assigned_follows_the_record_through_every_transition(any_store):
    job = make_job(cpus=1.5, memory=1 << 30)
    any_store.submit(job)
    assert any_store.assigned() == {}
    held = {"cpus": 1.5, "memory": 1 << 30, "array": None}

    def step(old, new):
        _, rev = any_store.get(old.uuid)
        assert any_store.update(old, new, rev)
        return new

    starting = step(job, assign(job, "n1"))
    assert any_store.assigned() == {"n1": {job.uuid: held}}
    assert any_store.assigned("n1") == {"n1": {job.uuid: held}}
    assert any_store.assigned("n2") == {"n2": {}}
    running = step(starting, core.transition(starting, core.RUNNING, now=2.0, started_at=2.0))
    assert any_store.assigned() == {"n1": {job.uuid: held}}
    # lost -> queued (one record change): the place on n1 is given back
    requeued = step(running, core.lose(running, "n1", 4.0))
    assert requeued.state == core.QUEUED
    assert any_store.assigned() == {}
    assert queued_uuids(any_store) == [job.uuid]
    again = step(requeued, assign(requeued, "n2"))
    assert any_store.assigned() == {"n2": {job.uuid: held}}
    assert queued_uuids(any_store) == []
    # warned keeps the place (its processes still hold the node); ending frees it
    running = step(again, core.transition(again, core.RUNNING, now=5.0, started_at=5.0))
    warned = step(running, core.warn(running, 6.0, "would not stop"))
    assert any_store.assigned() == {"n2": {job.uuid: held}}
    assert any_store.warned() == {job.uuid: "n2"}
    ended = step(warned, core.clear(warned, None, 7.0))
    assert any_store.assigned() == {}
    assert any_store.warned() == {}
    assert ended.state == core.FAILED


def test_deleting_a_live_record_drops_its_index_keys(any_store):
    job = make_job(cpus=1.0)
    any_store.submit(job)
    _, rev = any_store.get(job.uuid)
    running = assign(job, "n1")
    rev = any_store.update(job, running, rev)
    assert any_store.assigned()
    assert any_store.delete([(job.uuid, rev)]) == 1  # by uuid: the store finds its keys
    assert any_store.assigned() == {}
    assert any_store.get(job.uuid) is None


def test_deleting_queued_records_drops_their_queue_keys(any_store):
    jobs = [make_job(submitted_at=1000.0 + i) for i in range(3)]
    any_store.submit_many(jobs)
    found = any_store.get_many([j.uuid for j in jobs])
    assert any_store.delete([(found[jobs[0].uuid][0], found[jobs[0].uuid][1]),
                             (jobs[1].uuid, found[jobs[1].uuid][1])]) == 2
    assert queued_uuids(any_store) == [jobs[2].uuid]
    assert any_store.queued_count(1000) == 1
    assert any_store.delete([(jobs[2].uuid, found[jobs[2].uuid][1] + 1000)]) == 0  # moved: kept


def test_deleting_a_warned_record_given_as_a_job_drops_its_warned_key(any_store):
    job = make_job()
    any_store.submit(job)
    _, rev = any_store.get(job.uuid)
    running = core.transition(assign(job), core.RUNNING, now=2.0, started_at=2.0)
    rev = any_store.update(job, running, rev)
    warned = core.warn(running, 3.0, "would not stop")
    rev = any_store.update(running, warned, rev)
    assert any_store.warned() == {job.uuid: "n1"}
    assert any_store.delete([(warned, rev)]) == 1
    assert any_store.warned() == {} and any_store.assigned() == {}


def test_resolve_and_all_jobs(any_store):
    a = make_job()
    b = core.dataclasses.replace(make_job(), uuid=a.uuid[:8] + "-ffff-4fff-8fff-ffffffffffff")
    c = core.dataclasses.replace(make_job(), uuid="0" * 8 + a.uuid[8:])
    any_store.submit_many([a, b, c])
    assert any_store.resolve(a.uuid) == a.uuid
    assert any_store.resolve(c.uuid[:6]) == c.uuid
    with pytest.raises(core.AmbiguousRef):
        any_store.resolve(a.uuid[:8])
    with pytest.raises(LookupError):
        any_store.resolve("9999")
    records = any_store.all_jobs()
    assert sorted(j.uuid for j, _ in records) == sorted([a.uuid, b.uuid, c.uuid])
    assert all(any_store.get(j.uuid) == (j, rev) for j, rev in records)


def test_reindex_writes_what_records_of_an_older_version_lack(any_store, kind, request):
    """A job running since before the assigned/ index: only its record."""
    job = core.transition(assign(make_job(cpus=2.0)), core.RUNNING, now=2.0, started_at=2.0)
    key, value = f"{any_store.prefix}/jobs/{job.uuid}", etcd_store._encode(job)
    if kind == "memory":
        any_store._apply([any_store._put(key, value)])
    else:
        client = etcd3.client(port=request.getfixturevalue("etcd").client_port)
        client.put(key, value)
        client.close()
    queued = make_job()
    any_store.submit(queued)
    assert any_store.assigned() == {}
    assert any_store.reindex() == 1
    assert any_store.assigned() == {"n1": {job.uuid: {"cpus": 2.0, "memory": 0, "array": None}}}
    assert any_store.reindex() == 0


# --- the queue -----------------------------------------------------------------

def test_queue_order_is_priority_then_age(any_store):
    old_low = make_job(submitted_at=1000.0)
    new_high = make_job(submitted_at=2000.0, priority=10)
    old_high = make_job(submitted_at=1500.0, priority=10)
    new_low = make_job(submitted_at=3000.0)
    any_store.submit_many([old_low, new_high])
    any_store.submit_many([old_high, new_low])
    order = [old_high, new_high, old_low, new_low]
    assert queued_uuids(any_store) == [j.uuid for j in order]
    assert queued_uuids(any_store, 2) == [j.uuid for j in order[:2]]
    assert any_store.queued(0) == []
    assert [any_store.queue_position(j) for j in order] == [(i, 4) for i in range(4)]
    assert any_store.queue_positions(order) == {j.uuid: (i, 4) for i, j in enumerate(order)}
    assert any_store.queue_positions([]) == {}
    assert any_store.queued_count(1000) == 4


def test_queue_position_of_a_job_not_queued_counts_those_before_it(any_store):
    a, b = make_job(submitted_at=1000.0), make_job(submitted_at=3000.0)
    any_store.submit_many([a, b])
    between = make_job(submitted_at=2000.0)
    assert any_store.queue_position(between) == (1, 2)
    assert any_store.queue_positions([between, b]) == {between.uuid: (1, 2), b.uuid: (1, 2)}


# --- submissions: idempotency, arrays, dependents -----------------------------------

def test_submit_many_is_all_or_none_and_keyed_submissions_are_remembered(any_store):
    taken = make_job()
    any_store.submit(taken)
    fresh = make_job()
    with pytest.raises(RuntimeError):
        any_store.submit_many([fresh, taken])
    assert any_store.get(fresh.uuid) is None
    jobs = [make_job(), make_job()]
    assert any_store.submit_many(jobs, idempotency_key="k1") is None
    again = [make_job(), make_job()]
    assert any_store.submit_many(again, idempotency_key="k1") == [j.uuid for j in jobs]
    assert any_store.get(again[0].uuid) is None
    assert any_store.queued_count(1000) == 3


def test_an_array_is_written_with_its_members_and_goes_with_the_last(any_store):
    array_id = str(uuid.uuid4())
    members = [make_job(submitted_at=1000.0 + i, array=array_id, array_index=i, max_running=2)
               for i in range(4)]
    any_store.submit_many(members)
    array = any_store.get_array(array_id)
    assert array == {"id": array_id, "uuids": [m.uuid for m in members], "max_running": 2,
                     "submitter_uid": 1000, "at": members[0].submitted_at}
    assert any_store.get_array(str(uuid.uuid4())) is None
    _, rev = any_store.get(members[0].uuid)
    any_store.update(members[0], assign(members[0], "n1"), rev)
    assert any_store.assigned()["n1"][members[0].uuid]["array"] == array_id
    found = any_store.get_many([m.uuid for m in members])
    assert any_store.delete([(m.uuid, found[m.uuid][1]) for m in members[:3]]) == 3
    assert any_store.get_array(array_id) is not None  # one member left
    assert any_store.delete([(members[3].uuid, found[members[3].uuid][1])]) == 1
    assert any_store.get_array(array_id) is None


def test_dependents_are_indexed_at_submission_and_dropped_with_the_child(any_store):
    a, b = make_job(), make_job()
    any_store.submit_many([a, b])
    child = make_job(after=(a.uuid, b.uuid), after_mode=core.AFTER_OK)
    other = make_job(after=(a.uuid,), after_mode=core.AFTER_ANY)
    any_store.submit(child)
    any_store.submit(other)
    assert any_store.dependents(a.uuid) == sorted([child.uuid, other.uuid])
    assert any_store.dependents(b.uuid) == [child.uuid]
    assert any_store.dependents(child.uuid) == []
    assert any_store.get(child.uuid)[0].after == (a.uuid, b.uuid)
    _, rev = any_store.get(child.uuid)
    assert any_store.delete([(child.uuid, rev)]) == 1
    assert any_store.dependents(a.uuid) == [other.uuid]
    assert any_store.dependents(b.uuid) == []


def test_dependents_of_many_parents_at_once(any_store):
    """dependents_many says what dependents says of each parent, also of
    one with more dependents than its transaction reads per parent."""
    a, b, c = make_job(), make_job(), make_job()
    any_store.submit_many([a, b, c])
    many = [make_job(after=(a.uuid,)) for _ in range(etcd_store.DEPENDENTS_AT_ONCE + 6)]
    any_store.submit_many(many)
    child = make_job(after=(a.uuid, b.uuid), after_mode=core.AFTER_OK)
    any_store.submit(child)
    found = any_store.dependents_many([a.uuid, b.uuid, c.uuid, a.uuid])
    assert found == {p: any_store.dependents(p) for p in (a.uuid, b.uuid, c.uuid)}
    assert found[a.uuid] == sorted([j.uuid for j in many] + [child.uuid])
    assert found[b.uuid] == [child.uuid] and found[c.uuid] == []
    assert any_store.dependents_many([]) == {}


def test_records_are_written_as_to_dict_says(any_store):
    """Store encodes without dataclasses.asdict (for speed): the same bytes."""
    import json
    job = make_job(env=("A=1",), after=(str(uuid.uuid4()),), after_mode=core.AFTER_ANY,
                   constraints=("rack=a",), array=str(uuid.uuid4()), array_index=3, max_running=2)
    job = core.transition(assign(job), core.RUNNING, now=3.0, started_at=3.0)
    assert etcd_store._encode(job) == json.dumps(job.to_dict(), separators=(",", ":"))
    any_store.submit(job)
    assert any_store.get(job.uuid)[0] == job


# --- nodes: drains, forget, leases, registration, the prime -----------------------------

def test_drain_resume_and_drains(any_store):
    info = {"reason": "new disk", "at": 5.0, "by": "root"}
    any_store.drain("n1", info)
    any_store.drain("n2", {"reason": "", "at": 6.0, "by": "root"})
    assert any_store.drains() == {"n1": info, "n2": {"reason": "", "at": 6.0, "by": "root"}}
    assert any_store.resume("n1") is True
    assert any_store.resume("n1") is False
    assert set(any_store.drains()) == {"n2"}


def test_forget_drops_a_dead_node_and_refuses_a_live_one(any_store):
    lease = any_store.grant(60)
    any_store.register({"name": "n1", "machine": "m1"}, lease)
    any_store.drain("n1", {"reason": "x", "at": 1.0, "by": "root"})
    with pytest.raises(core.Busy):
        any_store.forget("n1")
    assert any_store.drains()
    any_store.revoke(lease)
    assert any_store.record_failed("n1", 7.0)
    live, members, failed, _ = any_store.cluster()
    assert (live, set(members), set(failed)) == ({}, {"n1"}, {"n1"})
    assert any_store.forget("n1") is True
    assert any_store.cluster() == ({}, {}, {}, None)
    assert any_store.drains() == {}
    assert any_store.forget("n1") is False


def test_registration_lives_with_its_lease(any_store):
    lease = any_store.grant(60)
    info = {"name": "n1", "machine": "m1", "address": "a1", "slots": 4, "cpus": 2.0,
            "memory": 1 << 30, "labels": {"rack": "a"}, "running": 0, "free": 4}
    any_store.register(info, lease)
    live, members, failed, prime = any_store.cluster()
    assert live == {"n1": info} and members == {"n1": info} and failed == {} and prime is None
    assert any_store.update_registration({**info, "free": 3}, lease) is True
    assert any_store.cluster()[0]["n1"]["free"] == 3
    assert any_store.cluster()[1]["n1"]["free"] == 4  # members: what it registered with
    other = any_store.grant(60)
    with pytest.raises(NameTaken):
        any_store.register({"name": "n1", "machine": "m2"}, other)
    assert any_store.update_registration(info, other) is False
    assert any_store.renew(lease) is True
    any_store.revoke(lease)
    assert any_store.cluster()[0] == {}
    assert any_store.update_registration(info, lease) is False
    assert any_store.renew(lease) is False
    with pytest.raises(LeaseExpired):
        any_store.register(info, lease)
    assert any_store.record_failed("n1", 9.0) is True
    assert any_store.record_failed("n1", 9.5) is False  # recorded already
    any_store.register(info, other)  # the same machine comes back: no longer failed
    assert any_store.cluster()[2] == {}
    assert any_store.record_failed("n1", 10.0) is False  # alive


def test_a_restarted_node_takes_its_prime_over_under_its_new_lease(any_store):
    """The prime under our name but the lease of this node's daemon before a
    restart: campaign moves it to our lease, so it does not go with the old
    one (placement stalled once, ~10 s after every restart)."""
    before, after = any_store.grant(60), any_store.grant(60)
    assert any_store.campaign("n1", before) is True
    assert any_store.campaign("n1", after) is True
    any_store.revoke(before)  # the old process's lease runs out
    assert any_store.cluster()[3] == "n1"
    any_store.revoke(after)
    assert any_store.cluster()[3] is None


def test_campaign_and_resign(any_store):
    l1, l2 = any_store.grant(60), any_store.grant(60)
    assert any_store.campaign("n1", l1) is True
    assert any_store.campaign("n1", l1) is True  # ours already
    assert any_store.campaign("n2", l2) is False
    assert any_store.cluster()[3] == "n1"
    any_store.resign("n2")  # not theirs: nothing
    assert any_store.cluster()[3] == "n1"
    any_store.resign("n1")
    assert any_store.cluster()[3] is None
    assert any_store.campaign("n2", l2) is True
    any_store.revoke(l2)  # the prime goes with its holder's lease
    assert any_store.cluster()[3] is None


def test_a_lease_expires_by_itself(any_store, kind):
    lease = any_store.grant(1)
    any_store.register({"name": "n1", "machine": "m1"}, lease)
    assert any_store.campaign("n1", lease)
    if kind == "memory":
        any_store.clock.now += 2
    else:
        time.sleep(3)  # etcd's lease of 1 s (its minimum TTL may round up a little)
    assert any_store.cluster()[0] == {} and any_store.cluster()[3] is None
    assert any_store.renew(lease) is False


def test_lock_is_held_by_one_holder(any_store):
    assert any_store.lock("prune", "n1", 60) is True
    assert any_store.lock("prune", "n1", 60) is True  # again, after a restart
    assert any_store.lock("prune", "n2", 60) is False


# --- watches -------------------------------------------------------------------

def test_watches_deliver_events_of_their_kind(any_store):
    queue, assigned, mine, prime, drained, nodes = (Events() for _ in range(6))
    cancels = [any_store.watch("queue", queue), any_store.watch("assigned", assigned),
               any_store.watch("assigned", mine, node="n1"), any_store.watch("prime", prime),
               any_store.watch("drained", drained), any_store.watch("nodes", nodes)]
    try:
        job = make_job()
        any_store.submit(job)
        queue.wait_for([(core.queue_rank(job), False)])
        _, rev = any_store.get(job.uuid)
        any_store.update(job, assign(job, "n1"), rev)
        queue.wait_for([(core.queue_rank(job), True)])
        assigned.wait_for([(f"n1/{job.uuid}", False)])
        mine.wait_for([(job.uuid, False)])
        lease = any_store.grant(60)
        any_store.campaign("n1", lease)
        prime.wait_for([("", False)])
        any_store.resign("n1")
        prime.wait_for([("", True)])
        any_store.drain("n2", {"reason": "", "at": 1.0, "by": "root"})
        drained.wait_for([("n2", False)])
        any_store.register({"name": "n3", "machine": "m3"}, lease)
        nodes.wait_for([("n3", False)])
        any_store.revoke(lease)
        nodes.wait_for([("n3", True)])
        assert all(e[0].startswith(("n1/",)) for e in assigned.seen)
    finally:
        for cancel in cancels:
            cancel()
    assert mine.seen == [(job.uuid, False)]


def test_a_watch_for_one_node_sees_only_that_nodes_assignments(any_store):
    mine = Events()
    cancel = any_store.watch("assigned", mine, node="n1")
    try:
        a, b = make_job(), make_job()
        any_store.submit_many([a, b])
        found = any_store.get_many([a.uuid, b.uuid])
        any_store.update_many([(b, assign(b, "n2"), found[b.uuid][1]),
                               (a, assign(a, "n1"), found[a.uuid][1])])
        mine.wait_for([(a.uuid, False)])
        time.sleep(0.2)  # anything else would have arrived with it
        assert mine.seen == [(a.uuid, False)]
    finally:
        cancel()


def test_a_cancelled_watch_delivers_nothing_more(any_store):
    queue = Events()
    cancel = any_store.watch("queue", queue)
    first = make_job()
    any_store.submit(first)
    queue.wait_for([(core.queue_rank(first), False)])
    cancel()
    cancel()  # twice is harmless
    any_store.submit(make_job())
    time.sleep(0.2)
    assert queue.seen == [(core.queue_rank(first), False)]


def test_a_watch_may_cancel_itself_from_its_callback(any_store):
    calls, cancels = [], []

    def once(events):
        calls.append(events)
        cancels[0]()
    cancels.append(any_store.watch("drained", once))
    any_store.drain("n1", {"reason": "", "at": 1.0, "by": "root"})
    deadline = time.monotonic() + WAIT
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    any_store.drain("n2", {"reason": "", "at": 1.0, "by": "root"})
    time.sleep(0.2)
    assert calls == [[("n1", False)]]


def test_a_watch_that_raises_keeps_watching(any_store):
    seen = []

    def flaky(events):
        seen.extend(events)
        if len(seen) == 1:
            raise RuntimeError("a bug in the caller")
    cancel = any_store.watch("drained", flaky)
    try:
        any_store.drain("n1", {"reason": "", "at": 1.0, "by": "root"})
        any_store.drain("n2", {"reason": "", "at": 1.0, "by": "root"})
        deadline = time.monotonic() + WAIT
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [("n1", False), ("n2", False)]
    finally:
        cancel()


def test_unknown_watch_kind_refused(any_store):
    with pytest.raises(ValueError):
        any_store.watch("jobs", lambda events: None)


# --- the real one only: what etcd does that memory cannot --------------------------

def test_a_watch_resumes_after_etcd_restarts(etcd, prefix):
    s = Store([etcd.endpoint], prefix=prefix)
    drained = Events()
    cancel = s.watch("drained", drained)
    try:
        s.drain("n1", {"reason": "", "at": 1.0, "by": "root"})
        drained.wait_for([("n1", False)])
        etcd.stop()
        etcd.start()
        s.drain("n2", {"reason": "", "at": 1.0, "by": "root"})
        drained.wait_for([("n2", False)])
        assert drained.seen == [("n1", False), ("n2", False)]  # nothing twice
    finally:
        cancel()
        s.close()


def test_a_watch_tells_when_history_was_compacted_under_it(etcd, prefix):
    """A watch that comes back after etcd compacted what it had not seen yet
    says so with callback([]) and goes on from what is left."""
    s = Store([etcd.endpoint], prefix=prefix)
    drained = Events()
    try:
        for i in range(3):
            s.drain(f"n{i}", {"reason": "", "at": 1.0, "by": "root"})
        s.compact(margin=0)
        key = s._key("drained")
        # As a watch broken since revision 1 would resume (deterministic, unlike a race with an outage)
        watcher = etcd_store._Watch(s, key, etcd_store._end(key), drained, 1)
        watcher.start()
        try:
            s.drain("n9", {"reason": "", "at": 1.0, "by": "root"})
            drained.wait_for([("n9", False)])
            assert drained.calls[0] == []
        finally:
            watcher.cancel()
    finally:
        s.close()


def test_watches_leak_no_threads(etcd, prefix):
    s = Store([etcd.endpoint], prefix=prefix)
    before = threading.active_count()
    cancels = [s.watch(kind, lambda events: None) for kind in etcd_store.Store.WATCHED]
    s.drain("n1", {"reason": "", "at": 1.0, "by": "root"})
    time.sleep(0.2)
    # One thread a watch (gRPC's request thread ends after the create), and
    # at most gRPC's channel poller: a node runs 2 watches, its placer 4 more.
    assert threading.active_count() <= before + len(cancels) + 1
    for cancel in cancels:
        cancel()
    deadline = time.monotonic() + WAIT
    while threading.active_count() > before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # gRPC's own threads wind down after the streams
    watching = [t.name for t in threading.enumerate() if t.name.startswith("watch ")]
    assert watching == []
    assert threading.active_count() <= before + 1  # at most gRPC's channel poller, as for any call
    s.close()


# --- the in-memory one only: what it simulates for the node's tests -------------------

def test_memstore_down_and_out_of_space():
    s = MemStore()
    s.down = True
    with pytest.raises(etcd_store.Unavailable):
        s.ping()
    with pytest.raises(etcd_store.Unavailable):
        s.queued(10)
    s.down = False
    s.nospace = True
    with pytest.raises(etcd_store.NoSpace):
        s.check_space()
    with pytest.raises(etcd_store.NoSpace):
        s.submit(make_job())
    assert s.queued(10) == []  # reads still work
    assert s.lock("prune", "n1", 60) is True  # as Store: pruning frees the space
    s.compact()
    s.check_space()  # compaction recovered it


def test_memstore_leases_expire_by_its_clock():
    clock = Clock()
    s = MemStore(clock=clock)
    nodes = Events()
    s.watch("nodes", nodes)
    lease = s.grant(10)
    s.register({"name": "n1"}, lease)
    clock.now += 9
    assert s.renew(lease) is True
    clock.now += 9
    s.expire_leases()
    assert s.cluster()[0] == {"n1": {"name": "n1"}}
    clock.now += 2
    s.expire_leases()
    assert s.cluster()[0] == {}
    assert nodes.calls == [[("n1", False)], [("n1", True)]]


def test_memstore_counts_revisions_as_etcd_does():
    s = MemStore()
    first = s.revision
    jobs = [make_job() for _ in range(3)]
    s.submit_many(jobs)  # one transaction
    found = s.get_many([j.uuid for j in jobs])
    s.update_many([(j, assign(j), found[j.uuid][1]) for j in jobs])  # one more
    assert s.revision == first + 2
    s.resume("nobody")  # a delete of nothing writes nothing
    assert s.revision == first + 2


def test_a_watch_leaves_a_member_gone_silent(etcd, prefix):
    """A member cut off under an open stream says nothing (no error, no
    events): when another call finds its channel dead, the watch moves to
    the next endpoint and resumes from the last revision it saw."""
    from tests.integration.test_store_faults import FreezingProxy
    proxy = FreezingProxy(etcd.client_port)
    s = Store([proxy.endpoint, etcd.endpoint], prefix=prefix)
    drained = Events()
    cancel = s.watch("drained", drained)
    try:
        s.drain("n1", {"reason": "", "at": 1.0, "by": "root"})
        drained.wait_for([("n1", False)])
        proxy.frozen.set()
        s.drain("n2", {"reason": "", "at": 1.0, "by": "root"})  # times out on the proxy, then etcd
        started = time.monotonic()
        drained.wait_for([("n2", False)])
        assert time.monotonic() - started < 2
        assert drained.seen == [("n1", False), ("n2", False)]
    finally:
        cancel()
        s.close()
        proxy.frozen.clear()
        proxy.close()


def test_a_watch_made_while_etcd_is_down_starts_when_it_is_back(etcd, prefix):
    s = Store([etcd.endpoint], prefix=prefix)
    drained = Events()
    etcd.stop()
    cancel = s.watch("drained", drained)  # raises nothing: it waits for etcd
    try:
        etcd.start()
        deadline = time.monotonic() + WAIT
        while not drained.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert drained.calls == [[]]  # "read everything": it cannot know what it missed
        s.drain("n1", {"reason": "", "at": 1.0, "by": "root"})
        drained.wait_for([("n1", False)])
    finally:
        cancel()
        s.close()


def test_memstore_watch_made_while_down_says_read_everything_once_up():
    s = MemStore()
    drained = Events()
    s.down = True
    s.watch("drained", drained)
    s.down = False
    s.drain("n1", {"reason": "", "at": 1.0, "by": "root"})
    assert drained.calls == [[], [("n1", False)]]


def test_a_watch_survives_etcd_made_anew(etcd, prefix):
    """etcd back with an empty data dir (revisions start again at 1): a
    watch from the revision it had would wait silently; it starts afresh."""
    import shutil
    s = Store([etcd.endpoint], prefix=prefix)
    drained = Events()
    cancel = s.watch("drained", drained)
    try:
        for i in range(20):
            s.drain(f"n{i}", {"reason": "", "at": 1.0, "by": "root"})
        drained.wait_for([("n19", False)])
        etcd.stop()
        shutil.rmtree(etcd.data_dir)
        etcd.start()
        deadline = time.monotonic() + WAIT
        while [] not in drained.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [] in drained.calls  # "read everything"
        s.drain("again", {"reason": "", "at": 1.0, "by": "root"})
        drained.wait_for([("again", False)])
    finally:
        cancel()
        s.close()


def test_placement_and_watches_go_on_when_a_member_dies(etcd_cluster, prefix):
    """Three members; the one the store and its watches use is killed: the
    writes fail over, the watches resume on another member from the last
    revision they saw, nothing missed or seen twice."""
    s = Store(etcd_cluster.endpoints, prefix=prefix)
    queue, mine = Events(), Events()
    cancels = [s.watch("queue", queue), s.watch("assigned", mine, node="n1")]
    try:
        jobs = [make_job(submitted_at=1000.0 + i) for i in range(10)]
        s.submit_many(jobs[:5])
        queue.wait_for([(core.queue_rank(j), False) for j in jobs[:5]])
        etcd_cluster.members[0].process.kill()  # the endpoint tried first
        etcd_cluster.members[0].process.wait()
        s.submit_many(jobs[5:])
        found = s.get_many([j.uuid for j in jobs])
        assert all(s.update_many([(j, assign(j, "n1"), found[j.uuid][1]) for j in jobs]))
        mine.wait_for([(j.uuid, False) for j in jobs])
        queue.wait_for([(core.queue_rank(j), True) for j in jobs])
        assert sorted(mine.seen) == sorted((j.uuid, False) for j in jobs)  # each once
        assert len(queue.seen) == 20
    finally:
        for cancel in cancels:
            cancel()
        s.close()


def test_both_leave_the_same_keys_after_the_same_calls(etcd, prefix):
    """The keyspace itself, key by key and value by value, after one story
    told to both stores with the same jobs."""
    real, fake = Store([etcd.endpoint], prefix=prefix), MemStore(prefix=prefix + "-mem")
    array_id = str(uuid.uuid4())
    parent = make_job(submitted_at=1000.0, cpus=1.0, memory=1 << 20)
    members = [make_job(submitted_at=1001.0 + i, array=array_id, array_index=i, max_running=1,
                        after=(parent.uuid,), after_mode=core.AFTER_OK) for i in range(3)]
    for s in (real, fake):
        lease = s.grant(60)
        s.register({"name": "n1", "machine": "m1"}, lease)
        s.campaign("n1", lease)
        s.submit_many([parent])
        s.submit_many(members, idempotency_key="story")
        _, rev = s.get(parent.uuid)
        starting = assign(parent, "n1", now=2000.0)
        rev = s.update_many([(parent, starting, rev)], prime="n1")[0]
        running = core.transition(starting, core.RUNNING, now=2001.0, started_at=2001.0)
        rev = s.update(starting, running, rev)
        warned = core.warn(running, 2002.0, "would not stop")
        rev = s.update(running, warned, rev)
        _, first_rev = s.get(members[0].uuid)
        s.update(members[0], core.transition(members[0], core.CANCELLED, now=2003.0), first_rev)
        s.delete([(members[1].uuid, s.get(members[1].uuid)[1])])
        s.drain("n2", {"reason": "disk", "at": 5.0, "by": "root"})
        s.record_failed("n3", 6.0)
        s.lock("prune", "n1", 60)

    def keyspace(s, base):
        if isinstance(s, MemStore):
            items = s.snapshot().items()
        else:
            client = etcd3.client(port=etcd.client_port)
            items = [(m.key.decode(), v.decode()) for v, m in client.get_prefix(base + "/")]
            client.close()
        return {k[len(base):]: v for k, v in items}
    try:
        found = keyspace(real, prefix)
        assert keyspace(fake, prefix + "-mem") == found
        assert {k.split("/")[1] for k in found} == {
            "jobs", "queue", "queued_by", "warned_jobs", "assigned", "arrays", "dependents",
            "idempotency", "nodes", "members", "failed_nodes", "prime", "drained", "locks", "finished"}
    finally:
        real.close()


def test_drop_orphan_deletes_the_assignment_of_a_record_deleted_by_hand(any_store):
    job = make_job()
    any_store.submit(job)
    _, revision = any_store.get(job.uuid)
    [revision] = any_store.update_many([(job, assign(job, "n1"), revision)])
    assert any_store.drop_orphan("n1", job.uuid) is False  # its record is there: kept
    assert job.uuid in any_store.assigned("n1")["n1"]
    key = f"{any_store.prefix}/jobs/{job.uuid}"
    if isinstance(any_store, MemStore):  # `etcdctl del` of the record alone
        with any_store._lock:
            any_store._apply([("delete", key)])
    else:
        any_store._call(lambda c: c.delete(key))
    assert any_store.get(job.uuid) is None
    assert job.uuid in any_store.assigned("n1")["n1"]  # what the runner finds
    assert any_store.drop_orphan("n1", job.uuid) is True
    assert any_store.assigned("n1") == {"n1": {}}
    assert any_store.drop_orphan("n1", job.uuid) is False
