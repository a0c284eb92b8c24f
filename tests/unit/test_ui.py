"""The status page (lclusterd/ui.py, issue 12 item 3), served by api.make_app
over TCP with aiohttp's test client, in front of a fake node: login by token
into an HttpOnly SameSite=Strict cookie, every job text escaped, the pages."""

import asyncio
import re
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from lclusterd import api, core, ui
from lclusterd.client import UnixHTTPConnection

from tests.unit.test_api import FakeNode, Served, job

pytestmark = pytest.mark.allow_io("socket")  # the test server listens on 127.0.0.1
TOKEN = "s" * 32
EVIL = "<script>alert(1)</script>"


class Node(FakeNode):
    """FakeNode with the listing's filters, a nodes table and output that
    arrives while the job runs (self.more: set it to send the rest)."""

    def __init__(self):
        super().__init__()
        self.rows = [{"name": "node1", "address": "http://10.0.0.1:7379", "state": core.PRIMED,
                      "slots": 2, "running": 2, "free": 0, "warned": [], "failed_at": None}]
        self.text = [b"first line\n"]
        self.more = None

    async def list(self, limit=50, **filters):
        return core.select(list(self.jobs.values()), limit=limit, **filters)

    async def nodes(self):
        return self.rows

    async def output(self, j, caller, follow=False, tail=None, since=None):
        for chunk in self.text:
            yield chunk
        if follow and self.more is not None:
            await self.more.wait()
            yield b"second line\n"


def served(node, token=TOKEN):
    return TestClient(TestServer(api.make_app(node, token)))


async def logged_in(client, token=TOKEN):
    answer = await client.post("/ui/login", data={"token": token, "next": "/ui/"},
                               allow_redirects=False)
    assert answer.status == 303, await answer.text()
    return answer


def run(coroutine):
    return asyncio.run(coroutine)


# --- login ----------------------------------------------------------------------------

def test_a_page_without_login_sends_to_the_login_form():
    async def go():
        async with served(Node()) as client:
            answer = await client.get("/ui/history?state=failed", allow_redirects=False)
            assert answer.status == 303
            assert answer.headers["Location"] == "/ui/login?next=%2Fui%2Fhistory%3Fstate%3Dfailed"
            form = await client.get("/ui/login")
            assert form.status == 200 and 'type="password"' in await form.text()
    run(go())


def test_a_wrong_token_says_so_and_sets_nothing():
    async def go():
        async with served(Node()) as client:
            answer = await client.post("/ui/login", data={"token": "wrong"}, allow_redirects=False)
            assert answer.status == 401
            assert "wrong token" in await answer.text()
            assert "Set-Cookie" not in answer.headers
            assert len(client.session.cookie_jar) == 0
            assert (await client.get("/ui/", allow_redirects=False)).status == 303
    run(go())


def test_the_right_token_sets_an_httponly_strict_cookie_that_is_not_the_token():
    async def go():
        async with served(Node()) as client:
            answer = await logged_in(client)
            cookie = answer.headers["Set-Cookie"]
            assert cookie.startswith(f"{ui.COOKIE}=")
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
            assert TOKEN not in cookie
            page = await client.get("/ui/")
            assert page.status == 200 and "node1" in await page.text()
            await client.post("/ui/logout", allow_redirects=False)
            assert (await client.get("/ui/", allow_redirects=False)).status == 303
    run(go())


def test_a_node_without_token_serves_no_page_over_tcp():
    async def go():
        async with served(Node(), token=None) as client:
            answer = await client.post("/ui/login", data={"token": ""}, allow_redirects=False)
            assert answer.status == 403 and "no token" in await answer.text()
            assert "Set-Cookie" not in answer.headers
    run(go())


def test_the_cookie_does_not_open_the_api():
    async def go():
        async with served(Node()) as client:
            await logged_in(client)
            assert (await client.get("/v1/jobs")).status == 401
            assert (await client.get("/metrics")).status == 401
    run(go())


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/v1/jobs",
                                    "/ui/\\\\evil"])
def test_next_never_leaves_the_page(target):
    async def go():
        async with served(Node()) as client:
            answer = await client.post("/ui/login", data={"token": TOKEN, "next": target},
                                       allow_redirects=False)
            assert answer.headers["Location"] == "/ui/"
    run(go())


def test_the_unix_socket_needs_no_login(tmp_path):
    node = Node()
    node.add(job(command=EVIL))
    s = Served(tmp_path / "api.sock", node)
    try:
        conn = UnixHTTPConnection(s.path)
        conn.request("GET", "/ui/queue")
        answer = conn.getresponse()
        text = answer.read().decode()
        assert answer.status == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    finally:
        s.stop()


