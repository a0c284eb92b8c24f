"""lclusterd.client as a library (docs/python.md, issue 12 item 7): a script
that submits one job and many, waits for them, iterates over the output as it
comes and lists jobs, against a fake daemon on a unix socket in tmp_path that
speaks docs/api.md and records what it is asked."""

import http.server
import json
import socketserver
import threading
import time
import uuid as uuidlib

import pytest

from lclusterd import client as lclient
from lclusterd.client import Client, ClientError

TERMINAL = {"succeeded", "failed", "cancelled"}  # as docs/python.md tells users


class Daemon:
    """The API on a dict. A job moves one state per GET of it (queued ->
    running -> its end), so a waiting loop has something to wait for."""

    def __init__(self):
        self.jobs = {}
        self.requests = []  # (method, path, body, headers)
        self.output = {}  # uuid: [bytes chunks]
        self.ends = {}  # uuid: (state, exit_status) it ends with
        self.between_chunks = threading.Event()  # a follow stream waits on it after chunk 1
        self.arrays = {}  # id: [uuids]
        self.old_version = False  # True: ignores ?answer=uuids, as nodes before it did
        self.nodes = {"node1": {"name": "node1", "state": "primed"},
                      "node2": {"name": "node2", "state": "failed"}}

    def new(self, body):
        job = {"uuid": str(uuidlib.uuid4()), "command": body["command"], "state": "queued",
               "user": "alice", "node": None, "submitted_at": time.time(), "exit_status": None,
               "reason": None, **{k: v for k, v in body.items()
                                  if k not in ("command", "count", "commands")}}
        self.jobs[job["uuid"]] = job
        return job

    def find(self, ref):
        matches = [u for u in self.jobs if u.startswith(ref)]
        if not matches:
            return 404, {"error": f"no job matches '{ref}'"}
        if len(matches) > 1:
            return 409, {"error": f"'{ref}' matches {len(matches)} jobs: give more of the uuid"}
        return 200, self.jobs[matches[0]]

    def step(self, job):
        if job["state"] == "queued":
            job.update(state="running", node="node1")
        elif job["state"] == "running":
            state, status = self.ends.get(job["uuid"], ("succeeded", 0))
            job.update(state=state, exit_status=status, reason=f"exited with status {status}")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def stream(self, job, follow):
        """Chunked, as aiohttp streams: chunk 1, then (following) wait for the
        test to have seen it before the rest: proof that it came as it came."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, chunk in enumerate(self.server.daemon.output.get(job["uuid"], [])):
            if i == 1 and follow:
                self.server.daemon.between_chunks.wait(10)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        if follow:  # follow=1 ends once the job has ended
            job.update(state="succeeded", exit_status=0, reason="exited with status 0")
        self.wfile.write(b"0\r\n\r\n")

    def serve(self):
        d = self.server.daemon
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        d.requests.append((self.command, self.path, body, dict(self.headers)))
        route, _, query = self.path.partition("?")
        args = dict(p.split("=", 1) for p in query.split("&") if p)
        if self.command == "POST" and route == "/v1/jobs":
            if "count" in body or "commands" in body:
                array = str(uuidlib.uuid4())
                commands = body.get("commands") or [body["command"]] * body["count"]
                jobs = [d.new({**body, "command": c, "array": array, "array_index": i})
                        for i, c in enumerate(commands)]
                d.arrays[array] = [j["uuid"] for j in jobs]
                if args.get("answer") == "uuids" and not d.old_version:
                    return self.answer(201, {"array": array, "uuids": d.arrays[array]})
                return self.answer(201, {"array": array, "jobs": jobs})
            return self.answer(201, {"job": d.new(body)})
        if route.startswith("/v1/nodes/"):
            name, _, verb = route[len("/v1/nodes/"):].partition("/")
            if name not in d.nodes:
                return self.answer(404, {"error": f"no node '{name}'"})
            if self.command == "DELETE":
                del d.nodes[name]
                return self.answer(200, {"forgotten": name})
            d.nodes[name].update(state="draining" if verb == "drain" else "ready",
                                 drain_reason=(body or {}).get("reason"))
            return self.answer(200, {"node": d.nodes[name]})
        if route.startswith("/v1/jobs/") and route[len("/v1/jobs/"):] in d.arrays:
            array = route[len("/v1/jobs/"):]
            jobs = [d.jobs[u] for u in d.arrays[array]]
            if self.command == "DELETE":
                live = [j for j in jobs if j["state"] not in TERMINAL]
                for j in live:
                    j.update(state="cancelled")
                return self.answer(200, {"array": array, "cancelled": [j["uuid"] for j in live],
                                         "jobs": jobs})
            for j in jobs:
                d.step(j)
            counts = {s: sum(j["state"] == s for j in jobs) for s in ("queued", "running", "succeeded")}
            return self.answer(200, {"array": array, "counts": counts, "max_running": None,
                                     "jobs": jobs})
        if self.command == "GET" and route == "/v1/jobs":
            jobs = sorted(d.jobs.values(), key=lambda j: -j["submitted_at"])
            jobs = [j for j in jobs if j["state"] == args.get("state", j["state"])]
            return self.answer(200, {"jobs": jobs[:int(args.get("limit", 50))]})
        if self.command == "GET" and route == "/v1/nodes":
            return self.answer(200, {"nodes": [{"name": "node1", "state": "primed"}]})
        if route.startswith("/v1/jobs/"):
            ref, _, sub = route[len("/v1/jobs/"):].partition("/")
            status, job = d.find(ref)
            if status != 200:
                return self.answer(status, job)
            if sub == "logs":
                return self.stream(job, args.get("follow") == "1")
            if self.command == "DELETE":
                job.update(state="cancelled", reason="removed by alice")
            else:
                d.step(job)
            return self.answer(200, {"job": job})
        return self.answer(404, {"error": "no such route"})

    do_GET = do_POST = do_DELETE = serve

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that went away is no failure of the fake


@pytest.fixture
def daemon(tmp_path):
    server = Server(str(tmp_path / "lclusterd.sock"), Handler)
    server.daemon = Daemon()
    server.daemon.socket = server.server_address
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server.daemon
    server.daemon.between_chunks.set()
    server.shutdown()
    server.server_close()


def wait(client, ref, poll=0.01):
    """docs/python.md's waiting loop, as a user copies it."""
    while True:
        job = client.get_job(ref)
        if job["state"] in TERMINAL:
            return job
        time.sleep(poll)


