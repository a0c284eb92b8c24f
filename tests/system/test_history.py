"""Console output, the record of past jobs and warned jobs, on the installed
package in a container booted with systemd, driven with lclusterc.

Tests run in file order on one container; the retention test comes last
(it deletes records)."""

import json
import re
import time
from pathlib import Path

import pytest

from tests.system.test_spine import one_line_error

CONFIG = "/etc/lclusterd/lclusterd.conf"


def configure(box, **settings):
    """Write these settings into the config file and reload the daemon."""
    lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
    box.sh(f"printf '[lclusterd]\\n{lines}' > {CONFIG} && systemctl reload-or-restart lclusterd")


def daemon_pid(box):
    return int(box.sh("systemctl show -p MainPID --value lclusterd").stdout)


@pytest.fixture(scope="module", autouse=True)
def quick_stops(box):
    box.lc("list")  # starts the daemon (socket activation)
    configure(box, stop_timeout=2)


# --- logs ---------------------------------------------------------------------------

LONG = "seq -f %0100.0f 1 100000"  # 100,000 lines of 101 bytes: 10 MB


def test_logs_of_100000_lines_are_complete_in_order_and_streamed(box):
    uuid = box.lc(f"addjob --wait '{LONG}'", user="alice").stdout.strip()
    # Right after the job ended (journald may still be writing its output),
    # through a slow reader, while sampling the daemon's own memory.
    pid = daemon_pid(box)
    out = box.sh(
        f"grep RssAnon /proc/{pid}/status; "
        f"runuser -u alice -- lclusterc logs {uuid} | (sleep 2; cat > /tmp/long.out) & "
        f"for i in $(seq 60); do grep RssAnon /proc/{pid}/status; sleep 0.05; done; wait").stdout
    rss = [int(line.split()[1]) for line in out.splitlines()]  # kB
    assert box.sh(f"{LONG} | cmp - /tmp/long.out && wc -l < /tmp/long.out").stdout.strip() == "100000"
    # The daemon holds a chunk at a time, not the 10 MB of output.
    assert max(rss) - rss[0] < 4 * 1024, f"daemon's anonymous memory grew by {max(rss) - rss[0]} kB"


def test_logs_tail_and_since(box):
    uuid = box.lc("addjob --wait 'seq 100000'", user="alice").stdout.strip()
    assert box.lc(f"logs {uuid} | md5sum", user="alice").stdout == box.sh("seq 100000 | md5sum").stdout
    assert box.lc(f"logs --tail 3 {uuid[:8]}", user="alice").stdout == "99998\n99999\n100000\n"
    assert box.lc(f"logs --tail 0 {uuid}", user="alice").stdout == ""
    assert box.lc(f"logs --since 1h {uuid} | wc -l", user="alice").stdout.strip() == "100000"
    assert box.lc(f"logs --since 2099-01-01 {uuid}", user="alice").stdout == ""


def test_logs_follow_shows_lines_while_the_job_runs_then_exits_with_its_status(box):
    # The job prints, then waits for a file that only the test creates.
    box.sh("rm -f /run/lc-release")
    uuid = box.lc("addjob 'echo first; while [ ! -e /run/lc-release ]; do sleep 0.1; done; "
                  "echo second >&2; exit 3'", user="alice").stdout.strip()
    out = box.sh(
        f"runuser -u alice -- lclusterc logs -f {uuid} > /tmp/follow.out 2>/tmp/follow.err & "
        f"until grep -q first /tmp/follow.out; do sleep 0.1; done; "
        f"lclusterc checkjob --json {uuid} | grep -o '\"state\": \"[a-z]*\"'; "
        f"touch /run/lc-release; wait $!; echo exit=$?", timeout=60).stdout
    # "first" came while the job still ran (it waits for the file): the record
    # says starting or running (runner.py writes running within 0.25 s).
    assert '"state": "running"' in out or '"state": "starting"' in out, out
    assert "exit=3" in out
    assert box.sh("cat /tmp/follow.out").stdout == "first\nsecond\n"
    assert f"job {uuid} failed: exited with status 3" in box.sh("cat /tmp/follow.err").stdout


def test_logs_follow_of_a_queued_job_waits_for_it(box):
    blockers = box.fill_slots()
    queued = box.lc("addjob 'echo at last'", user="alice").stdout.strip()
    assert box.job(queued)["state"] == "queued"
    box.sh(f"runuser -u alice -- lclusterc logs -f {queued} > /tmp/queued.out & "
           f"sleep 1; lclusterc removejob {blockers[0]} >/dev/null; wait $!")
    assert box.sh("cat /tmp/queued.out").stdout == "at last\n"
    for uuid in blockers[1:]:
        box.lc(f"removejob {uuid}")


