"""The HTTP API (lclusterd/api.py) served for real, by its own Runner on a unix
socket in tmp_path, in front of a fake node: the error table, hostile input,
what callers see of others' jobs, the connection bounds."""

import asyncio
import errno
import http.client
import json
import logging
import os
import socket
import threading
import time
import uuid
import zlib
from types import SimpleNamespace

import pytest
from aiohttp import web
from dbus_next.errors import DBusError

from lclusterd import api, core, metrics
from lclusterd.client import UnixHTTPConnection
from lclusterd.node import Caller
from lclusterd.store import Unavailable as StoreUnavailable
from lclusterd.units import Unavailable as UnitsUnavailable

ALICE, BOB = 1000, 1001
POLICY = SimpleNamespace(job_networks=("host",), **{f"{k}_{n}": None for k in ("default", "max")
                                                    for n in ("memory", "cpus", "tasks", "timeout")})


def job(uid=ALICE, **changes):
    made = core.new_job("echo hi", uid, uid, f"user{uid}", 1764431000.0, submitter=f"user{uid}",
                        submitter_uid=uid, env=("TOKEN=s3cret", "MODE=fast"))
    return core.Job.from_dict({**made.to_dict(), **changes})


class FakeNode:
    """What api.py calls of lclusterd.node.Node (contract K6)."""

    def __init__(self):
        self.config = SimpleNamespace(node_name="node1", slots=4, max_connections=40,
                                      max_connections_per_uid=8)
        self.jobs = {}
        self.fail = None  # an exception every verb raises
        self.fail_later = None  # an exception output raises after its first chunk
        self.calls = []  # (verb, args) in order
        self.counters = metrics.Counters()  # what Node counts (tested with the Node itself)
        self.primed = False
        self.arrays = {}  # array id: {"id", "max_running", "uuids"}
        self.rows = []  # what nodes() answers (two_nodes() fills it)
        self.why = {}  # uuid: what waiting() says of it

    def _maybe_fail(self, verb, *args):
        self.calls.append((verb, args))
        if self.fail is not None:
            raise self.fail

    def add(self, j):
        self.jobs[j.uuid] = j
        return j

    async def submit(self, command, caller, request=None, count=None, idempotency_key=None,
                     commands=None):
        self._maybe_fail("submit", command, caller, request, count, idempotency_key, commands)
        spec = core.job_spec(request, POLICY)  # as Node.submit parses what the job asks for
        if count is not None:
            core.validate_count(count)
        array = str(uuid.uuid4()) if count is not None or commands is not None else None
        made = [self.add(core.Job.from_dict({
                    **core.new_job(c, caller.uid, caller.gid, caller.user, time.time(),
                                   submitter=caller.user, submitter_uid=caller.uid,
                                   env=tuple(request.get("env") or ())).to_dict(),
                    "after": list(spec.get("after", ())), "after_mode": spec.get("after_mode"),
                    "constraints": list(spec.get("constraints", ())), "array": array,
                    "array_index": i if array else None,
                    "max_running": spec.get("max_running") if array else None}))
                for i, c in enumerate(commands or [command] * (count or 1))]
        if array is None:
            return made[0]
        self.arrays[array] = {"id": array, "max_running": spec.get("max_running"),
                              "uuids": [j.uuid for j in made]}
        return array, made

    async def find_array(self, ref):
        self._maybe_fail("find_array", ref)
        found = self.arrays.get(ref)
        if found is None:
            raise LookupError(f"no array '{ref}'")
        return {"id": ref, "max_running": found["max_running"],
                "jobs": [self.jobs[u] for u in found["uuids"]]}

    async def waiting(self, jobs):
        self.calls.append(("waiting", [j.uuid for j in jobs]))
        return {j.uuid: self.why.get(j.uuid, {"kind": "priority", "text": "1 of 2 ahead",
                                              "ahead": 1, "total": 2})
                for j in jobs if j.state == core.QUEUED}

    async def drain(self, name, reason, caller):
        self._maybe_fail("drain", name, reason, caller)
        row = self._row(name)
        row.update(state="draining", drain_reason=reason)

    async def resume(self, name, caller):
        self._maybe_fail("resume", name, caller)
        self._row(name).update(state="ready", drain_reason=None)

    async def forget(self, name, caller):
        self._maybe_fail("forget", name, caller)
        if self._row(name)["state"] != "failed":
            raise core.Busy(f"node {name} is live: only a failed node is forgotten")
        self.rows = [r for r in self.rows if r["name"] != name]

    def _row(self, name):
        for row in self.rows:
            if row["name"] == name:
                return row
        raise LookupError(f"no node '{name}'")

    async def find(self, ref):
        self._maybe_fail("find", ref)
        matches = [j for u, j in self.jobs.items() if u.startswith(core.validate_ref(ref))]
        if not matches:
            raise LookupError(f"no job matches '{ref}'")
        return matches[0]

    def unit_properties(self, j):
        return core.unit_properties(j, 10.0)

    async def list(self, limit=50, **filters):
        self._maybe_fail("list", limit, filters)
        return list(self.jobs.values())[:limit]

    async def remove(self, ref, caller):
        self._maybe_fail("remove", ref, caller)
        if ref in self.arrays:
            jobs = [self.jobs[u] for u in self.arrays[ref]["uuids"]]
            live = [j for j in jobs if not j.terminal]
            for j in live:
                self.jobs[j.uuid] = core.transition(j, core.CANCELLED, ended_at=time.time(),
                                                    reason=f"removed by {caller.user}")
            return {"id": ref, "cancelled": [j.uuid for j in live],
                    "jobs": [self.jobs[j.uuid] for j in jobs]}
        return await self.find(ref)

    async def output(self, j, caller, follow=False, tail=None, since=None):
        self._maybe_fail("output", since)
        yield b"out\n"
        if self.fail_later is not None:
            raise self.fail_later

    async def ping(self):
        self._maybe_fail("ping")

    async def nodes(self):
        self._maybe_fail("nodes")
        return [dict(row) for row in self.rows]


