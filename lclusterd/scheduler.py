"""The cluster's scheduling rules (issue 11, contract K5): which queued job
goes to which node, which waits and why, which can never run.

Pure like core: no I/O, no clock, no asyncio. The primed node reads the
queue head, the live nodes, what is assigned to them (store.assigned()),
the drains and the parents of the queued jobs, calls plan(), and its
applier writes the plan (guarded by the records' revisions and the prime).
explain() answers checkjob's "why does it wait"; never_fits() refuses at
submission a job no registered node could ever run.

Placement in short:
- jobs are taken in queue order (priority, then age) and each goes to a
  node that fits: not drained, with every label the job's constraints name,
  enforcing every limit it asks for, with a free slot, and with its cpus and
  memory free (a job reserves job.cpus or 0, job.memory or 0 and one slot);
- spread (the default) picks the node least loaded once the job is on it
  (ties: fewer jobs, then a hash of node and plan), pack the most loaded that
  still fits (ties: more jobs, then the first name); load is the highest of
  the node's shares of slots, cpus and memory in use;
- a job that fits nowhere waits and does NOT block the jobs behind it
  (backfill without reservations: a big job can be overtaken by small ones
  for as long as they keep coming; its reason says so and priority is the
  user's lever);
- the plan counts its own assignments as it goes, so one plan spreads many
  jobs evenly and never over-commits a node.
"""

import collections
import dataclasses
import hashlib
import heapq
from dataclasses import dataclass
from typing import Optional

from lclusterd import core

ENFORCES = frozenset(("memory", "cpu", "pids"))
EPSILON = 1e-9  # cpus are floats: ten jobs of 0.1 fill 1.0 exactly
SPREAD, PACK = "spread", "pack"

# The limit a job asks for -> the cgroup controller a node needs to enforce it.
CONTROLLERS = (("memory", "memory", "--memory"), ("cpus", "cpu", "--cpus"), ("tasks", "pids", "--tasks"))

# Waiting kinds, in the order explain() looks for them.
DEPENDENCY, THROTTLED, CONSTRAINT, DRAINED, RESOURCES, PRIORITY = (
    "dependency", "throttled", "constraint", "drained", "resources", "priority")
READY, WAIT, NEVER = "ready", "wait", "never"  # dependency() statuses


@dataclass(frozen=True)
class NodeView:
    """What the scheduler knows of a live node (its registration, its drain)."""
    name: str
    cpus: float
    memory: int  # bytes
    slots: int
    labels: dict  # node=<name> is implied even when absent here
    drained: bool = False
    enforces: frozenset = ENFORCES  # the limits it can enforce (cgroup controllers)


@dataclass(frozen=True)
class Load:
    """What the jobs assigned to a node reserve of it."""
    cpus: float = 0.0
    memory: int = 0
    jobs: int = 0

    def plus(self, job: core.Job) -> "Load":
        return Load(self.cpus + (job.cpus or 0.0), self.memory + (job.memory or 0), self.jobs + 1)


@dataclass(frozen=True)
class Waiting:
    kind: str  # priority|resources|constraint|dependency|drained|throttled
    text: str


@dataclass(frozen=True)
class Plan:
    assign: tuple = ()  # ((uuid, node), ...) in queue order
    cancel: tuple = ()  # ((uuid, reason), ...): a dependency that can never be met
    waiting: dict = dataclasses.field(default_factory=dict)  # {uuid: Waiting} as this plan saw it


def node_views(live, drains=()) -> list:
    """NodeViews from registrations {name: registration} (store.cluster()'s
    live nodes) and the names of drained nodes. A registration of an older
    version without capacity offers its slots as cpus and no memory limit."""
    views = []
    for name, reg in sorted(live.items()):
        enforces = reg.get("enforces")
        views.append(NodeView(
            name=name, slots=int(reg.get("slots") or 0),
            cpus=float(reg["cpus"]) if reg.get("cpus") is not None else float(reg.get("slots") or 0),
            memory=int(reg["memory"]) if reg.get("memory") is not None else core.MAX_MEMORY,
            labels=core.node_labels(name, reg.get("labels") or {}), drained=name in drains,
            enforces=frozenset(enforces) if enforces is not None else ENFORCES))
    return views


