"""lclusterd-fence: stops this node's jobs when its lease may have expired.

Why a separate process: the daemon renews this node's lease in etcd. When the
daemon is stopped, crashed, crash-looping or mid-upgrade, nobody renews it;
the other nodes then see the node failed and run its jobs again, while the
job units here (which live outside the daemon's cgroup) keep running. This
fence runs in its own service and stops them in time, so a job never runs on
two nodes at once.

It reads one file, which the daemon replaces atomically after registering and
after every confirmed renewal (contract C1):

    /run/lclusterd/fence.json   {"node": NAME, "deadline": D, "others_live": BOOL, "pid": PID}

D is in CLOCK_MONOTONIC seconds (time.monotonic(); the same clock in every
process of this boot, and it never jumps with the wall clock). Every 0.2 s:
once monotonic() > D and others_live, every lcluster-job@*.service whose job
still runs is marked (/run/lclusterd/fenced/<uuid>, an empty file, so the
daemon records the job `lost`, not failed or succeeded), killed with SIGKILL
and stopped.
A node alone in the cluster (others_live false) has nobody to take its jobs:
it keeps them.

Deliberately small and stdlib only (no etcd, no D-Bus library, nothing else
of lclusterd): it must keep working whatever state the daemon, its
dependencies or an upgrade are in. systemctl is the way to systemd here; it
only runs once the deadline has passed.
"""

import json
import os
import subprocess
import sys
import time

FENCE_FILE = "/run/lclusterd/fence.json"
MARKER_DIR = "/run/lclusterd/fenced"
UNITS = "lcluster-job@*.service"
PREFIX, SUFFIX = "lcluster-job@", ".service"
INTERVAL = 0.2  # seconds between checks (C1)
SYSTEMCTL_TIMEOUT = 10  # a systemctl that hangs must not stop the next check for long


def log(message):
    # stdout goes to the journal under lclusterd-fence.service
    print(message, flush=True)


def read_fence(path=FENCE_FILE):
    """The fence file's content, or None when it is missing or unusable
    (no daemon has registered since boot: nothing to enforce)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return {"node": str(data.get("node", "")), "deadline": float(data["deadline"]),
                "others_live": bool(data["others_live"])}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def must_fence(fence, now):
    """The whole rule: past the deadline, and others may run our jobs."""
    return fence is not None and fence["others_live"] and now > fence["deadline"]


def systemctl(*args):
    return subprocess.run(["systemctl", *args], capture_output=True, text=True,
                          timeout=SYSTEMCTL_TIMEOUT, stdin=subprocess.DEVNULL)


def job_units():
    """Names of the lcluster-job@<uuid>.service units whose job still runs.
    Not those that ended (failed, inactive, or active/exited under
    RemainAfterExit): their result is real and the daemon records it; and
    not those fenced already, which stay loaded as failed."""
    r = systemctl("list-units", "--all", "--plain", "--no-legend", "--full", UNITS)
    names = []
    for line in r.stdout.splitlines():
        fields = line.split()  # UNIT LOAD ACTIVE SUB DESCRIPTION...
        if len(fields) >= 4 and fields[0].startswith(PREFIX) and fields[0].endswith(SUFFIX) \
                and fields[1] != "not-found" and running(fields[2], fields[3]):
            names.append(fields[0])
    return names


def running(active, sub):
    return active in ("activating", "deactivating", "reloading") or (
        active == "active" and sub != "exited")


def fence_units(units, marker_dir=MARKER_DIR):
    """Mark, SIGKILL, then stop each unit. The marker comes first so the
    daemon, whenever it sees the unit end, knows it was fenced."""
    os.makedirs(marker_dir, exist_ok=True)
    for unit in units:
        uuid = unit[len(PREFIX):-len(SUFFIX)]
        with open(os.path.join(marker_dir, uuid), "a", encoding="utf-8"):
            pass
    if units:
        systemctl("kill", "--signal=SIGKILL", *units)
        systemctl("stop", "--no-block", *units)


def check(now=None):
    """One pass; returns the units it fenced."""
    fence = read_fence()
    if not must_fence(fence, time.monotonic() if now is None else now):
        return []
    units = job_units()
    if units:
        fence_units(units)
        log(f"fenced {len(units)} job unit(s) of node {fence['node']!r}: its lease was not "
            f"renewed by its deadline and other nodes are live: {' '.join(units)}")
    return units


def main():
    log(f"watching {FENCE_FILE} every {INTERVAL} s")
    while True:
        try:
            check()
        except (OSError, subprocess.SubprocessError) as e:
            # Keep watching: the next pass tries again.
            log(f"fence pass failed: {e}")
        time.sleep(INTERVAL)


if __name__ == "__main__":
    sys.exit(main())
