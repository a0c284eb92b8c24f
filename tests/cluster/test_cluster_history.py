"""Output and warned jobs across nodes, on a cluster of three containers (see
conftest.py): logs read at one node of a job that ran on another, and a
job that will not stop shown as warned on its node by `lclusterc nodes`."""

import json

from tests.cluster.harness import wait_for
from tests.cluster.test_cluster import addjob
from tests.system.test_history import Frozen


def other_than(cluster, name):
    return next(n for n in cluster if n.name != name)


def by_name(cluster, name):
    return next(n for n in cluster if n.name == name)


def test_logs_of_a_job_that_ran_on_another_node(cluster):
    asker = cluster[0]
    uuid = addjob(asker, "seq 100000; echo ran on $(hostname)", "--wait")
    ran_on = asker.job(uuid)["node"]
    hostname = by_name(cluster, ran_on).sh("hostname").stdout.strip()
    for node in cluster:  # every node answers, the one that ran it from its journal
        out = node.sh(f"lclusterc logs {uuid} > /tmp/out; wc -l < /tmp/out; tail -1 /tmp/out; "
                      f"seq 100000 > /tmp/want; diff /tmp/want /tmp/out | head -5").stdout
        assert out.splitlines()[:2] == ["100001", f"ran on {hostname}"], (node.name, ran_on, out)
        assert node.sh("head -100000 /tmp/out | md5sum").stdout == node.sh("seq 100000 | md5sum").stdout
    # checkjob at another node shows the last lines too
    text = other_than(cluster, ran_on).lc(f"checkjob {uuid}").stdout
    assert text.endswith(f"  100000\n  ran on {hostname}\n")


def test_logs_follow_from_another_node(cluster):
    uuid = addjob(cluster[0], "echo first; sleep 4; echo second; exit 4")
    job = wait_for("the job running", lambda: (lambda j: j if j["state"] == "running" else None)(
        cluster[0].job(uuid)), 60)
    asker = other_than(cluster, job["node"])
    out = asker.sh(f"lclusterc logs -f {uuid} > /tmp/f.out 2>/dev/null & "
                   f"until grep -q first /tmp/f.out; do sleep 0.1; done; "
                   f"lclusterc checkjob --json {uuid} | grep -o '\"state\": \"[a-z]*\"'; "
                   f"wait $!; echo exit=$?", timeout=60).stdout
    assert '"state": "running"' in out and "exit=4" in out
    assert asker.sh("cat /tmp/f.out").stdout == "first\nsecond\n"


def test_a_job_that_will_not_stop_is_warned_on_its_node(cluster):
    for node in cluster:  # a short kill timeout on every node
        node.sh("grep -q '^stop_timeout' /etc/lclusterd/lclusterd.conf || "
                "echo 'stop_timeout = 2' >> /etc/lclusterd/lclusterd.conf; systemctl reload lclusterd")
    uuid = addjob(cluster[0], "sleep 1000")
    job = wait_for("the job running", lambda: (lambda j: j if j["state"] == "running" else None)(
        cluster[0].job(uuid)), 60)
    runner = by_name(cluster, job["node"])
    asker = other_than(cluster, job["node"])
    frozen = Frozen(runner, uuid)
    try:
        assert asker.lc(f"removejob {uuid}").stdout == f"cancelled {uuid}\n"  # its node stops it
        wait_for("the job warned", lambda: asker.job(uuid)["state"] == "warned", 60)
        rows = {n["name"]: n for n in json.loads(asker.lc("nodes --json").stdout)}
        assert rows[runner.name]["warned"] == [uuid]
        assert all(rows[n.name]["warned"] == [] for n in cluster if n is not runner)
        table = asker.lc("nodes").stdout.splitlines()
        column = table[0].split().index("WARNED")  # every cell is one word ('-' when empty)
        assert [line.split()[column] for line in table[1:] if line.startswith(runner.name)] == ["1"]
        assert json.loads(asker.lc("list --json --state warned").stdout)[0]["uuid"] == uuid
    finally:
        frozen.thaw()
    job = wait_for("the job cleared", lambda: (lambda j: j if j["state"] == "cancelled" else None)(
        asker.job(uuid)), 60)
    assert job["warning"] and job["warned_from"] == "cancelled"
    assert all(n["warned"] == [] for n in json.loads(asker.lc("nodes --json").stdout))
