"""The history's prune (lclusterd/history.py) reads the finished/ index,
never every record: it deletes exactly what core.expired would over all
records, reading only the doomed ones; records an older lclusterd wrote
(no finished/ key, or a key it left behind) are pruned all the same.
The scenario runs here on MemStore and, in
tests/integration/test_history_store.py, on a real etcd."""

import asyncio
import dataclasses
import random
import types

import pytest

from lclusterd import core, history
from lclusterd import store as etcd_store
from tests.memstore import MemStore

NOW = 1_764_000_000.0  # a time of today's size (the index keeps 9 decimals)
RETENTION = 3000.0
CAP = 20


def finished(i, state=core.SUCCEEDED, ended_at=None, submitted_at=None):
    job = core.new_job("true", 1000, 1000, "alice", now=submitted_at or NOW - 9000 + i,
                       submitter="alice", submitter_uid=1000)
    return dataclasses.replace(job, state=state, ended_at=ended_at)


def history_records():
    """Finished records in every finished state, some past the retention,
    two ended at the same time, one with no end (cancelled while queued),
    and live ones older than all of them (never deleted)."""
    states = (core.SUCCEEDED, core.FAILED, core.CANCELLED)
    jobs = [finished(i, states[i % 3], ended_at=NOW - 1000 + i) for i in range(30)]
    jobs += [finished(30 + i, ended_at=NOW - 5000 - i) for i in range(3)]  # past the retention
    jobs += [finished(40, ended_at=NOW - 990.0), finished(41, ended_at=NOW - 990.0)]  # a tie
    jobs.append(finished(42, core.CANCELLED, submitted_at=NOW - 995.5))  # no ended_at
    live = [dataclasses.replace(finished(50 + i, state), ended_at=None, started_at=NOW - 9000)
            for i, state in enumerate((core.QUEUED, core.RUNNING, core.WARNED))]
    return jobs + [dataclasses.replace(j, node="n1") if j.state != core.QUEUED else j for j in live]


class Reads:
    """Counts the records a store reads for the prune (get_many), and
    refuses all_jobs: the prune must never read every record."""

    def __init__(self, store):
        self.uuids = []
        get_many = store.get_many

        def counted(uuids):
            uuids = list(uuids)
            self.uuids += uuids
            return get_many(uuids)

        def refused():
            raise AssertionError("the prune read every record (all_jobs)")
        store.get_many, store.all_jobs = counted, refused


def node_history(store, cap=CAP, batch=history.PRUNE_BATCH):
    async def call(fn, *args):
        return fn(*args)
    config = types.SimpleNamespace(node_name="n1", retention=RETENTION, max_finished_jobs=cap,
                                   poll_interval=1.0)
    applier = types.SimpleNamespace(store=store, call=call,
                                    counters=types.SimpleNamespace(ended={}))
    return history.History(config, applier, clock=lambda: NOW, batch=batch)


def uuids_in(store):
    return {job.uuid for job, _ in store.all_jobs()}


def check_prune_deletes_what_expired_would(store):
    jobs = history_records()
    store.submit_many(jobs)
    doomed = set(core.expired(jobs, NOW, RETENTION, CAP))
    assert len(doomed) == len(jobs) - 3 - CAP  # every record over the cap (past the retention too)
    reads, pruning = Reads(store), node_history(store, batch=4)  # many batches, one past the doomed
    pruning.next_reindex = NOW + 1  # not due (the hourly look reads every record)
    assert asyncio.run(pruning.prune()) == len(doomed)
    assert sorted(reads.uuids) == sorted(doomed)  # the doomed records, read once, and no other
    store.all_jobs = type(store).all_jobs.__get__(store)
    assert uuids_in(store) == {j.uuid for j in jobs} - doomed
    assert store.finished()[0] == CAP  # their keys went with them
    assert asyncio.run(node_history(store).prune()) == 0


