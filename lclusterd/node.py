"""The node: the composition root of what one lclusterd does in the cluster.

    applier     the one place that writes to etcd (guarded changes, counted calls)
    runner      this node's jobs: starts the units of jobs assigned to it,
                records them running and how they end, sweeps (core.reconcile)
    membership  the lease, the heartbeat and the fence, the registration,
                the prime, failed nodes and the jobs they lost
    placer      the cluster's scheduler, on the primed node only
    history     pruning of finished records
    verbs       the API's verbs (K6)

api.py, ui.py, metrics and the daemon call the facade below (node.<verb>).
"""

import asyncio
import time

from lclusterd import metrics, store as etcd_store
from lclusterd.applier import Applier, Passes, woken
from lclusterd.history import History
from lclusterd.membership import (FENCE_AFTER, HEARTBEAT, REQUEUE_GUARD,  # noqa: F401
                                  Membership, endpoint_stores, machine_id)
from lclusterd.placer import Placer
from lclusterd.runner import RUN_DIR, FenceMarkers, Runner
from lclusterd.store import Unavailable as StoreUnavailable
from lclusterd.units import Unavailable as UnitsUnavailable
from lclusterd.verbs import Caller, Verbs  # noqa: F401  (Caller: api.py imports it from here)



# Seconds between a node's looks at etcd's NOSPACE alarm while all is well.
# Reading etcd's alarms is a raft proposal (a write) on every member: once a
# sweep it was an idle node's only writes (0.5/s; issue 13 wants <= 0.2),
# and a node that writes hears NOSPACE from its writes anyway.
SPACE_CHECK_EVERY = 30.0


