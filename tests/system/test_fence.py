"""The fence without the daemon (issue 9 item 5, contract C1), on one node.

lclusterd-fence.service (lclusterd/fence.py) reads /run/lclusterd/fence.json,
which the daemon rewrites after every confirmed lease renewal. Here the daemon
is stopped and the file is written by the test, as a daemon that stopped
renewing would have left it: past its deadline, with other nodes live, the
fence must mark and kill every lcluster-job@*.service; alone in the cluster,
it must keep them. The job units are made with systemd-run, as the daemon
makes them (same names, same slice), printing timestamps. The cluster-level
proof (a stopped, killed, upgraded daemon on a real cluster) is in
tests/cluster.
"""

import json
import time
import uuid as uuidlib

import pytest

FENCE = "/run/lclusterd/fence.json"
MARKERS = "/run/lclusterd/fenced"
TICKER = "while :; do date +%s.%N; sleep 0.2; done"


@pytest.fixture(scope="module")
def node(box):
    # The fence must work with no daemon at all.
    box.sh("systemctl stop lclusterd.socket lclusterd.service")
    return box


def start_jobs(box, n=2):
    uuids = [str(uuidlib.uuid4()) for _ in range(n)]
    for u in uuids:
        box.sh(f"systemd-run --quiet --unit=lcluster-job@{u}.service --slice=lcluster.slice "
               f"sh -c '{TICKER}'")
    for u in uuids:
        assert box.unit_state(f"lcluster-job@{u}.service") == ["loaded", "active"]
    return uuids


def write_fence(box, others_live, deadline_in=-1.0):
    """The fence file, replaced atomically as the daemon does; its deadline
    deadline_in seconds from now on the node's monotonic clock."""
    now = float(box.sh("python3 -c 'import time; print(time.monotonic())'").stdout)
    data = json.dumps({"node": "n1", "deadline": now + deadline_in,
                       "others_live": others_live, "pid": 1})
    box.sh(f"mkdir -p /run/lclusterd && cat >{FENCE}.tmp && mv {FENCE}.tmp {FENCE}", input=data)


def stop_jobs(box, uuids):
    box.sh("systemctl stop " + " ".join(f"lcluster-job@{u}.service" for u in uuids), check=False)
    box.sh(f"rm -f {FENCE}; rm -rf {MARKERS}")


def test_fence_runs_from_boot_and_comes_back(node):
    assert node.sh("systemctl is-enabled lclusterd-fence.service").stdout.strip() == "enabled"
    pid = node.sh("systemctl show -p MainPID --value lclusterd-fence.service").stdout.strip()
    assert node.sh("systemctl is-active lclusterd-fence.service").stdout.strip() == "active"
    node.sh(f"kill -9 {pid}")
    deadline = time.monotonic() + 10
    while True:
        now = node.sh("systemctl show -p MainPID,ActiveState --value lclusterd-fence.service")
        new_pid, state = now.stdout.split()
        if state == "active" and new_pid not in ("0", pid):
            break
        assert time.monotonic() < deadline, f"fence not back after kill -9: {state} {new_pid}"
        time.sleep(0.2)


def test_alone_in_the_cluster_keeps_its_jobs(node):
    uuids = start_jobs(node)
    try:
        # No fence file, a garbled one, then a passed deadline with nobody else live.
        time.sleep(0.6)
        node.sh(f"echo '{{not json' >{FENCE}")
        time.sleep(0.6)
        write_fence(node, others_live=False, deadline_in=-5)
        time.sleep(1.5)
        for u in uuids:
            assert node.unit_state(f"lcluster-job@{u}.service") == ["loaded", "active"]
        assert node.sh(f"ls {MARKERS} 2>/dev/null || true").stdout.strip() == ""
        # A deadline not yet passed, others live: nothing either.
        write_fence(node, others_live=True, deadline_in=30)
        time.sleep(1.0)
        for u in uuids:
            assert node.unit_state(f"lcluster-job@{u}.service") == ["loaded", "active"]
    finally:
        stop_jobs(node, uuids)


def test_past_the_deadline_with_others_live_it_kills_and_marks(node):
    uuids = start_jobs(node, 3)
    try:
        write_fence(node, others_live=True, deadline_in=-0.5)
        start = time.monotonic()
        units = " ".join(f"lcluster-job@{u}.service" for u in uuids)
        while {"active", "deactivating"} & set(
                node.sh(f"systemctl is-active {units}", check=False).stdout.split()):
            assert time.monotonic() - start < 5, "fence did not stop the job units within 5 s"
            time.sleep(0.1)
        took = time.monotonic() - start
        print(f"fence: {len(uuids)} job units stopped {took:.2f} s after the deadline passed")
        markers = node.sh(f"ls {MARKERS}").stdout.split()
        assert sorted(markers) == sorted(uuids)
        # Killed (SIGKILL), not left to finish: nothing of them runs any more.
        for u in uuids:
            assert node.sh(f"systemctl show -p ActiveState --value lcluster-job@{u}.service"
                           ).stdout.strip() in ("inactive", "failed")
        log = node.sh("journalctl -u lclusterd-fence.service -o cat --no-pager").stdout
        assert "fenced 3 job unit(s)" in log
    finally:
        stop_jobs(node, uuids)