def two_nodes(node):
    """node1 primed, node2 failed: what drain, resume, forget and metrics act on."""
    node.rows = [{"name": "node1", "state": "primed", "cpus": 4.0, "memory": 8 << 30,
                  "reserved_cpus": 1.0, "reserved_memory": 1 << 30, "slots": 4},
                 {"name": "node2", "state": "failed", "cpus": 2.0, "memory": 4 << 30,
                  "reserved_cpus": 0.0, "reserved_memory": 0, "slots": 2}]
    return node


class Served:
    """api.runner(node) on a unix socket, its loop in a thread."""

    def __init__(self, path, node):
        self.path, self.node = str(path), node
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)

    def _serve(self, started):
        asyncio.set_event_loop(self.loop)
        self.runner = api.runner(self.node)
        self.loop.run_until_complete(self.runner.setup())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        self.loop.run_until_complete(web.SockSite(self.runner, sock, backlog=2048).start())
        started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        left = asyncio.all_tasks(self.loop)  # connections still lingering
        for task in left:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self.loop.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def call(self, method, path, body=None, headers=None, raw=None):
        conn = UnixHTTPConnection(self.path, timeout=10)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers=headers or {})
            answer = conn.getresponse()
            payload = answer.read()
        finally:
            conn.close()
        return answer.status, answer.getheader("Content-Type"), json.loads(payload)

    def raw(self, data, timeout=5):
        """Bytes sent as they are; the answer's status line and JSON body."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(self.path)
            s.sendall(data)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), head.decode(), body


@pytest.fixture
def node():
    return FakeNode()


@pytest.fixture
def served(tmp_path, node):
    s = Served(tmp_path / "api.sock", node)
    yield s
    s.stop()


@pytest.fixture
def as_uid(monkeypatch):
    """Make every caller on the socket look like uid."""
    def become(uid):
        def peer_uid(sock):
            # A client socket bound to .../uid-N-... is uid N (see _connect_as).
            name = sock.getpeername()
            who = int(name.rsplit("/uid-", 1)[1].split("-")[0]) if "/uid-" in name else uid
            return (1, who, who)
        monkeypatch.setattr(api, "peer_uid", peer_uid)
    return become


def assert_one_line_json(status_type_payload, status):
    code, ctype, payload = status_type_payload
    assert code == status, payload
    assert ctype.startswith("application/json")
    assert set(payload) == {"error"} and "\n" not in payload["error"] and payload["error"]
    return payload["error"]


# --- issue 9 item 15 and 11: one table, JSON always -----------------------------------

@pytest.mark.parametrize("error, status, words", [
    (UnitsUnavailable("lost the system bus: EOF"), 503, "systemd is unreachable"),
    (DBusError("org.freedesktop.DBus.Error.NoReply", "no reply"), 503, "systemd is unreachable"),
    (StoreUnavailable("etcd is unreachable at 127.0.0.1:2379 (Channel closed!)"), 503,
     "etcd is unreachable"),
    (api.StoreNoSpace("etcd is out of space (quota 2147483648 bytes): fix: compact, defrag"), 507,
     "etcd is out of space"),
    (api.StoreTooLarge("etcd refused the request as too large"), 413, "too large"),
    (core.IllegalTransition("job x cannot go from succeeded to cancelled"), 409, "cannot go"),
    (core.Conflict("job x kept changing; try again"), 409, "kept changing"),
    (core.Busy("node n2 is live: only a failed node is forgotten"), 409, "is live"),
    (core.TooLarge("an array of 1000 such jobs is more than the 1.5 MiB etcd takes"), 413,
     "1.5 MiB"),
    (core.QuotaExceeded("alice has 10000 jobs queued, the most per user"), 429, "10000 jobs"),
    (core.Elsewhere("node2 is not reachable"), 502, "node2"),
    (core.Forbidden("permission denied: job x belongs to bob"), 403, "belongs to bob"),
    (LookupError("no job matches 'abcd'"), 404, "no job matches"),
    (core.InvalidInput("bad\nthing"), 400, "bad\\nthing"),
])
def test_every_failure_has_its_status_and_one_line(served, node, error, status, words):
    node.fail = error
    for method, path in (("GET", "/v1/nodes"), ("DELETE", "/v1/jobs/abcd1234"), ("GET", "/v1/jobs")):
        message = assert_one_line_json(served.call(method, path), status)
        assert words in message


@pytest.mark.parametrize("error", [RuntimeError("etcd3 said\nsomething odd"), KeyError("uuid"),
                                   TypeError("a bug")])
def test_anything_else_is_a_json_500_and_one_traceback_in_the_journal(served, node, caplog, error):
    node.fail = error
    with caplog.at_level(logging.ERROR):
        message = assert_one_line_json(served.call("GET", "/v1/jobs"), 500)
    assert "internal error" in message and "journalctl -u lclusterd" in message
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info[1] is error


def test_health_says_etcd_is_unreachable_as_503(served, node):
    node.fail = StoreUnavailable("etcd is unreachable at 127.0.0.1:2379 (DEADLINE_EXCEEDED)")
    assert "etcd is unreachable" in assert_one_line_json(served.call("GET", "/v1/health"), 503)


def test_unknown_route_and_method_are_json(served):
    assert assert_one_line_json(served.call("GET", "/v2/nothing"), 404) == "Not Found"
    assert assert_one_line_json(served.call("PUT", "/v1/jobs"), 405) == "Method Not Allowed"


# --- issue 10 item 11: hostile input, one JSON line each --------------------------------

def test_json_nested_1000_deep_is_400(served, node):
    raw = ('{"command": "true", "env": ' + "[" * 1000 + "]" * 1000 + "}").encode()
    assert "not valid JSON" in assert_one_line_json(served.call("POST", "/v1/jobs", raw=raw), 400) \
        or "nested" in assert_one_line_json(served.call("POST", "/v1/jobs", raw=raw), 400)
    raw = ('{"command": "true", "env": ' + "[" * 40 + "]" * 40 + "}").encode()
    assert "nested deeper" in assert_one_line_json(served.call("POST", "/v1/jobs", raw=raw), 400)
    assert not [c for c in node.calls if c[0] == "submit"]


@pytest.mark.parametrize("since", ["nan", "inf", "-inf", "NaN", "1e999"])
def test_logs_since_must_be_a_finite_number(served, node, since):
    node.add(job())
    uuid = next(iter(node.jobs))
    assert "since must be a number" in assert_one_line_json(
        served.call("GET", f"/v1/jobs/{uuid}/logs?since={since}"), 400)
    assert not [c for c in node.calls if c[0] == "output"]


@pytest.mark.parametrize("encoding", ["deflate", "gzip"])
def test_garbage_under_content_encoding_is_400(served, node, encoding):
    message = assert_one_line_json(served.call(
        "POST", "/v1/jobs", raw=b"\x00garbage, not " + encoding.encode(),
        headers={"Content-Encoding": encoding, "Content-Type": "application/json"}), 400)
    assert "body" in message
    body = zlib.compress(b'{"command": "true"}')  # well-formed deflate still works
    code, _, payload = served.call("POST", "/v1/jobs", raw=body, headers={"Content-Encoding": "deflate"})
    assert code == 201, payload


@pytest.mark.parametrize("field", ["cpus", "memory", "tasks", "timeout", "priority", "max_attempts",
                                   "count"])
@pytest.mark.parametrize("digits", [400, 5000])
def test_a_huge_integer_is_400(served, node, field, digits):
    raw = ('{"command": "true", "%s": %s}' % (field, "9" * digits)).encode()
    message = assert_one_line_json(served.call("POST", "/v1/jobs", raw=raw), 400)
    assert len(message) < 200
    assert node.jobs == {}


def test_nan_and_infinity_are_not_json(served):
    for raw in (b'{"command": "true", "cpus": NaN}', b'{"command": "true", "cpus": Infinity}'):
        assert "not valid JSON" in assert_one_line_json(served.call("POST", "/v1/jobs", raw=raw), 400)


def test_a_body_over_the_limit_is_413(served):
    message = assert_one_line_json(
        served.call("POST", "/v1/jobs", raw=b'{"command": "' + b"x" * (api.MAX_BODY + 1) + b'"}'), 413)
    assert message.startswith("request body too large (over 128 KiB; an array")


# issue 10 item 7: what cannot be encoded is refused at submission
@pytest.mark.parametrize("body, words", [
    ({"command": "echo x", "count": 2, "priority": 100, "env": ["A=\udc80"]}, "not valid UTF-8"),
    ({"command": "echo x", "workdir": "/tmp/\udc80"}, "workdir is not valid UTF-8"),
    ({"command": "echo \udc80"}, "command is not valid UTF-8"),
    ({"command": "echo x", "env": ["KEY\n=v"]}, "is not KEY=VALUE"),
    ({"command": "echo x", "env": ["KEY\u2028=v"]}, "is not KEY=VALUE"),
    ({"command": "echo x", "network": "ns:x\n"}, "network must be"),
])
def test_what_cannot_be_encoded_is_400_at_submission(served, node, body, words):
    message = assert_one_line_json(served.call("POST", "/v1/jobs", body), 400)
    assert words in message
    assert not [c for c in node.calls if c[0] == "submit"]


@pytest.mark.parametrize("data, words", [
    (b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "8190"),  # URL too long
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n", "8190"),  # header
    (b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", ""),  # bad method
    (b"this is not HTTP\r\n\r\n", ""),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", ""),
])
def test_aiohttps_own_errors_are_one_line_of_json_and_one_log_line(served, caplog, data, words):
    with caplog.at_level(logging.INFO):
        status, head, body = served.raw(data)
    assert status == 400, head
    assert "application/json" in head
    message = json.loads(body)["error"]
    assert words in message and "\n" not in message and len(message) <= api.MAX_MESSAGE
    logged = [r for r in caplog.records if "malformed HTTP" in r.getMessage()]
    assert len(logged) == 1 and not logged[0].exc_info and "\n" not in logged[0].getMessage()


def test_error_messages_never_echo_raw_newlines():
    assert api.one_line("no such user 'alice\nroot'") == "no such user 'alice\\nroot'"
    assert api.one_line("x\udc80\x1b[31m") == "x\\udc80\\x1b[31m"
    assert len(api.one_line("y" * 10000)) == api.MAX_MESSAGE


# --- issue 10 item 2: env values for the submitter and root only -------------------------

def test_others_see_env_keys_only(served, node, as_uid):
    mine = node.add(job(uid=ALICE))
    as_uid(BOB)
    _, _, payload = served.call("GET", f"/v1/jobs/{mine.uuid}")
    assert payload["job"]["env"] == ["TOKEN=<hidden>", "MODE=<hidden>"]
    _, _, payload = served.call("GET", "/v1/jobs")
    assert payload["jobs"][0]["env"] == ["TOKEN=<hidden>", "MODE=<hidden>"]
    _, _, payload = served.call("GET", f"/v1/jobs/{mine.uuid}/unit-properties")
    environment = dict(payload["properties"])["Environment"]
    assert "TOKEN=<hidden>" in environment and not any("s3cret" in e for e in environment)
    assert "s3cret" not in json.dumps(payload)


@pytest.mark.parametrize("uid", [ALICE, 0])
def test_the_submitter_and_root_see_env_values(served, node, as_uid, uid):
    mine = node.add(job(uid=ALICE))
    as_uid(uid)
    _, _, payload = served.call("GET", f"/v1/jobs/{mine.uuid}")
    assert payload["job"]["env"] == ["TOKEN=s3cret", "MODE=fast"]
    _, _, payload = served.call("GET", "/v1/jobs")
    assert payload["jobs"][0]["env"] == ["TOKEN=s3cret", "MODE=fast"]
    _, _, payload = served.call("GET", f"/v1/jobs/{mine.uuid}/unit-properties")
    assert "TOKEN=s3cret" in dict(payload["properties"])["Environment"]


def test_a_job_run_as_another_user_is_its_submitters():
    root_for_alice = job(uid=ALICE, submitter="root", submitter_uid=0)
    assert api.shown(root_for_alice, Caller(ALICE, ALICE, "alice"))["env"][0] == "TOKEN=<hidden>"
    assert api.shown(root_for_alice, Caller(0, 0, "root"))["env"][0] == "TOKEN=s3cret"


# --- contract C5: the idempotency key reaches node.submit --------------------------------

def test_the_idempotency_key_is_passed_to_submit(served, node):
    code, _, _ = served.call("POST", "/v1/jobs", {"command": "true"},
                             headers={"Idempotency-Key": "7d1c2c4e-1b8e-4f57-9a36-0c1f3d1a2b3c"})
    assert code == 201
    assert node.calls[-1][1][4] == "7d1c2c4e-1b8e-4f57-9a36-0c1f3d1a2b3c"
    served.call("POST", "/v1/jobs", {"command": "true"})
    assert node.calls[-1][1][4] is None
    message = assert_one_line_json(served.call("POST", "/v1/jobs", {"command": "true"},
                                               headers={"Idempotency-Key": "a b"}), 400)
    assert "Idempotency-Key" in message


# --- issue 10 item 6: connections bounded per uid and in all, idle ones closed ------------

def _connect(path, uid=None, n=0):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    if uid is not None:  # known as uid by as_uid's peer_uid, however late it is accepted
        s.bind(f"{path}.d/uid-{uid}-{n}")
    s.connect(path)
    return s


def _status_of(s):
    """One request on an open connection; its status and whole answer."""
    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    return _read_answer(s)


def _read_answer(s):
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += s.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(65536)
    return int(head.split()[1]), head + body


def test_a_flooding_uid_is_refused_while_others_are_served(served, node, as_uid):
    as_uid(ALICE)
    held = [_connect(served.path) for _ in range(20)]  # over her 8
    try:
        statuses = []
        for s in held:
            statuses.append(_status_of(s)[0])
        assert statuses.count(200) == 8 and statuses.count(503) == 12
        status, answer = _status_of(_connect(served.path))
        assert status == 503 and b"too many connections from uid 1000" in answer
        as_uid(BOB)
        code, _, payload = served.call("GET", "/v1/health")
        assert code == 200 and payload["etcd"] == "ok"
        as_uid(0)
        assert served.call("GET", "/v1/health")[0] == 200
    finally:
        for s in held:
            s.close()


def test_root_gets_in_past_the_total(served, node, as_uid, monkeypatch):
    node.config.max_connections_per_uid = 40
    as_uid(BOB)
    held = [_connect(served.path) for _ in range(45)]
    try:
        time.sleep(0.2)
        assert served.call("GET", "/v1/health")[0] == 503  # bob: the total is reached
        as_uid(0)
        assert served.call("GET", "/v1/health")[0] == 200
    finally:
        for s in held:
            s.close()


def test_connections_come_back_when_closed(served, node, as_uid):
    as_uid(ALICE)
    for _ in range(3):
        held = [_connect(served.path) for _ in range(8)]
        assert all(_status_of(s)[0] == 200 for s in held)
        for s in held:
            s.close()
        time.sleep(0.2)
    assert served.call("GET", "/v1/health")[0] == 200


def test_idle_and_slow_connections_are_closed(served, monkeypatch):
    monkeypatch.setattr(api, "HEAD_TIMEOUT", 0.3)
    idle = _connect(served.path)
    slow = _connect(served.path)
    slow.sendall(b"GET /v1/health HTTP/1.1\r\n")  # and never the rest
    time.sleep(0.8)
    for s in (idle, slow):
        assert s.recv(100) == b""  # closed by the daemon
        s.close()
    fresh = _connect(served.path)
    assert _status_of(fresh)[0] == 200  # a prompt request is answered
    time.sleep(0.5)
    assert _status_of(fresh)[0] == 200  # and its connection is kept alive past HEAD_TIMEOUT
    fresh.close()


def test_the_gate_counts():
    gate = api.Gate(SimpleNamespace(max_connections=3, max_connections_per_uid=2))
    assert gate.admit(ALICE) is None and gate.admit(ALICE) is None
    assert "uid 1000" in gate.admit(ALICE)
    assert gate.admit(("tcp", "10.0.0.2")) is None
    assert "connections open" in gate.admit(BOB)
    assert gate.admit(0) is None  # root: the reserve
    gate.release(ALICE)
    gate.release(0)
    assert gate.admit(BOB) is None
    assert gate.total == 3 and dict(gate.open) == {ALICE: 1, ("tcp", "10.0.0.2"): 1, BOB: 1}


def test_1100_idle_connections_of_one_user_leave_the_node_serving(served, node, as_uid):
    """issue 10 item 6's attack at the API's level: alice opens 1,100 idle
    connections (the config's defaults bound her); root and bob are served at
    once meanwhile, and the daemon holds no more than her bound for long."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    del node.config.max_connections, node.config.max_connections_per_uid  # the defaults
    as_uid(BOB)
    os.mkdir(served.path + ".d")
    held = []
    try:
        for n in range(1100):
            held.append(_connect(served.path, ALICE, n))
        started = time.monotonic()
        assert served.call("GET", "/v1/health")[0] == 200
        as_uid(0)
        assert served.call("GET", "/v1/health")[0] == 200
        latency = time.monotonic() - started
        assert latency < 1.0, latency
        time.sleep(api.REFUSED_LINGER + 0.5)  # the refused ones are closed by now
        gate = served.runner.server.gate
        assert gate.open == {ALICE: api.DEFAULT_MAX_PER_UID}
        closed = sum(1 for s in held if _closed(s))
        assert closed == 1100 - api.DEFAULT_MAX_PER_UID
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert served.runner.server.gate.total == 0 and served.runner.server.gate.lingering == 0


def _closed(s):
    s.setblocking(False)
    try:
        data = s.recv(65536)  # the 503, then end of file
        while data:
            data = s.recv(65536)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        return e.errno in (errno.ECONNRESET, errno.EPIPE)


@pytest.mark.parametrize("error, tracebacks", [
    (StoreUnavailable("etcd is unreachable at 127.0.0.1:2379"), 0), (RuntimeError("a bug"), 1)])
def test_a_stream_that_fails_midway_is_cut_not_ended(served, node, caplog, error, tracebacks):
    uuid = node.add(job()).uuid
    node.fail_later = error
    conn = UnixHTTPConnection(served.path, timeout=10)
    with caplog.at_level(logging.INFO):
        conn.request("GET", f"/v1/jobs/{uuid}/logs")
        answer = conn.getresponse()
        assert answer.status == 200
        with pytest.raises(http.client.IncompleteRead) as cut:
            answer.read()
        time.sleep(0.1)
    conn.close()
    assert cut.value.partial == b"out\n"
    assert len([r for r in caplog.records if r.exc_info]) == tracebacks


def test_a_slow_body_is_408(served, node, monkeypatch):
    monkeypatch.setattr(api, "BODY_TIMEOUT", 0.3)
    s = _connect(served.path)
    s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"comm")
    status, answer = _read_answer(s)
    s.close()
    assert status == 408
    assert b"took longer than 0.3 s" in answer and node.jobs == {}