class Node:
    def __init__(self, config, store, units, job_log=None, peers=None, clock=time.time,
                 signing_key=None, enforceable=frozenset(("memory", "cpu", "pids")),
                 run_dir=RUN_DIR, machine=None, lease_stores=None):
        """run_dir: where FENCE_FILE and FENCED_DIR are; machine: this
        machine's id (default /etc/machine-id); lease_stores: the stores the
        heartbeat renews through (default one per etcd endpoint)."""
        self.config = config
        self.store = store
        self.units = units
        self.clock = clock
        self.counters = metrics.Counters()  # GET /metrics (issue 12 item 2): counted as it happens
        self._wake = asyncio.Event()
        self.markers = FenceMarkers(run_dir)
        self.applier = Applier(store, self.counters, config.node_name, self.markers.was_fenced)
        self.runner = Runner(config, self.applier, units, self.markers, clock, signing_key,
                             wake=self._wake.set, registered=lambda: self.membership.lease is not None)
        self.membership = Membership(config, self.applier, units, self.runner, self.markers, clock,
                                     enforceable, run_dir, machine, lease_stores, wake=self.wake)
        self.placer = Placer(config, self.applier, self.membership, clock)
        self.history = History(config, self.applier, clock)
        self.verbs = Verbs(config, self.applier, self.runner, self.membership, units, job_log,
                           peers, clock, signing_key, wake=self.placer.changed_here)
        # Loop time each long-lived loop last went round ("runner", "placer",
        # "heartbeat"): the daemon pets the watchdog only while all are recent.
        self.progress = {}
        self.membership.progress = self.progress
        self.placer.progress = self.progress

    # -- the facade (K6) ----------------------------------------------------------

    async def ping(self):
        await self.verbs.ping()

    async def submit(self, command, caller, request=None, count=None, idempotency_key=None,
                     commands=None):
        return await self.verbs.submit(command, caller, request, count, idempotency_key, commands)

    async def find(self, ref):
        return await self.verbs.find(ref)

    async def find_array(self, ref):
        return await self.verbs.find_array(ref)

    async def list(self, limit=50, **filters):
        return await self.verbs.list(limit, **filters)

    async def remove(self, ref, caller):
        return await self.verbs.remove(ref, caller)

    async def waiting(self, jobs):
        return await self.verbs.waiting(jobs)

    def output(self, job, caller, follow=False, tail=None, since=None):
        return self.verbs.output(job, caller, follow, tail, since)

    async def nodes(self):
        return await self.verbs.nodes()

    async def drain(self, name, reason, caller):
        return await self.verbs.drain(name, reason, caller)

    async def resume(self, name, caller):
        return await self.verbs.resume(name, caller)

    async def forget(self, name, caller):
        return await self.verbs.forget(name, caller)

    def unit_properties(self, job):
        return self.runner.unit_properties(job)

    @property
    def primed(self):
        return self.membership.primed

    @property
    def lease(self):
        return self.membership.lease

    @property
    def mine(self):
        return self.runner.mine

    @property
    def etcd_error(self):
        return self.applier.etcd_error

    @property
    def next_prune(self):
        return self.history.next_prune

    @next_prune.setter
    def next_prune(self, value):
        self.history.next_prune = value

    def wake(self):
        self._wake.set()
        self.placer.wake()

    def unit_changed(self, job_uuid):
        """Called by units for every change of a job's unit."""
        self.runner.unit_changed(job_uuid)

    async def keep_lease(self, stopping):
        await self.membership.keep_lease(stopping)

    async def place(self, stopping):
        await self.placer.run(stopping)

    def close(self):
        """Close the heartbeat's own stores (the daemon closes self.store)."""
        self.membership.close()
        self.placer.close()

    def watches(self, loop):
        """Wire etcd's watches to wake-ups on loop (each callback comes from
        a watch thread). Returns the cancels, for the daemon to call on stop."""
        def soon(callback):
            return lambda events: loop.call_soon_threadsafe(callback, events)
        me = self.config.node_name
        # (The placer watches the queue, nodes, drains and assignments itself,
        # only while this node holds the prime.)
        wanted = [("assigned", self.runner.assignment_events, me), ("prime", self._prime_events, None)]
        cancels = []
        try:
            for kind, callback, node in wanted:
                cancels.append(self.store.watch(kind, soon(callback), node=node))
        except BaseException:  # all or none (etcd went away half-way)
            for cancel in cancels:
                cancel()
            raise
        return cancels

    def _prime_events(self, events):
        self.membership.prime_events(events)
        self.placer.wake()

    # -- this node's loop ------------------------------------------------------------

    async def run(self, stopping):
        """This node's own work until stopping is set: on every wake-up
        record what units told us and start what was assigned to us; every
        poll_interval also sweep, judge other nodes and publish."""
        next_sweep = next_space_check = 0.0
        # (LeaseExpired: the heartbeat's next renewal hears it too, and fences.)
        passes = Passes("node", (StoreUnavailable, UnitsUnavailable, OSError, etcd_store.LeaseExpired))
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            self.progress["runner"] = loop.time()
            with passes.one():
                if not self.units.connected:
                    await self.units.connect()
                    next_sweep = 0.0  # what happened while we were away?
                if loop.time() >= next_sweep:
                    # An idle node writes nothing: ask about etcd's space, so
                    # STATUS= says NOSPACE (etcd_error) before a write fails on
                    # it; every sweep while etcd is in trouble.
                    if loop.time() >= next_space_check or self.applier.etcd_error:
                        next_space_check = loop.time() + SPACE_CHECK_EVERY
                        await self.applier.call(self.store.check_space)
                    await self.runner.sweep()
                    await self.membership.watch_cluster()
                    # Once a sweep, not per job: the registration's counts are
                    # for people (lclusterc nodes), and each rewrite is an etcd write.
                    await self.membership.publish()
                    next_sweep = loop.time() + self.config.poll_interval
                    # (The placer's own poll_interval is the backstop of its
                    # watches: a wake-up here too doubled an idle node's reads.)
                await self.runner.record_changed()
                await self.runner.start_assigned()
                await self.history.prune_when_due(loop.time())
            await woken(self._wake, self.config.poll_interval)
