"""Arrays up to core.MAX_ARRAY members (issue 13 item 2), through the node
(verbs.submit) on MemStore: an array is refused whole, before anything is
written, when it is over the count or when its records would not fit the one
etcd transaction that writes it (TooLarge, HTTP 413)."""

import asyncio

import pytest

from lclusterd import core
from lclusterd.node import Caller
from tests.unit.test_cluster import make_node, register

ROOT = Caller(0, 0, "root")


def submit(n, *args, **kw):
    return asyncio.run(n.submit(*args, ROOT, **kw))


@pytest.fixture
def n(tmp_path):
    node = make_node(tmp_path)
    register(node)
    return node


def test_an_array_of_max_array_members_is_queued(n):
    array, jobs = submit(n, "true", count=core.MAX_ARRAY)
    assert len(jobs) == core.MAX_ARRAY and {j.array for j in jobs} == {array}
    assert len(n.store.queued(2 * core.MAX_ARRAY)) == core.MAX_ARRAY
    _, members = submit(n, None, commands=[f"echo {i}" for i in range(core.MAX_ARRAY)])
    assert [j.command for j in members[:2]] == ["echo 0", "echo 1"]


@pytest.mark.parametrize("kw", [{"count": core.MAX_ARRAY + 1},
                                {"commands": ["true"] * (core.MAX_ARRAY + 1)}])
def test_one_member_over_max_array_is_refused(n, kw):
    with pytest.raises(core.InvalidInput, match="an array holds at most 1000 jobs; queue more"):
        submit(n, "true" if "count" in kw else None, **kw)
    assert n.store.all_jobs() == []


@pytest.mark.parametrize("kw", [
    {"count": core.MAX_ARRAY, "command": "x" * 1000},  # ~2 MB of records
    {"count": 100, "command": "x" * 20000},
    {"commands": ["x" * 2000] * 800},
    {"count": 60, "command": "true", "request": {"env": [f"K{i}=" + "x" * 480 for i in range(64)]}},
])
def test_an_array_too_big_for_one_etcd_transaction_is_refused_with_what_to_do(n, kw):
    command = kw.pop("command", None)
    with pytest.raises(core.TooLarge) as e:
        submit(n, command, **kw)
    assert "more than the 1.5 MiB etcd takes in one transaction: queue fewer jobs a call" in str(e.value)
    assert n.store.all_jobs() == []


def test_an_array_with_too_many_etcd_operations_is_refused(n):
    _, parents = submit(n, "true", count=2)
    with pytest.raises(core.TooLarge, match="1000 jobs with 2 parent.s. each is 5002 etcd operations"):
        submit(n, "true", count=core.MAX_ARRAY, request={"after": [j.uuid for j in parents]})
    assert len(n.store.all_jobs()) == 2
    _, members = submit(n, "true", count=core.MAX_ARRAY, request={"after": [parents[0].uuid]})
    assert len(members) == core.MAX_ARRAY  # 4,002 operations: nested, one transaction takes them