def test_lclusterc_over_its_bound_reads_the_503(served, node, as_uid):
    from lclusterd.client import Client, ClientError
    as_uid(ALICE)
    held = [_connect(served.path) for _ in range(8)]
    try:
        time.sleep(0.2)
        with pytest.raises(ClientError) as refused:
            Client(served.path).health()
        assert refused.value.cause == 503
        assert refused.value.message == ("too many connections from uid 1000 (8 open at most); "
                                         "close some and try again")
    finally:
        for s in held:
            s.close()


# --- issue 12 item 2: GET /metrics -------------------------------------------------

def scrape(served):
    from prometheus_client.parser import text_string_to_metric_families
    conn = UnixHTTPConnection(served.path, timeout=10)
    try:
        conn.request("GET", "/metrics")
        answer = conn.getresponse()
        body = answer.read().decode()
    finally:
        conn.close()
    assert answer.status == 200, body
    assert answer.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body) for s in f.samples}


def test_metrics_on_the_unix_socket_show_the_nodes_counters_and_its_records(served, node):
    node.primed = True
    now = time.time()
    node.add(job(state=core.SUCCEEDED, node="node1", submitted_at=now - 3, started_at=now - 2.95,
                 ended_at=now - 1))
    node.add(job(state=core.RUNNING, node="node1", submitted_at=now - 1, started_at=now - 1,
                 cpus=1.5, memory=1 << 20))
    node.add(job(state=core.RUNNING, node="node2", submitted_at=now, started_at=now))  # not ours
    node.counters.submitted, node.counters.started = 5, 3
    node.counters.end(core.SUCCEEDED)
    node.counters.dispatched(0.05)
    after = scrape(served)
    key = lambda name, **labels: (name, tuple(sorted({"node": "node1", **labels}.items())))
    assert after[key("lclusterd_jobs_submitted_total")] == 5
    assert after[key("lclusterd_jobs_started_total")] == 3
    assert after[key("lclusterd_jobs_ended_total", result="succeeded")] == 1
    assert after[key("lclusterd_node_jobs", state="running")] == 1
    assert after[key("lclusterd_slots")] == 4 and after[key("lclusterd_slots_used")] == 1
    assert after[key("lclusterd_cpus_reserved")] == 1.5
    assert after[key("lclusterd_memory_reserved_bytes")] == 1 << 20
    assert after[key("lclusterd_primed")] == 1
    assert after[("lclusterd_cluster_jobs", (("state", "running"),))] == 2
    assert after[key("lclusterd_dispatch_latency_seconds_bucket", le="0.1")] == 1


