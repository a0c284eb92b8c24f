"""lclusterd/store.py against a real etcd (see conftest.py)."""

import threading
import time

import pytest

from lclusterd import core
from lclusterd.store import Store, Unavailable

UUID_A = "abcd1234-0000-4000-8000-000000000001"
UUID_B = "abcd5678-0000-4000-8000-000000000002"
UUID_C = "ffff0000-0000-4000-8000-000000000003"


def make_job(job_uuid=None, command="echo hello", submitted_at=None):
    if job_uuid is None:
        return core.new_job(command, 1000, 1000, "alice", now=submitted_at or time.time())
    return core.Job(uuid=job_uuid, command=command, uid=1000, gid=1000, user="alice",
                    submitted_at=submitted_at or time.time())


def queued_uuids(store, limit=1000):
    return [job.uuid for job, _ in store.queued(limit)]


# --- records -------------------------------------------------------------------

def test_submit_and_get_round_trip(store):
    job = make_job(command="echo 'héllo' | tr a-z A-Z")
    store.submit(job)
    found, revision = store.get(job.uuid)
    assert found == job
    assert isinstance(revision, int) and revision > 0
    assert store.get("00000000-0000-4000-8000-000000000000") is None


def test_submit_many_queues_all_in_order(store):
    jobs = [make_job(command=f"echo {i}", submitted_at=1000.0 + i) for i in range(core.MAX_BATCH)]
    store.submit_many(jobs)
    assert queued_uuids(store) == [job.uuid for job in jobs]
    assert all(store.get(job.uuid)[0] == job for job in jobs)


def test_submit_many_of_largest_batch(store):
    jobs = [make_job(command="x" * core.MAX_COMMAND_BYTES) for _ in range(16)]
    store.submit_many(jobs)  # 1 MiB of commands: under etcd's request limit
    assert len(queued_uuids(store)) == 16


def test_submit_many_is_all_or_none(store):
    taken = make_job()
    store.submit(taken)
    fresh = make_job()
    with pytest.raises(RuntimeError):
        store.submit_many([fresh, taken])
    assert store.get(fresh.uuid) is None
    assert queued_uuids(store) == [taken.uuid]


def test_submit_of_largest_command(store):
    job = make_job(command="x" * core.MAX_COMMAND_BYTES)
    store.submit(job)
    assert store.get(job.uuid)[0].command == "x" * core.MAX_COMMAND_BYTES


def test_submit_of_existing_uuid_refused(store):
    job = make_job()
    store.submit(job)
    _, revision = store.get(job.uuid)
    with pytest.raises(RuntimeError, match=f"job {job.uuid} already exists"):
        store.submit(make_job(job.uuid, "rm -rf /"))
    again, same_revision = store.get(job.uuid)
    assert again == job and same_revision == revision
    assert queued_uuids(store) == [job.uuid]  # not queued twice


def test_prefixes_keep_stores_apart(etcd, store, prefix):
    other = Store([etcd.endpoint], prefix=prefix + "-other")
    try:
        job = make_job()
        other.submit(job)
        assert store.all_jobs() == [] and store.queued(10) == []
        assert store.get(job.uuid) is None
        assert [j.uuid for j, _ in other.all_jobs()] == [job.uuid]
    finally:
        other.close()


# --- the queue -------------------------------------------------------------------

def test_queued_oldest_first_with_records(store):
    now = time.time()
    # Submitted out of order: the queue sorts by submission time, not by arrival.
    jobs = [make_job(submitted_at=now + offset) for offset in (3.0, 1.0, 2.0, 0.5)]
    for job in jobs:
        store.submit(job)
    oldest_first = sorted(jobs, key=lambda j: j.submitted_at)
    heads = store.queued(10)
    assert [job for job, _ in heads] == oldest_first
    assert all(rev == store.get(job.uuid)[1] for job, rev in heads)


LIMIT_BUG = ("BUG lclusterd/store.py Store.queued: python3-etcd3 0.12's get_prefix() accepts "
             "limit= but never puts it into the RangeRequest (Etcd3Client._build_get_range_request "
             "drops it), so queued(limit) returns the whole queue; node.fill_slots then claims "
             "every queued job whatever its free slots")


