"""lclusterc's start-up budget (issue 13 item 2): `lclusterc addjob` in a
shell loop costs mostly Python's start-up and imports, so each command may
import only what it needs. Checked by what a fresh interpreter has in
sys.modules at exit, not by timing (a busy machine would make a timed test
flaky, and a slow import is a slow import on any machine)."""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lclusterd import cli, client, core
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
# Not for a submission over the unix socket: HTTP over it is a few lines on
# a plain socket (client.py), http.client (with email and ssl) is for TCP.
NOT_FOR_ADDJOB = DAEMON_ONLY + ("http.client", "ssl", "email", "lclusterd.tls", "urllib.parse",
                                "shlex")


def modules_after(*args, env=None):
    """The modules a fresh `lclusterc ARGS` has imported when it exits, and its exit code."""
    code = ("import atexit, sys\n"  # nothing more: the hook must not import what it reports
            "atexit.register(lambda: sys.__stderr__.write('\\nMODULES ' + ' '.join(sys.modules)))\n"
            "from lclusterd.cli import main\n"
            "main(sys.argv[1:])\n")
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
    assert imported(modules, NOT_FOR_ADDJOB + ("lclusterd.core",)) == []


def test_importing_the_cli_imports_only_click():
    code = "import sys, lclusterd.cli; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=60, check=True)
    assert imported(done.stdout.split(), NOT_FOR_HELP) == []


def test_addjob_over_the_socket_needs_no_http_client_nor_ssl(fake):  # noqa: F811
    modules, done = modules_after("--socket", fake.socket, "addjob", "true")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in fake.jobs
    assert imported(modules, NOT_FOR_ADDJOB) == []


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


def test_the_cli_constants_are_cores():
    # cli keeps copies so that its options need not import core
    assert cli.STATES == core.STATES and cli.TERMINAL == core.TERMINAL
    assert cli.MAX_BATCH == core.MAX_BATCH
    assert (cli.MIN_PRIORITY, cli.MAX_PRIORITY) == (core.MIN_PRIORITY, core.MAX_PRIORITY)
    assert (cli.DEFAULT_ATTEMPTS, cli.MAX_ATTEMPTS) == (core.DEFAULT_ATTEMPTS, core.MAX_ATTEMPTS)
    assert (cli.DEFAULT_SOCKET, cli.DEFAULT_TOKEN_FILE) == (client.DEFAULT_SOCKET, client.DEFAULT_TOKEN_FILE)
    assert {client.BAD_URL, client.DENIED, client.UNTRUSTED, client.UNREACHABLE} <= set(cli.EXIT_FOR_CAUSE)


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