def test_a_node_that_counts_itself_is_believed(served, node):
    node.counters.started = 7
    node.add(job(state=core.RUNNING, node="node1", started_at=time.time()))
    samples = scrape(served)
    assert samples[("lclusterd_jobs_started_total", (("node", "node1"),))] == 7
    assert ("lclusterd_cluster_jobs", (("state", "running"),)) not in samples  # not primed


async def _over_tcp(app, path, headers=None):
    from aiohttp.test_utils import TestClient, TestServer
    async with TestClient(TestServer(app)) as client:
        answer = await client.get(path, headers=headers or {})
        return answer.status, await answer.text()


@pytest.mark.allow_io("socket")
def test_metrics_over_tcp_need_the_token(node):
    token = "t" * 32
    status, text = asyncio.run(_over_tcp(api.make_app(node, token), "/metrics"))
    assert status == 401 and "token" in json.loads(text)["error"]
    status, _ = asyncio.run(_over_tcp(api.make_app(node, token), "/metrics",
                                      {"Authorization": "Bearer wrong"}))
    assert status == 401
    status, text = asyncio.run(_over_tcp(api.make_app(node, token), "/metrics",
                                         {"Authorization": f"Bearer {token}"}))
    assert status == 200 and "lclusterd_slots" in text


def test_the_primed_node_shows_each_nodes_capacity_and_reservations(served, node):
    two_nodes(node)
    node.primed = True
    node.config.cpus, node.config.memory = 3.5, 6 << 30  # the config's capacity (K3)
    samples = scrape(served)
    assert samples[("lclusterd_cpus", (("node", "node1"),))] == 3.5
    assert samples[("lclusterd_memory_bytes", (("node", "node1"),))] == 6 << 30
    assert samples[("lclusterd_cluster_node_cpus", (("node", "node2"),))] == 2.0
    assert samples[("lclusterd_cluster_node_cpus_reserved", (("node", "node1"),))] == 1.0
    assert samples[("lclusterd_cluster_node_memory_bytes", (("node", "node1"),))] == 8 << 30
    assert samples[("lclusterd_cluster_node_memory_reserved_bytes", (("node", "node1"),))] == 1 << 30
    assert samples[("lclusterd_cluster_node_state", (("node", "node2"), ("state", "failed")))] == 1
    assert samples[("lclusterd_cluster_node_state", (("node", "node2"), ("state", "ready")))] == 0
    node.primed = False
    assert not [k for k in scrape(served) if k[0].startswith("lclusterd_cluster_node")]


