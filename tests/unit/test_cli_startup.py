"""lclusterc's start-up budget (issue 13 item 2): `lclusterc addjob` in a
shell loop costs mostly Python's start-up and imports, so each command may
import only what it needs. Checked by what a fresh interpreter has in
sys.modules at exit, not by timing (a busy machine would make a timed test
flaky, and a slow import is a slow import on any machine)."""

import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lclusterd import api, cli, client, core, inputs, quick
from tests.unit.test_cli import fake  # noqa: F401  (a fixture)

ROOT = str(Path(__file__).resolve().parents[2])
# Each test runs lclusterc in a fresh interpreter (only that one starts cold).
pytestmark = pytest.mark.allow_io("subprocess")

# Never in the client: the daemon's modules and what they pull in.
DAEMON_ONLY = ("aiohttp", "etcd3", "dbus_next", "grpc", "systemd", "pyroute2", "prometheus_client",
               "asyncio", "lclusterd.api", "lclusterd.node", "lclusterd.store", "lclusterd.daemon")
# Not for --help and --version: what only talking to the daemon, validating
# or formatting needs.
NOT_FOR_HELP = DAEMON_ONLY + ("lclusterd.core", "lclusterd.client", "lclusterd.tls", "http.client",
                              "ssl", "email", "json", "socket", "uuid", "hashlib", "urllib.parse",
                              "dataclasses", "shlex")  # shutil: click's help asks the terminal's width
# Not for a request over the unix socket: HTTP over it is a few lines on a
# plain socket (client.py), http.client (with email and ssl) is for TCP.
NOT_FOR_SOCKET = DAEMON_ONLY + ("http.client", "ssl", "email", "lclusterd.tls", "urllib.parse",
                                "shlex")
# Nor for a submission: quick.py reads addjob's command line without click,
# and checks it with inputs.py, not core (whose own imports cost as much again).
NOT_FOR_ADDJOB = NOT_FOR_SOCKET + ("click", "lclusterd.cli", "lclusterd.core", "dataclasses",
                                   "typing", "hashlib", "hmac", "uuid", "datetime")


def modules_after(*args, env=None):
    """The modules a fresh `lclusterc ARGS` has imported when it exits, and its
    exit code; lclusterc as debian/rules writes it."""
    code = ("import atexit, sys\n"  # nothing more: the hook must not import what it reports
            "atexit.register(lambda: sys.__stderr__.write('\\nMODULES ' + ' '.join(sys.modules)))\n"
            "from lclusterd.quick import main\n"
            "main()\n")
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=60)
    return set(done.stderr.rpartition("MODULES ")[2].split()), done


def imported(modules, names):
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_help_and_version_import_only_click(args):
    modules, done = modules_after(*args)
    assert done.returncode == 0, done.stderr
    assert imported(modules, NOT_FOR_HELP) == []


def test_a_subcommands_help_imports_no_http_client():
    modules, done = modules_after("addjob", "--help")  # the group made its Client already
    assert done.returncode == 0 and "--count" in done.stdout, done.stderr
    assert imported(modules, NOT_FOR_SOCKET + ("lclusterd.core",)) == []


def test_importing_the_cli_imports_only_click():
    code = "import sys, lclusterd.cli; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=60, check=True)
    assert imported(done.stdout.split(), NOT_FOR_HELP) == []


