"""Group commit against a real etcd (issue 13 item 2): concurrent single
submissions through the node share transactions (fewer etcd revisions than
jobs), and every job answered is in etcd with its index keys."""

import asyncio

from lclusterd import core
from lclusterd.node import Caller
from tests.unit.test_cluster import make_node, register

N = 200


def test_concurrent_submissions_share_transactions_and_all_are_written(tmp_path, etcd, store):
    n = make_node(tmp_path, store=store)
    register(n)
    before = etcd.revision()

    async def go():
        return await asyncio.gather(*(n.submit(f"echo {i}", Caller(0, 0, "root")) for i in range(N)))
    jobs = asyncio.run(go())
    revisions = etcd.revision() - before
    assert len({j.uuid for j in jobs}) == N
    print(f"{revisions} etcd revisions for {N} concurrent submissions")
    assert revisions < N / 2
    assert n.verbs.commits.transactions == revisions
    found = store.get_many([j.uuid for j in jobs])
    assert {u: job for u, (job, _) in found.items()} == {j.uuid: j for j in jobs}
    assert sorted(j.uuid for j, _ in store.queued(2 * N)) == sorted(j.uuid for j in jobs)  # the queue index
    assert n.counters.submitted == N and all(j.state == core.QUEUED for j in jobs)