def test_etcd_out_of_space_leaves_out_the_nodes_gauges_not_the_scrape(served, node):
    node.primed = True

    async def no_space():
        raise api.StoreNoSpace("etcd is out of space (quota 2147483648 bytes)")
    node.nodes = no_space  # as Node.nodes() asks check_space first
    samples = scrape(served)
    assert samples[("lclusterd_primed", (("node", "node1"),))] == 1
    assert not [k for k in samples if k[0].startswith("lclusterd_cluster_node")]


# --- issue 11: arrays, dependencies, constraints, why a job waits, drain -----------------

PARENT = "0b5e8c1e-3c1f-4a43-9d59-1d1c1f0a2b77"


def test_submit_passes_dependencies_and_constraints_on(served, node):
    code, _, payload = served.call("POST", "/v1/jobs", {
        "command": "true", "after": [PARENT], "after_mode": "any", "constraints": ["rack=a"]})
    assert code == 201, payload
    request = node.calls[-1][1][2]
    assert request == {"after": [PARENT], "after_mode": "any", "constraints": ["rack=a"]}
    assert payload["job"]["after"] == [PARENT] and payload["job"]["constraints"] == ["rack=a"]


def test_count_and_commands_make_an_array(served, node):
    code, _, payload = served.call("POST", "/v1/jobs", {"command": "true", "count": 3,
                                                        "max_running": 2})
    assert code == 201 and set(payload) == {"array", "jobs"}
    assert [j["array_index"] for j in payload["jobs"]] == [0, 1, 2]
    assert {j["array"] for j in payload["jobs"]} == {payload["array"]}
    code, _, payload = served.call("POST", "/v1/jobs", {"commands": ["echo a", "echo b"]})
    assert code == 201 and [j["command"] for j in payload["jobs"]] == ["echo a", "echo b"]
    verb, args = node.calls[-1]
    assert verb == "submit" and args[0] is None and args[5] == ["echo a", "echo b"]


