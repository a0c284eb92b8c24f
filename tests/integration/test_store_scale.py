"""store.py at scale, against a real etcd (see conftest.py): paginated reads
past gRPC's 4 MiB, the per-user queue count, idempotent submission, history
compaction. Issue 10 items 8, 9 and 12 (contracts C5, C6)."""

import time

import etcd3
import pytest

from lclusterd import core, store as store_module
from lclusterd.store import Store

from tests.integration.test_store import make_job


def submit(store, count, command="true", uid=1000, at=1000.0):
    """count queued jobs, in the largest batches the API takes; their uuids in queue order."""
    uuids = []
    batch = min(core.MAX_BATCH, (1 << 20) // len(command))  # about a MiB a transaction
    for start in range(0, count, batch):
        jobs = [core.new_job(command, uid, uid, "alice", now=at + (start + i) / 1e6)
                for i in range(min(batch, count - start))]
        store.submit_many(jobs)
        uuids += [job.uuid for job in jobs]
    return uuids


# --- issue 10 item 8: every read paginated -------------------------------------------

def test_20000_records(store, capsys):
    uuids = submit(store, 20000)  # about 10 MB of records: 2.5 x gRPC's receive limit
    started = time.monotonic()
    records = store.all_jobs()
    took = time.monotonic() - started
    assert sorted(job.uuid for job, _ in records) == sorted(uuids)
    assert all(isinstance(rev, int) and rev > 0 for _, rev in records)
    assert [job.uuid for job, _ in store.queued(1000)] == uuids[:1000]
    assert store.queued_count(1000) == 20000
    with pytest.raises(core.AmbiguousRef, match=r"'a' matches \d{3,} jobs"):
        store.resolve("a")
    assert store.resolve(uuids[12345]) == uuids[12345]
    started = time.monotonic()
    assert len(store.all_jobs()) == 20000  # again: only changed records are decoded
    again = time.monotonic() - started
    started = time.monotonic()
    positions = store.queue_positions([job for job, _ in records])  # lclusterc list's "waiting"
    ranked = time.monotonic() - started
    assert [positions[u] for u in uuids[::5000]] == [(i, 20000) for i in range(0, 20000, 5000)]
    started = time.monotonic()
    assert store.queue_position(records[0][0])[1] == 20000
    one = time.monotonic() - started
    with capsys.disabled():
        print(f"\n  all_jobs of 20,000 records: {took:.2f} s, again {again:.2f} s; queue_positions "
              f"of all: {ranked:.2f} s, queue_position of one: {one * 1000:.0f} ms")


def test_1000_records_of_16_kib(store):
    command = "echo " + "y" * (16 * 1024)
    uuids = submit(store, 1000, command=command)  # 16 MB
    records = store.all_jobs()
    assert sorted(job.uuid for job, _ in records) == sorted(uuids)
    assert all(job.command == command for job, _ in records)
    heads = store.queued(1000)  # fetched in transactions bounded by bytes too
    assert [job.uuid for job, _ in heads] == uuids


def test_records_of_64_kib_in_the_queue(store):
    uuids = submit(store, 150, command="z" * core.MAX_COMMAND_BYTES)  # 10 MB
    assert [job.uuid for job, _ in store.queued(150)] == uuids
    assert len(store.all_jobs()) == 150


def test_small_pages_read_everything_at_one_revision(etcd, prefix):
    store = Store([etcd.endpoint], prefix=prefix, page_keys=7)
    try:
        jobs = [make_job() for _ in range(30)]
        for job in jobs:
            store.submit(job)
        for job in jobs[:20]:
            starting = core.transition(job, core.STARTING, node="n1")
            store.update(job, starting, store.get(job.uuid)[1])
            running = core.transition(starting, core.RUNNING)
            store.update(starting, running, store.get(job.uuid)[1])
            store.update(running, core.warn(running, time.time(), "stuck"), store.get(job.uuid)[1])
        assert set(store.warned()) == {job.uuid for job in jobs[:20]}
        for i in range(17):
            store.register({"name": f"n{i:02d}", "address": f"http://n{i}"}, store.grant(30))
        live, members, failed, prime = store.cluster()
        assert set(live) == set(members) == {f"n{i:02d}" for i in range(17)}
        assert len(store.all_jobs()) == 30
    finally:
        store.close()


# --- issue 10 item 8's quota (contract C6) ---------------------------------------------

def test_queued_count_follows_the_queue(store):
    alice = [core.new_job("true", 1000, 1000, "alice", now=1.0 + i) for i in range(3)]
    bob = [core.new_job("true", 1001, 1001, "bob", now=10.0 + i) for i in range(2)]
    store.submit_many(alice)
    store.submit_many(bob)
    assert (store.queued_count(1000), store.queued_count(1001), store.queued_count(0)) == (3, 2, 0)
    job, rev = store.get(alice[0].uuid)
    claimed = core.transition(job, core.STARTING, node="n1")
    rev = store.update(job, claimed, rev)
    assert store.queued_count(1000) == 2
    requeued = core.transition(claimed, core.QUEUED, node=None)
    rev = store.update(claimed, requeued, rev)
    assert store.queued_count(1000) == 3
    store.update(requeued, core.transition(requeued, core.CANCELLED), rev)
    assert (store.queued_count(1000), store.queued_count(1001)) == (2, 2)
    # A queued record deleted takes its queue key and its index entry along.
    assert store.delete([store.get(bob[0].uuid)]) == 1
    assert store.queued_count(1001) == 1 and [j.uuid for j, _ in store.queued(10)] == [
        alice[1].uuid, alice[2].uuid, bob[1].uuid]


# --- issue 10 item 12 (contract C5): idempotent submission ----------------------------

def test_a_repeated_idempotency_key_writes_nothing(store):
    first = [make_job() for _ in range(core.MAX_BATCH)]  # the largest batch, with its key
    assert store.submit_many(first, idempotency_key="k-1") is None
    again = [make_job() for _ in range(core.MAX_BATCH)]  # the client's retry: new uuids
    assert store.submit_many(again, idempotency_key="k-1") == [job.uuid for job in first]
    assert all(store.get(job.uuid) is None for job in again)
    assert len(store.all_jobs()) == core.MAX_BATCH and store.queued_count(1000) == core.MAX_BATCH
    # Another key, or the same key of another user, is another submission.
    assert store.submit_many([make_job()], idempotency_key="k-2") is None
    bob = core.new_job("true", 1001, 1001, "bob", now=time.time())
    assert store.submit_many([bob], idempotency_key="k-1") is None
    assert store.get(bob.uuid)[0] == bob


def test_idempotency_survives_a_lost_lease(store):
    assert store.submit_many([make_job()], idempotency_key="k") is None
    store.revoke(store._idem_lease[0])  # as after an etcd restored from a backup
    assert store.submit_many([make_job()], idempotency_key="k") is None  # the key went with it
    assert store.submit_many([make_job()], idempotency_key="other") is None


# --- issue 10 item 9: etcd's history compacted -------------------------------------------

def test_compact_keeps_a_margin_of_history(etcd, store):
    job = make_job()
    store.submit(job)
    first = store.get(job.uuid)[1]
    for _ in range(30):
        record, rev = store.get(job.uuid)
        store.update(record, record, rev)
    compacted = store.compact(margin=10)
    assert compacted and compacted == etcd.revision() - 10
    assert store.compact(margin=10) is None  # nothing new
    raw = etcd3.client(host="127.0.0.1", port=etcd.client_port, timeout=5)
    try:
        with pytest.raises(store_module._Compacted):  # that history is gone
            store_module._range(raw, store._job_key(job.uuid), revision=first)
        assert store_module._range(raw, store._job_key(job.uuid), revision=compacted).kvs
    finally:
        raw.close()
    assert store.get(job.uuid)[0] == job and len(store.all_jobs()) == 1


def test_50000_jobs_leave_the_db_bounded(etcd_factory, prefix, capsys):
    """50,000 job records submitted and deleted (the prune pass's pace: a
    compact() every 5,000), as in normal use: etcd's db stays small."""
    server = etcd_factory()
    s = Store([server.endpoint], prefix=prefix)
    started = time.monotonic()
    try:
        sizes = []
        for _ in range(10):
            submit(s, 5000, command="echo " + "w" * 600)  # ~1 KB records
            deleted = s.delete(s.all_jobs())  # with their queue keys
            assert deleted == 5000
            s.compact()
            sizes.append(s.space()["db_size"])
        size = sizes[-1]
        after = s.recover_space()["db_size"]  # what an admin's defrag would leave
    finally:
        s.close()
    with capsys.disabled():
        print(f"\n  etcd db size after 50,000 jobs submitted+deleted with compaction: "
              f"{size / 2**20:.1f} MiB ({time.monotonic() - started:.0f} s; by 5,000: "
              f"{' '.join(f'{x / 2**20:.0f}' for x in sizes)} MiB; defragmented: {after / 1024:.0f} KiB)")
    assert size <= sizes[2] * 1.25, "the db keeps growing"  # freed pages are reused
    assert size < 32 * 2**20
    assert after < 4 * 2**20


def test_all_jobs_again_sees_every_change(store):
    jobs = [make_job() for _ in range(5)]
    for job in jobs:
        store.submit(job)
    first = dict((job.uuid, rev) for job, rev in store.all_jobs())
    starting = core.transition(jobs[0], core.STARTING, node="n1")
    store.update(jobs[0], starting, first[jobs[0].uuid])
    store.delete([(jobs[1].uuid, first[jobs[1].uuid])])
    again = {job.uuid: (job, rev) for job, rev in store.all_jobs()}
    assert set(again) == {job.uuid for job in jobs} - {jobs[1].uuid}
    assert again[jobs[0].uuid] == (starting, store.get(jobs[0].uuid)[1])
    assert all(again[j.uuid] == (j, first[j.uuid]) for j in jobs[2:])


def test_all_jobs_forgets_what_it_decoded(etcd, prefix):
    """A node that served `lclusterc list` once does not hold every record decoded for good."""
    store = Store([etcd.endpoint], prefix=prefix, decoded_ttl=0.3)
    for job in [make_job() for _ in range(3)]:
        store.submit(job)
    assert len(store.all_jobs()) == 3 and len(store._decoded) == 3
    deadline = time.monotonic() + 10
    while store._decoded:
        assert time.monotonic() < deadline, "all_jobs kept what it decoded"
        time.sleep(0.05)
    assert len(store.all_jobs()) == 3
    store.close()


# --- issue 11: the placer's writes and reads at scale ----------------------------------

def test_placing_5000_jobs_on_100_nodes(etcd, store, capsys):
    """The primed node's pass: read the queue's head, write assignments with
    update_many under the prime, read assigned() back. Revisions per job
    stay few (issue 11 item 8: <= 3 in all, run and end included)."""
    lease = store.grant(60)
    assert store.campaign("p", lease)
    uuids = submit(store, 5000)
    before = etcd.revision()
    started = time.monotonic()
    placed = 0
    while True:
        heads = store.queued(1000)
        if not heads:
            break
        changes = [(job, core.transition(job, core.STARTING, now=2000.0, node=f"n{i % 100}"), rev)
                   for i, (job, rev) in enumerate(heads, start=placed)]
        results = store.update_many(changes, prime="p")
        assert all(results)
        placed += len(changes)
    took = time.monotonic() - started
    revisions = etcd.revision() - before
    started = time.monotonic()
    assigned = store.assigned()
    read = time.monotonic() - started
    assert placed == 5000 and sum(len(jobs) for jobs in assigned.values()) == 5000
    assert sorted(u for jobs in assigned.values() for u in jobs) == sorted(uuids)
    assert len(assigned) == 100 and all(len(jobs) == 50 for jobs in assigned.values())
    assert revisions <= 5000 / 100  # a transaction places up to 123 (4 ops each, nested)
    with capsys.disabled():
        print(f"\n  placed 5,000 jobs in {took:.2f} s ({5000 / took:,.0f}/s) in {revisions} "
              f"revisions; assigned() of 5,000: {read:.2f} s")