def loads(assigned) -> dict:
    """{node: Load} from store.assigned(): {node: {uuid: {"cpus", "memory", "array"}}}."""
    return {node: Load(cpus=sum(r.get("cpus") or 0.0 for r in jobs.values()),
                       memory=sum(r.get("memory") or 0 for r in jobs.values()),
                       jobs=len(jobs))
            for node, jobs in assigned.items()}


def array_live(assigned) -> dict:
    """{array id: members assigned to a node (starting, running, warned)}."""
    live = {}
    for jobs in assigned.values():
        for reservation in jobs.values():
            if reservation.get("array"):
                live[reservation["array"]] = live.get(reservation["array"], 0) + 1
    return live


# --- dependencies ----------------------------------------------------------------

def dependency(job: core.Job, parents) -> tuple:
    """(READY|WAIT|NEVER, text) for job's --after. parents: {uuid: Job, or
    None when its record is gone (deleted by retention or by hand)}.
    - ok: every parent succeeded. A parent failed, cancelled or gone: never.
    - any: every parent ended (terminal, or gone), whatever the outcome.
    - failed: every parent ended without success (failed, cancelled, or
      failed for good as node-lost), like Slurm's afternotok on each parent.
      A parent that succeeded, or is gone (outcome unknown): never.
    A parent absent from parents (not read) makes it wait: the rules never
    run or cancel a job on what they were not shown."""
    if not job.after:
        return READY, ""
    mode = job.after_mode or core.AFTER_OK
    waiting_for = None
    for uuid in job.after:
        if uuid not in parents:
            waiting_for = waiting_for or uuid
            continue
        parent = parents[uuid]
        if parent is None:
            if mode != core.AFTER_ANY:
                return NEVER, f"dependency failed: {uuid[:8]} is gone (its outcome is unknown)"
            continue
        if not parent.terminal:
            waiting_for = waiting_for or uuid
        elif mode == core.AFTER_OK and parent.state != core.SUCCEEDED:
            return NEVER, f"dependency failed: {uuid[:8]} {parent.state}"
        elif mode == core.AFTER_FAILED and parent.state == core.SUCCEEDED:
            return NEVER, f"dependency failed: {uuid[:8]} succeeded (--after-failed)"
    if waiting_for:
        return WAIT, f"waiting for {waiting_for[:8]}"
    return READY, ""


# --- fitting ---------------------------------------------------------------------

def _needs(job: core.Job):
    """The controllers job's limits need, as (controller, option) pairs."""
    return [(controller, option) for field, controller, option in CONTROLLERS
            if getattr(job, field) is not None]


def _has_labels(job: core.Job, labels: dict) -> bool:
    return all(labels.get(key) == value for key, _, value in
               (c.partition("=") for c in job.constraints))


def _suits(job: core.Job, node: NodeView, labels: dict) -> bool:
    """Could node ever run job: its labels and the limits it enforces (not load, not drain)."""
    return _has_labels(job, labels) and all(c in node.enforces for c, _ in _needs(job))


def _room(job: core.Job, node: NodeView, load: Load) -> bool:
    """Is there room for job on node now: a slot, its cpus, its memory."""
    return (load.jobs + 1 <= node.slots
            and load.cpus + (job.cpus or 0.0) <= node.cpus + EPSILON
            and load.memory + (job.memory or 0) <= node.memory)