@pytest.mark.parametrize("args", [
    ["addjob", "true"],
    ["--addjob=true"],
    ["addjob", "--json", "--priority", "5", "--retries=2", "--memory", "1G", "--env", "A=1",
     "--cpus=0.5", "--timeout", "1h", "--constraint", "a=b", "--after", "0b5e8c1e", "--", "-true"],
])
def test_addjob_over_the_socket_needs_no_click_nor_http_client(fake, args):  # noqa: F811
    modules, done = modules_after("--socket", fake.socket, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in fake.jobs or fake.requests[0][2]["command"] == "-true"
    assert imported(modules, NOT_FOR_ADDJOB) == []


def test_addjob_wait_needs_no_click(fake):  # noqa: F811
    fake.finish = ("failed", 7)
    modules, done = modules_after("--socket", fake.socket, "addjob", "--wait", "exit 7")
    assert done.returncode == 7 and done.stdout.strip() in fake.jobs
    assert done.stderr.startswith("lclusterc: job ") and " failed: exited with status 7" in done.stderr
    assert "click" not in modules


@pytest.mark.parametrize("args, code, line", [
    (["addjob", ""], 2, "lclusterc: command is empty"),
    (["addjob", "--count", "3", "--wait", "true"], 2, "lclusterc: --wait takes one job, not --count "
     "(lclusterc wait ARRAY waits for an array) (see 'lclusterc addjob --help')"),
])
def test_addjob_refusals_of_the_quick_path_are_clicks(fake, args, code, line):  # noqa: F811
    modules, done = modules_after("--socket", fake.socket, *args)
    assert (done.returncode, done.stderr.partition("\nMODULES")[0]) == (code, line + "\n")
    assert "click" not in modules and fake.requests == []


def test_the_daemon_down_is_one_line_exit_5_without_click(tmp_path):
    modules, done = modules_after("--socket", str(tmp_path / "none.sock"), "addjob", "true")
    assert done.returncode == quick.EXIT_UNREACHABLE
    assert done.stderr.startswith("lclusterc: lclusterd is not running (no socket ")
    assert "click" not in modules


def test_other_commands_and_help_go_to_click(fake):  # noqa: F811
    for args in (["list"], ["addjob", "--help"], ["addjob", "--priority", "500", "true"]):
        modules, done = modules_after("--socket", fake.socket, *args)
        assert "click" in modules, args
    assert done.returncode == 2 and "'--priority': 500 is not in the range" in done.stderr


@pytest.mark.parametrize("args", [
    ["addjob", "--count", "3", "--max-running", "1", "--after", "0b5e8c1e", "--constraint", "a=b", "true"],
    ["addjob", "--file", "COMMANDS"],
])
def test_an_array_with_dependencies_needs_no_more(fake, args, tmp_path):  # noqa: F811
    (tmp_path / "commands").write_text("echo a\necho b\n")
    args = [str(tmp_path / "commands") if a == "COMMANDS" else a for a in args]
    modules, done = modules_after("--socket", fake.socket, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] in fake.arrays
    assert imported(modules, NOT_FOR_ADDJOB) == []


def test_importing_inputs_imports_nothing_and_its_patterns_compile_when_used():
    def modules(statement):
        code = f"import sys; {statement}; print(' '.join(sys.modules))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT}, timeout=60, check=True)
        return set(done.stdout.split())
    assert modules("import lclusterd.inputs") == modules("pass") | {"lclusterd", "lclusterd.inputs"}
    assert "re" in modules("import lclusterd.inputs as i; i.validate_env(['A=1'])")
    assert inputs.parse_size("1.5g") == 3 << 29 and inputs._UUID.pattern.startswith("^[0-9a-f]{8}")


@pytest.mark.parametrize("args", [["addjob", "true"], ["--addjob=echo hi"]])
def test_a_plain_addjob_imports_neither_re_json_nor_socket(fake, args):  # noqa: F811
    # re (with enum), json and socket.py were over a third of its start-up
    # (instructions under cachegrind); client.py uses their C cores _json, _socket.
    modules, done = modules_after("--socket", fake.socket, *args)
    assert done.returncode == 0 and done.stdout.strip() in fake.jobs, done.stderr
    assert imported(modules, NOT_FOR_ADDJOB + ("re", "json", "enum", "socket")) == []


@pytest.mark.parametrize("value", [
    {"command": "echo 'é' \"$x\"\n\t\\", "count": 3, "env": ["A=1", "B=\udc80"], "cpus": 0.5,
     "after": ("a", "b"), "wait": True, "no": False, "user": None, "n": -12, "big": 10 ** 30},
    [], {}, "", "\u2028\x00\x7f", 1.5e300, [[{"a": [None]}]],
])
def test_the_clients_json_is_jsons(value):
    import json
    text = client._dumps(value)
    assert text == json.dumps(value, separators=(",", ":"))
    assert client._loads(text.encode()) == json.loads(text)
    assert client._loads(f" \n{json.dumps(value, indent=2)}\r\n") == json.loads(json.dumps(value))


@pytest.mark.parametrize("raw", [b"", b"  ", b"{", b'{"a": 1} x', b"[1,]", b"nul", b"\xff",
                                 b'{"a": 1}{"b": 2}', b"'a'"])
def test_the_clients_json_refuses_what_json_refuses(raw):
    import json
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises(ValueError):
        client._loads(raw)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1: 2}, object(), b"x"])
