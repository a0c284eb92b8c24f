"""lclusterd.metrics: a node's figures in Prometheus text format, read back
with prometheus_client's own parser (what a Prometheus server accepts)."""

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lclusterd import core, metrics


def parse(data):
    """{(sample name, frozenset(labels)): value} and {family: type} of a render."""
    assert isinstance(data, bytes)
    samples, types = {}, {}
    for family in text_string_to_metric_families(data.decode()):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"sample {key} written twice"
            samples[key] = s.value
    return samples, types


def value(samples, name, **labels):
    return samples[(name, frozenset(labels.items()))]


def job(n, state, node="n1", cpus=None, memory=None):
    return core.Job(uuid=f"00000000-0000-4000-8000-{n:012d}", command="true", uid=1000, gid=1000,
                    user="alice", submitted_at=1000.0, state=state, node=node,
                    cpus=cpus, memory=memory)


def test_every_state_and_result_is_written_zeros_too():
    samples, types = parse(metrics.render(metrics.Snapshot(node="n1", states={})))
    for state in core.STATES:  # a node's own jobs: the live ones; the cluster's: all
        if state in core.TERMINAL:
            assert ("lclusterd_node_jobs", frozenset({"node": "n1", "state": state}.items())) \
                not in samples
        else:
            assert value(samples, "lclusterd_node_jobs", node="n1", state=state) == 0
    for result in metrics.RESULTS:
        assert value(samples, "lclusterd_jobs_ended_total", node="n1", result=result) == 0
    assert types["lclusterd_jobs_ended"] == "counter" and types["lclusterd_node_jobs"] == "gauge"
    # Only the primed node speaks for the cluster; no histogram until measured.
    assert "lclusterd_cluster_jobs" not in types
    assert "lclusterd_dispatch_latency_seconds" not in types


def test_snapshot_values_come_back_as_given():
    snap = metrics.Snapshot(
        node="n1", states={"running": 2, "queued": 1}, cluster_states={"queued": 5, "running": 3},
        primed=True, submitted=7, started=3, ended={"succeeded": 2, "failed": 1}, slots=4,
        slots_used=2, cpus=2.0, cpus_reserved=0.5, memory_bytes=2 ** 31,
        memory_reserved_bytes=2 ** 28, warned=1)
    samples, types = parse(metrics.render(snap))
    assert value(samples, "lclusterd_node_jobs", node="n1", state="running") == 2
    assert value(samples, "lclusterd_node_jobs", node="n1", state="queued") == 1
    assert value(samples, "lclusterd_cluster_jobs", state="queued") == 5
    assert value(samples, "lclusterd_cluster_jobs", state="lost") == 0
    assert value(samples, "lclusterd_primed", node="n1") == 1
    assert value(samples, "lclusterd_jobs_submitted_total", node="n1") == 7
    assert value(samples, "lclusterd_jobs_started_total", node="n1") == 3
    assert value(samples, "lclusterd_jobs_ended_total", node="n1", result="succeeded") == 2
    assert value(samples, "lclusterd_jobs_ended_total", node="n1", result="failed") == 1
    for name, expected in (("lclusterd_slots", 4), ("lclusterd_slots_used", 2),
                           ("lclusterd_cpus", 2.0), ("lclusterd_cpus_reserved", 0.5),
                           ("lclusterd_memory_bytes", 2 ** 31),
                           ("lclusterd_memory_reserved_bytes", 2 ** 28),
                           ("lclusterd_warned_jobs", 1)):
        assert value(samples, name, node="n1") == expected, name
        assert types[name] == "gauge"


def test_a_state_or_result_unknown_here_is_still_written():
    snap = metrics.Snapshot(node="n1", states={"paused": 1}, ended={"fenced": 2})
    samples, _ = parse(metrics.render(snap))
    assert value(samples, "lclusterd_node_jobs", node="n1", state="paused") == 1
    assert value(samples, "lclusterd_jobs_ended_total", node="n1", result="fenced") == 2


def test_label_values_are_escaped():
    node = 'odd "name"\\with\nnewline'
    samples, _ = parse(metrics.render(metrics.Snapshot(node=node, states={"running": 1})))
    assert value(samples, "lclusterd_node_jobs", node=node, state="running") == 1


def test_counters_feed_a_cumulative_dispatch_histogram():
    c = metrics.Counters(buckets=(0.1, 1, 10))
    for seconds in (0.05, 0.1, 0.5, 3, 99, -1):  # -1: a clock step back counts as 0
        c.dispatched(seconds)
    assert c.dispatch_buckets() == (("0.1", 3), ("1", 4), ("10", 5), ("+Inf", 6))
    snap = metrics.Snapshot(node="n1", states={}, dispatch_buckets=c.dispatch_buckets(),
                            dispatch_sum=c.dispatch_sum)
    samples, types = parse(metrics.render(snap))
    assert types["lclusterd_dispatch_latency_seconds"] == "histogram"
    buckets = {le: value(samples, "lclusterd_dispatch_latency_seconds_bucket", node="n1", le=le)
               for le in ("0.1", "1", "10", "+Inf")}
    assert buckets == {"0.1": 3, "1": 4, "10": 5, "+Inf": 6}
    assert value(samples, "lclusterd_dispatch_latency_seconds_count", node="n1") == 6
    assert math.isclose(value(samples, "lclusterd_dispatch_latency_seconds_sum", node="n1"),
                        0.05 + 0.1 + 0.5 + 3 + 99)