def _load_after(job: core.Job, node: NodeView, load: Load) -> float:
    """The node's load once job is on it: its highest share in use."""
    share = (load.jobs + 1) / node.slots if node.slots else 1.0
    if node.cpus > 0:
        share = max(share, (load.cpus + (job.cpus or 0.0)) / node.cpus)
    if node.memory > 0:
        share = max(share, (load.memory + (job.memory or 0)) / node.memory)
    return share


class _Placer:
    """One plan's nodes and their loads as it assigns, with a heap per job
    shape (cpus, memory, constraints, limits asked) of the nodes that suit
    that shape and have room for it, best first. A scan of every node per
    job costs 4 ms a job at 1,000 nodes; the heaps make it O(log nodes).
    Entries are (key, version, name): a node's version goes up when it is
    given a job, and a fresh entry goes onto each heap it still has room in;
    an entry of an older version is stale and dropped when it comes up.
    Loads only grow within a plan, so a node without room for a shape never
    regains it: it is simply not pushed again."""

    def __init__(self, nodes, loads, placement, seed):
        self.pack = placement == PACK
        self.nodes = {n.name: n for n in nodes if not n.drained}
        self.labels = _label_map(self.nodes.values())
        self.load = {name: loads.get(name) or Load() for name in self.nodes}
        self.version = dict.fromkeys(self.nodes, 0)
        self.heaps = {}  # shape -> (a job of that shape, its heap)
        self.suited = {}  # (constraints, limits asked) -> names of the nodes that suit them
        # The last tie-break among equally loaded nodes. pack: the first name
        # (it fills n1, then n2). spread: a hash of node and plan, different
        # in every plan: short jobs placed one a plan, each finding every node
        # idle, still spread evenly instead of all going to the first name.
        # blake2b, not hash(): the same on every node and every run.
        self.tie = {name: name if self.pack else
                    hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
                    for name in self.nodes}

    def _suited(self, job, shape):
        """Names of the nodes that suit job's labels and limits, computed
        once per (constraints, limits asked): many shapes share them."""
        key = shape[2:]
        if key not in self.suited:
            self.suited[key] = {name for name, node in self.nodes.items()
                                if _suits(job, node, self.labels[name])}
        return self.suited[key]

    def _entry(self, job, name):
        node, load = self.nodes[name], self.load[name]
        share = _load_after(job, node, load)
        # spread: least loaded, then fewer jobs; pack: the most loaded, then more jobs
        key = (-share, -load.jobs) if self.pack else (share, load.jobs)
        return key + (self.tie[name],), self.version[name], name

    def choose(self, job, shape):
        """The best node for job (of shape) now, or None."""
        if shape not in self.heaps:
            heap = [self._entry(job, name) for name in self._suited(job, shape)
                    if _room(job, self.nodes[name], self.load[name])]
            heapq.heapify(heap)
            self.heaps[shape] = (job, heap)
        heap = self.heaps[shape][1]
        while heap and heap[0][1] != self.version[heap[0][2]]:
            heapq.heappop(heap)  # stale: its node was given a job since
        return heap[0][2] if heap else None

    def forget(self, shape):
        """No more jobs of shape in this plan: stop keeping its heap."""
        self.heaps.pop(shape, None)

    def take(self, job, name):
        self.load[name] = self.load[name].plus(job)
        self.version[name] += 1
        node = self.nodes[name]
        for shape, (sample, heap) in self.heaps.items():
            if name in self._suited(sample, shape) and _room(sample, node, self.load[name]):
                heapq.heappush(heap, self._entry(sample, name))


def _throttled(job, live) -> Optional[Waiting]:
    if job.array is None or job.max_running is None:
        return None
    running = live.get(job.array, 0)
    if running < job.max_running:
        return None
    return Waiting(THROTTLED, f"array {job.array[:8]}: {running} of {job.max_running} running")


def _free_text(what, job_value, nodes, free):
    """'no node has 8.0G free; most free: n2 3.1G' over nodes (free: node -> amount)."""
    show = core.human_size if what == "memory" else _cpus
    ask = show(job_value)
    if not nodes:
        return f"no node has {ask} free"
    most = max(nodes, key=free)  # the first of the highest
    return f"no node has {ask} free; most free: {most.name} {show(max(free(most), 0))}"


