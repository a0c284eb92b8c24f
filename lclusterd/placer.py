"""The cluster's scheduler, run by the primed node only: it places queued
jobs onto nodes (queued -> starting, node=X), several per guarded
transaction, and cancels jobs whose dependency can never be met.

It is woken by etcd's watches (a job queued, a node changed, an assignment
gone, a drain; held only while primed), BACKSTOP poll_intervals at the
latest; each pass reads a snapshot (the assignments and the queue's head
keys in one transaction, store.assigned_and_queue(), then the head's
records, and further down while the head's jobs wait and slots stay free;
live registrations, drains, the parents of jobs with dependencies), asks scheduler.plan() and writes at
most MAX_ASSIGN assignments with update_many(..., prime=us): a pass of a
node that lost the prime writes nothing. One placer, so nodes never race on the queue; every
assignment is checked against what etcd says is assigned, so no node is
over-committed whoever held the prime before.
"""

import asyncio
import concurrent.futures
import functools
import logging

from lclusterd import core, scheduler
from lclusterd.applier import Passes, woken
from lclusterd.store import LeaseExpired, Unavailable as StoreUnavailable

log = logging.getLogger("lclusterd.node")

# Queued jobs looked at past the cluster's free slots: ones that fit where
# the head does not (a big job first, small ones behind it; dependencies).
# Each is a record read and decoded per pass, and a busy node passes once
# per job or two: 128 made a deep queue cost the primed node ~130 decoded
# records per job. Further down is read only while the head's jobs wait.
LOOKAHEAD = 16
# When the head cannot use the free slots (its jobs wait on dependencies or
# an array's throttle), the pass reads further down, each read this many
# times the last, up to MAX_LOOK jobs (store.queued reads at most a page).
LOOK_GROWTH = 4
MAX_LOOK = 1000
# Assignments written per pass at most: short, frequent passes (the first
# jobs start while the next are placed) and a bounded transaction batch.
MAX_ASSIGN = 256
# Threads for the placer's etcd calls: not queued behind the runner's and
# the API's in the default pool.
PLACER_THREADS = 4
# Seconds between reads of the dependents of jobs that ended: those of all
# that ended meanwhile in one etcd call (a read every pass was an etcd call
# every job or two on a busy node: make bench). A dependent that can never
# run now is cancelled up to this much later; plan() cancels those it reads.
DEPENDENTS_EVERY = 1.0
# While its watches run, the placer passes at least once every this many
# poll_intervals (the watches' backstop; they resume after errors and say
# when they missed events).
BACKSTOP = 5


async def cancel_dependents(applier, roots, clock, call=None):
    """Jobs roots ended (or were cancelled): cancel their dependents whose
    dependency can never be met now, and theirs after them, at once (as
    Flux does, not Slurm's forever-pending). Returns the uuids cancelled.
    call: how to call the store (default applier.call). Each generation's
    dependents are read at once, not one job after another (the primed node
    looks at every job that ended: ~1,000 a second at 100 nodes); all
    the parents of a generation in one call (store.dependents_many)."""
    call, store = call or applier.call, applier.store
    todo, seen, cancelled = list(roots), set(), []
    while todo:
        parents_now = [p for p in dict.fromkeys(todo) if p not in seen]
        seen.update(parents_now)
        todo = []
        answers = await call(store.dependents_many, parents_now) if parents_now else {}
        children = sorted({c for found in answers.values() for c in found})
        if not children:
            continue
        found = await call(store.get_many, children)
        wanted = sorted({p for job, _ in found.values() for p in job.after})
        known = await call(store.get_many, wanted) if wanted else {}
        parents = {u: known[u][0] if u in known else None for u in wanted}

        def decide(job):
            if job.state != core.QUEUED:
                return None
            status, text = scheduler.dependency(job, parents)
            if status != scheduler.NEVER:
                return None
            return core.transition(job, core.CANCELLED, ended_at=clock(), reason=text)
        done = await applier.change_many(found, decide)
        for job_uuid, job in sorted(done.items()):
            if job.state == core.CANCELLED:
                log.info("job %s cancelled: %s", job_uuid, job.reason)
                cancelled.append(job_uuid)
                todo.append(job_uuid)
    return cancelled


