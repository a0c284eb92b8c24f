"""The cluster, for real: three containers, three etcd members, three
lclusterd installed from the .deb; driven with lclusterc (see conftest.py).

The cases run in this order on one cluster: the destructive ones last.
"""

import json
import re
import time
from pathlib import Path

import pytest

from tests.cluster.harness import CA, LEASE_TTL, PORT, SLOTS, TOKEN, ip, wait_for

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
    header = table.splitlines()[0].split()
    assert header[0] == "NAME" and {"ADDRESS", "STATE"} <= set(header) and "n3" in table


def test_nodes_say_what_they_enforce_and_refuse_what_they_cannot(cluster):
    """Issue 9 item 17 (contract C4), across the cluster: since the primed
    node places every job (issue 11), a limit is refused at submission only
    if no node can enforce it; else the job goes to one that can."""
    rows = cluster[0].nodes()
    for n in cluster:
        enforces = rows[n.name]["enforces"]
        assert isinstance(enforces, list) and set(enforces) <= {"memory", "cpu", "pids"}
    somewhere = any("memory" in rows[n.name]["enforces"] for n in cluster)
    for n in cluster:
        r = n.lc("addjob --memory 64M true", check=False)
        if somewhere:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert "no node enforces --memory (its memory cgroup controller)" in r.stderr


def test_tcp_needs_the_token(cluster):
    a, b = cluster[0], cluster[1]
    probe = ("import sys, urllib.request, urllib.error\n"
             "req = urllib.request.Request(sys.argv[1], headers=dict([sys.argv[2].split(': ', 1)]) "
             "if len(sys.argv) > 2 else {})\n"
             "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
             "except urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\n")
    a.sh("cat > /tmp/probe.py", input=probe)
    url = f"{b.url}/v1/jobs"
    python = f"SSL_CERT_FILE={CA} python3" if b.tls else "python3"  # (https: the cluster's CA)
    assert a.sh(f"{python} /tmp/probe.py {url}").stdout.startswith("401 ")
    assert a.sh(f"{python} /tmp/probe.py {url} 'Authorization: Bearer wrong'").stdout.startswith("401 ")
    assert a.sh(f"{python} /tmp/probe.py {url} 'Authorization: Bearer {TOKEN}'").stdout.strip() == "200"
    # lclusterc without a readable token: 401 is exit 4 with one line.
    r = a.lc(f"--server {b.url} {b.ca_option} --token-file /dev/null list", check=False)
    assert r.returncode == 4 and "token" in r.stderr and len(r.stderr.splitlines()) == 1
    # With the token (root's file), remotely: a job queued at b, answered by a's socket too.
    uuid = a.lc(f"--server {b.url} {b.ca_option} addjob true").stdout.split()[0]
    assert b.wait_state(uuid)["state"] == "succeeded"
    assert a.job(uuid)["state"] == "succeeded"
    ca = f"LCLUSTER_CA={CA} " if b.tls else ""
    r = a.sh(f"{ca}LCLUSTER_SERVER={b.url} lclusterc checkjob --json {uuid}")
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


def test_a_second_machine_with_a_live_node_name_is_refused(cluster):
    """Issue 9 item 10 (contract C2): exit 78, one line naming the holder's
    address; the holder keeps its registration."""
    n, holder = cluster[0], cluster[1]
    endpoints = n.sh("grep '^etcd_endpoints' /etc/lclusterd/lclusterd.conf").stdout.strip()
    n.sh(f"printf '[lclusterd]\\n{endpoints}\\nnode_name = {holder.name}\\n' > /tmp/dup.conf")
    r = n.sh("timeout 60 lclusterd --config /tmp/dup.conf --socket /tmp/dup.sock",
             check=False, timeout=90)
    assert r.returncode == 78, (r.returncode, r.stderr[-2000:])
    # (In the foreground its log goes to stderr too: the refusal is the last line.)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lclusterd: ") and holder.url in last, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    row = n.nodes()[holder.name]
    assert row["address"] == holder.url and row["state"] in ("ready", "primed")


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