def test_snapshot_counts_this_nodes_records_and_what_its_running_jobs_reserve():
    c = metrics.Counters()
    c.submitted, c.started = 5, 4
    c.end("succeeded")
    c.end("succeeded")
    c.end("lost")
    jobs = [job(1, "running", cpus=0.5, memory=2 ** 20), job(2, "starting", cpus=1.0),
            job(3, "warned", memory=2 ** 21), job(4, "succeeded", cpus=8.0, memory=2 ** 30),
            job(5, "queued", node=None), job(6, "running", node="n2", cpus=4.0)]
    snap = metrics.snapshot("n1", jobs, c, slots=4, cpus=2.0, memory_bytes=2 ** 32, primed=True,
                            cluster_jobs=jobs)
    assert snap.states == {"running": 1, "starting": 1, "warned": 1}
    assert snap.slots_used == 3 and snap.warned == 1
    assert snap.cpus_reserved == 1.5 and snap.memory_reserved_bytes == 2 ** 20 + 2 ** 21
    assert snap.cluster_states == {"running": 2, "starting": 1, "warned": 1, "succeeded": 1,
                                   "queued": 1}
    assert (snap.submitted, snap.started) == (5, 4)
    assert snap.ended["succeeded"] == 2 and snap.ended["lost"] == 1 and snap.ended["failed"] == 0
    assert snap.dispatch_buckets[-1] == ("+Inf", 0)
    # Not primed: no cluster figures.
    assert metrics.snapshot("n1", jobs, c, slots=4, cpus=2.0,
                            memory_bytes=1).cluster_states is None


def test_renders_are_independent():
    """No process-wide registry: one render never shows another's figures."""
    a = parse(metrics.render(metrics.Snapshot(node="a", states={"running": 1})))[0]
    b = parse(metrics.render(metrics.Snapshot(node="b", states={})))[0]
    assert not any(("node", "a") in labels for _, labels in b)
    assert value(a, "lclusterd_node_jobs", node="a", state="running") == 1


def test_content_type_is_prometheus_text_format():
    assert metrics.CONTENT_TYPE.startswith("text/plain; version=0.0.4")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_odd_floats_still_render(bad):
    samples, _ = parse(metrics.render(metrics.Snapshot(node="n1", states={}, cpus=bad)))
    got = value(samples, "lclusterd_cpus", node="n1")
    assert (math.isnan(got) if math.isnan(bad) else got == bad)


def test_etcd_errors_by_kind_prime_changes_and_fences_are_written_zeros_too():
    samples, types = parse(metrics.render(metrics.Snapshot(node="n1", states={})))
    for kind in ("unreachable", "nospace", "other"):
        assert value(samples, "lclusterd_etcd_request_errors_total", node="n1", kind=kind) == 0
    for name in ("lclusterd_prime_changes", "lclusterd_fenced", "lclusterd_fenced_jobs",
                 "lclusterd_etcd_request_errors"):
        assert types[name] == "counter", name
    for name in ("lclusterd_prime_changes_total", "lclusterd_fenced_total",
                 "lclusterd_fenced_jobs_total"):
        assert value(samples, name, node="n1") == 0, name
    assert "lclusterd_etcd_request_seconds" not in types  # not measured


def test_counters_feed_etcd_errors_and_an_etcd_latency_histogram():
    c = metrics.Counters()
    for kind in ("unreachable", "unreachable", "nospace", "other"):
        c.etcd_failed(kind)
    for seconds in (0.0005, 0.003, 0.2, 7, 60):
        c.etcd.observe(seconds)
    c.prime_changes, c.fenced, c.fenced_jobs = 3, 1, 2
    snap = metrics.snapshot("n1", [], c, slots=1, cpus=1.0, memory_bytes=1)
    data = metrics.render(snap)
    samples, types = parse(data)
    assert value(samples, "lclusterd_etcd_request_errors_total", node="n1", kind="unreachable") == 2
    assert value(samples, "lclusterd_etcd_request_errors_total", node="n1", kind="nospace") == 1
    assert value(samples, "lclusterd_etcd_request_errors_total", node="n1", kind="other") == 1
    assert types["lclusterd_etcd_request_seconds"] == "histogram"
    bucket = lambda le: value(samples, "lclusterd_etcd_request_seconds_bucket",  # noqa: E731
                              node="n1", le=le)
    assert (bucket("0.001"), bucket("0.005"), bucket("0.25"), bucket("10"), bucket("+Inf")) == \
        (1, 2, 3, 4, 5)
    assert value(samples, "lclusterd_etcd_request_seconds_count", node="n1") == 5
    assert math.isclose(value(samples, "lclusterd_etcd_request_seconds_sum", node="n1"),
                        0.0005 + 0.003 + 0.2 + 7 + 60)
    assert value(samples, "lclusterd_prime_changes_total", node="n1") == 3
    assert value(samples, "lclusterd_fenced_total", node="n1") == 1
    assert value(samples, "lclusterd_fenced_jobs_total", node="n1") == 2
    for name in ("lclusterd_etcd_request_errors", "lclusterd_etcd_request_seconds",
                 "lclusterd_prime_changes", "lclusterd_fenced", "lclusterd_fenced_jobs"):
        assert f"# HELP {name}".encode() in data and f"# TYPE {name}".encode() in data, name
