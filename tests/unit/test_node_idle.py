"""What an idle node asks of etcd (issue 13: <= 0.2 writes/s): not its
alarms (a raft write in etcd) every sweep, and its placer passes on its
watches' events, not on every sweep."""

import asyncio
import dataclasses

from lclusterd import core, placer as placer_module
from tests.unit.test_cluster import U1, job, make_node, put, register


def counted(store, method):
    calls = []
    real = getattr(store, method)
    setattr(store, method, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def run_for(n, seconds, *loops):
    async def scenario():
        stopping = asyncio.Event()
        asyncio.get_running_loop().call_later(seconds, stopping.set)
        await asyncio.gather(*(loop(stopping) for loop in loops))
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