def test_a_running_job_whose_record_is_deleted_is_stopped(cluster):
    """Issue 10 item 10: its unit would hold the slot for ever."""
    uuid = addjob(cluster[0], "sleep 600")
    job = wait_running(cluster[0], [uuid])[0]
    runner = next(n for n in cluster if n.name == job["node"])
    t = time.time()
    runner.sh(f"etcdctl del /lcluster/jobs/{uuid}")
    unit = f"lcluster-job@{uuid}.service"
    wait_for(f"{unit} gone", lambda: unit not in runner.units(), 30)
    log = runner.sh(f"journalctl -o cat --no-pager -u lclusterd --since @{t - 1:.0f}").stdout
    assert f"job {uuid}: its record is gone from etcd" in log
    wait_for("its slot free", lambda: cluster[0].nodes()[runner.name]["free"] == SLOTS, 30)
    # ... for placement too (issue 11): its reservation (PREFIX/assigned/<node>/<uuid>)
    # went with it, else the primed node counts the slot as taken for ever.
    wait_for("its reservation gone", lambda: (lambda row: row if row["running"] == 0 and not row.get(
        "reserved_cpus") else None)(cluster[0].nodes()[runner.name]), 30)
    assert runner.sh(f"etcdctl get --prefix --keys-only /lcluster/assigned/{runner.name}/{uuid}"
                     ).stdout.strip() == ""


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


# --- fencing: the margin, elections, a daemon that is not running -------------------
#
# Every figure is measured from inside the jobs (a tick every 0.2 s, epoch
# time: the containers share the host's clock) and kept in FIGURES for README.

MARGIN = 2.0  # seconds between a job's last output on one node and its first on another


def etcd_status(cluster):
    """[(node, member id, is leader)] from `etcdctl endpoint status --cluster`."""
    out = json.loads(cluster[0].sh("etcdctl endpoint status --cluster -w json").stdout)
    found = []
    for entry in out:
        node = next(n for n in cluster if f"//{n.addr}:" in entry["Endpoint"])
        header = entry["Status"]["header"]
        found.append((node, header["member_id"], entry["Status"]["leader"] == header["member_id"]))
    return found


def move_etcd_leader(cluster, to):
    """Make `to`'s member the etcd leader (etcdctl move-leader, at the leader)."""
    status = etcd_status(cluster)
    leader = next(n for n, _, is_leader in status if is_leader)
    if leader is not to:
        target = next(m for n, m, _ in status if n is to)
        leader.sh(f"etcdctl --endpoints=http://{leader.addr}:2379 move-leader {target:x}")
    wait_for(f"{to.name} leading etcd", lambda: any(
        n is to and is_leader for n, _, is_leader in etcd_status(cluster)), 30)


def wait_etcd_healthy(cluster):
    wait_for("etcd healthy", lambda: cluster[0].sh(
        "etcdctl endpoint health --cluster 2>&1", check=False).stdout.count("is healthy") == 3, 60)


def fenced_since(node, since):
    """Lines saying node fenced (the daemon, or lclusterd-fence) since epoch `since`."""
    out = node.sh(f"journalctl -o cat --no-pager --since @{since:.0f} -u lclusterd -u lclusterd-fence "
                  "| grep -E 'fencing:|fenced [0-9]' || true").stdout
    return [line for line in out.splitlines() if line.strip()]


def by_node(cluster, uuids):
    """{node name: [uuid, ...]} of where the jobs run now."""
    placed = {}
    for u in uuids:
        placed.setdefault(cluster[0].job(u)["node"], []).append(u)
    return placed


