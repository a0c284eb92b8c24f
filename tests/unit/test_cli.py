"""lclusterc against a fake daemon: an in-process HTTP server on a unix socket
that implements docs/api.md on a dict, and records every request it gets."""

import datetime
import http.server
import json
import re
import socket
import socketserver
import threading
import uuid as uuidlib

import pytest
from click.testing import CliRunner

from lclusterd import __version__, cli, client, quick

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
JOB_A = "0b5e8c1e-3c1f-4a43-9d59-1d1c1f0a2b77"
JOB_B = "7f00aa11-0000-4000-8000-000000000001"
JOB_C = "7f00bb22-0000-4000-8000-000000000002"


def record(uuid, command="echo hello", state="succeeded", submitted=1764431000.12, **changes):
    job = {
        "uuid": uuid, "command": command, "state": state,
        "uid": 1000, "gid": 1000, "user": "alice", "node": "node1",
        "unit": f"lcluster-job@{uuid}.service",
        "submitted_at": submitted, "started_at": submitted + 0.08, "ended_at": submitted + 0.19,
        "exit_status": 0, "result": "success", "reason": "exited with status 0",
        # as the daemon sends them for a job of its own (docs/api.md)
        "after": [], "after_mode": None, "constraints": [], "array": None, "array_index": None,
        "max_running": None,
    }
    job.update(changes)
    return job


class FakeDaemon:
    def __init__(self):
        self.jobs = {}
        self.requests = []  # (method, path, body) of every request, in order
        self.force = None  # (status, answer): every request gets this
        self.finish = None  # (state, exit_status): what a live job is on its next GET
        self.output = {}  # uuid: bytes, a job's output for GET .../logs
        self.headers = []  # the headers of every request, in order
        self.drop = 0  # this many requests are read, then the connection closed unanswered
        self.arrays = {}  # array id: [member uuids]
        self.nodes = {}  # name: NODE row (drain, resume, forget)

    def add(self, job):
        self.jobs[job["uuid"]] = job
        return job

    def answer(self, method, path, body):
        if self.force:
            return self.force
        route, _, query = path.partition("?")
        if method == "POST" and route == "/v1/jobs" and ("count" in body or "commands" in body):
            array = str(uuidlib.uuid4())
            commands = body.get("commands") or [body["command"]] * body["count"]
            jobs = [self.add(record(str(uuidlib.uuid4()), command, state="queued", array=array,
                                    array_index=i, max_running=body.get("max_running")))
                    for i, command in enumerate(commands)]
            self.arrays[array] = [job["uuid"] for job in jobs]
            return 201, {"array": array, "jobs": jobs}
        if route.startswith("/v1/nodes/"):
            name, _, verb = route[len("/v1/nodes/"):].partition("/")
            if name not in self.nodes:
                return 404, {"error": f"no node '{name}'"}
            row = self.nodes[name]
            if method == "DELETE":
                if row["state"] != "failed":
                    return 409, {"error": f"node {name} is live: only a failed node is forgotten"}
                del self.nodes[name]
                return 200, {"forgotten": name}
            if verb == "drain":
                row.update(state="draining", drain_reason=body.get("reason"))
            elif verb == "resume":
                row.update(state="ready", drain_reason=None)
            return 200, {"node": row}
        if method == "POST" and route == "/v1/jobs":
            job = self.add(record(str(uuidlib.uuid4()), body["command"], state="queued", started_at=None,
                                  ended_at=None, exit_status=None, result=None, reason=None))
            return 201, {"job": job}
        if method == "GET" and route == "/v1/jobs":
            args = dict(p.split("=", 1) for p in query.split("&") if p)
            jobs = sorted(self.jobs.values(), key=lambda j: -j["submitted_at"])
            jobs = [j for j in jobs if j["state"] == args.get("state", j["state"])]
            return 200, {"jobs": jobs[:int(args.get("limit", 50))]}
        if route.startswith("/v1/jobs/") and route.endswith("/logs"):
            matches = [u for u in self.jobs if u.startswith(route[len("/v1/jobs/"):-len("/logs")])]
            if len(matches) != 1:
                return 404, {"error": "no job matches"}
            ref = matches[0]
            args = dict(p.split("=", 1) for p in query.split("&") if p)
            output = self.output.get(ref, b"")
            if "tail" in args:
                output = b"".join(output.splitlines(True)[-int(args["tail"]):])
            if self.finish and ref in self.jobs:
                state, status = self.finish
                self.jobs[ref].update(state=state, exit_status=status, reason=f"status {status}")
            return 200, output
        if route.startswith("/v1/jobs/") and route[len("/v1/jobs/"):] in self.arrays:
            array = route[len("/v1/jobs/"):]
            jobs = [self.jobs[u] for u in self.arrays[array]]
            if method == "DELETE":
                live = [j for j in jobs if j["state"] not in quick.TERMINAL]
                for j in live:
                    j.update(state="cancelled", reason="removed by alice")
                return 200, {"array": array, "cancelled": [j["uuid"] for j in live], "jobs": jobs}
            if self.finish:
                for j in jobs:
                    j.update(state=self.finish[0], exit_status=self.finish[1])
            counts = {state: sum(j["state"] == state for j in jobs) for state in quick.STATES}
            return 200, {"array": array, "counts": counts, "max_running": jobs[0].get("max_running"),
                         "jobs": jobs}
        if route.startswith("/v1/jobs/"):
            ref = route[len("/v1/jobs/"):]
            matches = [u for u in self.jobs if u.startswith(ref)]
            if not matches:
                return 404, {"error": f"no job matches '{ref}'"}
            if len(matches) > 1:
                return 409, {"error": f"'{ref}' matches {len(matches)} jobs: give more of the uuid"}
            job = self.jobs[matches[0]]
            if method == "DELETE":
                job.update(state="cancelled", reason="removed by alice")
            elif method == "GET" and self.finish and job["state"] not in quick.TERMINAL:
                state, status = self.finish
                job.update(state=state, exit_status=status, ended_at=job["submitted_at"] + 1,
                           reason=f"exited with status {status}")
            return 200, {"job": job}
        return 404, {"error": "no such route"}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def serve(self):
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        fake.requests.append((self.command, self.path, body))
        fake.headers.append(dict(self.headers))
        if fake.drop:  # the answer is lost: the daemon died after reading the request
            fake.drop -= 1
            self.close_connection = True
            return
        status, answer = fake.answer(self.command, self.path, body)
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = serve

    def log_message(self, *args):  # quiet; and a unix peer has no address to log
        pass


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that went away (BrokenPipeError) is no failure of the fake;
        # printed, it lands in whatever test's captured stderr runs then.
        pass


