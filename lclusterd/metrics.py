"""Prometheus text format for `GET /metrics`, with Debian's python3-prometheus-client.

Pure: `render(snapshot) -> bytes` turns a Snapshot of figures the node already
keeps into the exposition format. No I/O and no process-wide registry (each
call builds its own), so a render shows exactly its snapshot and tests call it
directly. api.py serves the bytes with CONTENT_TYPE.

Every state and result is always written, zeros too: a series that appears
only once it is non-zero breaks rate() and alerting on absent().
"""

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lclusterd import core

CONTENT_TYPE = CONTENT_TYPE_LATEST  # "text/plain; version=0.0.4; charset=utf-8"

# How a job ended, for lclusterd_jobs_ended_total{result=...}.
RESULTS = (core.SUCCEEDED, core.FAILED, core.CANCELLED, core.LOST, core.WARNED)
# A node's own jobs are its live ones (how they ended is lclusterd_jobs_ended_total).
NODE_STATES = tuple(s for s in core.STATES if s not in core.TERMINAL)


@dataclass(frozen=True)
class Snapshot:
    """What one node knows at one moment. Counters count since the daemon
    started (Prometheus handles their reset on restart)."""

    node: str
    states: Mapping[str, int]  # this node's live jobs by state
    cluster_states: Optional[Mapping[str, int]] = None  # every job by state: the primed node only
    primed: bool = False
    submitted: int = 0  # jobs queued through this node
    started: int = 0  # units this node started
    ended: Mapping[str, int] = field(default_factory=dict)  # jobs of this node ended, by result
    slots: int = 0
    slots_used: int = 0
    cpus: float = 0.0  # the node's CPUs ...
    cpus_reserved: float = 0.0  # ... and the sum of its running jobs' --cpus
    memory_bytes: int = 0
    memory_reserved_bytes: int = 0  # sum of its running jobs' --memory
    warned: int = 0  # jobs of this node that would not stop
    # Seconds from queued to started, as cumulative buckets: ((le, count), ...,
    # ("+Inf", count)), and their sum. None: not measured.
    dispatch_buckets: Optional[Sequence[Tuple[str, float]]] = None
    dispatch_sum: float = 0.0
    # Calls to etcd that failed, by ETCD_ERROR_KINDS; and how long every call
    # took (buckets as dispatch_buckets; None: not measured).
    etcd_errors: Mapping[str, int] = field(default_factory=dict)
    etcd_buckets: Optional[Sequence[Tuple[str, float]]] = None
    etcd_sum: float = 0.0
    prime_changes: int = 0  # times this node took or gave up the prime
    fenced: int = 0  # times this node fenced itself: it stopped its jobs, its lease lost
    fenced_jobs: int = 0  # jobs recorded lost because a fence (ours or lclusterd-fence) killed their unit
    # The nodes' table (node.nodes() rows: cpus, memory, reserved_*, state):
    # the primed node only, as cluster_states.
    cluster_nodes: Optional[Sequence[Mapping]] = None


