"""The user's own commands, on the installed package, in a container booted
with systemd: socket activation, jobs as transient units with their output in
journald, removejob, restarts, an etcd outage, and bad input.

Tests run in file order on one container (the first one checks that the
daemon is not running before the first lclusterc call)."""

import json
import re

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def one_line_error(result):
    """The error is one line on stderr, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lclusterc: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_socket_activation_starts_the_daemon_on_first_use(box):
    assert box.sh("systemctl is-enabled lclusterd.socket").stdout.strip() == "enabled"
    assert box.sh("systemctl is-active lclusterd.socket").stdout.strip() == "active"
    assert box.sh("systemctl is-active lclusterd.service", check=False).stdout.strip() == "inactive"

    out = box.lc("addjob 'echo hello from $(hostname)'", user="alice").stdout
    assert UUID.match(out.strip()), out
    assert box.sh("systemctl is-active lclusterd.service").stdout.strip() == "active"
    # STATUS= says where it stands.
    box.sh("until systemctl status lclusterd --no-pager | grep -q 'etcd ok'; do sleep 0.2; done",
           timeout=15)


def test_output_goes_to_the_journal_under_the_unit_name(box):
    uuid = box.lc("addjob 'echo hello from $(hostname)'", user="alice").stdout.strip()
    job = box.wait_state(uuid)
    assert job["state"] == "succeeded" and job["exit_status"] == 0
    hostname = box.sh("hostname").stdout.strip()
    log = box.sh(f"journalctl -u lcluster-job@{uuid} --no-pager -o cat").stdout
    assert f"hello from {hostname}" in log


def test_checkjob_shows_state_exit_node_and_times(box):
    uuid = box.lc("addjob 'sleep 0.3'", user="alice").stdout.strip()
    box.wait_state(uuid)
    text = box.lc(f"checkjob {uuid}").stdout
    hostname = box.sh("hostname").stdout.strip()
    for pattern in (rf"state:\s+succeeded", rf"exit status:\s+0", rf"node:\s+{hostname}",
                    r"submitted:\s+\d{4}-", r"started:\s+\d{4}-", r"ended:\s+\d{4}-",
                    r"user:\s+alice"):
        assert re.search(pattern, text), f"{pattern!r} not in:\n{text}"
    job = box.job(uuid)
    assert job["submitted_at"] <= job["started_at"] <= job["ended_at"]
    assert job["ended_at"] - job["started_at"] >= 0.3
    # The unit is unloaded once its result is recorded.
    assert box.unit_state(job["unit"])[0] == "not-found"


def test_failing_job_reports_its_exit_status(box):
    r = box.lc("addjob --wait 'echo failing >&2; exit 7'", user="alice", check=False)
    assert r.returncode == 7, (r.stdout, r.stderr)
    uuid = box.lc("list --json --limit 1").stdout
    job = json.loads(uuid)[0]
    assert job["state"] == "failed" and job["exit_status"] == 7 and job["result"] == "exit-code"
    assert "failing" in box.sh(f"journalctl -u {job['unit']} --no-pager -o cat").stdout


def test_jobs_run_as_the_submitter_in_the_sandbox(box):
    uuid = box.lc("addjob --wait 'id -u; touch /etc/x 2>&1; ls /home 2>&1; cat /proc/net/dev'",
                  user="alice").stdout.strip()
    job = box.job(uuid)
    alice = int(box.sh("id -u alice").stdout)
    assert job["uid"] == alice and job["user"] == "alice"
    log = box.sh(f"journalctl -u {job['unit']} --no-pager -o cat").stdout
    assert str(alice) in log.splitlines()
    assert "Read-only file system" in log  # ProtectSystem=strict
    assert "host0" not in log and "lo:" in log  # PrivateNetwork: only loopback


def test_removejob_stops_a_running_job(box):
    uuid = box.lc("addjob 'sleep 600'", user="alice").stdout.strip()
    job = box.wait_state(uuid, ("running",))
    assert box.unit_state(job["unit"]) == ["loaded", "active"]
    out = box.lc(f"removejob {uuid}", user="alice").stdout
    assert "cancelled" in out
    job = box.job(uuid)
    assert job["state"] == "cancelled" and job["ended_at"]
    assert box.unit_state(job["unit"])[0] == "not-found"  # stopped and gone


def test_removejob_takes_a_queued_job_off_the_queue(box):
    blockers = box.fill_slots()
    queued = box.lc("addjob 'echo never'", user="alice").stdout.strip()
    assert box.job(queued)["state"] == "queued"
    box.lc(f"removejob {queued}", user="alice")
    job = box.job(queued)
    assert job["state"] == "cancelled" and job["started_at"] is None and job["node"] is None
    assert box.unit_state(job["unit"])[0] == "not-found"
    for uuid in blockers:
        box.lc(f"removejob {uuid}", user="alice")
    assert all(box.job(u)["state"] == "cancelled" for u in blockers)


def test_only_the_submitter_or_root_removes_a_job(box):
    uuid = box.lc("addjob 'sleep 600'", user="alice").stdout.strip()
    box.wait_state(uuid, ("running",))
    r = box.lc(f"removejob {uuid}", user="bob", check=False)
    assert r.returncode == 4 and "permission denied" in one_line_error(r)
    assert box.job(uuid)["state"] == "running"
    box.lc(f"removejob {uuid}")  # root may
    assert box.job(uuid)["state"] == "cancelled"


def test_restart_and_kill_of_the_daemon_kill_no_job(box):
    # 10 s: a restart under load took 5-8 s, and the job must outlive it.
    uuid = box.lc("addjob 'sleep 10; echo survived; exit 5'", user="alice").stdout.strip()
    box.wait_state(uuid, ("running",))
    box.sh("systemctl restart lclusterd")
    assert box.job(uuid)["state"] == "running"
    box.sh("kill -9 $(systemctl show -p MainPID --value lclusterd)")
    job = box.wait_state(uuid, timeout=30)  # the next call starts it again
    assert job["state"] == "failed" and job["exit_status"] == 5
    assert "survived" in box.sh(f"journalctl -u {job['unit']} --no-pager -o cat").stdout


def test_a_job_that_ends_while_the_daemon_is_down_keeps_its_status(box):
    uuid = box.lc("addjob 'sleep 1; exit 4'", user="alice").stdout.strip()
    unit = box.wait_state(uuid, ("running",))["unit"]
    box.sh("systemctl stop lclusterd.service")
    box.sh(f"while [ $(systemctl show -p ActiveState --value {unit}) = active ]; do sleep 0.2; done",
           timeout=30)
    assert box.sh("systemctl is-active lclusterd.service", check=False).stdout.strip() == "inactive"
    job = box.wait_state(uuid, timeout=30)  # this call starts the daemon again
    assert job["state"] == "failed" and job["exit_status"] == 4


def test_etcd_outage_answers_503_loses_nothing_and_recovers(box):
    before = box.job_count()
    queued = [box.lc(f"addjob 'sleep 0.5; echo {i}'", user="alice").stdout.strip() for i in range(4)]
    box.sh("systemctl stop etcd")
    try:
        r = box.lc("addjob 'echo lost?'", user="alice", check=False)
        assert r.returncode == 6 and "etcd" in one_line_error(r)
        r = box.lc(f"checkjob {queued[0]}", check=False)
        assert r.returncode == 6 and "etcd is unreachable" in one_line_error(r)
        box.sh("until systemctl status lclusterd --no-pager | grep -q 'waiting for etcd'; "
               "do sleep 0.2; done", timeout=15)
    finally:
        box.sh("systemctl start etcd")
    for uuid in queued:
        assert box.wait_state(uuid, timeout=60)["state"] == "succeeded"
    assert box.job_count() == before + len(queued)  # the refused submission left nothing


def test_old_spellings_still_work(box):
    uuid = box.lc("--addjob='echo old style'", user="alice").stdout.strip()
    assert UUID.match(uuid)
    box.wait_state(uuid)
    assert "succeeded" in box.lc(f"--checkjob={uuid}", user="alice").stdout
    assert "cancelled" not in box.lc(f"--removejob={uuid}", user="alice").stdout  # already over


def test_unique_prefix_stands_for_the_uuid(box):
    uuid = box.lc("addjob 'true'", user="alice").stdout.strip()
    box.wait_state(uuid)
    assert box.job(uuid[:8])["uuid"] == uuid


def test_bad_input_is_one_line_nonzero_and_changes_nothing(box):
    before = box.job_count()
    long_command = "x" * (64 * 1024 + 1)
    cases = [
        ("addjob ''", 2), ("addjob '   '", 2),
        (f"addjob '{long_command}'", 2),
        ("checkjob 'not-a-uuid!'", 2), ("checkjob ab", 2),
        ("checkjob 00000000-0000-4000-8000-000000000000", 3),
        ("removejob 00000000-0000-4000-8000-000000000000", 3),
    ]
    for args, code in cases:
        r = box.lc(args, user="alice", check=False)
        assert r.returncode == code, (args[:60], r.returncode, r.stderr)
        one_line_error(r)
    assert box.job_count() == before


def test_ambiguous_prefix_is_refused(box):
    # Two records sharing a prefix, written straight into etcd.
    for suffix in ("1", "2"):
        uuid = f"abcd000{suffix}-0000-4000-8000-000000000000"
        record = json.dumps({"uuid": uuid, "command": "true", "uid": 0, "gid": 0, "user": "root",
                             "submitted_at": 1.0, "state": "succeeded"})
        box.sh(f"ETCDCTL_API=3 etcdctl put /lcluster/jobs/{uuid} '{record}'")
    r = box.lc("checkjob abcd", check=False)
    assert r.returncode == 3 and "matches 2 jobs" in one_line_error(r)
    assert box.job("abcd0001")["uuid"].startswith("abcd0001")


API = """
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect("/run/lclusterd/lclusterd.sock")
c = C("localhost")
c.request("POST", "/v1/jobs", body=sys.stdin.buffer.read(), headers={"Content-Type": "application/json"})
r = c.getresponse()
print(r.status, r.read().decode())
"""


def test_http_api_refuses_malformed_requests_with_400_and_a_json_error(box):
    before = box.job_count()
    for body in ('{"command": "true"', '{"command": "true", "colour": 1}', '["true"]',
                 '{"command": "echo a\\u0000b"}', '{}'):
        out = box.sh(f"python3 -c '{API}'", input=body, user="alice").stdout
        status, answer = out.split(" ", 1)
        assert status == "400", (body, out)
        assert json.loads(answer)["error"]
    assert box.job_count() == before


def test_daemon_unreachable_says_how_to_start_it(box):
    box.sh("systemctl stop lclusterd.socket lclusterd.service")
    try:
        r = box.lc("list", user="alice", check=False)
        assert r.returncode == 5
        assert "systemctl start lclusterd" in one_line_error(r)
    finally:
        box.sh("systemctl start lclusterd.socket")
    assert box.lc("list", user="alice").returncode == 0


def test_daemon_runs_in_the_foreground_with_its_own_socket(box):
    # A second daemon by hand, beside the packaged one: its own socket, node
    # name and key prefix, so the two don't share jobs.
    box.sh("printf '[lclusterd]\\nprefix = /fg\\nnode_name = fg\\n' > /tmp/fg.conf")
    box.sh("setsid lclusterd --config /tmp/fg.conf --socket /tmp/fg.sock "
           ">/tmp/fg.log 2>&1 < /dev/null & echo $! > /tmp/fg.pid")
    try:
        box.sh("until [ -S /tmp/fg.sock ]; do sleep 0.1; done", timeout=15)
        r = box.lc("--socket /tmp/fg.sock addjob --wait 'echo in the foreground'", user="alice")
        uuid = r.stdout.split()[0]
        job = json.loads(box.lc(f"--socket /tmp/fg.sock checkjob {uuid} --json").stdout)
        assert job["state"] == "succeeded" and job["node"] == "fg"
        # The packaged daemon (prefix /lcluster) does not know it.
        assert box.lc(f"checkjob {uuid}", check=False).returncode == 3
    finally:
        box.sh("kill $(cat /tmp/fg.pid)")
    box.sh("while kill -0 $(cat /tmp/fg.pid) 2>/dev/null; do sleep 0.1; done", timeout=15)
    assert "Traceback" not in box.sh("cat /tmp/fg.log").stdout


def test_daemon_refuses_a_bad_rootfs_or_namespace_with_one_line(box):
    for args, words in (("--rootfs=/nonexistent", "not a directory"),
                        ("--rootfs=/tmp", "no executable /bin/sh"),
                        ("--namespace=no/such", "not a valid network namespace name"),
                        ("--config=/nonexistent.conf", "does not exist")):
        r = box.sh(f"lclusterd {args} --socket /tmp/refused.sock", check=False)
        assert r.returncode == 78, (args, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, r.stderr)