@pytest.fixture
def fake(tmp_path):
    server = Server(str(tmp_path / "lclusterd.sock"), Handler)
    server.fake = FakeDaemon()
    server.fake.socket = server.server_address
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield server.fake
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(quick, "POLL_INTERVAL", 0.01)


def run(fake_or_path, *args, env=None, input=None):
    path = fake_or_path if isinstance(fake_or_path, str) else fake_or_path.socket
    return CliRunner(mix_stderr=False).invoke(cli.lclusterc, ["--socket", path, *args], env=env,
                                              input=input)


def one_error_line(result):
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lclusterc: ")
    assert "Traceback" not in result.stderr
    return lines[0]


# --- addjob --------------------------------------------------------------------

def test_addjob_prints_the_full_uuid_only(fake):
    result = run(fake, "addjob", "echo hello from $(hostname)")
    assert result.exit_code == 0, result.stderr
    assert UUID.match(result.stdout.strip()) and result.stdout.count("\n") == 1
    assert fake.requests == [("POST", "/v1/jobs", {"command": "echo hello from $(hostname)"})]
    assert result.stdout.strip() in fake.jobs


def test_addjob_count_makes_one_array_and_prints_its_id_then_every_uuid(fake):
    result = run(fake, "addjob", "--count", "5", "true")
    assert result.exit_code == 0, result.stderr
    array, *uuids = result.stdout.split()
    assert array in fake.arrays and uuids == fake.arrays[array]
    assert len(set(uuids)) == 5 and all(UUID.match(u) for u in uuids)
    assert fake.requests == [("POST", "/v1/jobs?answer=uuids", {"command": "true", "count": 5})]


def test_addjob_count_json_prints_the_array_and_its_jobs(fake):
    result = run(fake, "addjob", "--count", "3", "--max-running", "2", "--json", "true")
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"array", "jobs"} and len(answer["jobs"]) == 3
    assert [j["uuid"] for j in answer["jobs"]] == fake.arrays[answer["array"]]
    assert fake.requests[0][2] == {"command": "true", "count": 3, "max_running": 2}


@pytest.mark.parametrize("args,message", [
    (["--count", "0", "true"], "count must be a whole number of at least 1"),
    (["--count", "-3", "true"], "count must be a whole number of at least 1"),
    (["--count", "2", "--wait", "true"], "--wait takes one job"),
    (["--count", "1001", "true"], "--count 1001: an array holds at most 1000 jobs; queue more"),
])
def test_addjob_count_refused(fake, args, message):
    result = run(fake, "addjob", *args)
    assert result.exit_code == 2
    assert message in one_error_line(result)
    assert fake.requests == []


def test_addjob_json_prints_the_record(fake):
    result = run(fake, "addjob", "--json", "true")
    job = json.loads(result.stdout)
    assert result.exit_code == 0 and job["command"] == "true" and job["state"] == "queued"


@pytest.mark.parametrize("state, status, code", [
    ("succeeded", 0, 0),
    ("failed", 3, 3),
    ("failed", None, 1),
    ("cancelled", None, 130),
])
def test_addjob_wait_exits_with_the_jobs_status(fake, state, status, code):
    fake.finish = (state, status)
    result = run(fake, "addjob", "--wait", "exit 3")
    assert result.exit_code == code, result.stderr
    uuid = result.stdout.strip()
    assert UUID.match(uuid)
    assert [r[:2] for r in fake.requests] == [("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{uuid}")]
    if state == "succeeded":
        assert result.stderr == ""
    else:
        assert one_error_line(result).startswith(f"lclusterc: job {uuid} {state}: ")


def test_addjob_wait_json_prints_the_final_record(fake):
    fake.finish = ("failed", 3)
    result = run(fake, "addjob", "--wait", "--json", "exit 3")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["state"] == "failed"


# --- checkjob, removejob, list -------------------------------------------------------

