"""This node in the cluster: its registration under a lease, the heartbeat
that renews it and fences us at the deadline, the prime, and the judgement
of other nodes (failed nodes, and the jobs they lost).

The fencing margin is designed (README, "Fencing"): a node stops its jobs by
    D = (send time of its last confirmed renewal) + FENCE_AFTER x TTL
(itself, or lclusterd-fence.service when the daemon is not running, reading
D from FENCE_FILE); etcd keeps the lease until at least that send time +
TTL (a renewal restarts the TTL when etcd gets it; a new etcd leader
restarts every TTL in full), and the primed node requeues its jobs only
REQUEUE_GUARD x TTL after it first sees the lease gone (a node that takes
the prime starts that clock at its first look). So a job stops on
its node at least (1 - FENCE_AFTER + REQUEUE_GUARD) x TTL before it can
start elsewhere: 6 s at TTL 8, 7.5 s at the default 10, less the fence's
0.2 s poll; clocks are never compared across machines.
"""

import asyncio
import concurrent.futures
import functools
import json
import logging
import os

from lclusterd import core, store as etcd_store
from lclusterd.store import Unavailable as StoreUnavailable
from lclusterd.units import Unavailable as UnitsUnavailable

log = logging.getLogger("lclusterd.node")

# The lease (TTL = config.lease_ttl), as fractions of the TTL.
HEARTBEAT = 0.125  # renew this often: an etcd election (1-3 s) costs a few
                   # renewals, not the FENCE_AFTER budget
RENEW_WAIT = 0.125  # each renewal, sent to every etcd endpoint at once, may take this long
FENCE_AFTER = 0.5  # unrenewed this long: stop our jobs
REQUEUE_GUARD = 0.25  # a dead node's lease gone this long: requeue its jobs
FENCE_STOP_WAIT = 5  # seconds to wait for a killed unit to go
FENCE_FILE = "fence.json"  # {"node", "deadline" (CLOCK_MONOTONIC s), "others_live", "pid"}
MACHINE_ID = "/etc/machine-id"
# store.NameTaken (contract C2) ends the heartbeat: the daemon exits 78.
NAME_TAKEN = etcd_store.NameTaken