def test_queued_respects_limit(store):
    now = time.time()
    jobs = [make_job(submitted_at=now + i) for i in range(4)]
    for job in jobs:
        store.submit(job)
    for limit in (1, 2, 3):
        got = [job.uuid for job, _ in store.queued(limit)]
        assert got == [j.uuid for j in jobs[:limit]], f"{LIMIT_BUG}: queued({limit}) gave {len(got)}"


def test_queued_when_empty(store):
    assert store.queued(5) == []


def test_queue_longer_than_etcd_allows_in_one_transaction(store):
    """etcd refuses transactions of more than --max-txn-ops (128 by default).
    A queue of 130 jobs must not stop the scheduling, whatever limit is asked."""
    now = time.time()
    jobs = [make_job(submitted_at=now + i / 1000) for i in range(130)]
    for job in jobs:
        store.submit(job)
    for limit in (2, 130):
        try:
            heads = store.queued(limit)
        except Unavailable as e:
            pytest.fail("BUG lclusterd/store.py Store.queued: it reads the records in ONE "
                        "transaction with one get per queue key, and etcd refuses more than 128 "
                        f"operations; the refusal is reported as an outage: queued({limit}) "
                        f"raised Unavailable({e}). With more than 128 jobs queued no node can "
                        "schedule anything.", pytrace=False)
        assert [job.uuid for job, _ in heads] == [j.uuid for j in jobs[:limit]]


# --- updates ---------------------------------------------------------------------

def test_update_guarded_by_revision(store):
    job = make_job()
    store.submit(job)
    _, revision = store.get(job.uuid)
    claimed = core.transition(job, core.STARTING, node="node1")
    new_revision = store.update(job, claimed, revision)
    assert new_revision > revision and store.get(job.uuid) == (claimed, new_revision)
    current, new_revision = store.get(job.uuid)
    assert current == claimed and new_revision > revision

    # A second writer that read the old revision loses, and changes nothing.
    rival = core.transition(job, core.STARTING, node="node2")
    assert not store.update(job, rival, revision)
    assert store.get(job.uuid) == (claimed, new_revision)
    cancelled = core.transition(job, core.CANCELLED)
    assert not store.update(job, cancelled, revision)
    assert store.get(job.uuid) == (claimed, new_revision)
    assert queued_uuids(store) == []


def test_claim_dequeues_and_requeue_puts_back(store):
    first, second = make_job(submitted_at=1000.0), make_job(submitted_at=2000.0)
    store.submit(first)
    store.submit(second)
    assert queued_uuids(store) == [first.uuid, second.uuid]

    _, rev = store.get(first.uuid)
    starting = core.transition(first, core.STARTING, node="node1")
    assert store.update(first, starting, rev)
    assert queued_uuids(store) == [second.uuid]

    _, rev = store.get(first.uuid)
    requeued = core.transition(starting, core.QUEUED, node=None)
    assert store.update(starting, requeued, rev)
    assert queued_uuids(store) == [first.uuid, second.uuid]  # back in its old place
    assert store.queued(10)[0][0] == requeued


def test_cancel_dequeues(store):
    job = make_job()
    store.submit(job)
    _, rev = store.get(job.uuid)
    cancelled = core.transition(job, core.CANCELLED, reason="removed")
    assert store.update(job, cancelled, rev)
    assert queued_uuids(store) == []
    assert store.get(job.uuid)[0].state == core.CANCELLED


def test_update_without_queue_move_keeps_queue(store):
    job, other = make_job(), make_job()
    store.submit(job)
    store.submit(other)
    _, rev = store.get(job.uuid)
    starting = core.transition(job, core.STARTING, node="n")
    store.update(job, starting, rev)
    _, rev = store.get(job.uuid)
    running = core.transition(starting, core.RUNNING, started_at=1.0)
    assert store.update(starting, running, rev)
    assert queued_uuids(store) == [other.uuid]
    assert store.get(job.uuid)[0] == running


