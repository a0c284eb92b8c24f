"""Group commit of single submissions (lclusterd/groupcommit.py, issue 13
item 2): concurrent submissions share a transaction, each is answered after
its own one committed, a failed one fails only its own requests."""

import asyncio
import http.client
import pwd
import socket
import threading

import aiohttp
import pytest
from aiohttp import web

from lclusterd import api, core, store as etcd_store
from lclusterd.groupcommit import GroupCommit
from lclusterd.node import Caller
from lclusterd.store import Unavailable
from tests.unit.test_cluster import make_node, register

ROOT = Caller(0, 0, "root")


def job(command="true"):
    return core.new_job(command, 0, 0, "root", 1.0)


class Writes:
    """A write for GroupCommit that records each transaction's jobs; the
    transactions listed in `hold` wait until released."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)  # which transactions (0, 1, ...) raise Unavailable
        self.release = asyncio.Event()
        self.hold = {0}

    async def __call__(self, jobs):
        n = len(self.calls)
        self.calls.append([j.command for j in jobs])
        if n in self.hold:
            await self.release.wait()
        if n in self.fail:
            raise Unavailable("etcd is unreachable at test")


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_lone_submission_is_written_at_once_in_its_own_transaction():
    async def go():
        writes = Writes()
        writes.hold = set()
        commits = GroupCommit(writes)
        await asyncio.wait_for(commits.submit(job("a")), 1)
        assert writes.calls == [["a"]] and commits.writing is None
    asyncio.run(go())


def test_submissions_arriving_during_a_transaction_share_the_next():
    async def go():
        writes = Writes()
        commits = GroupCommit(writes)
        first = asyncio.create_task(commits.submit(job("a")))
        await settle()
        assert writes.calls == [["a"]]  # in flight
        rest = [asyncio.create_task(commits.submit(job(c))) for c in "bcd"]
        await settle()
        assert not any(t.done() for t in [first, *rest])  # nobody answered before its commit
        writes.release.set()
        await asyncio.gather(first, *rest)
        assert writes.calls == [["a"], ["b", "c", "d"]] and commits.transactions == 2
    asyncio.run(go())


def test_a_failed_transaction_fails_only_its_own_requests():
    async def go():
        writes = Writes(fail={1})
        writes.hold = {0, 1}
        commits = GroupCommit(writes)
        a = asyncio.create_task(commits.submit(job("a")))
        await settle()
        b, c = (asyncio.create_task(commits.submit(job(x))) for x in "bc")
        writes.release.set()  # a commits; b and c go in the next transaction, which fails
        await a
        writes.release.clear()
        await settle()
        d = asyncio.create_task(commits.submit(job("d")))  # waits for the failing one
        writes.release.set()
        for t in (b, c):
            with pytest.raises(Unavailable):
                await t
        await d
        assert writes.calls == [["a"], ["b", "c"], ["d"]]
    asyncio.run(go())


def test_a_transaction_takes_what_etcd_takes_and_the_rest_goes_next():
    async def go():
        writes = Writes()
        commits = GroupCommit(writes)
        first = asyncio.create_task(commits.submit(job("a")))
        await settle()
        small = [asyncio.create_task(commits.submit(job(f"s{i}"))) for i in range(core.MAX_BATCH + 6)]
        big = "x" * core.MAX_COMMAND_BYTES
        large = [asyncio.create_task(commits.submit(job(big))) for _ in range(40)]
        await settle()
        writes.release.set()
        await asyncio.gather(first, *small, *large)
        assert [c for call in writes.calls for c in call] == \
            ["a"] + [f"s{i}" for i in range(core.MAX_BATCH + 6)] + [big] * 40  # in arrival order
        assert [len(c) for c in writes.calls[:2]] == [1, core.MAX_BATCH]
        for call in writes.calls[2:]:  # 64 KiB records: about PAGE_BYTES a transaction
            assert sum(len(c) for c in call) <= etcd_store.PAGE_BYTES
        assert len(writes.calls) >= 2 + 40 * core.MAX_COMMAND_BYTES // etcd_store.PAGE_BYTES
    asyncio.run(go())


def test_a_caller_gone_before_its_transaction_is_not_written():
    async def go():
        writes = Writes()
        commits = GroupCommit(writes)
        first = asyncio.create_task(commits.submit(job("a")))
        await settle()
        gone = asyncio.create_task(commits.submit(job("gone")))
        stays = asyncio.create_task(commits.submit(job("stays")))
        await settle()
        gone.cancel()
        writes.release.set()
        await asyncio.gather(first, stays)
        assert writes.calls == [["a"], ["stays"]]
    asyncio.run(go())


# -- through the node (verbs.submit) on MemStore ----------------------------------

class HeldStore:
    """Wraps a MemStore: records submit_many's calls; the first waits for `go`."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = []
        self.go = threading.Event()
        self.fail = set()

    def submit_many(self, jobs, idempotency_key=None):
        n = len(self.calls)
        self.calls.append((len(jobs), idempotency_key))
        if n == 0:
            self.go.wait(10)
        if n in self.fail:
            raise Unavailable("etcd is unreachable at test")
        return self.inner.submit_many(jobs, idempotency_key=idempotency_key)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def held_node(tmp_path):
    n = make_node(tmp_path)
    register(n)
    held = HeldStore(n.store)
    n.applier.store = n.verbs.store = held
    return n, held


