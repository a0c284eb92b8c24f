"""PrivatePIDs= where the node's systemd has it (issue 12 item 1): on Debian 13
(systemd 257) a job sees only its own processes, under a shell as its PID
namespace's init (core.PID_INIT), and behaves as `sh -c` does otherwise; on
Debian 12 (systemd 252, no PrivatePIDs=) jobs run as before. Whether it is
there is asked of systemd at start-up (units.service_has), and said in the
journal."""

import time

from tests.system.conftest import TERMINAL


def has_private_pids(box):
    return box.suite != "bookworm"


def logs(box, uuid):
    return box.lc(f"logs {uuid}", user="alice").stdout


def test_the_daemon_asked_systemd_and_the_unit_says_what_it_got(box):
    uuid = box.lc("addjob 'sleep 300'", user="alice").stdout.strip()
    unit = box.wait_state(uuid, ("running",))["unit"]
    props = box.lc(f"checkjob --unit-properties {uuid}").stdout.splitlines()
    journal = box.sh("journalctl -u lclusterd --no-pager -o cat").stdout
    if has_private_pids(box):
        assert "PrivatePIDs=yes" in props, props
        assert "jobs get PrivatePIDs= (their own PID namespace)" in journal
    else:
        assert not [p for p in props if p.startswith("PrivatePIDs")], props
        assert "this systemd has no PrivatePIDs=" in journal
    # What systemd itself made of it.
    shown = box.sh(f"systemctl show -p PrivatePIDs --value {unit}", check=False).stdout.strip()
    box.lc(f"removejob {uuid}", user="alice")
    assert shown == ("yes" if has_private_pids(box) else "")


def test_a_job_does_not_see_the_same_users_other_jobs(box):
    other = box.lc("addjob 'sleep 301'", user="alice").stdout.strip()
    box.wait_state(other, ("running",))
    uuid = box.lc("addjob 'ps -eo pid,args; ls /proc | grep -c \"^[0-9]\"'", user="alice").stdout.strip()
    assert box.wait_state(uuid)["state"] == "succeeded"
    out = logs(box, uuid)
    box.lc(f"removejob {other}", user="alice")
    if has_private_pids(box):
        assert "sleep 301" not in out, out
        # The init, the job's shell and ps; then the init, the shell, ls and grep.
        pids = [line.split()[0] for line in out.splitlines()[1:-1]]
        assert pids == ["1", "2", "3"], out
        assert int(out.splitlines()[-1]) <= 4, out
    else:
        assert "sleep 301" in out, out  # what PrivatePIDs= takes away


def test_a_job_that_kills_itself_ends_as_under_sh_c(box):
    for cmd, status in (("kill -9 $$", 137), ("kill -TERM $$", 143), ("exit 3", 3)):
        uuid = box.lc(f"addjob '{cmd}'", user="alice").stdout.strip()
        job = box.wait_state(uuid)
        assert (job["state"], job["exit_status"]) == ("failed", status), (cmd, job)
        assert logs(box, uuid) == ""  # no "Killed" from the init
    uuid = box.lc("addjob 'echo \"$$ $0 [$1] $#\"'", user="alice").stdout.strip()
    assert box.wait_state(uuid)["state"] == "succeeded"
    pid, rest = logs(box, uuid).split(" ", 1)
    assert rest == "/bin/sh [] 0\n"
    assert pid == "2" if has_private_pids(box) else int(pid) > 2


def test_removejob_still_ends_a_running_job_promptly(box):
    # SIGTERM reaches the job's shell (the init has no handler for it); the
    # stop timeout (10 s) and its SIGKILL are not needed.
    for cmd in ("sleep 302", "sleep 303; echo not reached", 'trap "exit 7" TERM; sleep 304 & wait'):
        uuid = box.lc(f"addjob '{cmd}'", user="alice").stdout.strip()
        job = box.wait_state(uuid, ("running",))
        started = time.monotonic()
        box.lc(f"removejob {uuid}", user="alice")
        box.sh(f"while systemctl is-active -q {job['unit']}; do sleep 0.1; done", timeout=30)
        assert time.monotonic() - started < 5, cmd
        assert box.wait_state(uuid, TERMINAL)["state"] == "cancelled"
        assert "not reached" not in logs(box, uuid)
