"""The cluster, for real: three containers, three etcd members, three
lclusterd installed from the .deb; driven with lclusterc (see conftest.py).

The cases run in this order on one cluster: the destructive ones last.
"""

import json
import re
import time
from pathlib import Path

from tests.cluster.harness import LEASE_TTL, PORT, SLOTS, TOKEN, ip, wait_for

FIGURES = Path("/tmp/lclusterd-tests/cluster-figures.txt")
# Each line a job prints: "at <uuid> <epoch seconds>", from inside the job.
TICKING = "for i in $(seq {n}); do echo at $LCLUSTER_JOB_ID $(date +%s.%N); sleep 0.2; done"


def note(text):
    """Keep a measured figure (printed, and appended to FIGURES)."""
    print(text)
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def addjob(node, command, extra=""):
    out = node.lc(f"addjob {extra} -- '{command}'").stdout.split()
    assert out and re.fullmatch(r"[0-9a-f-]{36}", out[0]), out
    return out[0]


def wait_running(node, uuids, timeout=60, not_on=None):
    def check():
        jobs = [node.job(u) for u in uuids]
        ok = all(j["state"] == "running" and j["node"] != not_on for j in jobs)
        return jobs if ok else None
    return wait_for(f"{len(uuids)} job(s) running", check, timeout)


def ticks(node, uuids):
    """{uuid: [epoch, ...]} of the 'at' lines the jobs printed on node."""
    found = {}
    for line in node.journal_lines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "at" and parts[1] in uuids:
            found.setdefault(parts[1], []).append(float(parts[2]))
    return found


def remove_all(node, uuids):
    for u in uuids:
        node.lc(f"removejob {u}", check=False)


# --- cases --------------------------------------------------------------------

def test_nodes_registered_with_address_and_slots(cluster):
    rows = cluster[1].nodes()
    assert set(rows) == {"n1", "n2", "n3"}
    for n in cluster:
        assert rows[n.name]["address"] == n.url and rows[n.name]["slots"] == SLOTS
        assert rows[n.name]["state"] in ("ready", "primed")
    assert sum(r["state"] == "primed" for r in rows.values()) <= 1
    table = cluster[0].lc("nodes").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "ADDRESS", "STATE"] and "n3" in table


def test_tcp_needs_the_token(cluster):
    a, b = cluster[0], cluster[1]
    probe = ("import sys, urllib.request, urllib.error\n"
             "req = urllib.request.Request(sys.argv[1], headers=dict([sys.argv[2].split(': ', 1)]) "
             "if len(sys.argv) > 2 else {})\n"
             "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
             "except urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\n")
    a.sh("cat > /tmp/probe.py", input=probe)
    url = f"{b.url}/v1/jobs"
    assert a.sh(f"python3 /tmp/probe.py {url}").stdout.startswith("401 ")
    assert a.sh(f"python3 /tmp/probe.py {url} 'Authorization: Bearer wrong'").stdout.startswith("401 ")
    assert a.sh(f"python3 /tmp/probe.py {url} 'Authorization: Bearer {TOKEN}'").stdout.strip() == "200"
    # lclusterc without a readable token: 401 is exit 4 with one line.
    r = a.lc(f"--server {b.url} --token-file /dev/null list", check=False)
    assert r.returncode == 4 and "token" in r.stderr and len(r.stderr.splitlines()) == 1
    # With the token (root's file), remotely: a job queued at b, answered by a's socket too.
    uuid = a.lc(f"--server {b.url} addjob true").stdout.split()[0]
    assert b.wait_state(uuid)["state"] == "succeeded"
    assert a.job(uuid)["state"] == "succeeded"
    r = a.sh(f"LCLUSTER_SERVER={b.url} lclusterc checkjob --json {uuid}")
    assert json.loads(r.stdout)["uuid"] == uuid