def _why_not(job, nodes, labels, current) -> Waiting:
    """Why job fits no node now (it fits none: the caller tried)."""
    if not nodes:
        return Waiting(RESOURCES, "no node is up")
    suited = [n for n in nodes if _suits(job, n, labels[n.name])]
    if not suited:
        return Waiting(CONSTRAINT, _unsuited_text(job, nodes, labels))
    open_ = [n for n in suited if not n.drained]
    if not open_:
        return Waiting(DRAINED, "every node that fits is drained")
    load = {n.name: current.get(n.name) or Load() for n in open_}
    if job.memory and not any(load[n.name].memory + job.memory <= n.memory for n in open_):
        return Waiting(RESOURCES, _free_text("memory", job.memory, open_,
                                             lambda n: n.memory - load[n.name].memory))
    if job.cpus and not any(load[n.name].cpus + job.cpus <= n.cpus + EPSILON for n in open_):
        return Waiting(RESOURCES, _free_text("cpus", job.cpus, open_,
                                             lambda n: n.cpus - load[n.name].cpus))
    if not any(load[n.name].jobs < n.slots for n in open_):
        slots = sum(n.slots for n in open_)
        return Waiting(RESOURCES, f"no free slot: {slots} of {slots} in use on the "
                                  f"{_nodes(len(open_))} that fit")
    return Waiting(RESOURCES, "no node has its cpus, memory and a slot free at once")


def _cpus(value):
    value = round(value, 3)  # sums of floats: 1.1e-16 is 0
    return f"{value:g} CPU" if value == 1 else f"{value:g} CPUs"


def _nodes(count):
    return "1 node" if count == 1 else f"{count} nodes"


def _unsuited_text(job, nodes, labels) -> str:
    """Why no node suits job at all: a label nobody has, a limit nobody enforces."""
    for constraint in job.constraints:
        key, _, value = constraint.partition("=")
        if not any(labels[n.name].get(key) == value for n in nodes):
            return f"no node has {constraint}"
    labelled = [n for n in nodes if _has_labels(job, labels[n.name])]
    if not labelled and job.constraints:
        return f"no node has {' and '.join(job.constraints)}"
    for controller, option in _needs(job):
        if not any(controller in n.enforces for n in labelled):
            where = " with " + " and ".join(job.constraints) if job.constraints else ""
            return f"no node{where} enforces {option} (its {controller} cgroup controller)"
    return "no node enforces all the limits it asks for"


def _label_map(nodes):
    return {n.name: core.node_labels(n.name, n.labels) for n in nodes}


# --- the plan --------------------------------------------------------------------

def _shape(job):
    """What placement looks at: jobs of one shape fit the same nodes."""
    return job.cpus or 0.0, job.memory or 0, job.constraints, tuple(c for c, _ in _needs(job))