class Placer:
    def __init__(self, config, applier, membership, clock):
        self.config = config
        self.applier = applier
        self.store = applier.store
        self.membership = membership
        self.clock = clock
        self.progress = {}
        self._wake = asyncio.Event()
        self.ended = set()  # uuids whose assignment went (they ended): their dependents to look at
        self._next_dependents = 0.0  # loop time of the next read of their dependents
        self._dependents_timer = None  # the wake-up for it
        self._cancels = []  # of the watches we hold while primed
        # The live registrations and the drains as last read (loop time,
        # {name: registration}, drains): read again when a node came or went
        # or a drain changed, or once a poll_interval (the registrations'
        # counts change every sweep; placement reads capacity, not counts).
        self._live = None
        self._nodes_changed = True
        self._pool = concurrent.futures.ThreadPoolExecutor(PLACER_THREADS, thread_name_prefix="placer")
        self.writes = 0  # transactions of assignments and cancels (tests, bench)

    @property
    def me(self):
        return self.config.node_name

    def wake(self):
        self._wake.set()

    def changed_here(self):
        """This node queued a job or changed a drain: while primed, the
        watches bring that already (a wake here too was a pass for nothing
        after each submission); without them, pass now."""
        if not self._cancels:
            self.wake()

    def events(self, events):
        """store.watch("queue"): a job queued (or requeued) means place again.
        One gone from the queue (placed, cancelled) makes nothing placeable:
        a pass for it was a pass for nothing after every placement."""
        if not events or any(not deleted for _, deleted in events):
            self.wake()

    def node_events(self, events):
        """store.watch("nodes"): a node that came or went means read them again."""
        known = self._live[1] if self._live is not None else {}
        if not events or any(deleted or suffix not in known for suffix, deleted in events):
            self._nodes_changed = True
        self.wake()

    def drain_events(self, events):
        """store.watch("drained"): read the drains (and the nodes) again."""
        self._nodes_changed = True
        self.wake()

    def assigned_events(self, events):
        """store.watch("assigned"): an assignment gone is a job that ended
        (or was requeued): room for another, and maybe dependents to cancel.
        A new one (this placer's own write) makes no room."""
        for suffix, deleted in events:
            if deleted:
                self.ended.add(suffix.rsplit("/", 1)[-1])
        if not events or any(deleted for _, deleted in events):
            self.wake()

    async def _watch(self, primed):
        """The queue's, the nodes', the drains' and every assignment's
        changes, watched only while we hold the prime: the other nodes need
        none of them (so etcd streams them to one node, not to all)."""
        if primed and not self._cancels:
            loop = asyncio.get_running_loop()

            def start():
                cancels = []
                try:
                    for kind, callback in (("queue", self.events), ("nodes", self.node_events),
                                           ("drained", self.drain_events),
                                           ("assigned", self.assigned_events)):
                        cancels.append(self.store.watch(kind, functools.partial(
                            loop.call_soon_threadsafe, callback)))
                except BaseException:  # all or none
                    for cancel in cancels:
                        cancel()
                    raise
                return cancels
            self._cancels = await self.applier.call(start)
            self.wake()  # what changed before the watches began: the next pass reads it
        elif not primed and self._cancels:
            self.stop_watching()

    def stop_watching(self):
        for cancel in self._cancels:
            cancel()
        self._cancels = []
        self._live = None  # read afresh once primed again

    async def run(self, stopping):
        """Place while we hold the prime, until stopping is set."""
        loop = asyncio.get_running_loop()
        try:
            await self._run(stopping, loop)
        finally:
            self.stop_watching()

    async def _run(self, stopping, loop):
        passes = Passes("placement", (StoreUnavailable, LeaseExpired, OSError))
        while not stopping.is_set():
            self.progress["placer"] = loop.time()
            again = False
            with passes.one():
                primed = await self.membership.hold_prime()
                await self._watch(primed)
                if primed:
                    again = await self.place()
                else:
                    self.ended.clear()  # the primed node looks at them
            if again:
                await asyncio.sleep(0)  # let the API's requests in between passes
                continue
            # While primed its watches wake it: the backstop can wait longer
            # (each idle pass is an etcd read, and the nodes' and drains'
            # once a poll_interval; placement has no clock).
            await woken(self._wake, self.config.poll_interval * (BACKSTOP if self._cancels else 1))

    def call(self, method, *args):
        return self.applier.call(method, *args, executor=self._pool)

    def close(self):
        self._pool.shutdown(wait=False)

    def _read_head(self, nodes):
        """(assigned, loads, free slots, the queue's head [(Job, revision)]), in the
        placer's thread: the assignments and the queue's first keys in one
        etcd transaction (one revision: a job is never seen both queued and
        assigned), then the records of as many of those as a pass looks at
        (none with no slot free), one hand-off for both. Only this placer
        adds assignments: the loads can only shrink after the read."""
        slots = sum(n.slots for n in nodes if not n.drained)
        assigned, heads = self.store.assigned_and_queue(min(slots, MAX_ASSIGN) + LOOKAHEAD if slots else 0)
        loads = scheduler.loads(assigned)
        free = sum(max(0, n.slots - loads[n.name].jobs if n.name in loads else n.slots)
                   for n in nodes if not n.drained)
        look = min(free, MAX_ASSIGN) + LOOKAHEAD
        return assigned, loads, free, self.store.queued_jobs(heads[:look]) if free and heads else []

    async def place(self):
        """One pass: read, plan, write. True if it wrote MAX_ASSIGN
        assignments, or found the prime free: another pass may place more
        at once. (Else the watches say when there is more: a pass after each
        pass that placed, and one for each assignment this placer wrote,
        found no room: ~2 etcd reads a job for nothing on a busy node.)"""
        call, store = self.call, self.store
        loop = asyncio.get_running_loop()
        self._wake.clear()  # what changes from now on wakes the next pass
        now = loop.time()
        if self.ended and now >= self._next_dependents:
            self._next_dependents = now + DEPENDENTS_EVERY
            ended, self.ended = sorted(self.ended), set()
            await cancel_dependents(self.applier, ended, self.clock, self.call)
        elif self.ended:  # a pass then reads them
            if self._dependents_timer is not None:
                self._dependents_timer.cancel()
            self._dependents_timer = loop.call_at(self._next_dependents, self.wake)
        if self._nodes_changed or self._live is None or now - self._live[0] >= self.config.poll_interval:
            self._nodes_changed = False
            (live, _, _, prime), drains = await asyncio.gather(call(store.cluster), call(store.drains))
            self._live = (now, live, drains)
            if prime != self.me:  # taken from us (deleted by hand, our lease gone): campaign again
                self.membership.primed = False
                self.membership.prime_taken = prime is not None
                # Free: campaign again now (returning False waited out the
                # backstop with the watches still up: a job waited 10 s).
                return prime is None
        _, live, drains = self._live
        nodes = scheduler.node_views(live, drains)
        assigned, loads, free, queue = await call(self._read_head, nodes)
        if not free:
            return False
        wanted_assign = min(free, MAX_ASSIGN)
        limit = wanted_assign + LOOKAHEAD
        while True:
            if queue is None:  # further down
                queue = await call(store.queued, limit)
            if not queue:
                return False
            jobs = {job.uuid: (job, rev) for job, rev in queue}
            wanted = sorted({p for job, _ in queue for p in job.after})
            found = await call(store.get_many, wanted) if wanted else {}
            parents = {u: found[u][0] if u in found else None for u in wanted}
            plan = scheduler.plan([job for job, _ in queue], nodes, loads, parents,
                                  scheduler.array_live(assigned), placement=self.config.placement)
            # Enough placed, the queue's end (queued() filters moved records,
            # so a short answer is the end as far as this pass knows), or the bound.
            if len(plan.assign) >= wanted_assign or len(queue) < limit or limit >= MAX_LOOK:
                break
            limit = min(limit * LOOK_GROWTH, MAX_LOOK)
            queue = None
        assign = plan.assign[:MAX_ASSIGN]  # in queue order: a prefix over-commits nothing
        now = self.clock()
        changes = [(jobs[u][0], core.transition(jobs[u][0], core.STARTING, now=now, node=node),
                    jobs[u][1]) for u, node in assign]
        changes += [(jobs[u][0], core.transition(jobs[u][0], core.CANCELLED, ended_at=now,
                                                 reason=reason), jobs[u][1])
                    for u, reason in plan.cancel]
        if not changes:
            return False  # nothing to write: no transaction
        results = await self.applier.write_many(changes, prime=self.me, executor=self._pool)
        self.writes += 1
        placed = sum(1 for r in results[:len(assign)] if r)
        cancelled = [u for (u, _), r in zip(plan.cancel, results[len(assign):]) if r]
        for u, reason in plan.cancel:
            if u in cancelled:
                log.info("job %s cancelled: %s", u, reason)
        if cancelled:
            await cancel_dependents(self.applier, cancelled, self.clock, self.call)
        if placed < len(assign) or len(cancelled) < len(plan.cancel):
            self._nodes_changed = True  # some records moved, or the prime did: read all again
            self.wake()
        return placed >= MAX_ASSIGN