def test_checkjob_human(fake):
    job = fake.add(record(JOB_A))
    result = run(fake, "checkjob", JOB_A)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    keys = [line.split(":")[0] for line in lines]
    assert keys == ["uuid", "state", "command", "user", "node", "unit", "submitted", "started",
                    "ended", "duration", "exit status", "result", "reason", "submitter",
                    "limits", "network", "workdir", "env", "attempts"]
    # aligned: every value starts in the same column
    assert len({len(re.match(r"^[a-z ]+: +", line).group()) for line in lines}) == 1
    values = {k: line.split(":", 1)[1].strip() for k, line in zip(keys, lines)}
    local = datetime.datetime.fromtimestamp(job["submitted_at"]).astimezone()
    assert values["submitted"] == local.isoformat(timespec="seconds")
    assert values == {**values, "uuid": JOB_A, "state": "succeeded", "command": "echo hello",
                      "user": "alice (1000/1000)", "node": "node1", "duration": "0.1s",
                      "exit status": "0", "result": "success", "reason": "exited with status 0"}


def test_checkjob_of_a_queued_job_shows_dashes(fake):
    fake.add(record(JOB_A, state="queued", node=None, started_at=None, ended_at=None,
                    exit_status=None, result=None, reason=None))
    result = run(fake, "checkjob", JOB_A)
    assert re.search(r"^started: +-$", result.stdout, re.M)
    assert re.search(r"^exit status: +-$", result.stdout, re.M)


def test_checkjob_json(fake):
    job = fake.add(record(JOB_A))
    result = run(fake, "checkjob", "--json", JOB_A)
    assert result.exit_code == 0 and json.loads(result.stdout) == job


@pytest.mark.parametrize("ref, sent", [("0b5e", "0b5e"), ("0B5E8C1E", "0b5e8c1e"), ("0b5e8c1e-3c1f", "0b5e8c1e-3c1f")])
def test_prefix_refs_pass_through(fake, ref, sent):
    fake.add(record(JOB_A))
    result = run(fake, "checkjob", ref)
    assert result.exit_code == 0, result.stderr
    assert fake.requests == [("GET", f"/v1/jobs/{sent}", None),
                             ("GET", f"/v1/jobs/{JOB_A}/logs?tail=5", None)]


def test_removejob(fake):
    fake.add(record(JOB_A, state="running"))
    result = run(fake, "removejob", "0b5e8c1e")
    assert result.exit_code == 0
    assert result.stdout == f"cancelled {JOB_A}\n"
    assert fake.requests == [("DELETE", "/v1/jobs/0b5e8c1e", None)]


def test_list_fits_a_narrow_terminal(fake):
    for i, u in enumerate((JOB_A, JOB_B, JOB_C)):
        fake.add(record(u, command=f"job{i} " + "x" * 200 + "\x1b[31m", submitted=1764431000 + i))
    result = run(fake, "list", env={"COLUMNS": "200"})
    assert result.stdout.splitlines()[0].split() == ["UUID", "STATE", "EXIT", "USER", "NODE",
                                                     "SUBMITTED", "COMMAND"]
    for columns, header in ((60, ["UUID", "STATE", "EXIT", "USER", "NODE", "COMMAND"]),
                            (40, ["UUID", "STATE", "EXIT", "COMMAND"]), (20, ["UUID", "STATE", "COMMAND"])):
        result = run(fake, "list", env={"COLUMNS": str(columns)})
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split() == header
        assert [line[:8] for line in lines[1:]] == [JOB_C[:8], JOB_B[:8], JOB_A[:8]]  # newest first
        assert all(len(line) <= max(columns, 8 + 2 + 9 + 2 + 7) for line in lines), lines
        assert all(line.endswith("…") and " job" in line for line in lines[1:])
        assert "\x1b" not in result.stdout
    assert fake.requests[-1] == ("GET", "/v1/jobs?limit=20", None)


def test_list_shows_escaped_control_characters(fake):
    fake.add(record(JOB_A, command="printf '\\033[2J'\necho \x1b[31mred"))
    result = run(fake, "list", env={"COLUMNS": "200"})
    assert result.stdout.splitlines()[1].endswith("printf '\\033[2J'\\necho \\x1b[31mred")


def test_list_options_and_json(fake):
    fake.add(record(JOB_A, state="running"))
    fake.add(record(JOB_B))
    result = run(fake, "list", "--limit", "5", "--state", "running", "--json")
    assert result.exit_code == 0
    assert [j["uuid"] for j in json.loads(result.stdout)] == [JOB_A]
    assert fake.requests == [("GET", "/v1/jobs?limit=5&state=running", None)]


# --- the old spellings ---------------------------------------------------------------

def test_old_addjob_spellings(fake):
    for args in (["--addjob=echo old"], ["--addjob", "echo old"], ["--addjob=-n is a flag"]):
        result = run(fake, *args)
        assert result.exit_code == 0, (args, result.output, result.stderr)
        assert UUID.match(result.stdout.strip())
    assert [r[2]["command"] for r in fake.requests] == ["echo old", "echo old", "-n is a flag"]


def test_old_checkjob_and_removejob_spellings(fake):
    fake.add(record(JOB_A, state="running"))
    result = run(fake, f"--checkjob={JOB_A}")
    assert result.exit_code == 0 and f"uuid:        {JOB_A}" in result.stdout
    result = run(fake, "--checkjob", "0b5e", "--json")
    assert json.loads(result.stdout)["uuid"] == JOB_A
    result = run(fake, f"--removejob={JOB_A}")
    assert result.exit_code == 0 and result.stdout == f"cancelled {JOB_A}\n"