def machine_id(path=MACHINE_ID):
    """This machine's id (systemd's /etc/machine-id), or None."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, ValueError):
        return None


def endpoint_stores(store):
    """One store per etcd endpoint, for the heartbeat to ask them all at
    once (a member that is down or has no leader must not use up the
    fencing budget before the next one is asked); [store] if it has one."""
    endpoints = list(getattr(store, "endpoints", None) or [])
    if len(endpoints) < 2:
        return [store]
    try:
        return [type(store)([e], store.prefix, tls=getattr(store, "tls", None)) for e in endpoints]
    except TypeError:  # a store of another shape: the one we have
        return [store]


class Membership:
    def __init__(self, config, applier, units, runner, markers, clock, enforceable,
                 run_dir, machine=None, lease_stores=None, wake=lambda: None):
        self.config = config
        self.applier = applier
        self.store = applier.store
        self.units = units
        self.runner = runner  # its jobs hold our slots (the registration's counts)
        self.markers = markers
        self.clock = clock
        self.enforceable = frozenset(enforceable)  # limits this node can enforce (contract C4)
        self.run_dir = run_dir
        self.machine = machine if machine is not None else machine_id()
        self.wake = wake
        self.progress = {}
        self._lease_stores = lease_stores or endpoint_stores(self.store)
        self.lease = None  # our etcd lease while registered, else None
        self._primed = False
        # The prime key is under our lease, so once taken it stays ours while
        # that lease lives (an idle node writes nothing per pass, issue 13
        # item 3); while another node holds it we campaign only once we saw
        # it free (the watch, or a sweep's read of the cluster).
        self._prime_lease = None  # the lease we took the prime under
        self.prime_taken = False  # another node held the prime when we last looked
        self._reindexed = None  # the lease under which we last took the prime and reindexed
        self._published = None  # the registration last written
        self._judged = set()  # lease-less members whose jobs we have looked for
        self.others_live = False  # did another node hold a lease when we last looked?
        self._missing_since = {}  # member name -> loop time we first saw it without a lease
        self._next_look = 0.0  # loop time a node without the prime next reads the cluster
        self._fence_file_error = None  # why FENCE_FILE cannot be written, said once
        # The heartbeat's etcd calls get threads of their own: slow calls of
        # the API or the scheduler must not delay a renewal into a fence.
        # Enough for a renewal per endpoint every HEARTBEAT while dead members
        # hold theirs for the store's call timeout.
        self._beat = concurrent.futures.ThreadPoolExecutor(
            4 + 4 * len(self._lease_stores), thread_name_prefix="lease")

    @property
    def me(self):
        return self.config.node_name

    @property
    def primed(self):
        return self._primed

    @primed.setter
    def primed(self, value):
        if bool(value) != self._primed:
            self.applier.counters.prime_changes += 1  # GET /metrics: took or gave up the prime
        self._primed = bool(value)

    def close(self):
        """Close the heartbeat's own stores (the daemon closes the main store)."""
        for s in self._lease_stores:
            if s is not self.store:
                s.close()
        self._beat.shutdown(wait=False)

    # -- the registration ---------------------------------------------------

    def registration(self):
        """What PREFIX/nodes/<name> says (K3): capacity for placement, counts for people."""
        running = len(self.runner.mine)
        return {"name": self.me, "address": self.config.address,
                "slots": self.config.slots, "free": core.free_slots(self.config.slots, running),
                "running": running,
                "machine": self.machine,  # tells a restart of ours from a namesake (C2)
                "enforces": sorted(self.enforceable),
                "cpus": self.config.cpus, "memory": self.config.memory,
                "labels": core.node_labels(self.me, self.config.labels)}

    async def publish(self):
        """Keep our registration's counts current (once a sweep: each rewrite is a write)."""
        info = self.registration()
        if self.lease is not None and info != self._published:
            await self.applier.call(self.store.update_registration, info, self.lease)
            self._published = info

    # -- the prime ------------------------------------------------------------

    async def hold_prime(self):
        """Campaign for the prime when it is free; keep it while our lease
        lives. True while we hold it."""
        if self.lease is None:
            self.primed = False  # not registered (etcd unreachable, or fenced): place nothing
            return False
        if not (self.primed and self._prime_lease == self.lease):
            if self.prime_taken:
                return False  # another node holds it: the watch or the sweep says when it is free
            self.primed = await self.applier.call(self.store.campaign, self.me, self.lease)
            self._prime_lease = self.lease if self.primed else None
            self.prime_taken = not self.primed
        if self.primed and self._reindexed != self.lease:
            # Records of an older lclusterd have no assigned/ keys: without
            # them the placer would not count the jobs that hold a node.
            # (Once per prime taken; retried on the next pass if etcd fails.)
            written = await self.applier.call(self.store.reindex)
            self._reindexed = self.lease
            if written:
                log.info("wrote or dropped %d index key(s) (records of an older lclusterd)", written)
        return self.primed

    def prime_events(self, events):
        """store.watch("prime"): a deletion means it is free to campaign for
        (no events: some were missed, look again)."""
        if not events or any(deleted for _, deleted in events):
            self.prime_taken = False
            self.wake()

    # -- the heartbeat ----------------------------------------------------------

    async def keep_lease(self, stopping):
        """Hold our lease: register under a fresh one, renew it every
        HEARTBEAT × TTL through every etcd endpoint at once, and fence
        ourselves at the deadline (FENCE_AFTER × TTL after the send time of
        the last confirmed renewal), or as soon as etcd says it expired.
        After registering and after every confirmed renewal, FENCE_FILE
        tells lclusterd-fence the deadline, for when we are not running."""
        ttl = self.config.lease_ttl
        loop = asyncio.get_running_loop()
        renewed = next_beat = loop.time()
        beat = functools.partial(self.applier.call, executor=self._beat)

        def deadline():
            return renewed + ttl * FENCE_AFTER

        def budget(limit):  # no etcd call may carry us past the fencing deadline
            if self.lease is None:
                return limit
            return max(0.05, min(limit, deadline() - loop.time()))

        while not stopping.is_set():
            self.progress["heartbeat"] = loop.time()
            if loop.time() >= next_beat:
                # Counted from when we asked: etcd restarts the TTL when it gets the request.
                sent = loop.time()
                next_beat = sent + ttl * HEARTBEAT
                try:
                    if self.lease is None:
                        wait = ttl * FENCE_AFTER / 2
                        lease = await asyncio.wait_for(beat(self.store.grant, ttl), wait)
                        info = self.registration()
                        await asyncio.wait_for(beat(self.store.register, info, lease), wait)
                        self.lease, self._published, renewed = lease, info, sent
                        log.info("registered as node %s (lease %x, TTL %g s)", self.me, lease, ttl)
                        await self._look_for_others(beat, wait)
                        self._write_fence_file(deadline())
                        self.wake()
                    elif await self._renew(self.lease, budget(ttl * RENEW_WAIT)):
                        renewed = sent
                        self._write_fence_file(deadline())
                    else:
                        await self.fence("etcd says our lease expired")
                except NAME_TAKEN:
                    raise  # another machine's node has our name: the daemon says so and exits
                except (StoreUnavailable, asyncio.TimeoutError):
                    pass  # etcd_error says why; the deadline below decides what it costs
                except Exception:
                    log.exception("heartbeat failed; retrying")
            if self.lease is not None and loop.time() >= deadline():
                await self.fence(f"could not renew our lease for {loop.time() - renewed:.1f} s")
            try:
                await asyncio.wait_for(stopping.wait(), budget(max(0.05, next_beat - loop.time())))
            except asyncio.TimeoutError:
                pass

    async def _renew(self, lease, timeout):
        """Renew through every etcd endpoint at once; the first answer counts.
        True: renewed; False: etcd says it expired; asyncio.TimeoutError (or
        the last error) if no member answered within timeout."""
        loop = asyncio.get_running_loop()
        pending = {loop.run_in_executor(self._beat, functools.partial(s.renew, lease, timeout=timeout))
                   for s in self._lease_stores}
        for f in pending:  # the slow ones finish unwatched: retrieve their errors
            f.add_done_callback(lambda f: f.cancelled() or f.exception())
        end = loop.time() + timeout
        expired, error = False, None
        while pending and loop.time() < end:
            done, pending = await asyncio.wait(pending, timeout=end - loop.time(),
                                               return_when=asyncio.FIRST_COMPLETED)
            for f in done:
                if isinstance(f.exception(), etcd_store.LeaseExpired):
                    expired = True
                elif f.exception() is not None:
                    error = f.exception()
                elif f.result():
                    self.applier.etcd_error = None
                    return True
                else:
                    expired = True  # the leader says so; another member may still say otherwise
        if expired:
            return False
        if isinstance(error, StoreUnavailable) and not pending:
            self.applier.etcd_error = str(error)
        raise error if error is not None and not pending else asyncio.TimeoutError()

    async def _look_for_others(self, beat, wait):
        """Is another node live? (FENCE_FILE's others_live, from the start.)"""
        try:
            live, *_ = await asyncio.wait_for(beat(self.store.cluster), wait)
        except (StoreUnavailable, asyncio.TimeoutError):
            return  # the last answer stands until the next sweep looks
        self.others_live = bool(set(live) - {self.me})

    def _write_fence_file(self, deadline):
        """FENCE_FILE, replaced atomically (contract C1)."""
        path = os.path.join(self.run_dir, FENCE_FILE)
        info = {"node": self.me, "deadline": deadline,
                "others_live": self.others_live, "pid": os.getpid()}
        try:
            os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
            with open(f"{path}.tmp", "w", encoding="utf-8") as f:
                json.dump(info, f)
            os.replace(f"{path}.tmp", path)
            self._fence_file_error = None
        except OSError as e:
            if str(e) != self._fence_file_error:
                log.warning("cannot write %s: %s (lclusterd-fence cannot stop our jobs "
                            "while the daemon is not running)", path, e)
            self._fence_file_error = str(e)

    async def fence(self, why):
        """We may be declared failed: stop every job of ours now (SIGKILL),
        since other nodes will requeue them, and register afresh later. Alone
        in the cluster (a single node; or the others are dead too) nobody can
        take our jobs over: keep them running, and only register afresh."""
        self.lease, self.primed = None, False
        if not self.others_live:
            log.warning("%s; no other node is live to take our jobs over: keeping them", why)
            return
        log.warning("fencing: %s; stopping this node's jobs", why)
        self.applier.counters.fenced += 1
        try:
            # A unit that has finished keeps its real result (recorded if the
            # record is still ours): only what still runs is killed and lost.
            units = [u for u, status in (await self.units.list()).items() if not status.finished]
            for job_uuid in units:
                self.markers.mark(job_uuid)
            for job_uuid in units:
                await self.units.kill(job_uuid)
            for job_uuid in units:
                await self.units.stop_and_wait(job_uuid, FENCE_STOP_WAIT)
        except (UnitsUnavailable, OSError) as e:
            log.warning("fencing: %s", e)

    # -- other nodes ------------------------------------------------------------

    async def watch_cluster(self):
        """On the primed node only: record members whose lease expired as
        failed, and lose (requeue or fail) the jobs assigned to them, once
        REQUEUE_GUARD × TTL has passed since we first saw the lease gone (the
        fencing margin). A node that takes the prime starts that clock when
        it first looks, so a dead primed node's jobs wait no less. The others
        read the cluster only once a lease_ttl (the prime's watch tells them
        when it is free; a read of every registration per node per sweep was
        N² reads): another node holding the prime is a live one (others_live)."""
        if self.lease is None:
            return  # we may be the one cut off: judge nobody
        seen = asyncio.get_running_loop().time()
        if not self.primed:
            self._missing_since, self._judged = {}, set()  # the primed node's clock, not ours
            if self.prime_taken:
                self.others_live = True
            if seen < self._next_look:
                return
            self._next_look = seen + self.config.lease_ttl
        live, members, failed, prime = await self.applier.call(self.store.cluster)
        self.others_live = bool(set(live) - {self.me})
        if self.primed and prime != self.me:
            self.primed, self._prime_lease = False, None  # deleted meanwhile (etcdctl del): campaign again
        self.prime_taken = prime is not None and prime != self.me
        if not self.primed:
            return
        now = self.clock()
        for name in core.failed_nodes(members, live, failed):
            if await self.applier.call(self.store.record_failed, name, now):
                log.warning("node %s failed: its lease expired", name)
        missing = set(members) - set(live)
        self._missing_since = {n: self._missing_since.get(n, seen) for n in missing}
        due = {n for n in missing
               if seen - self._missing_since[n] >= REQUEUE_GUARD * self.config.lease_ttl}
        self._judged &= due  # a node back with a new lease may fail again
        if not due - self._judged:
            return  # a dead node places nothing: one look for its jobs is enough
        judged_live = set(live) | (missing - due)  # not yet past the guard: theirs still
        await self.lose_jobs_of(judged_live)
        self._judged |= due

    async def lose_jobs_of(self, judged_live):
        """Lose the live jobs of every node not in judged_live."""
        assigned = await self.applier.call(self.store.assigned)
        uuids = sorted(u for node, jobs in assigned.items() if node not in judged_live for u in jobs)
        records = await self.applier.call(self.store.get_many, uuids) if uuids else {}

        def lose(j):
            return core.lose(j, j.node, self.clock()) if core.lost_jobs([j], judged_live) else None
        lost = await self.applier.change_many(records, lose)
        for job_uuid, job in sorted(lost.items()):
            log.warning("job %s lost with its node: %s", job_uuid, job.state)
