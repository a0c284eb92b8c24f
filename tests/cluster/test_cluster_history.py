"""Output and warned jobs across nodes, on a cluster of three containers (see
conftest.py): logs read at one node of a job that ran on another, and a
job that will not stop shown as warned on its node by `lclusterc nodes`."""

import json

from tests.cluster.harness import CA, WRONG_CA, wait_for
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


def one_line(r):
    """A refusal: non-zero exit, one line on stderr, no traceback."""
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr.strip()


def test_logs_over_https_of_a_job_that_ran_on_a_third_node(cluster):
    """Issue 12 item 4: lclusterc asks n2 over HTTPS (verified against the
    cluster's CA) for a job pinned to n3; n2 fetches it from n3 over HTTPS,
    verifying n3's certificate against its tls_ca."""
    n1, n2, n3 = cluster
    assert all(n.url.startswith("https://") for n in cluster)
    assert n1.nodes()["n3"]["address"] == n3.url  # where n2 fetches from
    uuid = addjob(n1, "seq 3000; echo ran on n3", "--wait --constraint node=n3")
    assert n1.job(uuid)["node"] == "n3"
    out = n1.sh(f"lclusterc --server {n2.url} --ca {CA} logs {uuid}").stdout
    assert out.splitlines() == [str(i) for i in range(1, 3001)] + ["ran on n3"]
    # A CA that did not sign n2's certificate: one line, non-zero exit.
    said = one_line(n1.sh(f"lclusterc --server {n2.url} --ca {WRONG_CA} logs {uuid}", check=False))
    assert f"not trusted by the CA {WRONG_CA}" in said and n2.url in said, said
    # Without --ca: the system's CAs, which do not know the cluster's.
    said = one_line(n1.sh(f"lclusterc --server {n2.url} logs {uuid}", check=False))
    assert "not trusted by the system's CAs" in said, said


def test_a_node_with_the_wrong_ca_for_its_peers_says_so_in_one_line(cluster):
    n1, n2, n3 = cluster
    uuid = addjob(n1, "echo ran on n3", "--wait --constraint node=n3")
    conf = "/etc/lclusterd/lclusterd.conf"
    n2.sh(f"cp {conf} /root/lclusterd.conf.orig && sed -i 's|^tls_ca = .*|tls_ca = {WRONG_CA}|' {conf} "
          "&& systemctl restart lclusterd")
    try:
        said = one_line(n2.lc(f"logs {uuid}", check=False))
        assert said == (f"lclusterc: cannot fetch the output of job {uuid} from node n3: its TLS "
                        f"certificate at {n3.url} is not trusted by the CA {WRONG_CA}: "
                        "unable to get local issuer certificate"), said
    finally:
        n2.sh(f"cp /root/lclusterd.conf.orig {conf} && systemctl restart lclusterd")
    assert n2.lc(f"logs {uuid}").stdout == "ran on n3\n"


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