@pytest.mark.parametrize("args, rewritten", [
    (["--addjob=a b"], ["addjob", "--", "a b"]),
    (["--socket", "/s", "--addjob", "x", "--wait"], ["--socket", "/s", "addjob", "--wait", "--", "x"]),
    (["--checkjob="], ["checkjob", "--", ""]),
    (["--addjob"], ["addjob"]),
    (["addjob", "--", "--addjob=x"], ["addjob", "--", "--addjob=x"]),  # a command text, not an option
    (["list", "--removejob=x"], ["list", "--removejob=x"]),
])
def test_rewrite_old_spellings(args, rewritten):
    assert cli._rewrite_old_spellings(args) == rewritten


# --- bad input: one line, exit 2, nothing sent ---------------------------------------

@pytest.mark.parametrize("args, message", [
    (["addjob", ""], "lclusterc: command is empty"),
    (["addjob", "  \t\n "], "lclusterc: command is empty"),
    (["addjob", "x" * 65537], "lclusterc: command is longer than 65536 bytes"),
    (["addjob", "é" * 32769], "lclusterc: command is longer than 65536 bytes"),  # bytes, not characters
    (["addjob", "echo a\0b"], "lclusterc: command contains a NUL byte"),
    (["addjob", "echo \udcff"], "lclusterc: command is not valid UTF-8"),
    (["--addjob="], "lclusterc: command is empty"),
    (["checkjob", "abc"], "lclusterc: job uuid prefix 'abc' is too short (at least 4 characters)"),
    (["checkjob", "0b5e/../x"], "lclusterc: '0b5e/../x' is not a job uuid"),
    (["removejob", "zzzz"], "lclusterc: 'zzzz' is not a job uuid"),
    (["removejob", "0" * 36], f"lclusterc: '{'0' * 36}' is not a job uuid"),
    (["--checkjob=0b"], "lclusterc: job uuid prefix '0b' is too short (at least 4 characters)"),
])
def test_bad_input_is_refused_before_the_daemon(fake, args, message):
    result = run(fake, *args)
    assert result.exit_code == 2
    assert one_error_line(result) == message
    assert result.stdout == ""
    assert fake.requests == []


def test_the_largest_command_is_sent(fake):
    result = run(fake, "addjob", "é" * 32768)  # exactly 65536 bytes
    assert result.exit_code == 0 and len(fake.requests) == 1


@pytest.mark.parametrize("args, words", [
    (["addjob"], "give COMMAND or --file FILE"), (["list", "--limit", "0"], "'--limit'"),
    (["list", "--state", "bogus"], "'bogus' is not one of"), (["nosuchcommand"], "No such command"),
    (["--bogus"], "No such option: --bogus"), (["logs", "--tail", "-1", JOB_A], "'--tail'"),
])
def test_usage_errors_are_one_line_exit_2(fake, args, words):
    result = run(fake, *args)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert words in line and line.endswith("--help')") and "Usage:" not in line
    assert result.stdout == "" and fake.requests == []


def test_usage_errors_of_main_are_one_line(fake, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--socket", fake.socket, "logs", "--tail", "-1", JOB_A])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lclusterc: Invalid value for '--tail'")
    assert "(see 'lclusterc logs --help')" in err


# --- failures from the daemon, or no daemon -------------------------------------------

def test_daemon_unreachable(tmp_path):
    path = str(tmp_path / "nobody.sock")
    result = run(path, "addjob", "true")
    assert result.exit_code == 5
    line = one_error_line(result)
    assert line.startswith(f"lclusterc: lclusterd is not running (no socket {path}; ")
    assert "systemctl status lclusterd" in line and "sudo systemctl start lclusterd.socket" in line


def test_socket_without_listener(tmp_path):
    path = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # a socket file that nobody listens on: connection refused
        result = run(path, "list")
    assert result.exit_code == 5
    line = one_error_line(result)
    assert line.startswith(f"lclusterc: lclusterd is not running (nothing listens on {path}; ")
    assert "systemctl status lclusterd" in line