def test_an_array_may_be_answered_with_its_uuids_only(served, node):
    code, _, payload = served.call("POST", "/v1/jobs?answer=uuids", {"command": "true", "count": 3})
    assert code == 201 and set(payload) == {"array", "uuids"} and len(payload["uuids"]) == 3
    code, _, payload = served.call("POST", "/v1/jobs?answer=uuids", {"command": "true"})
    assert code == 201 and set(payload) == {"job"}  # one job: its record, as ever
    code, _, payload = served.call("POST", "/v1/jobs?answer=all", {"command": "true", "count": 3})
    assert code == 400 and "answer must be 'uuids'" in payload["error"]


@pytest.mark.parametrize("body, words", [
    ({"commands": []}, "non-empty list"),
    ({"commands": "echo a"}, "non-empty list"),
    ({"commands": ["echo a", ""]}, "command is empty"),
    ({"commands": ["true"], "command": "true"}, "not with command or count"),
    ({"commands": ["true"], "count": 2}, "not with command or count"),
    ({"command": "true", "max_running": 2}, "needs count or commands"),
    ({"command": "true", "count": 2, "max_running": 0}, "max_running must be"),
    ({"command": "true", "after": ["nonsense"]}, "not a full job uuid"),
    ({"command": "true", "after_mode": "ok"}, "after_mode needs after"),
    ({"command": "true", "constraints": ["rack"]}, "is not KEY=VALUE"),
    ({}, "missing field: command"),
])
def test_bad_arrays_and_dependencies_are_400_and_nothing_is_queued(served, node, body, words):
    assert words in assert_one_line_json(served.call("POST", "/v1/jobs", body), 400)
    assert not node.jobs


