"""lclusterc end to end inside one process: the CLI, through the real
api.runner on a unix socket, to real Nodes over MemStore (test_node_cluster's
Cluster: every node's loops run, only systemd is simulated). What the fakes
of test_cli.py and test_api.py assume of each other (K6, K7) is checked here
against the code that answers for real: arrays, dependencies, constraints,
why a job waits, drain and resume, forget."""

import asyncio
import json
import os
import re
import socket
import threading

import pytest
from aiohttp import web
from click.testing import CliRunner

from lclusterd import api, cli, quick
from tests.unit.test_node_cluster import Cluster

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


class Served:
    """A Cluster of names in an event loop of its own thread; the first
    node's API on a unix socket."""

    def __init__(self, tmp_path, names, **settings):
        self.path = str(tmp_path / "api.sock")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self._start(tmp_path, names, settings))

    def call(self, coroutine, timeout=30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    async def _start(self, tmp_path, names, settings):
        self.cluster = Cluster(tmp_path, names, **settings)
        await self.cluster.start()
        self.runner = api.runner(self.cluster.nodes[names[0]])
        await self.runner.setup()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        await web.SockSite(self.runner, sock).start()

    async def _stop(self):
        await self.runner.cleanup()
        await self.cluster.stop()

    def stop(self):
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def lc(self, *args, input=None):
        return CliRunner(mix_stderr=False).invoke(cli.lclusterc, ["--socket", self.path, *args],
                                                  input=input)

    def ok(self, *args, input=None):
        result = self.lc(*args, input=input)
        assert result.exit_code == 0, (args, result.exit_code, result.stdout, result.stderr)
        return result.stdout

    def refused(self, code, *args):
        """Exit code, one line on stderr, nothing on stdout; that line."""
        result = self.lc(*args)
        lines = result.stderr.splitlines()
        assert (result.exit_code, result.stdout, len(lines)) == (code, "", 1), (
            args, result.exit_code, result.stdout, result.stderr)
        return lines[0]

    def jobs(self):
        return self.cluster.jobs()


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setattr(quick, "POLL_INTERVAL", 0.02)
    monkeypatch.setenv("COLUMNS", "250")  # list keeps every column
    # Whoever runs the tests, the socket's caller is root: drain and forget are root's.
    monkeypatch.setattr(api, "peer_uid", lambda sock: (os.getpid(), 0, 0))
    s = Served(tmp_path, ["n1", "n2"], slots=2, cpus=2, memory="4G",
               labels={"n1": "rack=a", "n2": "rack=b,ssd=yes"})
    yield s
    s.stop()


def test_an_array_with_a_throttle_is_made_checked_waited_for(served):
    out = served.ok("addjob", "--count", "3", "--max-running", "1", "--", "sleep 0.1").split()
    array, members = out[0], out[1:]
    assert re.fullmatch(UUID, array) and len(members) == 3 and array not in members
    assert {served.jobs()[u].array for u in members} == {array}
    waited = served.ok("wait", array)
    assert waited.splitlines() == [f"succeeded {u}" for u in members]
    text = served.ok("checkjob", array)
    assert f"array:       {array}" in text and "states:      3 succeeded" in text
    assert "max running: 1" in text
    shown = json.loads(served.ok("checkjob", "--json", array))
    assert shown["counts"] == {"succeeded": 3} and shown["max_running"] == 1


def test_a_file_makes_an_array_and_removejob_cancels_its_live_members(served):
    array, *members = served.ok("addjob", "--file", "-", "--max-running", "1",
                                input="sleep 30\n\nsleep 30\n").split()
    assert [served.jobs()[u].command for u in members] == ["sleep 30", "sleep 30"]
    cancelled = served.ok("removejob", array).splitlines()
    assert sorted(cancelled) == sorted(f"cancelled {u}" for u in members)
    assert served.lc("wait", array).exit_code == quick.EXIT_FAILED  # 0 only if all succeeded
    one = served.ok("addjob", "--", "sleep 30").strip()
    assert served.ok("removejob", one) == f"cancelled {one}\n"  # a job: its record, not an array


def test_dependencies_wait_with_a_reason_and_a_failed_parent_cancels(served):
    parent = served.ok("addjob", "--", "sleep 0.5").strip()
    child = served.ok("addjob", "--after", parent[:8], "--", "true").strip()
    assert served.jobs()[child].after == (parent,)  # the prefix resolved by the node
    text = served.ok("checkjob", child)
    assert re.search(r"^waiting: +dependency: ", text, re.M), text
    assert re.search(r"^position: +\d+ of \d+ in the queue", text, re.M), text
    table = served.ok("list", "--state", "queued").splitlines()
    assert "REASON" in table[0].split()
    assert "dependency: " in next(row for row in table if row.startswith(child[:8]))
    assert served.ok("wait", child).strip() == f"succeeded {child}"
    never = served.ok("addjob", "--after-failed", parent, "--", "true").strip()
    result = served.lc("wait", never)
    assert result.exit_code == quick.EXIT_FAILED and result.stdout.startswith("cancelled ")


def test_what_no_node_could_run_is_refused_and_nothing_is_queued(served):
    before = len(served.jobs())
    assert "gpu=1" in served.refused(quick.EXIT_USAGE, "addjob", "--constraint", "gpu=1", "true")
    assert served.refused(quick.EXIT_USAGE, "addjob", "--memory", "64G", "true")
    served.refused(quick.EXIT_USAGE, "addjob", "--after", "0b5e8c1e-3c1f-4a43-9d59-1d1c1f0a2b77", "true")
    served.refused(quick.EXIT_USAGE, "addjob", "--count", "2", "--max-running", "0", "true")
    assert len(served.jobs()) == before
    pinned = served.ok("addjob", "--constraint", "ssd=yes", "--", "true").strip()
    assert served.ok("wait", pinned) and served.jobs()[pinned].node == "n2"


def test_drain_resume_and_forget_from_the_command_line(served):
    assert served.ok("drain", "n2", "--reason", "new disk") in ("draining n2 (new disk)\n",
                                                                "drained n2 (new disk)\n")
    rows = {row["name"]: row for row in json.loads(served.ok("nodes", "--json"))}
    assert rows["n2"]["state"] in ("draining", "drained") and rows["n2"]["drain_reason"] == "new disk"
    table = served.ok("nodes")
    assert re.search(r"^n2 +draining|^n2 +drained", table, re.M) and "new disk" in table
    pinned = served.ok("addjob", "--constraint", "node=n2", "--", "true").strip()
    text = served.ok("checkjob", pinned)
    assert re.search(r"^waiting: +drained", text, re.M), text
    assert served.ok("resume", "n2").split()[1] == "n2"
    assert served.ok("wait", pinned).strip() == f"succeeded {pinned}"
    assert "no node" in served.refused(quick.EXIT_NO_JOB, "drain", "n9")
    assert "is live" in served.refused(quick.EXIT_NO_JOB, "nodes", "--forget", "n1")
