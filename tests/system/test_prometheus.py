"""Debian's Prometheus server scrapes the installed node over TCP with the
cluster token (issue 12 item 2): values read back through Prometheus' own
HTTP query API after known jobs, and a scrape with a wrong token is down.

Prometheus (the host's /usr/bin/prometheus, package `prometheus`) runs on
the host inside the container's network namespace (nsenter -n), so it
reaches the node's listener on the container's 127.0.0.1 and listens on a
loopback port that no other test run shares; its storage is a temporary
directory of its own. The README's scrape config is the one written here.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from urllib.parse import quote

import pytest

CONF = "/etc/lclusterd/lclusterd.conf"
LISTEN = 7800  # the node's TCP listener, in the container's network namespace
PROM = 9090  # Prometheus' own port, in the same namespace
PROMETHEUS = "/usr/bin/prometheus"

# Two scrape jobs of one target: the cluster's token, and a wrong one (down, 401).
SCRAPE_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: lclusterd
    authorization:
      credentials_file: {right}
    static_configs:
      - targets: ['127.0.0.1:{port}']
  - job_name: wrong-token
    authorization:
      credentials_file: {wrong}
    static_configs:
      - targets: ['127.0.0.1:{port}']
"""

# Run inside the container (its loopback is Prometheus'): GET each path of
# argv[1] (a JSON list) from Prometheus' HTTP API; print the answers as JSON.
ASK = r"""
import json, sys, urllib.request
out = []
for path in json.loads(sys.argv[1]):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%(port)d" + path, timeout=10) as r:
            out.append([r.status, json.loads(r.read() or b"null") if path.startswith("/api/") else None])
    except OSError as e:  # not up yet: connection refused, or 503 while starting
        out.append([getattr(e, "code", None), str(e)])
print(json.dumps(out))
""" % {"port": PROM}


def ask(box, *paths):
    return json.loads(box.sh(f"python3 -c \"$(cat)\" '{json.dumps(paths)}'", input=ASK).stdout)


def query(box, *exprs):
    """Each PromQL expression's instant vector: [(labels, float value), ...]."""
    answers = ask(box, *(f"/api/v1/query?query={quote(e)}" for e in exprs))
    vectors = []
    for expr, (status, body) in zip(exprs, answers):
        assert status == 200 and body["status"] == "success", f"{expr}: {status} {body}"
        vectors.append([(r["metric"], float(r["value"][1])) for r in body["data"]["result"]])
    return vectors


def one(vector, expr=""):
    assert len(vector) == 1, f"{expr}: {vector}"
    return vector[0][1]


def values(box, **exprs):
    """{name: the single value of expr} for every name=expr given."""
    return {name: one(v, expr) for (name, expr), v in zip(exprs.items(), query(box, *exprs.values()))}


def wait_for(what, probe, timeout=30, every=0.5):
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(every)