def check_records_of_an_older_lclusterd_are_pruned(store, raw_put, raw_delete):
    """An older node wrote finished records without the index (it ended
    them) and deleted one record without its finished/ key (its prune).
    Until they are indexed the prune never deletes more than core.expired
    would over every record; after start-up's reindex, exactly that."""
    indexed = [finished(i, ended_at=NOW - 1000 + i) for i in range(CAP + 5)]
    store.submit_many(indexed)
    old_way = [finished(100, ended_at=NOW - 10.0), finished(101, ended_at=NOW - 6000.0)]
    for job in old_way:
        raw_put(f"{store.prefix}/jobs/{job.uuid}", etcd_store._encode(job))
    raw_delete(f"{store.prefix}/jobs/{indexed[0].uuid}")  # its finished/ key stays behind
    records = indexed[1:] + old_way
    pruning = node_history(store)
    pruning.next_reindex = NOW + 1  # not due
    first = set(core.expired(records, NOW, RETENTION, CAP))
    deleted = asyncio.run(pruning.prune())
    left = uuids_in(store)
    assert {j.uuid for j in records} - left <= first and deleted == len(records) - len(left)
    assert deleted == 4  # the stale key did not count: 24 indexed records, cap 20
    # The pruning node's first pass (or its hourly one): the old records are indexed, then pruned.
    records = [j for j in records if j.uuid in left]
    again = set(core.expired(records, NOW, RETENTION, CAP))
    assert again == {old_way[1].uuid, indexed[5].uuid}  # the old one past the retention, and one more
    pruning.next_reindex = NOW
    asyncio.run(pruning.prune())
    assert uuids_in(store) == {j.uuid for j in records} - again
    assert store.finished()[0] == CAP and store.reindex() == 0


def test_prune_deletes_what_expired_would_reading_only_those():
    check_prune_deletes_what_expired_would(MemStore())


def test_records_of_an_older_lclusterd_are_pruned():
    store = MemStore()
    check_records_of_an_older_lclusterd_are_pruned(
        store, lambda k, v: store._apply([store._put(k, v)]), lambda k: store._apply([("delete", k)]))


def test_a_key_whose_record_an_older_lclusterd_changed_is_dropped():
    """An older node moved a cancelled job to warned (its processes outlived
    the kill timeout) without its finished/ key: the prune keeps the record
    (live) and drops the key; so does the reindex, where no prune looks."""
    store = MemStore()
    for cap in (0, 5):
        job = finished(cap, core.CANCELLED, ended_at=NOW - (10 if cap else 9000))
        store.submit(job)
        warned = dataclasses.replace(job, state=core.WARNED, node="n1")
        store._apply([store._put(f"{store.prefix}/jobs/{job.uuid}", etcd_store._encode(warned))])
        pruning = node_history(store, cap=cap)
        pruning.next_reindex = NOW + 1  # not due
        assert asyncio.run(pruning.prune()) == 0 and store.get(job.uuid)[0] == warned
        if cap:  # one key, recent, not past the cap: the prune did not look at it
            assert store.finished()[0] == 1
            store.reindex()  # (it writes the warned jobs' assigned/ keys too)
        assert store.finished() == (0, [])


@pytest.mark.parametrize("batch", [1, 3, 7, 1000])
def test_expired_among_a_batch_at_a_time_is_expired(batch):
    """The prune's walk (history.prune): batches from the oldest end, each
    judged with the count from there on, until one is not all doomed."""
    rng = random.Random(batch)
    for _ in range(200):
        jobs = [finished(i, rng.choice(sorted(core.TERMINAL | {core.RUNNING})),
                         ended_at=rng.choice([None, NOW - rng.randrange(100)]))
                for i in range(rng.randrange(30))]
        retention, cap = rng.randrange(1, 120), rng.randrange(0, 25)
        entries = sorted((core.finished_at(j), j.uuid) for j in jobs if j.terminal)
        found, start = [], 0
        while True:
            oldest = entries[start:start + batch]
            doomed = core.expired_among(oldest, len(entries) - start, NOW, retention, cap)
            assert doomed == [u for _, u in oldest[:len(doomed)]]  # the oldest ones
            found += doomed
            if len(doomed) < len(oldest) or not oldest:
                break
            start += batch
        assert found == core.expired(jobs, NOW, retention, cap)


def test_the_finished_key_sorts_as_the_times_and_reads_back():
    times = [NOW, NOW + 1e-6, NOW + 0.5, 1e9, 20.25]
    keys = [etcd_store.finished_key("/p", t, "u") for t in times]
    assert sorted(keys) == [keys[i] for i in sorted(range(len(times)), key=times.__getitem__)]
    assert [etcd_store.finished_entry(k) for k in keys] == [(t, "u") for t in times]