def test_the_clients_json_refuses_what_is_not_json(value):
    with pytest.raises(ValueError, match="is not JSON"):
        client._dumps(value)


def test_core_re_exports_the_checks_of_inputs():
    # core.X is inputs.X: a core.InvalidInput handler (api.ERRORS) catches what inputs raises
    names = [n for n in vars(inputs) if not n.startswith("_") and n != "re"]
    assert [n for n in names if getattr(core, n, None) is not getattr(inputs, n)] == []
    assert api.answer_for(inputs.InvalidInput("bad")) == (400, "bad")
    assert api.answer_for(inputs.TooLarge("big")) == (413, "big")


def test_the_cli_constants_are_cores():
    # quick keeps copies so that the options need not import core
    assert quick.STATES == core.STATES and quick.TERMINAL == core.TERMINAL
    assert quick.MAX_ARRAY == core.MAX_ARRAY
    assert (quick.MIN_PRIORITY, quick.MAX_PRIORITY) == (core.MIN_PRIORITY, core.MAX_PRIORITY)
    assert (quick.DEFAULT_ATTEMPTS, quick.MAX_ATTEMPTS) == (core.DEFAULT_ATTEMPTS, core.MAX_ATTEMPTS)
    assert (quick.DEFAULT_SOCKET, quick.DEFAULT_TOKEN_FILE) == (client.DEFAULT_SOCKET,
                                                                client.DEFAULT_TOKEN_FILE)
    assert {client.BAD_URL, client.DENIED, client.UNTRUSTED, client.UNREACHABLE} <= set(quick.EXIT_FOR_CAUSE)


# --- quick.parse reads addjob's command line as click does ---------------------------

def clicks_reading(args, monkeypatch):
    """What click's commands give addjob for args: (group's values, addjob's
    values), or None if click does not run addjob (help, a usage error)."""
    seen = []

    class Given(dict):  # the group's values, as the client that other commands would use
        def __getattr__(self, name):
            raise LookupError("another command")
    monkeypatch.setattr(quick, "make_client", lambda **given: Given(given))
    monkeypatch.setattr(quick, "addjob", lambda given, **values: seen.append((given, values)) or 0)
    try:
        cli.run(list(args))
    except LookupError:
        return None
    return seen[0] if seen else None


def command_lines(rng, n):
    """n addjob command lines made of quick.ADDJOB_OPTIONS and GLOBAL_OPTIONS,
    in every spelling and order click takes, and some that it refuses."""
    values = {"flag": ["", "=1"], "text": ["256M", "", "-5", "--", "a=b"],
              "many": ["A=1", "x,y", "-"], (None, None): ["3", "-1", " 7 ", "1.5", "x"]}
    for _, name, kind, _, _ in quick.ADDJOB_OPTIONS:
        if kind not in values:
            low, high = kind
            values[kind] = [str(low), str(high), str(low - 1), str(high + 1), "+4", "0x1"]
    for _ in range(n):
        words = []
        for _ in range(rng.randint(0, 2)):
            spelling = rng.choice(quick.GLOBAL_OPTIONS)[0]
            words += ([f"{spelling}=/g"] if rng.random() < 0.5 else [spelling, "/g"])
        words.append(rng.choice(["addjob"] * 8 + ["--addjob=echo old", "checkjob", "--", "-h"]))
        body = []
        for _ in range(rng.randint(0, 4)):
            spelling, _, kind, _, _ = rng.choice(quick.ADDJOB_OPTIONS)
            value = rng.choice(values[kind])
            if kind == "flag":
                body.append(spelling + value)
            elif rng.random() < 0.5:
                body.append(f"{spelling}={value}")
            else:
                body += [spelling, value]
        commands = rng.choice([[], ["echo hi"], ["a", "b"], ["--", "-n x"], ["-"], ["--help"],
                               ["--bogus", "x"], ["-x"]])
        at = rng.randint(0, len(body))
        words += body[:at] + commands + body[at:]
        if rng.random() < 0.1:
            words.append(rng.choice(["--memory", "--wait=", "--count"]))  # a value missing
        yield words