def moved_apart(cluster, old, uuids, timeout=10 * LEASE_TTL, margin=MARGIN):
    """Wait for uuids to run on another node than old; per job the gap
    between its last tick on old and its first elsewhere (checked >= margin),
    its last tick on old, its first elsewhere. (The timeouts are ceilings:
    under load a move and the first tick's way to the journal take longer.)"""
    other = next(n for n in cluster if n is not old)
    moved = wait_running(other, uuids, timeout=timeout, not_on=old.name)
    node_of = {job["uuid"]: next(n for n in cluster if n.name == job["node"]) for job in moved}
    wait_for("the moved jobs' first ticks in their new nodes' journals", lambda: all(
        ticks(node, [u]).get(u) for u, node in node_of.items()), 20)
    before = ticks(old, uuids)
    found = []
    for job in moved:
        u = job["uuid"]
        after = ticks(node_of[u], [u])
        assert before.get(u) and after.get(u), (u, before, after)
        assert job["attempts"][-2]["node"] == old.name and job["attempts"][-2]["outcome"] == "lost"
        gap = min(after[u]) - max(before[u])
        assert gap >= margin, f"job {u} ran on {old.name} until {gap:.2f} s before it ran on {job['node']}"
        found.append((gap, max(before[u]), min(after[u])))
    return found


def record(what, t0, found):
    gaps = [g for g, _, _ in found]
    stopped = max(last for _, last, _ in found) - t0
    elsewhere = min(first for _, _, first in found) - t0
    note(f"{what} (lease TTL {LEASE_TTL} s): jobs stopped {stopped:.1f} s after, running "
         f"elsewhere {elsewhere:.1f} s after; margin {min(gaps):.1f}-{max(gaps):.1f} s; overlap 0 s")
    return stopped, elsewhere


@pytest.mark.parametrize("leader", [True, False], ids=["etcd-leaders-host", "a-follower"])
def test_node_cut_off_stops_its_jobs_by_the_margin_and_no_healthy_node_fences(cluster, leader):
    """Issue 9 items 8 and 9: cut (and heal) the node that hosts the etcd
    leader, or a follower: its jobs stop >= MARGIN s before they start
    elsewhere; no node that was not cut fences, at the cut or the heal."""
    wait_etcd_healthy(cluster)
    uuids = [addjob(cluster[0], TICKING.format(n=1500)) for _ in range(2 * SLOTS)]
    try:
        wait_running(cluster[0], uuids)
        placed = by_node(cluster, uuids)
        cut = next(n for n in cluster if placed.get(n.name))
        mine = placed[cut.name]
        healthy = [u for u in uuids if u not in mine]
        move_etcd_leader(cluster, cut if leader else next(n for n in cluster if n is not cut))
        t_cut = time.time()
        ip("link", "set", cut.veth, "down")
        try:
            found = moved_apart(cluster, cut, mine)
            rows = next(n for n in cluster if n is not cut).nodes()
            assert rows[cut.name]["state"] == "failed" and rows[cut.name]["failed_at"]
        finally:
            t_heal = time.time()
            ip("link", "set", cut.veth, "up")
        where = "etcd leader's host" if leader else "etcd follower's host"
        record(f"cut-off node, the {where}", t_cut, found)
        other = next(n for n in cluster if n is not cut)
        wait_for(f"{cut.name} back", lambda: other.nodes()[cut.name]["state"] in ("ready", "primed"),
                 60)
        time.sleep(LEASE_TTL)  # what a heal's elections would do, they have done by now
        for n in cluster:
            if n is not cut:
                assert fenced_since(n, t_cut - 1) == [], f"{n.name} fenced"
        for u in healthy:  # never stopped, never moved
            j = other.job(u)
            assert j["state"] == "running" and len(j["attempts"]) == 1, j
        assert not [u for u in mine for unit in cut.units() if u in unit]
        note(f"cut of the {where}: no other node fenced (cut to heal {t_heal - t_cut:.1f} s, "
             f"then {LEASE_TTL} s watched)")
    finally:
        remove_all(cluster[0], uuids)


NO_RESTART = "/run/systemd/system/lclusterd.service.d/no-restart.conf"