def test_submit_one_wait_and_read_its_output(daemon):
    client = Client(daemon.socket)
    job = client.add_job("echo hello", memory="256M", timeout="10m", env=["A=1"], cpus=None)
    assert job["state"] == "queued" and job["command"] == "echo hello"
    method, path, body, headers = daemon.requests[-1]
    # None means "not asked for": not sent; the rest as given, with an Idempotency-Key
    assert (method, path) == ("POST", "/v1/jobs")
    assert body == {"command": "echo hello", "memory": "256M", "timeout": "10m", "env": ["A=1"]}
    assert uuidlib.UUID(headers["Idempotency-Key"])

    daemon.output[job["uuid"]] = [b"hel", b"lo\n"]
    done = wait(client, job["uuid"][:8])  # a unique prefix is a ref too
    assert (done["uuid"], done["state"], done["exit_status"]) == (job["uuid"], "succeeded", 0)
    assert b"".join(client.logs(job["uuid"])) == b"hello\n"
    assert b"".join(client.logs(job["uuid"], tail=1)) == b"hello\n"
    assert daemon.requests[-1][1] == f"/v1/jobs/{job['uuid']}/logs?tail=1"


def test_a_failed_job_says_why(daemon):
    client = Client(daemon.socket)
    job = client.add_job("exit 3")
    daemon.ends[job["uuid"]] = ("failed", 3)
    done = wait(client, job["uuid"])
    assert (done["state"], done["exit_status"], done["reason"]) == ("failed", 3, "exited with status 3")


def test_submit_many_and_list_them(daemon):
    client = Client(daemon.socket)
    jobs = client.add_jobs("make -C /srv/src", 5, priority=10)
    assert len({j["uuid"] for j in jobs}) == 5
    assert daemon.requests[-1][2] == {"command": "make -C /srv/src", "count": 5, "priority": 10}
    assert {j["uuid"] for j in client.list_jobs(state="queued")} == {j["uuid"] for j in jobs}
    assert daemon.requests[-1][1] == "/v1/jobs?state=queued"
    assert len(client.list_jobs(limit=2)) == 2
    ended = [wait(client, j["uuid"]) for j in jobs]
    assert [j["state"] for j in ended] == ["succeeded"] * 5
    assert client.list_jobs(state="queued") == []


def test_following_output_yields_chunks_as_they_come(daemon):
    client = Client(daemon.socket)
    job = client.add_job("echo one; sleep 1; echo two")
    daemon.output[job["uuid"]] = [b"one\n", b"two\n"]
    chunks = client.logs(job["uuid"], follow=True)
    # The fake holds chunk 2 until we have chunk 1: a generator that read the
    # whole answer first would wait here for ever (and time out the test).
    assert next(chunks) == b"one\n"
    daemon.between_chunks.set()
    assert b"".join(chunks) == b"two\n"
    assert "follow=1" in daemon.requests[-1][1]
    assert client.get_job(job["uuid"])["state"] == "succeeded"  # the stream ended with the job


