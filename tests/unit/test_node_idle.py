"""What an idle node asks of etcd (issue 13: <= 0.2 writes/s): not its
alarms (a raft write in etcd) every sweep, and its placer passes on its
watches' events, not on every sweep."""

import asyncio
import dataclasses
import threading

from lclusterd import core, placer as placer_module
from tests.unit.test_cluster import U1, U2, U3, job, make_node, put, register


def counted(store, method):
    calls = []
    real = getattr(store, method)
    setattr(store, method, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def run_for(n, seconds, *loops):
    """Run the loops for seconds, then stop them as the daemon does (stopping, then cancel)."""
    async def scenario():
        stopping = asyncio.Event()
        tasks = [asyncio.ensure_future(loop(stopping)) for loop in loops]
        await asyncio.sleep(seconds)
        stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.run(scenario())


def test_an_idle_node_reads_etcds_alarms_once_per_space_check(tmp_path):
    n = make_node(tmp_path)
    register(n)
    checks = counted(n.store, "check_space")
    n.config = dataclasses.replace(n.config, poll_interval=0.01)  # a sweep every 10 ms

    run_for(n, 0.3, n.run)
    assert len(checks) == 1  # before: once a sweep (~30 here), each a raft write in etcd




def test_an_idle_primed_node_places_on_events_not_on_every_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(placer_module, "BACKSTOP", 10)
    n = make_node(tmp_path)
    register(n)
    n.config = n.placer.config = n.membership.config = dataclasses.replace(n.config, poll_interval=0.02)
    passes = counted(n.store, "drains")  # one read of each placement pass
    run_for(n, 0.5, n.run, n.place)
    assert n.primed
    # A pass when the watches begin, then one per BACKSTOP x poll_interval
    # (before: one per poll_interval and one per sweep, ~50 here).
    assert 1 <= len(passes) <= 5, len(passes)


def test_the_placer_reads_the_drains_when_they_change_not_every_pass(tmp_path):
    n = make_node(tmp_path, slots=1)
    register(n)
    drains = counted(n.store, "drains")

    async def scenario():
        assert await n.membership.hold_prime()
        await n.placer.place()
        await n.placer.place()  # (a queue event): before, a drains read every pass
        assert len(drains) == 1
        n.store.drain("me", {"reason": "maintenance", "at": 1.0, "by": "root"})
        n.placer.drain_events([("me", False)])
        put(n.store, job(job_uuid=U1))
        assert not await n.placer.place()  # the drain read, nothing placed on it
        assert len(drains) == 2 and n.store.get(U1)[0].state == core.QUEUED
    asyncio.run(scenario())


def test_a_busy_placer_passes_again_only_when_there_is_room(tmp_path, monkeypatch):
    """Its own assignments' events make no room, nor do its placements'
    queue events, nor the pass after a pass that placed (before: 3 passes
    for nothing each time, etcd reads each)."""
    monkeypatch.setattr(placer_module, "BACKSTOP", 100)
    n = make_node(tmp_path, slots=2)
    register(n)
    for u in (U1, U2, U3):
        put(n.store, job(job_uuid=u))
    watch = n.store.watch
    # etcd's events come a moment after the write, not within it.
    n.store.watch = lambda kind, callback, **kw: watch(
        kind, lambda events: threading.Timer(0.05, callback, [events]).start(), **kw)
    passes = counted(n.store, "assigned_and_queue")  # one read of each placement pass
    run_for(n, 0.5, n.place)
    assert sorted(n.store.get(u)[0].state for u in (U1, U2, U3)) == [
        core.QUEUED, core.STARTING, core.STARTING]
    # The pass that placed two, only: the queue's change (its keys went)
    # makes no room; before, a pass on it and one right after the first.
    assert len(passes) == 1, len(passes)


def test_a_pass_with_one_free_slot_reads_a_short_head_of_a_deep_queue(tmp_path):
    """Each queued job looked at is a record read and decoded; a busy node
    passes once per job or two (before: 129 records a pass, most of the
    primed node's CPU per job under a deep queue)."""
    n = make_node(tmp_path, slots=1)
    register(n)
    for i in range(40):
        put(n.store, job(job_uuid=f"{i:08d}-0000-4000-8000-000000000000"))
    limits, records = [], []
    heads, queued_jobs = n.store.assigned_and_queue, n.store.queued_jobs
    n.store.assigned_and_queue = lambda limit: (limits.append(limit), heads(limit))[1]
    n.store.queued_jobs = lambda uuids: (records.append(len(uuids)), queued_jobs(uuids))[1]

    async def scenario():
        assert await n.membership.hold_prime()
        await n.placer.place()
    asyncio.run(scenario())
    assert limits == [17] and records == [17], (limits, records)
    assert sum(n.store.get(f"{i:08d}-0000-4000-8000-000000000000")[0].state == core.STARTING
               for i in range(40)) == 1


def test_a_placement_pass_is_two_etcd_reads_in_one_hand_off_then_the_write(tmp_path):
    """The assignments and the queue's head keys in one transaction, then
    the head's records, both in one call to the placer's threads (before:
    the assignments, then the keys and records: two hand-offs, three etcd
    calls, each ~1 ms of the daemon's CPU)."""
    n = make_node(tmp_path, slots=2)
    register(n)
    hand_offs = counted(n.placer._pool, "submit")

    async def scenario():
        assert await n.membership.hold_prime()
        assert not await n.placer.place()  # the nodes and drains read; nothing queued
        for u in (U1, U2):
            put(n.store, job(job_uuid=u))
        hand_offs.clear()
        calls = counted(n.store, "_enter")  # every MemStore call starts there
        await n.placer.place()
        return len(calls)
    calls = asyncio.run(scenario())
    assert [n.store.get(u)[0].state for u in (U1, U2)] == [core.STARTING] * 2
    assert len(hand_offs) == 2, len(hand_offs)  # the reads, the write
    assert calls == 3, calls  # assigned_and_queue, queued_jobs, the write


def test_the_placer_passes_on_a_job_queued_not_on_one_gone_from_the_queue(tmp_path):
    """A placement (or cancel) takes a job's key out of the queue: nothing
    becomes placeable by that, and a pass for it was two etcd reads a job
    for nothing. A job queued, or missed events, still wake it."""
    p = make_node(tmp_path).placer
    p.events([("a", True), ("b", True)])
    assert not p._wake.is_set()
    p.events([("a", True), ("c", False)])
    assert p._wake.is_set()
    p._wake.clear()
    p.events([])  # events were missed: read again
    assert p._wake.is_set()


def test_a_change_made_here_wakes_the_placer_only_without_its_watches(tmp_path):
    """While primed, the queue's and drains' watches bring a submission or
    a drain made here; without them (not primed yet) the node passes now."""
    p = make_node(tmp_path).placer
    p.changed_here()
    assert p._wake.is_set()
    p._wake.clear()
    p._cancels = [lambda: None]
    p.changed_here()
    assert not p._wake.is_set()


def test_a_placer_that_finds_the_prime_free_campaigns_again_at_once(tmp_path, monkeypatch):
    """The prime went (its key deleted) under a pass: the placement's guard
    fails, the pass that follows reads the prime free and the placer takes
    it again and places at once (before: it waited out BACKSTOP x
    poll_interval with its watches up, 10 s for the job in hand)."""
    monkeypatch.setattr(placer_module, "BACKSTOP", 100)
    n = make_node(tmp_path)
    register(n)

    async def scenario():
        assert await n.membership.hold_prime()
        n.store.resign(n.config.node_name)
        put(n.store, job(job_uuid=U1))
        n.placer._nodes_changed = True  # (as a failed placement leaves it)
        assert await n.placer.place() is True and not n.membership.primed
        assert n.store.get(U1)[0].state == core.QUEUED
    asyncio.run(scenario())
    run_for(n, 0.3, n.place)
    assert n.store.get(U1)[0].state == core.STARTING