def test_a_queued_job_says_why_it_waits(served, node):
    queued = node.add(job())
    ended = node.add(job(state=core.SUCCEEDED, node="node1"))
    node.why[queued.uuid] = {"kind": "resources", "text": "no node has 8.0G free; most free: "
                             "node1 3.1G", "ahead": 0, "total": 1}
    _, _, payload = served.call("GET", f"/v1/jobs/{queued.uuid}")
    assert payload["job"]["waiting"] == node.why[queued.uuid]
    _, _, payload = served.call("GET", f"/v1/jobs/{ended.uuid}")
    assert "waiting" not in payload["job"]
    assert ("waiting", [ended.uuid]) not in node.calls  # asked for queued jobs only
    _, _, payload = served.call("GET", "/v1/jobs")
    rows = {row["uuid"]: row for row in payload["jobs"]}
    assert rows[queued.uuid]["waiting"]["kind"] == "resources" and "waiting" not in rows[ended.uuid]
    assert node.calls[-1] == ("waiting", [queued.uuid])  # one call for the whole list


def test_an_arrays_id_is_read_and_removed_as_a_whole(served, node, as_uid):
    as_uid(ALICE)
    _, _, made = served.call("POST", "/v1/jobs", {"command": "sleep 60", "count": 3})
    array = made["array"]
    first = made["jobs"][0]["uuid"]
    node.jobs[first] = core.Job.from_dict({**node.jobs[first].to_dict(), "state": core.SUCCEEDED})
    code, _, payload = served.call("GET", f"/v1/jobs/{array}")
    assert code == 200 and payload["array"] == array and payload["max_running"] is None
    assert payload["counts"] == {"queued": 2, "succeeded": 1}
    assert [j["uuid"] for j in payload["jobs"]] == [j["uuid"] for j in made["jobs"]]
    assert "waiting" in payload["jobs"][1] and "waiting" not in payload["jobs"][0]
    code, _, payload = served.call("DELETE", f"/v1/jobs/{array}")
    assert code == 200 and payload["array"] == array
    assert payload["cancelled"] == [j["uuid"] for j in made["jobs"][1:]]
    assert [j["state"] for j in payload["jobs"]] == ["succeeded", "cancelled", "cancelled"]
    _, _, payload = served.call("GET", f"/v1/jobs/{array}")
    assert payload["counts"] == {"succeeded": 1, "cancelled": 2}