def test_racing_claims_exactly_one_wins(etcd, prefix):
    stores = [Store([etcd.endpoint], prefix=prefix) for _ in range(2)]
    try:
        for round_ in range(20):
            job = make_job()
            stores[0].submit(job)
            barrier = threading.Barrier(2)
            results = [None, None]

            def claim(i):
                (head, rev), = stores[i].queued(1)
                barrier.wait()  # both have read the same revision before either writes
                results[i] = stores[i].update(
                    head, core.transition(head, core.STARTING, node=f"node{i}"), rev)

            threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert sorted(map(bool, results)) == [False, True], f"round {round_}: {results}"
            winner = [bool(r) for r in results].index(True)
            record, _ = stores[0].get(job.uuid)
            assert (record.state, record.node) == (core.STARTING, f"node{winner}")
            assert stores[1].queued(5) == []
    finally:
        for s in stores:
            s.close()


# --- lookups -------------------------------------------------------------------

def test_resolve_by_prefix(store):
    for job_uuid in (UUID_A, UUID_B, UUID_C):
        store.submit(make_job(job_uuid))
    assert store.resolve("abcd1") == UUID_A
    assert store.resolve("abcd5678") == UUID_B
    assert store.resolve("ffff") == UUID_C
    assert store.resolve(UUID_A) == UUID_A
    with pytest.raises(core.AmbiguousRef, match="matches 2 jobs"):
        store.resolve("abcd")
    with pytest.raises(LookupError) as e:
        store.resolve("0000")
    assert type(e.value) is LookupError


def test_all_jobs(store):
    assert store.all_jobs() == []
    jobs = {u: make_job(u) for u in (UUID_A, UUID_B, UUID_C)}
    for job in jobs.values():
        store.submit(job)
    _, rev = store.get(UUID_B)
    store.update(jobs[UUID_B], core.transition(jobs[UUID_B], core.CANCELLED), rev)
    found = {job.uuid: (job, rev) for job, rev in store.all_jobs()}
    assert set(found) == set(jobs)
    assert found[UUID_B][0].state == core.CANCELLED and found[UUID_A][0].state == core.QUEUED
    assert all(found[u][1] == store.get(u)[1] for u in found)


# --- outages and failover ----------------------------------------------------------

def wait_until_works(fn, seconds):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_unavailable_then_back(etcd, store):
    job = make_job()
    store.submit(job)
    etcd.stop()
    started = time.monotonic()
    with pytest.raises(Unavailable) as e:
        store.get(job.uuid)
    assert etcd.endpoint in str(e.value) and "unreachable" in str(e.value)
    with pytest.raises(Unavailable):
        store.submit(make_job())
    with pytest.raises(Unavailable):
        store.ping()
    assert time.monotonic() - started < 10  # an outage is reported, not waited out

    etcd.start()
    started = time.monotonic()
    found, _ = wait_until_works(lambda: store.get(job.uuid), 10)  # the same Store object
    assert found == job
    assert time.monotonic() - started < 5, "the store took long to reconnect"
    assert queued_uuids(store) == [job.uuid]  # nothing was written while etcd was down


def test_failover_to_a_live_endpoint(etcd, prefix, dead_endpoint):
    dead = dead_endpoint()
    s = Store([dead, etcd.endpoint], prefix=prefix)
    try:
        job = make_job()
        s.submit(job)
        assert s.get(job.uuid)[0] == job
        assert queued_uuids(s) == [job.uuid]
    finally:
        s.close()


def test_all_endpoints_dead(prefix, dead_endpoint):
    dead = [dead_endpoint(), dead_endpoint()]
    s = Store(dead, prefix=prefix)
    try:
        with pytest.raises(Unavailable) as e:
            s.ping()
        assert all(d in str(e.value) for d in dead)
    finally:
        s.close()


# --- cost ----------------------------------------------------------------------------

