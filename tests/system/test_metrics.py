"""GET /metrics on the installed package: Prometheus text format from the node,
read with prometheus_client's parser inside the container, after known jobs."""

import json
import time

# Scrape the unix socket as a local user would (curl --unix-socket); print the
# status, the content type, the seconds it took and the samples as JSON.
SCRAPE = r"""
import http.client, json, socket, time
from prometheus_client.parser import text_string_to_metric_families
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect("/run/lclusterd/lclusterd.sock")
t = time.monotonic()
c = C("localhost")
c.request("GET", "/metrics")
r = c.getresponse()
body = r.read().decode()
took = time.monotonic() - t
samples = [[s.name, s.labels, s.value] for f in text_string_to_metric_families(body) for s in f.samples]
print(json.dumps({"status": r.status, "type": r.getheader("Content-Type"), "seconds": took,
                  "samples": samples}))
"""


def scrape(box, user="alice"):
    out = json.loads(box.sh("python3 -c \"$(cat)\"", input=SCRAPE, user=user).stdout)
    assert out["status"] == 200, out
    assert out["type"].startswith("text/plain; version=0.0.4"), out["type"]
    return out


def value(out, name, **labels):
    found = [v for n, l, v in out["samples"] if n == name and all(l.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def test_metrics_count_known_jobs(box):
    box.lc("list")  # the socket starts the daemon
    node = json.loads(box.lc("nodes --json").stdout)[0]["name"]
    before = scrape(box)
    for cmd in ("true", "true", "exit 3"):
        box.lc(f"addjob --wait '{cmd}'", user="alice", check=False)
    sleeper = box.lc("addjob 'sleep 600'", user="bob").stdout.strip()
    box.wait_state(sleeper, ("running",))

    after = scrape(box)
    def grew(name, **labels):
        return value(after, name, node=node, **labels) - value(before, name, node=node, **labels)
    assert grew("lclusterd_jobs_submitted_total") == 4
    assert grew("lclusterd_jobs_started_total") == 4
    assert grew("lclusterd_jobs_ended_total", result="succeeded") == 2
    assert grew("lclusterd_jobs_ended_total", result="failed") == 1
    assert value(after, "lclusterd_node_jobs", node=node, state="running") == 1
    assert value(after, "lclusterd_slots", node=node) == int(box.sh("nproc").stdout)
    assert value(after, "lclusterd_slots_used", node=node) == 1
    assert value(after, "lclusterd_primed", node=node) == 1  # alone: it is the primed node
    assert value(after, "lclusterd_cluster_jobs", state="running") == 1
    assert value(after, "lclusterd_cluster_jobs", state="failed") >= 1
    assert value(after, "lclusterd_dispatch_latency_seconds_count", node=node) >= 4

    box.lc(f"removejob {sleeper}", user="bob")
    deadline = time.monotonic() + 30
    while True:
        last = scrape(box)
        if value(last, "lclusterd_jobs_ended_total", node=node, result="cancelled") - value(
                before, "lclusterd_jobs_ended_total", node=node, result="cancelled") == 1:
            break
        assert time.monotonic() < deadline, "removejob never counted as cancelled"
        time.sleep(0.5)
    assert value(last, "lclusterd_node_jobs", node=node, state="running") == 0
    print(f"metrics scrape: {after['seconds'] * 1000:.0f} ms")