def test_checkjob_shows_the_last_lines(box):
    uuid = box.lc("addjob --wait 'seq 12'", user="alice").stdout.strip()
    text = box.lc(f"checkjob {uuid}", user="alice").stdout
    assert re.search(rf"^output: +last 5 line\(s\); all of it: lclusterc logs {uuid}$", text, re.M)
    assert text.endswith("\n  8\n  9\n  10\n  11\n  12\n")


def test_only_the_submitter_or_root_reads_the_output(box):
    uuid = box.lc("addjob --wait 'echo secret'", user="alice").stdout.strip()
    r = box.lc(f"logs {uuid}", user="bob", check=False)
    assert r.returncode == 4 and "permission denied" in one_line_error(r)
    assert box.lc(f"logs {uuid}").stdout == "secret\n"  # root may
    assert "output:" not in box.lc(f"checkjob {uuid}", user="bob").stdout  # the record, no output


def test_logs_bad_input(box):
    for args, code in (("logs 00000000-0000-4000-8000-000000000000", 3), ("logs ab", 2),
                       ("logs --since yesterday 0000", 2)):
        r = box.lc(args, user="alice", check=False)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        one_line_error(r)
    r = box.lc("logs --tail -1 0000", user="alice", check=False)  # click's usage error
    assert r.returncode == 2 and "lclusterc: Invalid value for '--tail'" in r.stderr
    one_line_error(r)  # issue 9 item 19: one line, not click's four


# --- wait ---------------------------------------------------------------------------

def test_wait_exits_0_only_if_all_succeeded(box):
    good = [box.lc(f"addjob 'sleep 0.{i}; true'", user="alice").stdout.strip() for i in (3, 5)]
    bad = box.lc("addjob 'sleep 0.4; exit 2'", user="alice").stdout.strip()
    r = box.lc(f"wait {' '.join(good)}", user="alice")
    assert r.stdout.split() == ["succeeded", good[0], "succeeded", good[1]]
    r = box.lc(f"wait {good[0]} {bad}", user="alice", check=False)
    assert r.returncode == 1 and f"failed {bad}" in r.stdout
    assert f"job {bad} failed: exited with status 2" in r.stderr


# --- history ------------------------------------------------------------------------

def listed(box, args, user=None):
    return [job["uuid"] for job in json.loads(box.lc(f"list --json {args}", user=user).stdout)]


def test_list_filters(box):
    hostname = box.sh("hostname").stdout.strip()
    running = box.lc("addjob 'sleep 600'", user="bob").stdout.strip()
    failed = box.lc("addjob --wait 'exit 1'", user="bob", check=False).stdout.strip()
    ok = box.lc("addjob --wait true", user="alice").stdout.strip()
    box.wait_state(running, ("running",))
    try:
        assert listed(box, "--user bob --limit 2") == [running, failed]  # live first
        assert listed(box, "--limit 1") == [running]
        assert failed in listed(box, "--state failed --user bob")
        assert ok not in listed(box, "--state failed")
        assert ok in listed(box, f"--node {hostname} --since 5m")
        assert listed(box, "--node elsewhere") == []
        assert listed(box, "--until 1h") == []  # nothing was submitted before the container booted
        assert listed(box, "--since 2099-01-01") == []
        assert ok in listed(box, f"--since '{time.strftime('%Y-%m-%d', time.gmtime(time.time() - 86400))}'")
        # The human table: running first, fits the terminal.
        lines = box.sh(f"COLUMNS=70 lclusterc list --user bob --limit 2").stdout.splitlines()
        assert lines[1].startswith(running[:8]) and "running" in lines[1]
        assert all(len(line) <= 70 for line in lines), lines
        r = box.lc("list --since yesterday", check=False)
        assert r.returncode == 2 and "not a time" in one_line_error(r)
    finally:
        box.lc(f"removejob {running}")


# --- warned jobs ----------------------------------------------------------------------

class Frozen:
    """The job's processes moved into a frozen cgroup of the (host's) v1
    freezer hierarchy, below the container's own: SIGKILL cannot end a
    process frozen there until it is thawed."""

    def __init__(self, box, uuid):
        mine = {Path(cg).relative_to("/sys/fs/cgroup").parts[0]: Path(cg) for cg in box.c._cgroups}
        unified = mine["unified"]
        freezer = next(cg for ctl, cg in mine.items() if "freezer" in ctl.split(","))
        procs = next(unified.glob(f"**/lcluster-job@{uuid}.service/cgroup.procs"))
        self.pids = procs.read_text().split()
        assert self.pids, f"no processes in {procs}"
        self.cgroup = freezer / f"stuck-{uuid[:8]}"
        self.cgroup.mkdir()
        for pid in self.pids:
            (self.cgroup / "cgroup.procs").write_text(pid)
        (self.cgroup / "freezer.state").write_text("FROZEN")

    def thaw(self):
        if self.cgroup.exists():
            (self.cgroup / "freezer.state").write_text("THAWED")
            deadline = time.monotonic() + 30
            while (self.cgroup / "cgroup.procs").read_text().strip():  # SIGKILL was pending
                assert time.monotonic() < deadline, "thawed processes did not die"
                time.sleep(0.1)
            self.cgroup.rmdir()