def test_tcp_without_a_root_only_token_file_is_refused(cluster):
    n = cluster[0]
    n.sh("printf '[lclusterd]\\nlisten = 127.0.0.1:7801\\ntoken_file = /tmp/tok\\n' > /tmp/tcp.conf")
    for prepare, expected in (("rm -f /tmp/tok", "does not exist"),
                              ("echo 0123456789abcdef0123 > /tmp/tok; chmod 644 /tmp/tok",
                               "readable by root only")):
        n.sh(prepare)
        r = n.sh("lclusterd --config /tmp/tcp.conf --socket /tmp/tcp.sock", check=False, timeout=30)
        assert r.returncode == 78 and expected in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_30_jobs_all_succeed_exactly_once_over_several_nodes(cluster):
    command = "echo ran $LCLUSTER_JOB_ID; sleep 0.5"
    uuids = []
    for n in cluster:  # 10 submitted at each node
        out = n.sh(f"for i in $(seq 10); do lclusterc addjob '{command}'; done").stdout.split()
        uuids += out
    assert len(set(uuids)) == 30
    jobs = wait_for("30 jobs to end", lambda: (lambda js: js if all(
        j["state"] in ("succeeded", "failed", "cancelled") for j in js) else None)(
        [cluster[0].job(u) for u in uuids]), 120, interval=1)
    assert [j["state"] for j in jobs] == ["succeeded"] * 30
    assert all(len(j["attempts"]) == 1 and j["attempts"][0]["node"] == j["node"] for j in jobs)
    used = {j["node"] for j in jobs}
    assert len(used) > 1, f"all 30 ran on {used}"
    ran = []
    for n in cluster:
        ran += [line.split()[1] for line in n.journal_lines() if line.startswith("ran ")]
    assert sorted(u for u in ran if u in uuids) == sorted(uuids)  # each exactly once
    note(f"30 jobs of 0.5 s on 3 nodes x {SLOTS} slots: nodes used {sorted(used)}")


def test_a_freed_slot_goes_to_the_highest_priority_first(cluster):
    a = cluster[0]
    blockers = [addjob(a, "sleep 600") for _ in range(len(cluster) * SLOTS)]
    try:
        wait_running(a, blockers)  # every slot of the cluster taken
        low = addjob(a, "sleep 1")
        high = addjob(cluster[1], "sleep 5", "--priority 50")  # later, at another node
        assert [a.job(u)["state"] for u in (low, high)] == ["queued", "queued"]
        a.lc(f"removejob {blockers[0]}")  # one slot frees: the high one takes it
        assert a.wait_state(high, ("running",), timeout=60)["priority"] == 50
        assert a.job(low)["state"] == "queued"
        for u in (high, low):  # then the low one, in the slot the high one leaves
            assert a.wait_state(u, timeout=60)["state"] == "succeeded"
    finally:
        remove_all(a, blockers)


def test_removejob_at_one_node_stops_the_job_on_another(cluster):
    uuid = addjob(cluster[0], "sleep 600")
    job = wait_running(cluster[0], [uuid])[0]
    runner = next(n for n in cluster if n.name == job["node"])
    asker = next(n for n in cluster if n is not runner)
    unit = f"lcluster-job@{uuid}.service"
    assert runner.unit_state(unit) == ["loaded", "active"]
    t = time.monotonic()
    assert asker.lc(f"removejob {uuid}").stdout.startswith("cancelled ")
    wait_for(f"{unit} gone on {runner.name}", lambda: unit not in runner.units(), 30)
    note(f"removejob at {asker.name} of a job on {runner.name}: its unit gone after "
         f"{time.monotonic() - t:.1f} s")
    assert runner.job(uuid)["state"] == "cancelled"


def test_one_etcd_member_down_the_cluster_keeps_scheduling(cluster):
    down = cluster[2]
    down.sh("systemctl stop etcd")
    try:
        uuids = [addjob(n, "true") for n in cluster for _ in range(2)]  # also at the member-less node
        for u in uuids:
            assert cluster[0].wait_state(u, timeout=60)["state"] == "succeeded"
        assert all(r["state"] != "failed" for r in cluster[0].nodes().values())
    finally:
        down.sh("systemctl start etcd")
    wait_for("etcd healthy again", lambda: cluster[0].sh(
        "etcdctl endpoint health --cluster 2>&1", check=False).stdout.count("is healthy") == 3, 60)