@pytest.mark.parametrize("how", ["systemctl stop", "kill -9"])
def test_a_node_whose_daemon_is_not_running_still_fences(cluster, how):
    """Issue 9 item 5: lclusterd-fence stops the jobs of a node whose daemon
    is stopped (or killed, and not restarted) before other nodes run them."""
    wait_etcd_healthy(cluster)
    uuids, victim, mine, other = ticking_jobs(cluster, ticks=1500)
    try:
        if how == "kill -9":
            victim.sh(f"mkdir -p {Path(NO_RESTART).parent} && "
                      f"printf '[Service]\\nRestart=no\\n' > {NO_RESTART} && systemctl daemon-reload")
            t0 = time.time()
            victim.sh("systemctl kill --signal=SIGKILL lclusterd.service")
        else:
            t0 = time.time()
            victim.sh("systemctl stop lclusterd.service")
        wait_for(f"{victim.name}'s jobs stopped", lambda: not any(
            u in unit for u in mine for unit in victim.running_units()), 2 * LEASE_TTL, interval=0.2)
        assert victim.sh("systemctl is-active lclusterd.service", check=False).stdout.strip() != "active"
        found = moved_apart(cluster, victim, mine)
        stopped, elsewhere = record(f"daemon stopped by {how}", t0, found)
        assert stopped <= LEASE_TTL * 0.5 + 1  # the deadline, plus the fence's poll and a tick
    finally:
        victim.sh(f"rm -f {NO_RESTART}; systemctl daemon-reload; systemctl reset-failed lclusterd; "
                  "systemctl start lclusterd.socket lclusterd.service")
        remove_all(other, uuids)
    wait_for(f"{victim.name} back", lambda: other.nodes()[victim.name]["state"] in ("ready", "primed"),
             60)
    # The restarted daemon released the fenced units, runs none of the jobs,
    # and is done with the fence's markers.
    wait_for("the fenced units released", lambda: not [
        unit for u in mine for unit in victim.units() if u in unit], 30)
    wait_for("the fence markers gone", lambda: victim.sh(
        "ls /run/lclusterd/fenced 2>/dev/null | wc -l").stdout.strip() == "0", 30)


def test_an_upgrade_with_jobs_running_never_runs_them_twice(cluster):
    """Issue 9 item 4 across nodes: apt-get install of the package with jobs
    running leaves the new daemon running and no job on two nodes."""
    wait_etcd_healthy(cluster)
    uuids, node, mine, other = ticking_jobs(cluster, ticks=1500)
    try:
        t0 = time.time()
        node.sh("apt-get install -y --reinstall --no-install-recommends /mnt/debs/lclusterd_*_all.deb",
                timeout=300)
        took = time.time() - t0
        wait_for("the new daemon", lambda: node.sh("systemctl is-active lclusterd.service",
                                                   check=False).stdout.strip() == "active", 30)
        time.sleep(LEASE_TTL * (1.5))  # past when others would have taken its jobs
        jobs = [other.job(u) for u in uuids]
        kept = [j for j in jobs if j["node"] == node.name and len(j["attempts"]) == 1]
        moved = [j["uuid"] for j in jobs if j not in kept and j["uuid"] in mine]
        # Moved only if the daemon was down past its deadline: lclusterd-fence
        # killed them, and the new daemon, seeing their units end, recorded
        # them lost itself (no lease expiry to wait for: nothing of them runs
        # here any more). So no overlap, but no designed margin either.
        found = moved_apart(cluster, node, moved, margin=0.0) if moved else []
        if moved:
            assert fenced_since(node, t0 - 1), "its jobs moved, but lclusterd-fence did not stop them"
        for j in kept:
            assert j["state"] == "running"
        log = node.sh(f"journalctl -u lclusterd -o short-unix --no-pager --since @{t0 - 1:.0f}").stdout
        stops = [float(line.split()[0]) for line in log.splitlines() if "Stopping lclusterd" in line]
        registered = [float(line.split()[0]) for line in log.splitlines() if "registered as node" in line]
        down = f"{min(registered) - min(stops):.1f} s" if stops and registered else "?"
        note(f"upgrade (apt-get install, {took:.1f} s; daemon stopped to registered {down}) with "
             f"{len(mine)} job(s) running: {len(kept)} kept running, {len(moved)} moved"
             + (f" (margin {min(g for g, _, _ in found):.1f} s)" if found else "") + "; overlap 0 s")
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
