"""store.py's history and warned-job keys against a real etcd (see conftest.py)."""

import time

import etcd3

from lclusterd import core
from lclusterd.store import MAX_TXN_OPS, Store

from tests.integration.test_store import UUID_A, UUID_B, make_job
from tests.unit import test_history


def running(store, job_uuid):
    job = make_job(job_uuid)
    store.submit(job)
    claimed = core.transition(job, core.STARTING, node="n1")
    store.update(job, claimed, store.get(job_uuid)[1])
    now = core.transition(claimed, core.RUNNING)
    store.update(claimed, now, store.get(job_uuid)[1])
    return now


def test_warned_jobs_are_indexed_by_node_while_warned(store):
    job = running(store, UUID_A)
    warned = core.warn(job, time.time(), "stuck")
    assert store.update(job, warned, store.get(UUID_A)[1])
    assert store.warned() == {UUID_A: "n1"}
    cleared = core.clear(warned, None, time.time())
    assert store.update(warned, cleared, store.get(UUID_A)[1])
    assert store.warned() == {} and store.get(UUID_A)[0].state == core.FAILED


def test_delete_only_records_still_at_their_revision(store):
    jobs = [make_job() for _ in range(MAX_TXN_OPS + 10)]  # more than one transaction holds
    for job in jobs:
        store.submit(job)
    records = store.all_jobs()
    assert store.delete([(job.uuid, rev) for job, rev in records[:-1]]) == len(records) - 1
    last, rev = records[-1]
    store.update(last, core.transition(last, core.CANCELLED), rev)  # it moved on
    assert store.delete([(last.uuid, rev)]) == 0
    assert [job.uuid for job, _ in store.all_jobs()] == [last.uuid]


def test_lock_is_held_by_one_until_its_lease_runs_out(etcd, store):
    other = Store([etcd.endpoint], store.prefix)  # another node
    try:
        assert store.lock("prune", "n1", ttl=2)
        assert not other.lock("prune", "n2", ttl=2)
        assert store.lock("prune", "n1", ttl=2)  # its holder may (a restarted node)
        deadline = time.monotonic() + 10
        while not other.lock("prune", "n2", ttl=2):
            assert time.monotonic() < deadline, "the lease did not run out"
            time.sleep(0.2)
        assert not store.lock("prune", "n1", ttl=2)
    finally:
        other.close()


def test_prune_deletes_what_expired_would_reading_only_those(store):
    """The history's prune on a real etcd: the finished/ keys, then only the
    doomed records (tests/unit/test_history.py has the scenario)."""
    test_history.check_prune_deletes_what_expired_would(store)


def test_records_of_an_older_lclusterd_are_pruned(etcd, store):
    client = etcd3.client(port=etcd.client_port)
    try:
        test_history.check_records_of_an_older_lclusterd_are_pruned(store, client.put, client.delete)
    finally:
        client.close()