def ticking_jobs(cluster, ticks):
    """Fill SLOTS with ticking jobs; (their uuids, the node running the first,
    that node's jobs, another node)."""
    uuids = [addjob(cluster[0], TICKING.format(n=ticks)) for _ in range(SLOTS)]
    jobs = wait_running(cluster[0], uuids)
    node = next(n for n in cluster if n.name == jobs[0]["node"])
    mine = [j["uuid"] for j in jobs if j["node"] == node.name]
    return uuids, node, mine, next(n for n in cluster if n is not node)


def test_node_cut_off_stops_its_jobs_and_no_job_runs_twice(cluster):
    uuids, cut, mine, other = ticking_jobs(cluster, ticks=1000)
    try:
        t_cut = time.time()
        ip("link", "set", cut.veth, "down")
        try:
            wait_for(f"{cut.name} to stop its jobs", lambda: not any(
                u in unit for u in mine for unit in cut.units()), 3 * LEASE_TTL, interval=0.2)
            moved = wait_running(other, mine, timeout=6 * LEASE_TTL, not_on=cut.name)
            elsewhere = time.time() - t_cut
            rows = other.nodes()
            assert rows[cut.name]["state"] == "failed" and rows[cut.name]["failed_at"]
        finally:
            ip("link", "set", cut.veth, "up")
        for job in moved:
            assert [a["node"] for a in job["attempts"]][0] == cut.name
            assert job["attempts"][0]["outcome"] == "lost" and len(job["attempts"]) == 2
        # From inside the jobs: the last tick on the cut node precedes the first elsewhere.
        time.sleep(1)
        before = ticks(cut, mine)
        # When they stopped, from inside the jobs (a tick every 0.2 s): within the TTL.
        stopped = max(max(before[u]) for u in mine) - t_cut
        note(f"cut-off node (lease TTL {LEASE_TTL} s): its jobs' last output {stopped:.1f} s after "
             f"the link went down; running elsewhere after {elsewhere:.1f} s")
        assert stopped <= LEASE_TTL
        for job in moved:
            after = ticks(next(n for n in cluster if n.name == job["node"]), mine)
            assert before[job["uuid"]] and after[job["uuid"]]
            gap = min(after[job["uuid"]]) - max(before[job["uuid"]])
            assert gap > 0, f"job {job['uuid']} ran on {cut.name} and {job['node']} at once"
            note(f"job {job['uuid'][:8]}: last tick on {cut.name}, first on {job['node']}: "
                 f"{gap:.1f} s apart")
        # Healed, the node registers afresh and runs none of its old jobs.
        wait_for(f"{cut.name} back", lambda: other.nodes()[cut.name]["state"] in ("ready", "primed"),
                 60)
        assert not [u for u in mine for unit in cut.units() if u in unit]
    finally:
        remove_all(other, uuids)


def test_power_off_requeues_its_jobs_on_the_other_nodes(cluster):
    _, dead, mine, alive = ticking_jobs(cluster, ticks=40)
    t_off = time.time()
    dead.c.poweroff_hard()
    failed_after = wait_for(f"{dead.name} failed", lambda: (
        alive.nodes()[dead.name]["state"] == "failed" and time.time() - t_off), 4 * LEASE_TTL)
    moved = wait_running(alive, mine, timeout=6 * LEASE_TTL, not_on=dead.name)
    elsewhere = max(j["attempts"][-1]["started_at"] for j in moved) - t_off
    note(f"power-off (lease TTL {LEASE_TTL} s): failed after {failed_after:.1f} s; its "
         f"{len(mine)} job(s) running elsewhere {elsewhere:.1f} s after the power-off")
    assert failed_after <= 2 * LEASE_TTL
    done = [alive.wait_state(u, timeout=60) for u in mine]
    for job in done:
        assert job["state"] == "succeeded" and job["node"] != dead.name
        # The last two attempts: lost with the dead node, then done elsewhere.
        # (On a loaded machine a node may already have lost one while the
        # cluster was forming: every attempt before the last is lost.)
        nodes = [a["node"] for a in job["attempts"]]
        assert nodes[-2:] == [dead.name, job["node"]], nodes
        outcomes = [a["outcome"] for a in job["attempts"]]
        assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) == {"lost"}, outcomes
        assert job["attempts"][-1]["started_at"] >= job["attempts"][-2]["ended_at"]
    described = alive.lc(f"checkjob {mine[0]}").stdout
    assert f"{dead.name} (lost)" in described