def plan(queue, nodes, loads, parents, array_live, placement=SPREAD) -> Plan:
    """Assignments for the queue's jobs (in queue order), cancels for those
    whose dependency can never be met, and why the others wait.
    queue: [Job] in queue order (queued ones; others are skipped);
    nodes: [NodeView] of the live nodes; loads: {node: Load} as assigned now;
    parents: {uuid: Job or None (gone)} for the queue's --after parents;
    array_live: {array id: members assigned now}; placement: spread or pack."""
    nodes = sorted(nodes, key=lambda n: n.name)  # reasons: whatever the order given
    labels = _label_map(nodes)
    queue = [job for job in queue if job.state == core.QUEUED]
    placer = _Placer(nodes, loads, placement, seed=queue[0].uuid if queue else "")
    live = dict(array_live)
    parents = dict(parents)
    assign, cancel, waiting = [], [], {}
    # A job shape that found no node finds none later in this plan either
    # (loads only grow as it assigns): its reason is reused, not searched again.
    no_room = {}
    shapes = [_shape(job) for job in queue]
    # Jobs of each shape still to come: a shape's heap goes once its last
    # job is decided, so many shapes (every job its own --memory) cost a
    # scan each, not a push into every heap on every placement.
    left = collections.Counter(shapes)

    def decide(job, shape):
        status, text = dependency(job, parents)
        if status == NEVER:
            cancel.append((job.uuid, text))
            # its dependents later in this queue see it cancelled (Flux's chain)
            parents[job.uuid] = dataclasses.replace(job, state=core.CANCELLED)
            return
        if status == WAIT:
            waiting[job.uuid] = Waiting(DEPENDENCY, text)
            return
        throttled = _throttled(job, live)
        if throttled:
            waiting[job.uuid] = throttled
            return
        if shape in no_room:
            waiting[job.uuid] = no_room[shape]
            return
        name = placer.choose(job, shape)
        if name is None:
            no_room[shape] = waiting[job.uuid] = _why_not(job, nodes, labels, placer.load)
            return
        assign.append((job.uuid, name))
        placer.take(job, name)
        if job.array is not None:
            live[job.array] = live.get(job.array, 0) + 1

    for job, shape in zip(queue, shapes):
        decide(job, shape)
        left[shape] -= 1
        if not left[shape]:
            placer.forget(shape)
    return Plan(assign=tuple(assign), cancel=tuple(cancel), waiting=waiting)


def explain(job, nodes, loads, parents, array_live, ahead, total) -> Optional[Waiting]:
    """Why a queued job waits, for checkjob and list (Slurm's REASON), in this
    order: dependency, throttled, constraint, drained, resources, and
    priority when it would fit now but `ahead` of the `total` queued jobs
    go first. None: nothing holds it (it is placed on the next pass)."""
    status, text = dependency(job, parents)
    if status != READY:
        return Waiting(DEPENDENCY, text)
    throttled = _throttled(job, array_live)
    if throttled:
        return throttled
    nodes = sorted(nodes, key=lambda n: n.name)  # reasons: whatever the order given
    labels = _label_map(nodes)
    fits_now = any(not n.drained and _suits(job, n, labels[n.name])
                   and _room(job, n, loads.get(n.name) or Load()) for n in nodes)
    if not fits_now:
        return _why_not(job, nodes, labels, loads)
    if ahead:
        return Waiting(PRIORITY, f"{ahead} of {total} ahead")
    return None


def never_fits(job, nodes) -> Optional[str]:
    """Why no registered node could ever run job, whatever their load and
    drains (labels, enforced limits, capacity); None if one could, or if no
    node is registered (nothing to judge by: it waits)."""
    nodes = sorted(nodes, key=lambda n: n.name)  # reasons: whatever the order given
    if not nodes:
        return None
    labels = _label_map(nodes)
    suited = [n for n in nodes if _suits(job, n, labels[n.name])]
    if not suited:
        return _unsuited_text(job, nodes, labels)
    if any(_room(job, n, Load()) for n in suited):
        return None
    if job.memory and not any(job.memory <= n.memory for n in suited):
        most = max(suited, key=lambda n: n.memory)
        return (f"no node has {core.human_size(job.memory)} of memory; the most: "
                f"{most.name} {core.human_size(most.memory)}")
    if job.cpus and not any(job.cpus <= n.cpus + EPSILON for n in suited):
        most = max(suited, key=lambda n: n.cpus)
        return f"no node has {_cpus(job.cpus)}; the most: {most.name} {_cpus(most.cpus)}"
    # each need is met somewhere, but not all on one node
    asks = [core.human_size(job.memory)] if job.memory else []
    asks += [_cpus(job.cpus)] if job.cpus else []
    return f"no node has {' and '.join(asks + ['a slot'])} at once"
