"""A job runs its command exactly as `sh -c CMD` run by the same user, and
its output comes back through `lclusterc logs` as written (issue 9 items 1, 2).

systemd substitutes ${NAME}, $NAME and $$ in ExecStart= arguments at exec
time, also for transient units: before the fix `X=shell; echo "${X} $$"`
printed " $" and `kill -9 $$` exited 2. journald cuts lines at LineMax
(48 KiB): before the fix a 100 KiB line came back as three lines.

Each command runs once as a job and once as `sh -c` in the same container
as the same user (alice); output and exit status must be equal. The table
avoids what journald itself changes (empty lines, blanks at a line's end:
README, "A job's output"), and what differs by design ($0 is /bin/sh in a
job, $LCLUSTER_JOB_ID is set), and values that differ per run ($$ itself).
"""

import json

import pytest

from tests.system.conftest import TERMINAL

LONG = "x=$(head -c 102400 /dev/zero | tr '\\0' x); printf '%s\\n' \"$x\""
BIG = "X=ab; echo  " + "${X}" * ((64 * 1024 - 12) // 4)  # 64 KiB exactly, $ on every 4th byte

COMMANDS = [
    'X=shell; echo "${X} $(( $$ > 1 ))"',
    'echo "[${X}]"',
    "X=value; echo $X",
    "X=value; echo ${X}",
    "echo \"$$\" | grep -q '^[0-9][0-9]*$' && echo pid-ok",
    'echo "[$1] [$#]"',
    'echo "[${X:-d}] [${X:+alt}]"; X=1; echo "[${X:-d}] [${X:+alt}]"',
    'echo "$$$$" | grep -q "^\\([0-9]*\\)\\1$" && echo twice',
    'echo "[${HOME}]" "[$USER]"',
    "echo %n %% %i %h %%n",
    "printf 'a\\nb\\n'; echo 'c\\nd'",
    "printf '%s\\n' 'back\\\\slash' \"two\\\\\\\\\" '\\\\'",
    "echo \"it's\" 'say \"hi\"' \"`echo sub`\" '$(not run)' \"$(echo run)\"",
    "echo a; echo b ; true",
    "echo 'héllo wörld ✓ 日本語 🙂'",
    "echo err >&2; echo out",
    "exit 3",
    "kill -9 $$",
    "printf 'a\\0b\\n'",
    "printf 'no final newline'",
    LONG,  # 100 KiB in one line: journald stores it in three pieces
    "head -c 60000 /dev/zero | tr '\\0' y; echo",  # a long line ended by another process
    BIG,
]


# `sh -c CMD` as the user runs it, with stdout and stderr on one stream as
# in the job. (Not from a shell: it would add its own "Killed" on stderr.)
REFERENCE = """
import json, subprocess, sys
r = subprocess.run(["sh", "-c", open(sys.argv[1]).read()], stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
print(json.dumps({"out": r.stdout.decode(), "rc": r.returncode if r.returncode >= 0 else 128 - r.returncode}))
"""


def test_the_big_command_is_64_KiB():
    assert len(BIG.encode()) == 64 * 1024


@pytest.fixture(scope="module")
def ran(box):
    """{command: (job record, its logs, sh -c's output, sh -c's exit status)}."""
    box.sh("rm -rf /tmp/lccmd && mkdir -m 755 /tmp/lccmd")
    box.sh("cat > /tmp/lcref.py && chmod 644 /tmp/lcref.py", input=REFERENCE)
    for i, cmd in enumerate(COMMANDS):
        box.sh(f"cat > /tmp/lccmd/{i:02d} && chmod 644 /tmp/lccmd/{i:02d}", input=cmd)
    uuids = box.sh('for f in /tmp/lccmd/*; do lclusterc addjob "$(cat $f)" || exit 1; done',
                   user="alice").stdout.split()
    assert len(uuids) == len(COMMANDS)
    results = {}
    for i, (cmd, uuid) in enumerate(zip(COMMANDS, uuids)):
        job = box.wait_state(uuid, TERMINAL)
        logs = box.lc(f"logs {uuid}", user="alice").stdout
        ref = json.loads(box.sh(f"cd / && python3 /tmp/lcref.py /tmp/lccmd/{i:02d}", user="alice").stdout)
        out, rc = ref["out"], ref["rc"]
        results[cmd] = (job, logs, out, int(rc))
    return results


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c if len(c) < 40 else f"{c[:30]}...({len(c)} bytes)")
def test_a_job_runs_its_command_as_sh_c_does(ran, cmd):
    job, logs, out, rc = ran[cmd]
    assert job["command"] == cmd
    assert job["exit_status"] == rc, (job["state"], job["reason"])
    assert logs == out


def test_known_outputs(ran):
    # What sh -c itself prints, so the comparison above is not of two wrongs.
    assert ran[COMMANDS[0]][1] == "shell 1\n"
    assert ran["kill -9 $$"][0]["exit_status"] == 137
    assert ran["kill -9 $$"][0]["state"] == "failed"
    assert ran["echo %n %% %i %h %%n"][1] == "%n %% %i %h %%n\n"
    assert ran["printf 'a\\0b\\n'"][1] == "a\0b\n"
    assert ran["printf 'no final newline'"][1] == "no final newline"


def test_a_100_KiB_line_comes_back_whole(ran, box):
    job, logs, _, _ = ran[LONG]
    assert logs == "x" * 102400 + "\n"
    # journald did split it: the rejoining is ours.
    pieces = box.sh(f"journalctl -u {job['unit']} _TRANSPORT=stdout -o json "
                    "--output-fields=_LINE_BREAK").stdout.splitlines()
    assert [json.loads(p).get("_LINE_BREAK") for p in pieces] == ["line-max", "line-max", None]


def enforce_limits(box):
    """nspawn mounts the v1 controllers read-only: remount them, and restart
    the daemon, which finds what it can enforce at start-up (issue 9 item 17)."""
    box.c.enable_resource_control()
    box.sh("systemctl restart lclusterd")


def test_an_oom_kill_is_recorded_with_the_number_of_kills(box):
    """Issue 9 item 18: on cgroup v1 (this host) systemd does not see OOM kills;
    core.OOM_CHECK does, and its exit status carries their number."""
    enforce_limits(box)
    r = box.lc("addjob --wait --memory 64M 'python3 -c \"b = bytearray(512 * 2**20)\"'",
               user="alice", check=False)
    assert r.stdout.split(), r.stderr
    uuid = r.stdout.split()[0]
    job = box.job(uuid)
    assert (job["state"], job["result"]) == ("failed", "oom-kill"), job
    assert "(oom-kill: 1 OOM kill in its memory cgroup)" in job["reason"], job["reason"]


def test_a_job_that_survives_an_oom_kill_is_recorded_oom_kill(box):
    """The issue's case: the OOM killer takes a child, the job exits 0.
    systemd's OOMPolicy=stop makes that Result=oom-kill on cgroup v2; here
    (v1) units.OomWatch sees it while the job runs."""
    enforce_limits(box)
    for cmd, kills in (("python3 -c \"b = bytearray(512 * 2**20)\" || true; sleep 1", 1),
                       ("for i in 1 2; do python3 -c \"b = bytearray(512 * 2**20)\"; done; true", 2)):
        r = box.lc(f"addjob --wait --memory 64M '{cmd}'", user="alice", check=False)
        assert r.stdout.split(), r.stderr
        job = box.job(r.stdout.split()[0])
        assert (job["state"], job["result"], job["exit_status"]) == ("failed", "oom-kill", 0), job
        assert f"(oom-kill: {kills} OOM kill" in job["reason"], job["reason"]
