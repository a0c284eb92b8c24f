"""Arrays of up to core.MAX_ARRAY members against a real etcd (issue 13
item 2): one array is one transaction (one revision), a retry with its
idempotency key writes nothing, and the node's size check (verbs.py) admits
only what etcd takes: the largest array it admits commits, the next byte up
(a few bytes a member more) is refused before anything is written."""

import asyncio

import pytest

from lclusterd import core
from lclusterd.node import Caller
from tests.unit.test_cluster import make_node, register

ROOT = Caller(0, 0, "root")


@pytest.fixture
def n(tmp_path, store):
    node = make_node(tmp_path, store=store)
    register(node)
    return node


def submit(n, *args, **kw):
    return asyncio.run(n.submit(*args, ROOT, **kw))


def test_an_array_of_max_array_members_is_one_revision_and_a_retry_writes_nothing(n, etcd, store):
    before = etcd.revision()
    array, jobs = submit(n, "true", count=core.MAX_ARRAY, idempotency_key="k-1000")
    assert etcd.revision() == before + 1
    assert len(store.get_many([j.uuid for j in jobs])) == core.MAX_ARRAY
    assert len(store.queued(2 * core.MAX_ARRAY)) == core.MAX_ARRAY
    assert store.get_array(array)["uuids"] == [j.uuid for j in jobs]
    again_array, again = submit(n, "true", count=core.MAX_ARRAY, idempotency_key="k-1000")
    assert etcd.revision() == before + 1
    assert (again_array, [j.uuid for j in again]) == (array, [j.uuid for j in jobs])


def largest(fits, low, high):
    """The largest x in [low, high) with fits(x), fits being monotone."""
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def test_the_largest_array_the_node_admits_commits_and_a_larger_one_is_refused(n, etcd, store):
    class Admitted(Exception):
        pass

    async def stop(job):  # the check after the size check: nothing is written
        raise Admitted()

    def admitted(length):
        try:
            submit(n, "x" * length, count=core.MAX_ARRAY, idempotency_key="k" * 128)
        except core.TooLarge:
            return False
        except Admitted:
            return True
    check_fits, n.verbs._check_fits = n.verbs._check_fits, stop
    length = largest(admitted, 1, 2000)
    print(f"{core.MAX_ARRAY} copies of a command of up to {length} bytes fit one transaction")
    assert length > 100 and store.all_jobs() == []
    n.verbs._check_fits = check_fits
    before = etcd.revision()
    # (a record's times vary by a byte or two from call to call)
    with pytest.raises(core.TooLarge):
        submit(n, "x" * (length + 10), count=core.MAX_ARRAY, idempotency_key="too-big")
    assert etcd.revision() == before and store.all_jobs() == []
    _, jobs = submit(n, "x" * (length - 3), count=core.MAX_ARRAY, idempotency_key="k" * 128)
    assert etcd.revision() == before + 1 and len(store.all_jobs()) == core.MAX_ARRAY


def test_an_array_with_the_most_operations_the_node_admits_commits(n, etcd, store):
    _, parents = submit(n, "true", count=2)
    before = etcd.revision()
    _, jobs = submit(n, "true", count=core.MAX_ARRAY, request={"after": [parents[0].uuid]},
                     idempotency_key="k-after")  # 4,002 operations, nested
    assert etcd.revision() == before + 1 and len(store.all_jobs()) == 2 + core.MAX_ARRAY
    with pytest.raises(core.TooLarge, match="5002 etcd operations"):
        submit(n, "true", count=core.MAX_ARRAY, request={"after": [j.uuid for j in parents]})
    assert etcd.revision() == before + 1


def test_a_job_after_a_whole_array_of_max_array_members_is_queued_in_one_revision(n, etcd, store):
    """--after ARRAY_ID names every member: an array of the largest size must
    be a valid parent (core.MAX_AFTER was 64 while arrays grew to 1,000)."""
    array, members = submit(n, "true", count=core.MAX_ARRAY)
    before = etcd.revision()
    child = submit(n, "echo done", request={"after": [array]})
    assert etcd.revision() == before + 1
    assert sorted(child.after) == sorted(j.uuid for j in members)
    assert store.dependents(members[-1].uuid) == [child.uuid]
