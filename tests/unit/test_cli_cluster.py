"""lclusterc's cluster commands against the fake daemon of test_cli.py."""

import json

import pytest

from lclusterd import cli, quick
from tests.unit.test_cli import JOB_A, fake, one_error_line, record, run  # noqa: F401  (fake: a fixture)

NODES = [{"name": "n1", "address": "http://10.0.0.1:7800", "state": "primed", "slots": 2,
          "running": 1, "failed_at": None, "warned": ["7f00aa11-0000-4000-8000-000000000001"],
          "enforces": ["memory", "pids"], "cpus": 4.0, "memory": 8 << 30, "reserved_cpus": 1.5,
          "reserved_memory": 3 << 29, "labels": {"rack": "a", "ssd": "yes", "node": "n1"}},
         {"name": "n2", "address": "http://10.0.0.2:7800", "state": "failed", "slots": 2,
          "running": 0, "failed_at": 1764431000.0},
         {"name": "n3", "address": "http://10.0.0.3:7800", "state": "drained", "slots": 4,
          "running": 0, "failed_at": None, "enforces": [], "cpus": 2, "memory": 1 << 30,
          "reserved_cpus": 0, "reserved_memory": 0, "labels": {"node": "n3"},
          "drain_reason": "new disk"}]


def test_nodes_table_and_json(fake):  # noqa: F811
    fake.force = (200, {"nodes": NODES})
    result = run(fake, "nodes")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "ADDRESS", "CPUS", "MEMORY", "JOBS", "LABELS",
                                "WARNED", "ENFORCES", "FAILED", "AT", "REASON"]
    # reserved/capacity; the implied node=NAME label is not repeated
    assert lines[1].split() == ["n1", "primed", "http://10.0.0.1:7800", "1.5/4", "1.5G/8.0G", "1/2",
                                "rack=a,ssd=yes", "1", "memory,pids", "-", "-"]
    assert lines[2].split()[:3] == ["n2", "failed", "http://10.0.0.2:7800"]
    assert lines[2].split()[3:9] == ["-", "-", "0/2", "-", "0", "-"]  # an older node says less
    assert lines[3].split() == ["n3", "drained", "http://10.0.0.3:7800", "0/2", "0/1.0G", "0/4", "-",
                                "0", "none", "-", "new", "disk"]
    assert json.loads(run(fake, "nodes", "--json").stdout) == NODES
    assert fake.requests[-1][:2] == ("GET", "/v1/nodes")


def _rows(fake):  # noqa: F811
    fake.nodes = {"n1": {"name": "n1", "state": "ready"}, "n2": {"name": "n2", "state": "failed"}}


def test_drain_and_resume(fake):  # noqa: F811
    _rows(fake)
    result = run(fake, "drain", "n1", "--reason", "new disk")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "draining n1 (new disk)\n"
    assert fake.requests[-1] == ("POST", "/v1/nodes/n1/drain", {"reason": "new disk"})
    assert run(fake, "drain", "n1").exit_code == 0
    assert fake.requests[-1] == ("POST", "/v1/nodes/n1/drain", {})
    result = run(fake, "resume", "n1")
    assert result.exit_code == 0 and result.stdout == "ready n1\n"
    assert fake.requests[-1] == ("POST", "/v1/nodes/n1/resume", {})


def test_nodes_forget(fake):  # noqa: F811
    _rows(fake)
    result = run(fake, "nodes", "--forget", "n2")
    assert result.exit_code == 0 and result.stdout == "forgot n2\n"
    assert fake.requests[-1][:2] == ("DELETE", "/v1/nodes/n2") and "n2" not in fake.nodes
    live = run(fake, "nodes", "--forget", "n1")  # a live node: 409
    assert live.exit_code == quick.EXIT_NO_JOB and "is live" in one_error_line(live)


@pytest.mark.parametrize("args", [["drain", "nosuch"], ["resume", "nosuch"],
                                  ["nodes", "--forget", "nosuch"]])
def test_an_unknown_node_is_one_line_and_exit_3(fake, args):  # noqa: F811
    _rows(fake)
    result = run(fake, *args)
    assert result.exit_code == quick.EXIT_NO_JOB and "no node 'nosuch'" in one_error_line(result)
    assert fake.nodes["n1"]["state"] == "ready" and "n2" in fake.nodes


@pytest.mark.parametrize("args", [["drain", ""], ["drain", "../jobs"], ["resume", " "],
                                  ["nodes", "--forget", "a/b"]])
def test_a_name_that_is_no_node_name_is_never_sent(fake, args):  # noqa: F811
    result = run(fake, *args)
    assert result.exit_code == quick.EXIT_USAGE and "is not a node name" in one_error_line(result)
    assert fake.requests == []


def test_drain_by_a_user_is_denied(fake):  # noqa: F811
    fake.force = (403, {"error": "permission denied: only root may drain a node"})
    result = run(fake, "drain", "n1")
    assert result.exit_code == quick.EXIT_DENIED and "only root" in one_error_line(result)


def test_addjob_retries_is_sent_and_checked(fake):  # noqa: F811
    assert run(fake, "addjob", "--retries", "5", "true").exit_code == 0
    assert fake.requests[-1] == ("POST", "/v1/jobs", {"command": "true", "max_attempts": 5})
    assert run(fake, "addjob", "true").exit_code == 0
    assert fake.requests[-1][2] == {"command": "true"}
    bad = run(fake, "addjob", "--retries", "0", "true")
    assert bad.exit_code == quick.EXIT_USAGE and len(fake.requests) == 2


def test_401_is_permission_denied(fake):  # noqa: F811
    fake.force = (401, {"error": "unauthorized: a valid token is required over TCP"})
    result = run(fake, "list")
    assert result.exit_code == quick.EXIT_DENIED
    assert "unauthorized" in one_error_line(result)


def test_server_url_and_token_file_are_checked(tmp_path):
    result = run(str(tmp_path / "s"), "--server", "ftp://x", "--token-file", "/dev/null", "list")
    assert result.exit_code == quick.EXIT_USAGE and "http://HOST:PORT" in one_error_line(result)
    result = run(str(tmp_path / "s"), "--server", "http://10.0.0.1:7800", "--token-file",
                 str(tmp_path / "missing"), "list")
    assert result.exit_code == quick.EXIT_DENIED and "token file" in one_error_line(result)


def test_checkjob_shows_attempts(fake):  # noqa: F811
    fake.add(record(JOB_A, attempts=[{"node": "n2", "outcome": "lost"},
                                     {"node": "n1", "outcome": None}]))
    out = run(fake, "checkjob", JOB_A).stdout
    assert "attempts:" in out and "n2 (lost), n1 (now)" in out


def test_addjob_priority_is_sent_and_checked(fake):  # noqa: F811
    assert run(fake, "addjob", "--priority", "-7", "true").exit_code == 0
    assert fake.requests[-1] == ("POST", "/v1/jobs", {"command": "true", "priority": -7})
    assert run(fake, "addjob", "--priority", "101", "true").exit_code == quick.EXIT_USAGE