# --- every job text escaped ----------------------------------------------------------

def assert_inert(text):
    assert EVIL not in text and "<script>alert" not in text
    # the only scripts are the package's own file; nothing inline
    assert re.findall(r"<script[^>]*>", text) == ['<script src="/ui/static/ui.js" defer>']


def test_a_command_with_script_renders_as_text_everywhere():
    async def go():
        node = Node()
        queued = node.add(job(command=EVIL, user=EVIL, env=(f"X={EVIL}",)))
        ran = node.add(job(command=f"echo '{EVIL}'", state=core.FAILED, node=EVIL, exit_status=1,
                           reason=EVIL, started_at=1764431001.0, ended_at=1764431002.0))
        node.text = [EVIL.encode() + b"\n"]
        async with served(node) as client:
            await logged_in(client)
            for path in ("/ui/", "/ui/queue", "/ui/running", "/ui/history",
                         f"/ui/history?user={EVIL}", f"/ui/jobs/{queued.uuid}", f"/ui/jobs/{ran.uuid}"):
                answer = await client.get(path)
                text = await answer.text()
                assert answer.status == 200, (path, text)
                assert_inert(text)
                assert "Content-Security-Policy" in answer.headers
            page = await (await client.get(f"/ui/jobs/{ran.uuid}")).text()
            assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # command, reason, output
            raw = await client.get(f"/ui/jobs/{ran.uuid}/output")
            assert raw.headers["Content-Type"].startswith("text/plain")
            assert raw.headers["X-Content-Type-Options"] == "nosniff"
            assert await raw.text() == EVIL + "\n"
    run(go())


# --- the pages -------------------------------------------------------------------------

def test_the_queue_in_queue_order_with_why_each_waits():
    async def go():
        node = Node()
        low = node.add(job(command="low", submitted_at=1.0))
        high = node.add(job(command="high", submitted_at=2.0, priority=5))
        node.why[low.uuid] = {"kind": "resources", "text": "no node has 8.0G free; most free: "
                              "node1 3.1G", "ahead": 1, "total": 2}
        node.why[high.uuid] = {"kind": "priority", "text": "0 of 2 ahead; being placed",
                               "ahead": 0, "total": 2}
        async with served(node) as client:
            await logged_in(client)
            text = await (await client.get("/ui/queue")).text()
            assert text.index("high") < text.index("low")
            assert "resources: no node has 8.0G free; most free: node1 3.1G" in text
            assert "priority (0 of 2 ahead; being placed)" in text
            assert high.uuid[:8] in text and low.uuid[:8] in text
            assert node.calls[-1] == ("waiting", [high.uuid, low.uuid])  # one call, the page's rows
    run(go())


def test_a_queued_jobs_page_says_why_it_waits():
    async def go():
        node = Node()
        queued = node.add(job(command="waits"))
        node.why[queued.uuid] = {"kind": "constraint", "text": "no node has gpu=1", "ahead": 2,
                                 "total": 5}
        async with served(node) as client:
            await logged_in(client)
            text = await (await client.get(f"/ui/jobs/{queued.uuid}")).text()
            assert "<th>waiting</th><td>constraint: no node has gpu=1</td>" in text
            assert "<th>position</th><td>3 of 5 in the queue</td>" in text
    run(go())


def test_the_nodes_table_shows_capacity_reservations_labels_and_drain():
    async def go():
        node = Node()
        node.rows = [{"name": "node1", "state": "primed", "slots": 4, "running": 1, "free": 3,
                      "cpus": 4.0, "memory": 8 << 30, "reserved_cpus": 1.5,
                      "reserved_memory": 3 << 29, "labels": {"rack": "a", "node": "node1"}},
                     {"name": "node2", "state": "draining", "slots": 2, "running": 1, "free": 1,
                      "cpus": 2, "memory": 1 << 30, "drain_reason": f"disk {EVIL}"}]
        async with served(node) as client:
            await logged_in(client)
            text = await (await client.get("/ui/")).text()
            assert "1.5 of 4 reserved" in text and "1.5G of 8.0G reserved" in text
            assert "0 of 2 reserved" in text and "0 of 1.0G reserved" in text
            assert "<td>rack=a</td>" in text and "node=node1" not in text
            assert '<tr class="node-draining"><td>node2</td><td>draining</td>' in text
            assert EVIL not in text and "disk &lt;script&gt;" in text
    run(go())