class _Collector:
    def __init__(self, snapshot):
        self.s = snapshot

    def collect(self):
        s, node = self.s, self.s.node

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["node"])
            g.add_metric([node], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["node"])
            c.add_metric([node], value)
            return c

        jobs = GaugeMetricFamily("lclusterd_node_jobs", "Jobs of this node, by state.",
                                 labels=["node", "state"])
        for state in dict.fromkeys([*NODE_STATES, *sorted(s.states)]):
            jobs.add_metric([node, state], s.states.get(state, 0))
        yield jobs
        if s.cluster_states is not None:  # only the primed node speaks for the cluster
            cluster = GaugeMetricFamily("lclusterd_cluster_jobs",
                                        "Every job of the cluster, by state (from the primed node).",
                                        labels=["state"])
            for state in dict.fromkeys([*core.STATES, *sorted(s.cluster_states)]):
                cluster.add_metric([state], s.cluster_states.get(state, 0))
            yield cluster
        yield gauge("lclusterd_primed", "1 when this node takes the next jobs.", int(s.primed))
        yield counter("lclusterd_jobs_submitted", "Jobs queued through this node.", s.submitted)
        yield counter("lclusterd_jobs_started", "Job units this node started.", s.started)
        ended = CounterMetricFamily("lclusterd_jobs_ended", "Jobs of this node that ended, by result.",
                                    labels=["node", "result"])
        for result in dict.fromkeys([*RESULTS, *sorted(s.ended)]):
            ended.add_metric([node, result], s.ended.get(result, 0))
        yield ended
        yield gauge("lclusterd_slots", "Jobs this node runs at once.", s.slots)
        yield gauge("lclusterd_slots_used", "Slots taken by live jobs.", s.slots_used)
        yield gauge("lclusterd_cpus", "CPUs of this node.", s.cpus)
        yield gauge("lclusterd_cpus_reserved", "CPUs its running jobs may use (their --cpus).",
                    s.cpus_reserved)
        yield gauge("lclusterd_memory_bytes", "Memory of this node.", s.memory_bytes)
        yield gauge("lclusterd_memory_reserved_bytes",
                    "Memory its running jobs may use (their --memory).", s.memory_reserved_bytes)
        yield gauge("lclusterd_warned_jobs", "Jobs of this node that would not stop.", s.warned)
        if s.dispatch_buckets is not None:
            h = HistogramMetricFamily("lclusterd_dispatch_latency_seconds",
                                      "From queued to started, for jobs this node started.",
                                      labels=["node"])
            h.add_metric([node], [(str(le), count) for le, count in s.dispatch_buckets],
                         s.dispatch_sum)
            yield h
        errors = CounterMetricFamily("lclusterd_etcd_request_errors",
                                     "Calls to etcd that failed: unreachable (any failure to reach "
                                     "it), nospace (its NOSPACE alarm), other (refused: too large, "
                                     "lease expired, ...).", labels=["node", "kind"])
        for kind in dict.fromkeys([*ETCD_ERROR_KINDS, *sorted(s.etcd_errors)]):
            errors.add_metric([node, kind], s.etcd_errors.get(kind, 0))
        yield errors
        if s.etcd_buckets is not None:
            h = HistogramMetricFamily("lclusterd_etcd_request_seconds",
                                      "How long each call of this node to etcd took, failed ones too.",
                                      labels=["node"])
            h.add_metric([node], [(str(le), count) for le, count in s.etcd_buckets], s.etcd_sum)
            yield h
        yield counter("lclusterd_prime_changes", "Times this node took or gave up the prime.",
                      s.prime_changes)
        yield counter("lclusterd_fenced", "Times this node lost its lease with other nodes live, "
                      "and stopped its jobs.", s.fenced)
        yield counter("lclusterd_fenced_jobs", "Jobs of this node recorded lost because a fence "
                      "(the daemon's or lclusterd-fence) killed their unit.", s.fenced_jobs)
        if s.cluster_nodes is not None:
            yield from _cluster_nodes(s.cluster_nodes)


# Per-node gauges of the primed node's table: (name, help, the row's key).
CLUSTER_NODE_GAUGES = (
    ("lclusterd_cluster_node_cpus", "CPUs a node offers for placement.", "cpus"),
    ("lclusterd_cluster_node_cpus_reserved", "CPUs reserved by the jobs placed on a node.",
     "reserved_cpus"),
    ("lclusterd_cluster_node_memory_bytes", "Memory a node offers for placement.", "memory"),
    ("lclusterd_cluster_node_memory_reserved_bytes", "Memory reserved by the jobs placed on a node.",
     "reserved_memory"),
    ("lclusterd_cluster_node_slots", "Jobs a node runs at once.", "slots"),
)
NODE_TABLE_STATES = ("primed", "ready", "draining", "drained", "failed")


def _cluster_nodes(rows):
    """The cluster's nodes as gauges labelled node=NAME (from the primed
    node); a state gauge per node is 1 for its state, 0 for the others."""
    for name, doc, key in CLUSTER_NODE_GAUGES:
        g = GaugeMetricFamily(name, doc + " (from the primed node)", labels=["node"])
        for row in rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                g.add_metric([str(row.get("name"))], value)
        yield g
    state = GaugeMetricFamily("lclusterd_cluster_node_state", "1 for the state each node is in "
                              "(from the primed node).", labels=["node", "state"])
    for row in rows:
        for name in dict.fromkeys([*NODE_TABLE_STATES, str(row.get("state"))]):
            state.add_metric([str(row.get("name")), name], int(row.get("state") == name))
    yield state