def _resetting_socket(path):
    """What lclusterd.socket does when the daemon will not start (a bad token
    file): it accepts, then the connection is closed or reset unanswered."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.parametrize("args", [["list"], ["addjob", "true"], ["checkjob", JOB_A]])
def test_a_daemon_that_closes_the_connection_is_not_running(tmp_path, monkeypatch, args):
    monkeypatch.setattr(client, "RETRY_PAUSE", 0)
    path = str(tmp_path / "reset.sock")
    listener = _resetting_socket(path)
    try:
        result = run(path, *args)
    finally:
        listener.close()
    assert result.exit_code == 5
    line = one_error_line(result)
    assert line == ("lclusterc: lclusterd is not running (it closed the connection without "
                    "an answer; see systemctl status lclusterd)")


def test_socket_from_the_environment(fake):
    result = CliRunner(mix_stderr=False).invoke(cli.lclusterc, ["addjob", "true"],
                                                env={"LCLUSTER_SOCKET": fake.socket})
    assert result.exit_code == 0 and len(fake.requests) == 1


def test_permission_denied_on_the_socket(fake, monkeypatch):
    def refuse(path, timeout):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(client, "unix_connect", refuse)  # every request's way to the socket
    result = run(fake, "list")
    assert result.exit_code == 4
    assert one_error_line(result) == f"lclusterc: permission denied on the socket {fake.socket}"


@pytest.mark.parametrize("status, error, code", [
    (503, "etcd is unreachable at 127.0.0.1:2379: nothing was written", 6),
    (403, "only the submitter or root may remove this job", 4),
    (404, f"no job matches '{JOB_A}'", 3),
    (409, "'0b5e' matches 2 jobs: give more of the uuid", 3),
    (400, "unknown field 'cmd'", 2),
    (500, "internal error", 1),
])
def test_http_errors_become_exit_codes(fake, status, error, code):
    fake.force = (status, {"error": error})
    result = run(fake, "removejob", JOB_A)
    assert result.exit_code == code
    assert one_error_line(result) == f"lclusterc: {error}"
    assert result.stdout == ""


def test_real_404_and_409(fake):
    fake.add(record(JOB_B))
    fake.add(record(JOB_C))
    result = run(fake, "checkjob", "dead")
    assert result.exit_code == 3 and one_error_line(result) == "lclusterc: no job matches 'dead'"
    result = run(fake, "checkjob", "7f00")
    assert result.exit_code == 3 and "matches 2 jobs" in one_error_line(result)


def test_error_without_json_body(fake):
    fake.force = (502, b"<html>bad gateway</html>")
    result = run(fake, "list")
    assert result.exit_code == 1
    assert one_error_line(result) == "lclusterc: lclusterd answered HTTP 502 Bad Gateway"


@pytest.mark.parametrize("answer", [b"not json", b"[]", b'{"job": {"state": "queued"}}'])
def test_malformed_answer(fake, answer):
    fake.force = (201, answer)
    result = run(fake, "addjob", "true")
    assert result.exit_code == 1 and "malformed answer from lclusterd" in one_error_line(result)


# --- main(): the entry point -------------------------------------------------------------

def test_main_ctrl_c_exits_130_without_traceback(fake, monkeypatch, capsys):
    def interrupted(self, command, **spec):
        raise KeyboardInterrupt
    monkeypatch.setattr(client.Client, "add_job", interrupted)
    with pytest.raises(SystemExit) as exit:
        cli.main(["--socket", fake.socket, "--addjob=sleep 100"])
    assert exit.value.code == 130
    assert "Traceback" not in capsys.readouterr().err


def test_main_exit_codes(fake, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--socket", fake.socket, "checkjob", "abc"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.startswith("lclusterc: job uuid prefix 'abc' is too short")
    fake.finish = ("failed", 7)
    with pytest.raises(SystemExit) as exit:
        cli.main(["--socket", fake.socket, "addjob", "--wait", "exit 7"])
    assert exit.value.code == 7
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0 and __version__ in capsys.readouterr().out


# --- history, logs, wait ------------------------------------------------------------

def test_list_filters_are_sent(fake, monkeypatch):
    monkeypatch.setattr(cli.time, "time", lambda: 1_000_000.0)
    result = run(fake, "list", "--state", "warned", "--node", "n1", "--user", "bob",
                 "--since", "2d", "--until", "6h", "--limit", "3")
    assert result.exit_code == 0, result.stderr
    assert fake.requests == [("GET", "/v1/jobs?limit=3&state=warned&node=n1&user=bob"
                              "&since=827200.0&until=978400.0", None)]


def test_list_refuses_a_bad_time_before_the_daemon(fake):
    result = run(fake, "list", "--since", "last tuesday")
    assert result.exit_code == 2 and "not a time" in one_error_line(result)
    assert fake.requests == []


def test_logs_prints_the_output_as_it_is(fake):
    fake.add(record(JOB_A))
    fake.output[JOB_A] = b"one\n\xff raw \x1b[31m\ntwo\n"
    result = run(fake, "logs", JOB_A)
    assert result.exit_code == 0 and result.stdout_bytes == fake.output[JOB_A]
    result = run(fake, "logs", "--tail", "1", JOB_A[:8])
    assert result.stdout_bytes == b"two\n"
    assert fake.requests[-1] == ("GET", "/v1/jobs/0b5e8c1e/logs?tail=1", None)


@pytest.mark.parametrize("state,status,code", [("succeeded", 0, 0), ("failed", 3, 3),
                                               ("cancelled", None, 130)])
def test_logs_follow_exits_with_the_jobs_status(fake, state, status, code):
    fake.add(record(JOB_A, state="running"))
    fake.output[JOB_A] = b"working\n"
    fake.finish = (state, status)
    result = run(fake, "logs", "-f", JOB_A)
    assert result.exit_code == code and result.stdout == "working\n"
    assert fake.requests[0] == ("GET", f"/v1/jobs/{JOB_A}/logs?follow=1", None)


def test_logs_of_no_job(fake):
    result = run(fake, "logs", JOB_A)
    assert result.exit_code == 3 and "no job" in one_error_line(result)


def test_checkjob_shows_the_last_lines(fake):
    fake.add(record(JOB_A))
    fake.output[JOB_A] = b"".join(b"line %d\n" % i for i in range(1, 9))
    lines = run(fake, "checkjob", JOB_A).stdout.splitlines()
    assert "last 5 line(s)" in lines[-6] and lines[-5:] == [f"  line {i}" for i in range(4, 9)]


def test_checkjob_shows_a_warning(fake):
    fake.add(record(JOB_A, state="warned", warned_at=1764431001.0, warning="still has processes"))
    assert re.search(r"^warned: +\S+: still has processes$", run(fake, "checkjob", JOB_A).stdout, re.M)


def test_removejob_of_a_job_that_does_not_stop_exits_1(fake):
    fake.add(record(JOB_A, state="running"))
    fake.force = (200, {"job": record(JOB_A, state="warned", warning="still has processes")})
    result = run(fake, "removejob", JOB_A)
    assert result.exit_code == 1 and result.stdout == f"warned {JOB_A}\n"
    assert "did not stop: still has processes" in one_error_line(result)


@pytest.mark.parametrize("finish,code", [(("succeeded", 0), 0), (("failed", 2), 1)])
def test_wait_exits_0_only_if_all_succeeded(fake, finish, code):
    fake.add(record(JOB_A))
    fake.add(record(JOB_B, state="running"))
    fake.finish = finish
    result = run(fake, "wait", JOB_A, JOB_B[:8], JOB_A)
    assert result.exit_code == code, result.stderr
    assert result.stdout == f"succeeded {JOB_A}\n{finish[0]} {JOB_B}\n"


def test_wait_needs_a_job(fake):
    assert run(fake, "wait").exit_code == 2


# --- what a job asks for ------------------------------------------------------------

def test_addjob_sends_what_the_job_asks_for(fake):
    result = run(fake, "addjob", "--memory", "256M", "--cpus", "0.5", "--tasks", "64", "--timeout",
                 "10m", "--env", "A=1", "--env", "B=x y", "--workdir", "/srv", "--network", "none",
                 "--user", "bob", "true")
    assert result.exit_code == 0, result.stderr
    assert fake.requests[-1][2] == {"command": "true", "memory": "256M", "cpus": "0.5", "tasks": "64",
                                    "timeout": "10m", "env": ["A=1", "B=x y"], "workdir": "/srv",
                                    "network": "none", "user": "bob"}
    run(fake, "addjob", "true")
    assert fake.requests[-1][2] == {"command": "true"}  # nothing asked: the node's defaults


@pytest.mark.parametrize("args", [("--memory", "lots"), ("--cpus", "0"), ("--tasks", "1.5"),
                                  ("--timeout", "soon"), ("--env", "A"), ("--workdir", "tmp"),
                                  ("--network", "bridge")])
def test_addjob_bad_requests_never_reach_the_daemon(fake, args):
    result = run(fake, "addjob", *args, "true")
    assert result.exit_code == 2
    one_error_line(result)
    assert fake.requests == []


def test_checkjob_unit_properties(fake):
    fake.force = (200, {"properties": [["PrivateTmp", True], ["ProtectProc", "invisible"],
                                       ["ExecStart", [["/bin/sh", ["/bin/sh", "-c", "echo hi"], False]]],
                                       ["Environment", ["LCLUSTER_JOB_ID=x", "A=b c"]],
                                       ["CapabilityBoundingSet", 0]]})
    result = run(fake, "checkjob", "--unit-properties", "abcd")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "PrivateTmp=yes", "ProtectProc=invisible", "ExecStart=/bin/sh -c 'echo hi'",
        "Environment=LCLUSTER_JOB_ID=x 'A=b c'", "CapabilityBoundingSet=0"]
    assert fake.requests[-1][:2] == ("GET", "/v1/jobs/abcd/unit-properties")


# --- contract C5: retry-safe submission (issue 10 item 12) ----------------------------------

def test_every_submission_carries_an_idempotency_key(fake):
    assert run(fake, "addjob", "true").exit_code == 0
    assert run(fake, "addjob", "--count", "64", "true").exit_code == 0
    assert run(fake, "addjob", "--file", "-", input="true\nfalse\n").exit_code == 0
    keys = [h.get("Idempotency-Key") for h in fake.headers]
    assert len(keys) == 3 and all(UUID.match(k or "") for k in keys) and len(set(keys)) == 3
    assert run(fake, "list").exit_code == 0
    assert "Idempotency-Key" not in fake.headers[-1]


@pytest.mark.parametrize("args", [["addjob", "true"], ["addjob", "--count", "3", "true"]])
def test_a_lost_answer_is_asked_again_once_with_the_same_key(fake, monkeypatch, args):
    monkeypatch.setattr(client, "RETRY_PAUSE", 0)
    fake.drop = 1
    result = run(fake, *args)
    assert result.exit_code == 0, result.stderr
    assert [r[0] for r in fake.requests] == ["POST"] * 2 and fake.requests[0] == fake.requests[1]
    assert fake.headers[0]["Idempotency-Key"] == fake.headers[1]["Idempotency-Key"]
    assert all(UUID.match(line) for line in result.stdout.split())


def test_two_lost_answers_are_a_failure(fake, monkeypatch):
    monkeypatch.setattr(client, "RETRY_PAUSE", 0)
    fake.drop = 2
    result = run(fake, "addjob", "true")
    assert result.exit_code == 5 and "lclusterd is not running" in one_error_line(result)
    assert len(fake.requests) == 2


@pytest.mark.parametrize("status", [500, 503, 400])
def test_an_answer_that_came_is_not_asked_again(fake, status):
    fake.force = (status, {"error": "no"})
    assert run(fake, "addjob", "true").exit_code != 0
    assert len(fake.requests) == 1


def test_exit_codes_of_the_new_statuses(fake):
    for status, code in ((429, 4), (507, 6), (413, 2)):
        fake.force = (status, {"error": f"status {status}"})
        result = run(fake, "addjob", "true")
        assert result.exit_code == code and one_error_line(result) == f"lclusterc: status {status}"


# --- issue 9 item 21: logs of a job that never ran, checkjob of a warned job -------------------

def test_logs_of_a_queued_job_says_it_has_not_started(fake):
    fake.add(record(JOB_A, state="queued", node=None, started_at=None, ended_at=None))
    result = run(fake, "logs", JOB_A)
    assert result.exit_code == 0 and result.stdout == ""
    assert one_error_line(result) == f"lclusterc: job {JOB_A} has not started yet (queued): no output"


def test_logs_of_a_job_cancelled_in_the_queue_says_it_never_ran(fake):
    fake.add(record(JOB_A, state="cancelled", node=None, started_at=None))
    result = run(fake, "logs", JOB_A)
    assert result.exit_code == 0
    assert one_error_line(result) == f"lclusterc: job {JOB_A} never ran (cancelled): no output"


def test_logs_of_a_silent_job_that_ran_says_nothing(fake):
    fake.add(record(JOB_A))
    result = run(fake, "logs", JOB_A)
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""


def test_checkjob_of_a_warned_job_shows_when_its_stop_began(fake):
    fake.add(record(JOB_A, state="warned", ended_at=1764431001.0, warned_at=1764431016.0,
                    warning="still has processes 15 s after removejob", warned_from="cancelled"))
    out = run(fake, "checkjob", JOB_A).stdout
    assert not re.search(r"^ended:", out, re.M)
    began = datetime.datetime.fromtimestamp(1764431001.0).astimezone().isoformat(timespec="seconds")
    assert re.search(rf"^stop began: +{re.escape(began)}$", out, re.M)
    assert re.search(r"^duration: +.* so far$", out, re.M)
    fake.add(record(JOB_B, state="warned", ended_at=None, warned_at=1764431016.0,
                    warning="still has processes after its timeout", warned_from="running"))
    out = run(fake, "checkjob", JOB_B).stdout
    began = datetime.datetime.fromtimestamp(1764431016.0).astimezone().isoformat(timespec="seconds")
    assert re.search(rf"^stop began: +{re.escape(began)}$", out, re.M) and "ended:" not in out


# --- issue 11: dependencies, constraints, arrays, why a job waits --------------------------

@pytest.mark.parametrize("option, mode", [("--after", "ok"), ("--after-any", "any"),
                                          ("--after-failed", "failed")])
def test_addjob_after_sends_the_parents_and_the_mode(fake, option, mode):
    result = run(fake, "addjob", option, f"{JOB_A},{JOB_B}", option, "7f00bb22", "true")
    assert result.exit_code == 0, result.stderr
    assert fake.requests == [("POST", "/v1/jobs", {"command": "true", "after": [JOB_A, JOB_B, "7f00bb22"],
                                                   "after_mode": mode})]


@pytest.mark.parametrize("args, words", [
    (["--after", "nonsense"], "--after: 'nonsense' is not a job uuid"),
    (["--after-any", "0b5e/../x"], "--after-any: '0b5e/../x' is not a job uuid"),
    (["--after-failed", "ab"], "--after-failed: job uuid prefix 'ab' is too short"),
    (["--after", ","], "--after needs a job uuid"),
    (["--after", JOB_A, "--after-any", JOB_B], "give one of --after, --after-any and --after-failed"),
    (["--constraint", "rack"], "constraint 'rack' is not KEY=VALUE"),
    (["--constraint", "rack=a", "--constraint", "rack=b"], "no node has both"),
    (["--count", "3", "--max-running", "0"], "max_running must be a whole number"),
    (["--count", "3", "--max-running", "two"], "max_running must be a whole number"),
    (["--max-running", "2"], "--max-running throttles an array"),
])
def test_bad_scheduling_options_are_one_line_and_nothing_is_sent(fake, args, words):
    result = run(fake, "addjob", *args, "true")
    assert result.exit_code == quick.EXIT_USAGE
    assert words in one_error_line(result)
    assert fake.requests == []


def test_addjob_constraints_are_sent(fake):
    result = run(fake, "addjob", "--constraint", "rack=a", "--constraint", "ssd=yes", "true")
    assert result.exit_code == 0, result.stderr
    assert fake.requests[-1][2] == {"command": "true", "constraints": ["rack=a", "ssd=yes"]}


def test_addjob_file_makes_an_array_of_one_job_per_line(fake, tmp_path):
    commands = tmp_path / "commands"
    commands.write_text("./run a\n\n   \n./run 'b c'\r\n./run d")
    result = run(fake, "addjob", "--file", str(commands), "--max-running", "2", "--after", JOB_A,
                 "--memory", "1G")
    assert result.exit_code == 0, result.stderr
    array, *uuids = result.stdout.split()
    assert uuids == fake.arrays[array] and len(uuids) == 3
    assert fake.requests == [("POST", "/v1/jobs?answer=uuids", {
        "commands": ["./run a", "./run 'b c'", "./run d"], "max_running": 2, "after": [JOB_A],
        "after_mode": "ok", "memory": "1G"})]
    assert [fake.jobs[u]["command"] for u in uuids] == ["./run a", "./run 'b c'", "./run d"]


def test_addjob_file_from_stdin_with_json(fake):
    result = run(fake, "addjob", "--json", "--file", "-", input="echo 1\necho 2\n")
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    assert [j["command"] for j in answer["jobs"]] == ["echo 1", "echo 2"]
    assert answer["array"] in fake.arrays


@pytest.mark.parametrize("content, words", [
    (b"", "has no commands"),
    (b"\n  \n\t\n", "has no commands"),
    (b"echo ok\necho \xff\n", "line 2: command is not valid UTF-8"),
    (b"echo\x00x\n", "line 1: command contains a NUL byte"),
    (b"true\n" * 1001, "has 1001 commands; an array holds at most 1000"),
])
def test_an_unusable_file_is_one_line_exit_2_nothing_sent(fake, tmp_path, content, words):
    path = tmp_path / "commands"
    path.write_bytes(content)
    result = run(fake, "addjob", "--file", str(path))
    assert result.exit_code == quick.EXIT_USAGE
    assert words in one_error_line(result)
    assert fake.requests == []


@pytest.mark.parametrize("args, words", [
    (["--file", "/nonexistent/commands"], "cannot read /nonexistent/commands: No such file"),
    (["--file", "/"], "cannot read /: Is a directory"),
    (["--file", "-"], "stdin has no commands"),
    (["--file", "/dev/null", "true"], "give COMMAND or --file FILE"),
    (["--file", "/dev/null", "--count", "2"], "not with --count"),
    (["--file", "/dev/null", "--wait"], "--wait takes one job, not --file"),
])
def test_file_refusals(fake, args, words):
    result = run(fake, "addjob", *args, input="")
    assert result.exit_code == quick.EXIT_USAGE
    assert words in one_error_line(result)
    assert fake.requests == []


def _array(fake, states):
    array = str(uuidlib.uuid4())
    fake.arrays[array] = []
    for i, state in enumerate(states):
        job = fake.add(record(str(uuidlib.uuid4()), f"./run {i}", state=state, array=array,
                              array_index=i, exit_status=0 if state == "succeeded" else None))
        fake.arrays[array].append(job["uuid"])
    return array


def test_checkjob_of_an_array_counts_its_members_by_state(fake):
    array = _array(fake, ["succeeded", "running", "queued", "queued"])
    fake.jobs[fake.arrays[array][2]]["waiting"] = {"kind": "throttled", "text": "array limit 1 reached",
                                                   "ahead": 0, "total": 2}
    result = run(fake, "checkjob", array)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"array:       {array}"
    assert "jobs:        4" in lines and "states:      2 queued, 1 running, 1 succeeded" in lines
    rows = [line.split(None, 3) for line in lines[lines.index("") + 1:]]
    assert rows[0][:3] == ["INDEX", "UUID", "STATE"] and rows[0][3].split() == ["NODE", "REASON"]
    assert rows[3][:3] == ["2", fake.arrays[array][2], "queued"]
    assert rows[3][3].endswith("throttled: array limit 1 reached")
    answer = json.loads(run(fake, "checkjob", "--json", array).stdout)
    assert answer["array"] == array and answer["counts"]["queued"] == 2


def test_removejob_of_an_array_prints_each_cancelled_member(fake):
    array = _array(fake, ["succeeded", "running", "queued"])
    result = run(fake, "removejob", array)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [f"cancelled {u}" for u in fake.arrays[array][1:]]
    again = run(fake, "removejob", array)
    assert again.exit_code == 0 and again.stdout == ""
    assert "has no live job to cancel" in one_error_line(again)


@pytest.mark.parametrize("finish, code", [(("succeeded", 0), 0), (("failed", 1), 1)])
def test_wait_for_an_array_waits_for_every_member(fake, finish, code):
    array = _array(fake, ["queued", "running"])
    fake.finish = finish
    result = run(fake, "wait", array, fake.arrays[array][0])
    assert result.exit_code == code, result.stderr
    assert result.stdout.splitlines() == [f"{finish[0]} {u}" for u in fake.arrays[array]]


WAITING = {"kind": "resources", "text": "no node has 8.0G free; most free: n2 3.1G", "ahead": 2,
           "total": 10}


def test_list_shows_why_queued_jobs_wait(fake, monkeypatch):
    monkeypatch.setattr("shutil.get_terminal_size", lambda: __import__("os").terminal_size((200, 24)))
    fake.add(record(JOB_A, state="queued", node=None, waiting=WAITING))
    fake.add(record(JOB_B, state="queued", node=None, submitted=1764431001.0,
                    waiting={"kind": "priority", "text": "3 of 10 ahead", "ahead": 3, "total": 10}))
    fake.add(record(JOB_C, state="running", submitted=1764431002.0))
    lines = run(fake, "list").stdout.splitlines()
    assert lines[0].split() == ["UUID", "STATE", "EXIT", "USER", "NODE", "SUBMITTED", "REASON", "COMMAND"]
    rows = {line[:8]: line for line in lines[1:]}
    assert "resources: no node has 8.0G free; most free: n2 3.1G  echo" in rows[JOB_A[:8]]
    assert "priority (3 of 10 ahead)" in rows[JOB_B[:8]]
    assert rows[JOB_C[:8]].split()[1] == "running"


def test_list_without_queued_jobs_has_no_reason_column(fake):
    fake.add(record(JOB_A))
    assert "REASON" not in run(fake, "list").stdout.splitlines()[0]


def test_checkjob_of_a_queued_job_says_its_place_and_why_it_waits(fake):
    fake.add(record(JOB_A, state="queued", node=None, waiting=WAITING, after=[JOB_B],
                    after_mode="any", constraints=["rack=a"]))
    out = run(fake, "checkjob", JOB_A).stdout
    assert re.search(r"^position: +3 of 10 in the queue \(2 ahead\)$", out, re.M), out
    assert re.search(r"^waiting: +resources: no node has 8.0G free; most free: n2 3.1G$", out, re.M)
    assert re.search(rf"^after: +{JOB_B} \(runs once all end\)$", out, re.M)
    assert re.search(r"^constraints: +rack=a$", out, re.M)


def test_checkjob_of_an_array_member_names_its_array(fake):
    array = _array(fake, ["running"])
    fake.jobs[fake.arrays[array][0]]["max_running"] = 2
    out = run(fake, "checkjob", fake.arrays[array][0]).stdout
    assert re.search(rf"^array: +{array} index 0, at most 2 running$", out, re.M), out
