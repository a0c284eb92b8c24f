"""lclusterc's cluster commands against the fake daemon of test_cli.py."""

import json

from lclusterd import cli
from tests.unit.test_cli import JOB_A, fake, one_error_line, record, run  # noqa: F401  (fake: a fixture)

NODES = [{"name": "n1", "address": "http://10.0.0.1:7800", "state": "primed", "slots": 2,
          "running": 1, "failed_at": None, "warned": ["7f00aa11-0000-4000-8000-000000000001"],
          "enforces": ["memory", "pids"]},
         {"name": "n2", "address": "http://10.0.0.2:7800", "state": "failed", "slots": 2,
          "running": 0, "failed_at": 1764431000.0}]


def test_nodes_table_and_json(fake):  # noqa: F811
    fake.force = (200, {"nodes": NODES})
    result = run(fake, "nodes")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "STATE", "RUNNING", "SLOTS", "WARNED", "ENFORCES",
                                "FAILED", "AT"]
    assert lines[1].split() == ["n1", "http://10.0.0.1:7800", "primed", "1", "2", "1",
                                "memory,pids", "-"]
    assert lines[2].split()[:3] == ["n2", "http://10.0.0.2:7800", "failed"]
    assert lines[2].split()[6] == "-"  # an older node does not say what it enforces
    assert json.loads(run(fake, "nodes", "--json").stdout) == NODES
    assert fake.requests[-1][:2] == ("GET", "/v1/nodes")


def test_addjob_retries_is_sent_and_checked(fake):  # noqa: F811
    assert run(fake, "addjob", "--retries", "5", "true").exit_code == 0
    assert fake.requests[-1] == ("POST", "/v1/jobs", {"command": "true", "max_attempts": 5})
    assert run(fake, "addjob", "true").exit_code == 0
    assert fake.requests[-1][2] == {"command": "true"}
    bad = run(fake, "addjob", "--retries", "0", "true")
    assert bad.exit_code == cli.EXIT_USAGE and len(fake.requests) == 2


def test_401_is_permission_denied(fake):  # noqa: F811
    fake.force = (401, {"error": "unauthorized: a valid token is required over TCP"})
    result = run(fake, "list")
    assert result.exit_code == cli.EXIT_DENIED
    assert "unauthorized" in one_error_line(result)


def test_server_url_and_token_file_are_checked(tmp_path):
    result = run(str(tmp_path / "s"), "--server", "ftp://x", "--token-file", "/dev/null", "list")
    assert result.exit_code == cli.EXIT_USAGE and "http://HOST:PORT" in one_error_line(result)
    result = run(str(tmp_path / "s"), "--server", "http://10.0.0.1:7800", "--token-file",
                 str(tmp_path / "missing"), "list")
    assert result.exit_code == cli.EXIT_DENIED and "token file" in one_error_line(result)


def test_checkjob_shows_attempts(fake):  # noqa: F811
    fake.add(record(JOB_A, attempts=[{"node": "n2", "outcome": "lost"},
                                     {"node": "n1", "outcome": None}]))
    out = run(fake, "checkjob", JOB_A).stdout
    assert "attempts:" in out and "n2 (lost), n1 (now)" in out


def test_addjob_priority_is_sent_and_checked(fake):  # noqa: F811
    assert run(fake, "addjob", "--priority", "-7", "true").exit_code == 0
    assert fake.requests[-1] == ("POST", "/v1/jobs", {"command": "true", "priority": -7})
    assert run(fake, "addjob", "--priority", "101", "true").exit_code == cli.EXIT_USAGE