def test_four_writes_per_job(etcd, store):
    store.ping()  # connect before counting
    before = etcd.revision()
    job = make_job()
    store.submit(job)
    _, rev = store.get(job.uuid)
    starting = core.transition(job, core.STARTING, node="node1")
    assert store.update(job, starting, rev)
    _, rev = store.get(job.uuid)
    running = core.transition(starting, core.RUNNING, started_at=1.0)
    assert store.update(starting, running, rev)
    _, rev = store.get(job.uuid)
    done = core.transition(running, core.SUCCEEDED, ended_at=2.0, exit_status=0,
                           result="success", reason="exited with status 0")
    assert store.update(running, done, rev)
    assert etcd.revision() - before == 4
    assert store.get(job.uuid)[0] == done


# --- the cluster: leases, registrations, the prime -----------------------------

def test_registration_lives_with_its_lease(store):
    lease = store.grant(2)
    store.register({"name": "n1", "address": "http://n1:7800", "slots": 2}, lease)
    live, members, failed, prime = store.cluster()
    assert set(live) == set(members) == {"n1"} and failed == {} and prime is None
    assert live["n1"]["address"] == "http://n1:7800"
    assert store.renew(lease)
    store.revoke(lease)  # as if it had expired
    live, members, _, _ = store.cluster()
    assert live == {} and set(members) == {"n1"}
    assert not store.renew(lease)


def test_failed_node_recorded_once_and_cleared_on_register(store):
    lease = store.grant(5)
    store.register({"name": "n1"}, lease)
    assert not store.record_failed("n1", 1.0)  # alive: not failed
    store.revoke(lease)
    assert store.record_failed("n1", 2.0)
    assert not store.record_failed("n1", 3.0)  # recorded already: the first time stays
    assert store.cluster()[2] == {"n1": {"name": "n1", "at": 2.0}}
    store.register({"name": "n1"}, store.grant(5))
    assert store.cluster()[2] == {}


def test_one_prime_at_a_time_and_it_dies_with_its_lease(store):
    a, b = store.grant(5), store.grant(5)
    assert store.campaign("a", a)
    assert store.campaign("a", a)  # still ours
    assert not store.campaign("b", b)
    assert store.cluster()[3] == "a"
    store.resign("b")  # not b's to give up
    assert store.cluster()[3] == "a"
    store.resign("a")
    assert store.campaign("b", b)
    store.revoke(b)
    assert store.cluster()[3] is None
    assert store.campaign("a", a)


def test_lost_job_requeued_in_one_transaction(store):
    job = make_job()
    store.submit(job)
    (queued, rev), = store.queued(10)
    running = core.transition(core.transition(queued, core.STARTING, now=1.0, node="n1"),
                              core.RUNNING, started_at=1.0)
    assert store.update(queued, running, rev)
    found, rev = store.get(job.uuid)
    assert queued_uuids(store) == []
    lost = core.lose(found, "n1", 2.0)
    assert store.update(found, lost, rev)
    assert queued_uuids(store) == [job.uuid]
    assert store.get(job.uuid)[0].attempts == ({"node": "n1", "started_at": 1.0, "ended_at": 2.0,
                                                "outcome": "lost"},)


def test_claim_only_while_holding_the_prime(store):
    job = make_job()
    store.submit(job)
    (queued, rev), = store.queued(10)
    claimed = core.transition(queued, core.STARTING, now=1.0, node="n1")
    assert not store.update(queued, claimed, rev, prime="n1")  # nobody holds it
    lease = store.grant(5)
    assert store.campaign("n1", lease)
    assert not store.update(queued, claimed, rev, prime="n2")
    assert store.update(queued, claimed, rev, prime="n1")
    assert queued_uuids(store) == []


def test_queue_head_is_highest_priority_then_oldest(store):
    old = make_job(submitted_at=1.0)
    new_urgent = core.new_job("echo urgent", 1000, 1000, "alice", now=3.0, priority=10)
    middle = make_job(submitted_at=2.0)
    low = core.new_job("echo later", 1000, 1000, "alice", now=0.5, priority=-1)
    for j in (old, new_urgent, middle, low):
        store.submit(j)
    assert queued_uuids(store) == [new_urgent.uuid, old.uuid, middle.uuid, low.uuid]
    assert queued_uuids(store, limit=2) == [new_urgent.uuid, old.uuid]