def test_keyed_and_array_submissions_keep_their_own_transactions(tmp_path):
    n, held = held_node(tmp_path)
    woken = []
    n.verbs.wake = lambda: woken.append(1)

    async def go():
        first = asyncio.create_task(n.submit("true", ROOT))
        while not held.calls:
            await asyncio.sleep(0.01)
        singles = [asyncio.create_task(n.submit("true", ROOT)) for _ in range(5)]
        keyed = asyncio.create_task(n.submit("true", ROOT, idempotency_key="k1"))
        array = asyncio.create_task(n.submit("true", ROOT, count=3))
        while len(held.calls) < 3:
            await asyncio.sleep(0.01)
        held.go.set()
        return await first, await asyncio.gather(*singles), await keyed, await array
    first, singles, keyed, (_, members) = asyncio.run(go())
    assert sorted(held.calls, key=str) == sorted([(1, None), (1, "k1"), (3, None), (5, None)], key=str)
    every = [first, *singles, keyed, *members]
    assert all(n.store.get(j.uuid)[0] == j for j in every)
    assert n.counters.submitted == 10 and len(woken) == 8  # once per request, as before


def test_a_failed_shared_transaction_answers_503_to_its_requests_only(tmp_path):
    n, held = held_node(tmp_path)
    held.fail = {1}  # the shared transaction after the first
    path = str(tmp_path / "api.sock")

    async def go():
        runner = api.runner(n)
        await runner.setup()
        await web.UnixSite(runner, path).start()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as s:
                async def post():
                    async with s.post("http://node/v1/jobs", json={"command": "true"}) as r:
                        return r.status, await r.json()
                first = asyncio.create_task(post())
                while not held.calls:
                    await asyncio.sleep(0.01)
                others = [asyncio.create_task(post()) for _ in range(4)]
                await asyncio.sleep(0.3)  # they reach the node and wait
                held.go.set()
                answers = [await first] + await asyncio.gather(*others)
                later = await post()
        finally:
            await runner.cleanup()
        return answers, later
    answers, later = asyncio.run(go())
    assert held.calls[:2] == [(1, None), (4, None)]
    assert answers[0][0] == 201 and n.store.get(answers[0][1]["job"]["uuid"]) is not None
    assert [a[0] for a in answers[1:]] == [503] * 4
    assert all(a[1] == {"error": "etcd is unreachable at test"} for a in answers[1:])
    assert later[0] == 201  # the next transaction is written
    assert n.counters.submitted == 2


# -- the per-request path's other costs -------------------------------------------

def test_a_run_as_user_is_looked_up_once_a_poll_interval_a_missing_one_every_time(tmp_path, monkeypatch):
    n = make_node(tmp_path)
    register(n)
    entry = pwd.struct_passwd(("alice", "x", 1000, 1000, "", "/home/alice", "/bin/sh"))
    looked = []

    def getpwnam(name):
        looked.append(name)
        if name == "alice":
            return entry
        raise KeyError(name)
    monkeypatch.setattr(pwd, "getpwnam", getpwnam)

    async def go():
        ran = [await n.submit("true", ROOT, {"user": "alice"}) for _ in range(3)]
        for _ in range(2):
            with pytest.raises(core.InvalidInput, match="no such user 'bob'"):
                await n.submit("true", ROOT, {"user": "bob"})
        return ran
    ran = asyncio.run(go())
    assert {(j.uid, j.user) for j in ran} == {(1000, "alice")}
    assert looked == ["alice", "bob", "bob"]


def test_the_callers_user_is_looked_up_once_a_connection(tmp_path, monkeypatch):
    class UnixHTTPConnection(http.client.HTTPConnection):
        def __init__(self, path):
            super().__init__("localhost", timeout=10)
            self.path = path

        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(self.path)
    n = make_node(tmp_path)
    register(n)
    looked = []
    real = pwd.getpwuid
    monkeypatch.setattr(api.pwd, "getpwuid", lambda uid: looked.append(uid) or real(uid))
    path = str(tmp_path / "api.sock")

    async def serve_two_connections():
        runner = api.runner(n)
        await runner.setup()
        await web.UnixSite(runner, path).start()

        def client():
            for _ in range(2):  # two connections, two requests each
                c = UnixHTTPConnection(path)
                for _ in range(2):
                    c.request("POST", "/v1/jobs", body=b'{"command": "true"}',
                              headers={"Content-Type": "application/json"})
                    r = c.getresponse()
                    assert r.status == 201, r.read()
                    r.read()
                c.close()
        try:
            await asyncio.to_thread(client)
        finally:
            await runner.cleanup()
    asyncio.run(serve_two_connections())
    assert len(looked) == 2 and n.counters.submitted == 4