# Seconds from queued to started: from an idle node's few milliseconds to a
# queue that waits minutes for a slot.
DISPATCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
# Seconds an etcd call takes: a local member's millisecond up to the store's
# call timeout (5 s) and the heartbeat's waits.
ETCD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# How a call to etcd failed, for lclusterd_etcd_request_errors_total{kind=...}.
ETCD_ERROR_KINDS = ("unreachable", "nospace", "other")


class Histogram:
    """Counts per bucket (no I/O, no registry), read as Prometheus wants them."""

    def __init__(self, buckets):
        self.bounds = tuple(buckets)
        self._counts = [0] * (len(self.bounds) + 1)  # per bucket, the last is +Inf
        self.sum = 0.0

    def observe(self, seconds):
        seconds = max(0.0, seconds)
        i = next((i for i, le in enumerate(self.bounds) if seconds <= le), len(self.bounds))
        self._counts[i] += 1
        self.sum += seconds

    def buckets(self):
        """Cumulative counts per upper bound."""
        out, total = [], 0
        for le, n in zip([*(f"{b:g}" for b in self.bounds), "+Inf"], self._counts):
            total += n
            out.append((le, total))
        return tuple(out)


class Counters:
    """What a node counts as it goes (no I/O): it bumps these where the event
    happens, and snapshot() reads them."""

    def __init__(self, buckets=DISPATCH_BUCKETS):
        self.submitted = 0
        self.started = 0
        self.ended = dict.fromkeys(RESULTS, 0)
        self.dispatch = Histogram(buckets)
        self.etcd_errors = dict.fromkeys(ETCD_ERROR_KINDS, 0)
        self.etcd = Histogram(ETCD_BUCKETS)
        self.prime_changes = 0
        self.fenced = 0
        self.fenced_jobs = 0

    def etcd_failed(self, kind):
        """A call to etcd failed; kind: one of ETCD_ERROR_KINDS."""
        self.etcd_errors[kind] = self.etcd_errors.get(kind, 0) + 1

    def end(self, result):
        self.ended[result] = self.ended.get(result, 0) + 1

    def dispatched(self, seconds):
        """A job started `seconds` after it was queued."""
        self.dispatch.observe(seconds)

    def dispatch_buckets(self):
        return self.dispatch.buckets()

    @property
    def dispatch_sum(self):
        return self.dispatch.sum


def snapshot(node, jobs, counters, *, slots, cpus, memory_bytes, primed=False, cluster_jobs=None,
             cluster_nodes=None):
    """A Snapshot from the node's own job records (live ones: jobs whose
    record names this node), its Counters and its capacity. cluster_jobs:
    every record of the cluster, cluster_nodes: the nodes' table (the
    primed node passes them), else None."""
    own = [j for j in jobs if j.node == node]
    live = [j for j in own if not j.terminal]
    running = [j for j in own if j.state in (core.STARTING, core.RUNNING, core.WARNED)]
    return Snapshot(
        node=node,
        states=_count(j.state for j in live),
        cluster_states=None if cluster_jobs is None else _count(j.state for j in cluster_jobs),
        primed=primed,
        submitted=counters.submitted,
        started=counters.started,
        ended=dict(counters.ended),
        slots=slots,
        slots_used=len(live),
        cpus=cpus,
        cpus_reserved=sum(j.cpus or 0 for j in running),
        memory_bytes=memory_bytes,
        memory_reserved_bytes=sum(j.memory or 0 for j in running),
        warned=sum(1 for j in own if j.state == core.WARNED),
        dispatch_buckets=counters.dispatch_buckets(),
        dispatch_sum=counters.dispatch_sum,
        etcd_errors=dict(counters.etcd_errors),
        etcd_buckets=counters.etcd.buckets(),
        etcd_sum=counters.etcd.sum,
        prime_changes=counters.prime_changes,
        fenced=counters.fenced,
        fenced_jobs=counters.fenced_jobs,
        cluster_nodes=None if cluster_nodes is None else [dict(row) for row in cluster_nodes],
    )


def _count(states):
    counts = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return counts


def render(snapshot: Snapshot) -> bytes:
    """The snapshot in Prometheus text format (version 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot))
    return generate_latest(registry)