def test_remove_and_nodes(daemon):
    client = Client(daemon.socket)
    job = client.add_job("sleep 600")
    assert client.remove_job(job["uuid"])["state"] == "cancelled"
    assert daemon.requests[-1][:2] == ("DELETE", f"/v1/jobs/{job['uuid']}")
    assert [n["name"] for n in client.nodes()] == ["node1"]


def test_errors_are_one_client_error_with_a_cause(daemon, tmp_path):
    client = Client(daemon.socket)
    with pytest.raises(ClientError) as e:
        client.get_job("0b5e8c1e")
    assert (e.value.cause, e.value.message) == (404, "no job matches '0b5e8c1e'")
    for uuid in ("7f00aa11-0000-4000-8000-000000000001", "7f00bb22-0000-4000-8000-000000000002"):
        daemon.jobs[uuid] = {"uuid": uuid, "state": "succeeded"}
    with pytest.raises(ClientError) as e:
        client.get_job("7f00")
    assert e.value.cause == 409 and "give more of the uuid" in e.value.message
    with pytest.raises(ClientError) as e:
        Client(str(tmp_path / "nobody.sock")).add_job("true")
    assert e.value.cause == lclient.UNREACHABLE and "\n" not in e.value.message
    assert "no socket" in e.value.message
    with pytest.raises(ClientError) as e:
        Client(server="ftp://node1:7800")
    assert e.value.cause == lclient.BAD_URL
    with pytest.raises(ClientError) as e:
        lclient.read_token(str(tmp_path / "no-token"))
    assert e.value.cause == lclient.DENIED and "no-token" in e.value.message


def test_an_array_with_dependencies_and_constraints(daemon):
    client = Client(daemon.socket)
    parent = client.add_job("make")
    made = client.add_array(commands=["./run a", "./run b"], after=(parent["uuid"],),
                            after_mode="ok", constraints=["rack=a"], max_running=1)
    assert daemon.requests[-1][2] == {"commands": ["./run a", "./run b"], "after": [parent["uuid"]],
                                      "after_mode": "ok", "constraints": ["rack=a"],
                                      "max_running": 1}
    assert [j["command"] for j in made["jobs"]] == ["./run a", "./run b"]
    array = made["array"]
    copies = client.add_array("true", count=3)
    assert len(copies["jobs"]) == 3 and copies["array"] != array
    with pytest.raises(ValueError):
        client.add_array("true")  # neither count nor commands
    # waiting for an array: read it until every member has ended
    while not all(j["state"] in TERMINAL for j in client.get_array(array)["jobs"]):
        time.sleep(0.01)
    assert client.get_array(array)["counts"]["succeeded"] == 2
    with pytest.raises(ClientError) as e:
        client.get_job(array)
    assert e.value.cause == 400 and "is an array of 2 jobs" in e.value.message
    with pytest.raises(ClientError) as e:
        client.get_array(parent["uuid"])
    assert e.value.cause == 400 and "is a job, not an array" in e.value.message
    removed = client.remove_job(copies["array"])
    assert removed["array"] == copies["array"] and len(removed["cancelled"]) == 3
    assert {j["state"] for j in removed["jobs"]} == {"cancelled"}


def test_drain_resume_forget(daemon):
    client = Client(daemon.socket)
    assert client.drain("node1", reason="new disk") == {"name": "node1", "state": "draining",
                                                         "drain_reason": "new disk"}
    assert daemon.requests[-1][:3] == ("POST", "/v1/nodes/node1/drain", {"reason": "new disk"})
    assert client.resume("node1")["state"] == "ready"
    assert daemon.requests[-1][:3] == ("POST", "/v1/nodes/node1/resume", {})
    assert client.forget("node2") is None
    assert daemon.requests[-1][:2] == ("DELETE", "/v1/nodes/node2")
    with pytest.raises(ClientError) as e:
        client.drain("nosuch")
    assert e.value.cause == 404


def test_describe_waiting_words_it_as_lclusterc_does():
    describe = lclient.describe_waiting
    assert describe({"kind": "priority", "text": "3 of 10 ahead", "ahead": 3, "total": 10}) == \
        "priority (3 of 10 ahead)"
    assert describe({"kind": "resources", "text": "no node has 8.0G free; most free: n2 3.1G"}) == \
        "resources: no node has 8.0G free; most free: n2 3.1G"
    assert describe({"kind": "drained", "text": ""}) == "drained"
    assert describe(None) is None and describe({"text": "x"}) is None


@pytest.mark.parametrize("old_version", [False, True])
def test_an_array_answered_with_its_uuids_only_also_by_an_older_node(daemon, old_version):
    daemon.old_version = old_version
    made = Client(daemon.socket).add_array("true", count=3, records=False)
    assert daemon.requests[-1][1] == "/v1/jobs?answer=uuids"
    assert made == {"array": made["array"], "uuids": daemon.arrays[made["array"]]}
    assert len(made["uuids"]) == 3