def test_history_filters():
    async def go():
        node = Node()
        now = time.time()
        node.add(job(command="old-failure", state=core.FAILED, node="node1",
                     submitted_at=now - 7200, ended_at=now - 7100))
        node.add(job(command="new-failure", state=core.FAILED, node="node2",
                     submitted_at=now - 60, ended_at=now - 50))
        node.add(job(command="new-success", state=core.SUCCEEDED, node="node1",
                     submitted_at=now - 60, ended_at=now - 40))
        node.add(job(command="still-queued"))
        async with served(node) as client:
            await logged_in(client)
            async def shown(query):
                text = await (await client.get("/ui/history" + query)).text()
                return {c for c in ("old-failure", "new-failure", "new-success", "still-queued")
                        if f"<code>{c}</code>" in text}
            assert await shown("") == {"old-failure", "new-failure", "new-success"}
            assert await shown("?state=failed") == {"old-failure", "new-failure"}
            assert await shown("?state=failed&since=1h") == {"new-failure"}
            assert await shown("?node=node1") == {"old-failure", "new-success"}
            assert await shown("?limit=1") == {"new-success"}  # the latest ended
            bad = await client.get("/ui/history?since=yesterday-ish")
            assert bad.status == 400 and "is not a time" in await bad.text()
            bad = await client.get("/ui/history?state=bogus")
            assert bad.status == 400 and "unknown state" in await bad.text()
    run(go())


def test_a_missing_job_is_a_404_page():
    async def go():
        async with served(Node()) as client:
            await logged_in(client)
            answer = await client.get("/ui/jobs/abcdef12")
            assert answer.status == 404 and "no job matches" in await answer.text()
            assert answer.headers["Content-Type"].startswith("text/html")
    run(go())


def test_a_running_jobs_page_follows_its_output():
    async def go():
        node = Node()
        node.more = asyncio.Event()
        running = node.add(job(state=core.RUNNING, node="node1", started_at=time.time()))
        async with served(node) as client:
            await logged_in(client)
            page = await (await client.get(f"/ui/jobs/{running.uuid}")).text()
            follow = f'data-follow="/ui/jobs/{running.uuid}/output?follow=1"'
            assert follow in page and "running" in page
            stream = await client.get(f"/ui/jobs/{running.uuid}/output?follow=1")
            assert await stream.content.readline() == b"first line\n"  # arrives before the rest
            node.more.set()
            assert await stream.content.readline() == b"second line\n"
    run(go())


def test_assets_come_from_the_package():
    async def go():
        async with served(Node()) as client:
            # no login needed: the login form itself uses ui.css
            for name, kind in (("ui.js", "text/javascript"), ("ui.css", "text/css")):
                answer = await client.get(f"/ui/static/{name}")
                assert answer.status == 200 and answer.headers["Content-Type"].startswith(kind)
                assert (await answer.read()) == (ui.ASSETS / name).read_bytes()
            assert (await client.get("/ui/static/..%2Fui.py")).status == 404
            assert b"http" not in (ui.ASSETS / "ui.js").read_bytes()  # nothing from a CDN
    run(go())


def test_a_history_of_10000_jobs_loads_fast():
    async def go():
        node = Node()
        now = time.time()
        for i in range(10_000):
            node.add(job(command=f"job {i}", state=core.SUCCEEDED, node="node1",
                         submitted_at=now - 10_000 + i, started_at=now - 10_000 + i,
                         ended_at=now - 9_999 + i, exit_status=0))
        async with served(node) as client:
            await logged_in(client)
            took = {}
            for path in ("/ui/", "/ui/history", "/ui/history?state=succeeded&limit=2000"):
                start = time.monotonic()
                answer = await client.get(path)
                await answer.read()
                took[path] = time.monotonic() - start
                assert answer.status == 200
            print("page load with 10,000 jobs:", {p: f"{t * 1000:.0f} ms" for p, t in took.items()})
            assert max(took.values()) < 2.0, took
    run(go())


def test_attempts_read_as_lines_not_python():
    async def go():
        node = Node()
        done = node.add(job(state=core.LOST, node="node2", attempts=(
            {"node": "node1", "started_at": 1764431001.0, "ended_at": 1764431002.0, "outcome": EVIL},)))
        async with served(node) as client:
            await logged_in(client)
            text = await (await client.get(f"/ui/jobs/{done.uuid}")).text()
            assert_inert(text)
            assert "{&#x27;node" not in text and "node1: 20" in text
    run(go())