def test_neither_job_nor_array_is_404_with_the_jobs_message(served, node):
    message = assert_one_line_json(served.call("GET", f"/v1/jobs/{PARENT}"), 404)
    assert message == f"no job matches '{PARENT}'"
    assert ("find_array", (PARENT,)) in node.calls


def test_an_ambiguous_prefix_is_not_looked_up_as_an_array(served, node):
    node.fail = core.AmbiguousRef("'0b5e' matches 2 jobs: give more of the uuid")
    assert "matches 2 jobs" in assert_one_line_json(served.call("GET", "/v1/jobs/0b5e"), 409)
    assert [verb for verb, _ in node.calls] == ["find"]


def test_root_drains_and_resumes_a_node(served, node, as_uid):
    two_nodes(node)
    as_uid(0)
    code, _, payload = served.call("POST", "/v1/nodes/node1/drain", {"reason": "new\ndisk  now"})
    assert code == 200 and payload["node"]["state"] == "draining"
    assert payload["node"]["drain_reason"] == "new disk now"  # one line, as `nodes` shows it
    verb, (name, reason, caller) = node.calls[-2]  # then nodes(), for the row
    assert (verb, name, reason, caller.uid) == ("drain", "node1", "new disk now", 0)
    code, _, payload = served.call("POST", "/v1/nodes/node1/drain")  # no body: no reason
    assert code == 200 and payload["node"]["drain_reason"] is None
    code, _, payload = served.call("POST", "/v1/nodes/node1/resume", {})
    assert code == 200 and payload["node"]["state"] == "ready"


def test_root_forgets_a_failed_node_but_not_a_live_one(served, node, as_uid):
    two_nodes(node)
    as_uid(0)
    assert "is live" in assert_one_line_json(served.call("DELETE", "/v1/nodes/node1"), 409)
    code, _, payload = served.call("DELETE", "/v1/nodes/node2")
    assert code == 200 and payload == {"forgotten": "node2"}
    assert [r["name"] for r in node.rows] == ["node1"]


@pytest.mark.parametrize("method, path", [("POST", "/v1/nodes/node1/drain"),
                                          ("POST", "/v1/nodes/node1/resume"),
                                          ("DELETE", "/v1/nodes/node2")])
def test_only_root_changes_nodes(served, node, as_uid, method, path):
    as_uid(ALICE)
    assert "only root" in assert_one_line_json(served.call(method, path, {}), 403)
    assert not [c for c in node.calls if c[0] in ("drain", "resume", "forget")]


@pytest.mark.parametrize("method, path", [("POST", "/v1/nodes/nosuch/drain"),
                                          ("POST", "/v1/nodes/nosuch/resume"),
                                          ("DELETE", "/v1/nodes/nosuch")])
def test_an_unknown_node_is_404(served, node, as_uid, method, path):
    two_nodes(node)
    as_uid(0)
    assert "no node 'nosuch'" in assert_one_line_json(served.call(method, path, {}), 404)
    assert node.rows[0]["state"] == "primed" and len(node.rows) == 2


@pytest.mark.parametrize("body, words", [
    ({"reason": 5}, "reason must be a string"),
    ({"reason": "x" * 201}, "longer than 200"),
    ({"why": "x"}, "unknown field(s): why"),
])
def test_a_bad_drain_is_400_and_nothing_is_drained(served, node, as_uid, body, words):
    two_nodes(node)
    as_uid(0)
    assert words in assert_one_line_json(served.call("POST", "/v1/nodes/node1/drain", body), 400)
    assert node.rows[0]["state"] == "primed"


async def _post_over_tcp(app, path, headers):
    from aiohttp.test_utils import TestClient, TestServer
    async with TestClient(TestServer(app)) as client:
        answer = await client.post(path, json={"reason": "tcp"}, headers=headers)
        return answer.status, await answer.json()


@pytest.mark.allow_io("socket")
def test_the_token_over_tcp_may_drain(node):
    two_nodes(node)
    token = "t" * 32
    status, _ = asyncio.run(_post_over_tcp(api.make_app(node, token), "/v1/nodes/node1/drain", {}))
    assert status == 401 and node.rows[0]["state"] == "primed"
    status, payload = asyncio.run(_post_over_tcp(api.make_app(node, token), "/v1/nodes/node1/drain",
                                                 {"Authorization": f"Bearer {token}"}))
    assert status == 200 and payload["node"]["drain_reason"] == "tcp"
