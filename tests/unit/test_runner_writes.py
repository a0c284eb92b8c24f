"""How many etcd writes a job costs its node (issue 13: <= 2 revisions a job):
a job that ends soon after its start is written once, starting -> its end;
the starts of many jobs share one transaction, with the ends that come with
them; the jobs our own placer assigned are started without a read."""

import asyncio
import dataclasses

from lclusterd import core, runner as runner_module
from tests.unit.test_cluster import EXITED, U1, U2, U3, job, make_node, on, put, register


def counting(store):
    """store, counting its transactions of job changes (update/update_many)."""
    store.transactions = 0
    update_many = store.update_many

    def counted(changes, prime=None):
        store.transactions += 1
        return update_many(changes, prime=prime)
    store.update_many = counted
    return store


def started(n, *uuids):
    for u in uuids:
        put(n.store, on("me", core.STARTING, job_uuid=u))
    n.runner.assignment_events([(u, False) for u in uuids])


def test_a_job_that_ends_soon_after_its_start_is_written_once(tmp_path):
    n = make_node(tmp_path)
    register(n)
    counting(n.store)
    started(n, U1)

    async def scenario():
        await n.runner.start_assigned()
        assert n.store.get(U1)[0].state == core.STARTING and n.store.transactions == 0
        n.units.loaded[U1] = EXITED
        n.unit_changed(U1)
        await n.runner.record_changed()
    asyncio.run(scenario())
    job = n.store.get(U1)[0]
    assert job.state == core.SUCCEEDED and job.started_at is not None
    assert n.store.transactions == 1  # before: 2 (running, then succeeded)
    assert n.units.released == [U1] and not n.runner.started


def test_starts_are_written_running_together_once_due(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "RECORD_RUNNING_AFTER", 0.05)
    n = make_node(tmp_path, slots=4)
    register(n)
    counting(n.store)
    started(n, U1, U2, U3)

    async def scenario():
        await n.runner.start_assigned()
        await n.runner.record_changed()  # not due yet: nothing written
        assert n.store.transactions == 0
        await asyncio.sleep(0.06)
        await n.runner.record_changed()
    asyncio.run(scenario())
    assert [n.store.get(u)[0].state for u in (U1, U2, U3)] == [core.RUNNING] * 3
    assert n.store.transactions == 1  # one for the three: never one per job
    started_at = n.store.get(U1)[0].started_at
    assert started_at is not None and started_at <= n.clock()


def test_a_start_cancelled_meanwhile_is_not_written_running(tmp_path):
    n = make_node(tmp_path)
    register(n)
    started(n, U1)

    async def scenario():
        await n.runner.start_assigned()
        job, rev = n.store.get(U1)
        cancelled = core.transition(job, core.CANCELLED, ended_at=2.0, reason="removejob")
        assert n.store.update(job, cancelled, rev)
        n.runner.started[U1] = n.runner.started[U1][:3] + (0.0,)  # due
        await n.runner.record_changed()
    asyncio.run(scenario())
    assert n.store.get(U1)[0].state == core.CANCELLED


def test_a_job_our_own_placer_assigned_is_started_without_a_read(tmp_path):
    n = make_node(tmp_path)
    register(n)
    put(n.store, job(job_uuid=U1))
    reads = []
    get_many = n.store.get_many
    n.store.get_many = lambda uuids: (reads.append(list(uuids)), get_many(uuids))[1]

    async def scenario():
        assert await n.membership.hold_prime()
        await n.placer.place()
        n.runner.assignment_events([(U1, False)])
        await n.runner.start_assigned()
    asyncio.run(scenario())
    assert n.units.started == [U1] and reads == []  # before: get_many([U1])


def test_the_deletion_of_an_assignment_by_our_own_end_write_is_not_looked_at(tmp_path):
    """The assignments' watch says a job's assignment went while its end is
    being written (its own write): not a change to reconcile (before: a
    status read of its released unit, 12 Gets, most jobs). A deletion by
    anyone else (a removejob elsewhere) still is."""
    n = make_node(tmp_path)
    register(n)
    started(n, U1, U2)
    change_many = n.applier.change_many

    async def hearing_the_deletion(records, decide):
        done = await change_many(records, decide)
        n.runner.assignment_events([(u, True) for u in records])  # as etcd's watch does, meanwhile
        return done
    n.applier.change_many = hearing_the_deletion

    async def scenario():
        await n.runner.start_assigned()
        n.units.loaded[U1] = EXITED
        n.unit_changed(U1)
        await n.runner.record_changed()
        assert n.store.get(U1)[0].state == core.SUCCEEDED and U1 not in n.runner.changed
        n.runner.assignment_events([(U2, True)])  # U2's went, not by us
        assert U2 in n.runner.changed
    asyncio.run(scenario())