def test_quick_parse_reads_every_command_line_as_click_does(monkeypatch):
    # Each line that click runs addjob with, quick.parse reads the same (it
    # declines only `lclusterc -- addjob`, and click's completion); each
    # other line it leaves to click.
    taken = 0
    for args in command_lines(random.Random(13), 600):
        theirs = clicks_reading(args, monkeypatch)
        assert quick.parse(args) == theirs, args
        taken += theirs is not None
    assert taken > 100  # lines of both kinds


@pytest.mark.parametrize("args", [
    ["addjob", "echo hi"], ["--addjob=-n x"], ["--addjob", "x", "--wait"],
    ["--socket", "/s", "--socket=/t", "addjob", "--env", "A=1", "x", "--env=B=2", "--json"],
    ["addjob", "--memory", "-5", "--", "--count"], ["addjob", "-"],
    ["addjob", "--priority", "-100", "--retries=100", "--count", "-1", "x"],
])
def test_quick_parse_takes_the_usual_command_lines(args, monkeypatch):
    assert quick.parse(args) is not None
    assert quick.parse(args) == clicks_reading(args, monkeypatch)


def test_quick_parse_reads_the_environment_as_click(monkeypatch):
    monkeypatch.setenv("LCLUSTER_SOCKET", "/env.sock")
    monkeypatch.setenv("LCLUSTER_SERVER", "")  # empty: as if not set
    monkeypatch.setenv("LCLUSTER_CA", "/ca.pem")
    for args in (["addjob", "x"], ["--socket", "/given", "--ca=", "addjob", "x"]):
        ours = quick.parse(args)
        assert ours is not None and ours == clicks_reading(args, monkeypatch)
    assert quick.parse(["addjob", "x"])[0]["socket_path"] == "/env.sock"


def test_clicks_own_completion_goes_to_click(monkeypatch):
    monkeypatch.setenv("_LCLUSTERC_COMPLETE", "bash_complete")
    assert quick.parse(["addjob", "x"]) is None


def test_the_click_options_are_the_tables():
    addjob = cli.lclusterc.commands["addjob"]
    options = [(p.opts[0], p.name) for p in addjob.params if p.param_type_name == "option"]
    assert options == [(spelling, name) for spelling, name, *_ in quick.ADDJOB_OPTIONS]
    group = [(p.opts[0], p.name, p.envvar, p.default) for p in cli.lclusterc.params
             if p.param_type_name == "option" and p.envvar]
    assert group == [option[:4] for option in quick.GLOBAL_OPTIONS]


# --- the plain socket's HTTP (client.PlainAnswer) ------------------------------------

def answer_of(raw):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(raw)
        theirs.shutdown(socket.SHUT_WR)
        answer = client.PlainAnswer(ours)
        return answer.status, answer.reason, answer.read()


def test_plain_answer_with_a_length_stops_there():
    raw = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}junk"
    assert answer_of(raw) == (201, "Created", b"{}")


def test_plain_answer_chunked_and_to_the_end():
    assert answer_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n") == (200, "OK", b"abcde")
    assert answer_of(b"HTTP/1.0 200 OK\r\n\r\nall of it") == (200, "OK", b"all of it")


@pytest.mark.parametrize("raw, message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "ended after 2 of its 10 bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "ended in its headers"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP answer"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "ended in a chunk"),
])
def test_plain_answer_that_is_cut_or_not_http(raw, message):
    with pytest.raises(client.BadHTTP, match=message):
        answer_of(raw)


def test_plain_answer_nothing_at_all_is_a_closed_connection():
    with pytest.raises(ConnectionResetError):
        answer_of(b"")


def test_a_cut_answer_is_one_line_lost_connection(tmp_path):
    path = str(tmp_path / "cut.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"jobs\": [")
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with listener:
        with pytest.raises(client.ClientError) as caught:
            client.Client(path).list_jobs()
    assert caught.value.cause == client.UNREACHABLE and caught.value.lost
    assert caught.value.message == (f"lost the connection to lclusterd at {path}: "
                                    "the answer ended after 10 of its 50 bytes")


def test_the_idempotency_key_is_a_random_uuid4_made_without_the_uuid_module():
    import uuid
    keys = {client._random_uuid() for _ in range(1000)}
    assert len(keys) == 1000
    for key in keys:
        assert str(uuid.UUID(key)) == key
        assert uuid.UUID(key).version == 4 and uuid.UUID(key).variant == uuid.RFC_4122