def daemon_status(box):
    return box.sh("systemctl show -p StatusText --value lclusterd").stdout.strip()


def test_a_removed_job_that_cannot_be_stopped_becomes_warned_and_clears(box):
    uuid = box.lc("addjob 'sleep 1000'", user="alice").stdout.strip()
    job = box.wait_state(uuid, ("running",))
    frozen = Frozen(box, uuid)
    try:
        r = box.lc(f"removejob {uuid}", user="alice", check=False)
        assert r.returncode == 1 and r.stdout == f"warned {uuid}\n"
        assert "did not stop: still has processes" in one_line_error(r)
        job = box.job(uuid)
        assert job["state"] == "warned" and job["warned_from"] == "cancelled"
        assert "removejob" in job["warning"] and job["warned_at"] >= job["ended_at"]
        assert listed(box, "--state warned") == [uuid]
        assert re.search(r"^warned: +\S+: still has processes", box.lc(f"checkjob {uuid}").stdout, re.M)
        assert box.sh(f"ETCDCTL_API=3 etcdctl get /lcluster/warned_jobs/{uuid} --print-value-only"
                      ).stdout.strip() == job["node"]
        time.sleep(3)  # sweeps pass: it stays warned, its unit loaded, its slot taken
        assert box.job(uuid)["state"] == "warned"
        assert box.unit_state(job["unit"])[0] == "loaded"
        assert daemon_status(box).startswith("running 1 job(s)")
    finally:
        frozen.thaw()
    job = box.wait_state(uuid, ("cancelled",), timeout=30)
    assert job["reason"] == "removed by alice" and job["warning"]  # cleared, the warning kept
    assert box.unit_state(job["unit"])[0] == "not-found"
    assert listed(box, "--state warned") == []
    assert box.sh("ETCDCTL_API=3 etcdctl get --prefix /lcluster/warned_jobs/ --keys-only").stdout.strip() == ""
    box.sh("until systemctl show -p StatusText --value lclusterd | grep -q 'running 0 job'; "
           "do sleep 0.2; done", timeout=15)


def test_a_job_stopped_by_systemd_that_does_not_stop_becomes_warned(box):
    # As a timeout or a fence would: its unit is stopped behind the daemon's back.
    uuid = box.lc("addjob 'sleep 1000'", user="alice").stdout.strip()
    job = box.wait_state(uuid, ("running",))
    frozen = Frozen(box, uuid)
    try:
        box.sh(f"systemctl stop --no-block {job['unit']}")
        job = box.wait_state(uuid, ("warned",), timeout=40)  # 2 s stop_timeout + 5 s grace + a sweep
        assert job["warned_from"] == "running"
        assert f"still has {len(frozen.pids)} process(es)" in job["warning"]
        assert daemon_status(box).startswith("running 1 job(s)")
    finally:
        frozen.thaw()
    job = box.wait_state(uuid, ("failed",), timeout=30)
    # Whether systemd still saw its main process die (killed by signal 9) or
    # had given up on it before (no exit status) depends on timing.
    assert job["result"] == "timeout" and job["warned_at"] and job["warning"]
    assert "killed by signal 9" in job["reason"] or "after it was warned" in job["reason"]


# --- retention (last: it deletes records) -----------------------------------------------

def finished_records(box):
    return [j for j in json.loads(box.lc("list --json --limit 100000").stdout)
            if j["state"] in ("succeeded", "failed", "cancelled")]


def test_retention_removes_old_records_by_count_then_by_age(box):
    latest = [box.lc(f"addjob --wait 'echo {i}'").stdout.strip() for i in range(3)]
    configure(box, stop_timeout=2, retention="1d", max_finished_jobs=2)
    deadline = time.monotonic() + 30
    while len(finished_records(box)) > 2:
        assert time.monotonic() < deadline, "the count cap was not applied"
        time.sleep(0.5)
    assert {j["uuid"] for j in finished_records(box)} == set(latest[1:])  # the latest ones stay

    live = box.lc("addjob 'sleep 600'").stdout.strip()
    configure(box, stop_timeout=2, retention="3s", max_finished_jobs=1000)
    deadline = time.monotonic() + 30
    while finished_records(box):
        assert time.monotonic() < deadline, "the retention was not applied"
        time.sleep(0.5)
    r = box.lc(f"checkjob {latest[-1]}", check=False)
    assert r.returncode == 3
    assert box.job(live)["state"] == "running"  # live jobs are never removed
    keys = box.sh("ETCDCTL_API=3 etcdctl get --prefix /lcluster/jobs/ --keys-only | grep -c .").stdout
    assert int(keys) == 1  # the keyspace holds only what is kept
    assert "deleted" in box.sh("journalctl -u lclusterd -o cat | grep history: | tail -1").stdout
    box.lc(f"removejob {live}")