@pytest.fixture(scope="module")
def prometheus(box):
    """The node listening on TCP with its token, and Prometheus scraping it
    every second: once with the token, once with a wrong one."""
    assert os.access(PROMETHEUS, os.X_OK), f"{PROMETHEUS} missing: apt-get install prometheus (make deps)"
    box.lc("list")  # the socket starts the daemon; its postinst made the token
    box.sh(f"cp {CONF} /root/lclusterd.conf.prom")
    box.sh(f"sed -i 's/^#listen =.*/listen = 127.0.0.1:{LISTEN}/' {CONF} && systemctl restart lclusterd")
    box.lc("list")
    work = tempfile.mkdtemp(prefix="lcprom-")
    proc = None
    try:
        right, wrong = os.path.join(work, "lclusterd.token"), os.path.join(work, "wrong.token")
        for path, text in ((right, box.sh("cat /etc/lclusterd/token").stdout),
                           (wrong, "not-the-cluster-token-at-all\n")):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        config = os.path.join(work, "prometheus.yml")
        with open(config, "w") as f:
            f.write(SCRAPE_CONFIG.format(right=right, wrong=wrong, port=LISTEN))
        check = subprocess.run(["/usr/bin/promtool", "check", "config", config],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        # nsenter with -n only execs Prometheus in the namespace (no fork):
        # proc.pid is Prometheus' own pid, the one process this test stops.
        log = open(os.path.join(work, "prometheus.log"), "wb")
        proc = subprocess.Popen(
            ["nsenter", "-t", str(box.c.init_pid), "-n", PROMETHEUS, f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(work, 'data')}",
             f"--web.listen-address=127.0.0.1:{PROM}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=work, env={"PATH": "/usr/bin:/bin", "HOME": work})
        log.close()

        def ready():
            assert proc.poll() is None, (f"prometheus exited {proc.returncode}:\n"
                                         + open(os.path.join(work, "prometheus.log")).read()[-3000:])
            return ask(box, "/-/ready")[0][0] == 200
        wait_for("prometheus ready", ready)
        yield box
    finally:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        box.sh(f"cp /root/lclusterd.conf.prom {CONF} && systemctl restart lclusterd")


def test_prometheus_scrapes_known_jobs_with_the_token(prometheus):
    box = prometheus
    node = json.loads(box.lc("nodes --json").stdout)[0]["name"]
    target = f'job="lclusterd",instance="127.0.0.1:{LISTEN}"'
    sel = f'{target},node="{node}"'
    counters = dict(
        submitted=f"lclusterd_jobs_submitted_total{{{sel}}}",
        started=f"lclusterd_jobs_started_total{{{sel}}}",
        succeeded=f'lclusterd_jobs_ended_total{{{sel},result="succeeded"}}',
        failed=f'lclusterd_jobs_ended_total{{{sel},result="failed"}}',
        cancelled=f'lclusterd_jobs_ended_total{{{sel},result="cancelled"}}',
    )
    # A first scrape with the token, and the series there before any job.
    wait_for("a scrape with the token", lambda: query(box, f'up{{job="lclusterd"}} == 1')[0])
    before = values(box, **counters)

    uuids = [box.lc(f"addjob '{cmd}'", user="alice").stdout.strip()
             for cmd in ("true", "true", "true", "exit 3", "exit 4")]
    ends = [box.wait_state(u) for u in uuids]
    assert [j["state"] for j in ends] == ["succeeded"] * 3 + ["failed"] * 2, ends
    ended_at = time.time()

    # A scrape that began after the last job ended (container and host share the clock).
    def last_scrape():
        return one(query(box, 'timestamp(up{job="lclusterd"})')[0])
    scraped_at = wait_for("a scrape after the jobs ended", lambda: (t := last_scrape()) > ended_at and t)
    after = values(box, **counters)
    grew = {k: after[k] - before[k] for k in counters}
    assert grew == {"submitted": 5, "started": 5, "succeeded": 3, "failed": 2, "cancelled": 0}, grew

    now = values(
        box,
        up=f'up{{job="lclusterd"}}',
        running=f'lclusterd_node_jobs{{{sel},state="running"}}',
        primed=f"lclusterd_primed{{{sel}}}",
        slots=f"lclusterd_slots{{{sel}}}",
        # the cluster's view carries no node= (it is the primed node's, whichever that is)
        cluster_succeeded=f'lclusterd_cluster_jobs{{{target},state="succeeded"}}',
        cluster_failed=f'lclusterd_cluster_jobs{{{target},state="failed"}}',
        dispatched=f"lclusterd_dispatch_latency_seconds_count{{{sel}}}",
        samples=f'scrape_samples_scraped{{job="lclusterd"}}',
    )
    assert now["up"] == 1
    assert now["running"] == 0
    assert now["primed"] == 1  # alone: it is the primed node
    assert now["slots"] == int(box.sh("nproc").stdout)
    assert now["cluster_succeeded"] == 3 and now["cluster_failed"] == 2  # a fresh container
    assert now["dispatched"] >= 5  # queued to started, one per job
    assert now["samples"] > 50

    # The wrong token: the same target, down, and Prometheus says why.
    assert one(query(box, 'up{job="wrong-token"}')[0]) == 0
    status, targets = ask(box, "/api/v1/targets?state=active")[0]
    assert status == 200, targets
    by_job = {t["labels"]["job"]: t for t in targets["data"]["activeTargets"]}
    assert by_job["lclusterd"]["health"] == "up", by_job["lclusterd"]
    assert by_job["wrong-token"]["health"] == "down"
    assert "401" in by_job["wrong-token"]["lastError"], by_job["wrong-token"]["lastError"]

    # What Prometheus measured of the scrapes with the token: 10 at least, for a figure.
    wait_for("10 scrapes with the token", lambda: one(query(
        box, 'count_over_time(scrape_duration_seconds{job="lclusterd"}[1m])')[0]) >= 10)
    took = values(box, **{f: f'{f}_over_time(scrape_duration_seconds{{job="lclusterd"}}[1m])'
                          for f in ("min", "avg", "max", "count")})
    assert took["max"] < 1  # within scrape_timeout
    print(f"prometheus scrape_duration_seconds over {took['count']:.0f} scrapes: "
          f"min {took['min'] * 1000:.1f} ms, avg {took['avg'] * 1000:.1f} ms, "
          f"max {took['max'] * 1000:.1f} ms; first scrape after the jobs ended "
          f"{scraped_at - ended_at:.2f} s after")
