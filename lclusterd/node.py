"""The node: applies the core's rules to etcd (store) and systemd (units).

It owns what this machine runs: it claims jobs from the queue while it has
free slots, starts their units, records how they end, and on every sweep
brings etcd and systemd back into agreement (core.reconcile), which is also
how it recovers after a restart, a missed signal or an etcd outage.
"""

import asyncio
import concurrent.futures
import functools
import json
import logging
import os
import pwd
import time
from dataclasses import dataclass, replace

from dbus_next.errors import DBusError

from lclusterd import core, metrics, netns, store as etcd_store
from lclusterd.peers import Unreachable as PeerUnreachable
from lclusterd.store import Unavailable as StoreUnavailable
from lclusterd.units import Refused, Unavailable as UnitsUnavailable

log = logging.getLogger(__name__)

MAX_CHANGE_ATTEMPTS = 5  # re-reads of a record whose revision moved under us
# journald reads a job's stdout pipe on its own time: 100,000 lines reach the
# journal up to a second after the job ended. So output read within
# LATE_OUTPUT seconds of the end is complete only once the journal has had
# nothing new for the unit for QUIET seconds.
LATE_OUTPUT = 10.0
QUIET = 1.0
MAX_PRUNE_EVERY = 300.0  # seconds; shorter retentions are pruned every retention/10
# The lease (TTL = config.lease_ttl), as fractions of the TTL. The fencing
# margin is designed (README, "Fencing"): a node stops its jobs by
#     D = (send time of its last confirmed renewal) + FENCE_AFTER x TTL
# (itself, or lclusterd-fence.service when the daemon is not running, reading
# D from FENCE_FILE); etcd keeps the lease until at least that send time +
# TTL (a renewal restarts the TTL when etcd gets it; a new etcd leader
# restarts every TTL in full), and the other nodes requeue its jobs only
# REQUEUE_GUARD x TTL after they first see the lease gone. So a job stops on
# its node at least (1 - FENCE_AFTER + REQUEUE_GUARD) x TTL before it can
# start elsewhere: 6 s at TTL 8, 7.5 s at the default 10, less the fence's
# 0.2 s poll; clocks are never compared across machines.
HEARTBEAT = 0.125  # renew this often: an etcd election (1-3 s) costs a few
                   # renewals, not the FENCE_AFTER budget
RENEW_WAIT = 0.125  # each renewal, sent to every etcd endpoint at once, may take this long
FENCE_AFTER = 0.5  # unrenewed this long: stop our jobs
REQUEUE_GUARD = 0.25  # a dead node's lease gone this long: requeue its jobs
CLAIM_POLL = 0.5  # seconds between looks at the prime and the queue while we have room
# A job asking for a limit this node cannot enforce is left for a node that
# can (issue 9 item 17): the primed node looks this many jobs past its free
# slots for ones it can run, and when such a job heads the queue it gives
# the prime up for YIELD_PRIME seconds, so that another node may take it.
LOOK_PAST = 16
YIELD_PRIME = 4 * CLAIM_POLL
FENCE_STOP_WAIT = 5  # seconds to wait for a killed unit to go
RUN_DIR = "/run/lclusterd"  # FENCE_FILE and FENCED_DIR live here (contract C1)
FENCE_FILE = "fence.json"  # {"node", "deadline" (CLOCK_MONOTONIC s), "others_live", "pid"}
FENCED_DIR = "fenced"  # <uuid>: an empty file per unit killed by a fence; its job is lost
MACHINE_ID = "/etc/machine-id"
# What a job asks for -> (the controller that enforces it, its addjob option)
LIMIT_CONTROLLERS = {"memory": ("memory", "--memory"), "cpus": ("cpu", "--cpus"),
                     "tasks": ("pids", "--tasks")}
# store.NameTaken (contract C2) ends the heartbeat: the daemon exits 78.
# (An empty tuple catches nothing while store.py has no such class.)
NAME_TAKEN = getattr(etcd_store, "NameTaken", ())


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


class Conflict(Exception):
    """A record kept changing under us; the caller may retry."""


class PermissionDenied(core.Forbidden):
    pass


class Elsewhere(Exception):
    """The job ran on another node, whose output we cannot fetch."""


class _NotStarted(Exception):
    """A job this node will not start; the message is the record's reason."""


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    user: str


class Node:
    def __init__(self, config, store, units, job_log=None, peers=None, clock=time.time,
                 signing_key=None, enforceable=frozenset(("memory", "cpu", "pids")),
                 run_dir=RUN_DIR, machine=None, lease_stores=None):
        """run_dir: where FENCE_FILE and FENCED_DIR are; machine: this
        machine's id (default /etc/machine-id); lease_stores: the stores the
        heartbeat renews through (default one per etcd endpoint)."""
        self.config = config
        self.run_dir = run_dir
        self.machine = machine if machine is not None else machine_id()
        self._lease_stores = lease_stores or endpoint_stores(store)
        self.signing_key = signing_key  # core.signing_key(token), None: records unsigned (contract C3)
        self.enforceable = frozenset(enforceable)  # limits this node can enforce (contract C4)
        # Loop time each long-lived loop last went round ("schedule", "heartbeat"):
        # the daemon pets the watchdog only while both are recent.
        self.progress = {}
        self.counters = metrics.Counters()  # GET /metrics (issue 12 item 2): counted as it happens
        self.store = store
        self.units = units
        self.job_log = job_log  # journal.JobLog: a job's output on this node
        self.peers = peers  # peers.Peers: the output of jobs that ran on other nodes
        self.clock = clock
        self.mine = set()  # uuids of live jobs on this node: they hold slots
        self.in_flight = set()  # uuids whose unit this process is starting now
        self.changed = set()  # uuids whose unit systemd told us about
        # (job, revision) as this node last wrote them, for its live jobs: the
        # next change of a job needs no read first (2 etcd reads a job fewer;
        # a stale one only fails its guarded write, and is read then).
        self.written = {}
        self.etcd_error = None  # why etcd is unreachable, or None
        self.next_prune = 0.0  # loop time of the next look at the history
        self._wake = asyncio.Event()
        self._recovered = False
        self.lease = None  # our etcd lease while registered, else None (claim nothing)
        self.primed = False
        # An idle node writes nothing per pass (issue 13 item 3): the prime key
        # is under our lease, so once taken it stays ours while that lease
        # lives (no re-campaign, a transaction, every CLAIM_POLL); and while
        # another node holds it we campaign only once a sweep's read of the
        # cluster saw it free. Claims stay guarded by the prime's value.
        self._prime_lease = None  # the lease we took the prime under
        self._prime_taken = False  # another node held the prime when we last looked
        self.fenced = set()  # uuids of units we killed when fenced: their records are lost, not ended
        self._published = None  # the registration last written
        self._judged = set()  # lease-less members whose jobs we have looked for
        self._others_live = False  # did another node hold a lease when we last looked?
        self._missing_since = {}  # member name -> loop time we first saw it without a lease
        self._yield_until = 0.0  # loop time before which we do not campaign (LOOK_PAST)
        self._fence_file_error = None  # why FENCE_FILE cannot be written, said once
        # The heartbeat's etcd calls get threads of their own: slow calls of
        # the API or the scheduler must not delay a renewal into a fence.
        # Enough for a renewal per endpoint every HEARTBEAT while dead members
        # hold theirs for the store's call timeout.
        self._beat = concurrent.futures.ThreadPoolExecutor(
            4 + 4 * len(self._lease_stores), thread_name_prefix="lease")

    @property
    def primed(self):
        return self._primed

    @primed.setter
    def primed(self, value):
        if bool(value) != getattr(self, "_primed", False):
            self.counters.prime_changes += 1  # GET /metrics: took or gave up the prime
        self._primed = value

    def close(self):
        """Close the heartbeat's own stores (the daemon closes self.store)."""
        for s in self._lease_stores:
            if s is not self.store:
                s.close()
        self._beat.shutdown(wait=False)

    # -- helpers --------------------------------------------------------------

    async def _store(self, method, *args, executor=None):
        began = time.monotonic()
        try:
            result = await asyncio.get_running_loop().run_in_executor(executor, method, *args)
        except StoreUnavailable as e:
            self.counters.etcd_failed("nospace" if isinstance(e, etcd_store.NoSpace) else "unreachable")
            self.etcd_error = str(e)
            raise
        except Exception:
            self.counters.etcd_failed("other")  # refused: too large, lease expired, name taken, ...
            raise
        finally:
            self.counters.etcd.observe(time.monotonic() - began)
        self.etcd_error = None
        return result

    async def _change(self, job_uuid, decide, known=None):
        """Apply decide(job) -> new job (or None: leave it) as one guarded
        transaction, re-reading and re-deciding if the record moved first.
        known: a (job, revision) already read. Returns the job as it stands."""
        cached = self.written.pop(job_uuid, None)
        known = known or cached
        for _ in range(MAX_CHANGE_ATTEMPTS):
            current = known or await self._store(self.store.get, job_uuid)
            known = None
            if current is None:
                return None
            job, revision = current
            new = decide(job)
            if new is None:
                return job
            if await self._write(job, new, revision):
                return new
        raise Conflict(f"job {job_uuid} kept changing; try again")

    async def _write(self, job, new, revision, *prime):
        """One guarded write (store.update); remembers what it wrote while the job is live here."""
        written = await self._store(self.store.update, job, new, revision, *prime)
        me = self.config.node_name
        if written and not new.terminal and new.node == me:
            self.written[new.uuid] = (new, written)
        ended = job.terminal or job.state == core.WARNED and job.warned_from in core.TERMINAL
        if written and job.node == me and not ended:  # how an attempt of ours ended (once)
            if new.terminal:
                self.counters.end(new.state)
            elif new.state == core.QUEUED:  # lost here (fenced, its unit vanished): requeued
                self.counters.end(core.LOST)
            if (new.state == core.QUEUED or new.reason == core.NODE_LOST) and self._was_fenced(new.uuid):
                self.counters.fenced_jobs += 1  # lost because a fence killed its unit
        return written

    def wake(self):
        self._wake.set()

    def unit_changed(self, job_uuid):
        """Called by units for every change of a job's unit."""
        self.changed.add(job_uuid)
        self.wake()

    # -- the API's verbs -------------------------------------------------------

    async def ping(self):
        await self._store(self.store.ping)
        await self._store(self.store.check_space)  # NOSPACE: reads work, writes do not

    async def submit(self, command, caller, request=None, count=None, idempotency_key=None):
        """Queue command; request: what the job asks for (core.job_spec's
        fields, and user: whom to run as). count: queue that many copies, all
        or none, and return them as a list (a batch). idempotency_key: the
        client's key for this request; a repeated key queues nothing and
        returns the jobs the first one queued."""
        request = request or {}
        spec = core.job_spec(request, self.config)
        uid, gid, user = caller.uid, caller.gid, caller.user
        name = core.run_as(caller.uid, caller.user, request.get("user"))
        if name is not None:
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise core.InvalidInput(f"no such user '{name}' on this node") from None
            uid, gid, user = entry.pw_uid, entry.pw_gid, entry.pw_name
        copies = 1 if count is None else core.validate_count(count, core.validate_command(command))
        self._check_enforceable(spec)
        await self._check_quota(caller, uid, copies)
        now = self.clock()
        jobs = [core.new_job(command, uid, gid, user, now, submitter=caller.user,
                             submitter_uid=caller.uid, **spec) for _ in range(copies)]
        if self.signing_key is not None:
            jobs = [core.sign(job, self.signing_key) for job in jobs]
        if idempotency_key is None:
            existing = await self._store(self.store.submit_many, jobs)
        else:
            existing = await self._store(functools.partial(
                self.store.submit_many, jobs, idempotency_key=idempotency_key))
        if existing is not None:  # this key queued these before: answer with them
            jobs = [await self.find(u) for u in existing]
        else:
            self.counters.submitted += len(jobs)
        self.wake()
        return jobs[0] if count is None else jobs

    def _check_enforceable(self, spec):
        """A limit this node cannot enforce would silently not hold: refuse it."""
        for name, (controller, option) in LIMIT_CONTROLLERS.items():
            if spec.get(name) is not None and controller not in self.enforceable:
                raise core.InvalidInput(f"this node cannot enforce {option} "
                                        f"(no writable {controller} cgroup controller)")

    def _can_enforce(self, job):
        return all(getattr(job, name) is None or controller in self.enforceable
                   for name, (controller, _) in LIMIT_CONTROLLERS.items())

    async def _check_quota(self, caller, uid, copies):
        """At most max_queued_per_user queued jobs per user (so one user
        cannot fill etcd), counted by whom they run as (store.queued_count's
        index; a user's jobs always run as that user). Root is trusted."""
        limit = self.config.max_queued_per_user
        if caller.uid == 0 or not limit:
            return
        queued = await self._store(self.store.queued_count, uid)
        if queued + copies > limit:
            raise core.QuotaExceeded(f"{caller.user} has {queued} job(s) queued; at most {limit} "
                                     "per user (max_queued_per_user)")

    async def find(self, ref):
        ref = core.validate_ref(ref)
        job_uuid = ref if core.is_full_uuid(ref) else await self._store(self.store.resolve, ref)
        found = await self._store(self.store.get, job_uuid)
        if found is None:
            raise LookupError(f"no job matches '{ref}'")
        return found[0]

    def unit_properties(self, job):
        """The systemd properties this node gives the job's unit."""
        return core.unit_properties(job, self.config.stop_timeout, self.config.rootfs,
                                    self.config.namespace, self.config.job_tmp_size)

    async def list(self, limit=50, **filters):
        """Jobs matching filters (core.select's), live ones first."""
        jobs = [job for job, _ in await self._store(self.store.all_jobs)]
        return core.select(jobs, limit=limit, **filters)

    @staticmethod
    def _check_owner(job, caller):
        """Only who queued the job, or root, may remove it or read its output."""
        if caller.uid != 0 and caller.uid != job.owner_uid:
            owner = job.submitter or job.user
            raise PermissionDenied(f"permission denied: job {job.uuid} belongs to {owner}")

    async def remove(self, ref, caller):
        job = await self.find(ref)
        self._check_owner(job, caller)
        if self._ours(job):
            # Its unit is ours to stop: ask systemd first, so that with the bus
            # down (units.Unavailable, DBusError: the API's 503) nothing is written.
            await self.units.status(job.uuid)
        reason = f"removed by {caller.user}"

        def cancel(current):
            if current.terminal or current.state == core.WARNED:
                return None  # already over, or being stopped: removing it again changes nothing
            return core.transition(current, core.CANCELLED, ended_at=self.clock(), reason=reason)
        job = await self._change(job.uuid, cancel)
        # On another node its sweep sees the cancelled record within poll_interval
        # and stops the unit (core.reconcile: RELEASE_UNIT).
        if job is not None and job.state == core.CANCELLED and job.node == self.config.node_name:
            # Give systemd the grace period to SIGTERM and then SIGKILL it.
            grace = self.config.stop_timeout + core.KILL_GRACE
            try:
                stopped = await self.units.stop_and_wait(job.uuid, grace)
            except (UnitsUnavailable, DBusError) as e:
                # The bus went away between the check and the stop: the record
                # stays cancelled and says so; the sweep after reconnecting
                # stops the unit (core.reconcile: RELEASE_UNIT).
                log.warning("job %s cancelled, but its unit could not be stopped yet: %s", job.uuid, e)
                why = f"{reason}; its unit is stopped once systemd answers (it did not: {e})"
                why = " ".join(why.split())
                return await self._change(job.uuid, lambda j: replace(j, reason=why)
                                          if j.state == core.CANCELLED and j.reason == reason
                                          else None) or job
            if stopped:
                self.mine.discard(job.uuid)
                self.wake()
            else:  # it keeps its slot; the sweep watches it and clears it once it stops
                why = f"still has processes {grace:g} s after removejob (SIGTERM, then SIGKILL)"
                log.warning("job %s warned: %s", job.uuid, why)
                job = await self._change(job.uuid, lambda j: core.warn(j, self.clock(), why)
                                         if j.state == core.CANCELLED else None)
        return job

    # -- a job's output ----------------------------------------------------------

    async def output(self, job, caller, follow=False, tail=None, since=None):
        """The job's output in bounded chunks (an async generator): from this
        node's journal, or fetched from the node that ran it. follow: go on
        until the job has ended (a queued job is waited for). Elsewhere if its
        node cannot be asked."""
        self._check_owner(job, caller)
        while follow and job.node is None and not job.terminal:
            await asyncio.sleep(self.config.poll_interval / 4)  # queued: wait for a node
            job = await self._current(job)
        if job.node is None:
            return  # never ran: no output
        if job.node != self.config.node_name:
            live, members, _, _ = await self._store(self.store.cluster)
            address = (live.get(job.node) or members.get(job.node) or {}).get("address")
            chunks = self.peers.logs(job.node, address, job.uuid, follow=1 if follow else None,
                                     tail=tail, since=since)
            try:
                async for chunk in chunks:
                    yield chunk
            except PeerUnreachable as e:
                raise Elsewhere(str(e)) from None
            finally:
                await chunks.aclose()
            return
        loop = asyncio.get_running_loop()
        async with self.job_log(job.unit, tail, since) as output:
            quiet_since = None
            while True:
                chunk = await output.read()
                if chunk:
                    quiet_since = None
                    yield chunk
                    continue
                if follow and not job.terminal:
                    job = await self._current(job)
                if not job.terminal:
                    if not follow:
                        return  # what is there now, like journalctl without -f
                elif self.clock() - (job.ended_at or 0) > LATE_OUTPUT:
                    return
                elif quiet_since is None:
                    quiet_since = loop.time()
                elif loop.time() - quiet_since >= QUIET:
                    return
                await output.wait(QUIET / 4 if job.terminal else 1.0)

    async def _current(self, job):
        """The job's record now, to follow it: while etcd is away, as it was;
        a record deleted meanwhile (retention) counts as ended."""
        try:
            found = await self._store(self.store.get, job.uuid)
        except StoreUnavailable:
            return job
        return found[0] if found else replace(job, state=core.CANCELLED)

    # -- history -------------------------------------------------------------------

    def prune_every(self):
        return max(self.config.poll_interval, min(self.config.retention / 10, MAX_PRUNE_EVERY))

    async def prune(self):
        """Delete finished records past the retention or the count cap, if no
        other node has done so this interval (a lock under a lease as long as
        the interval, left to run out). Returns how many were deleted."""
        if not await self._store(self.store.lock, "prune", self.config.node_name,
                                 self.prune_every()):
            return 0
        await self._store(self.store.compact)  # etcd's history of revisions nobody reads (C7)
        records = await self._store(self.store.all_jobs)
        doomed = set(core.expired([job for job, _ in records], self.clock(),
                                  self.config.retention, self.config.max_finished_jobs))
        if not doomed:
            return 0
        deleted = await self._store(self.store.delete,
                                    [(job.uuid, rev) for job, rev in records if job.uuid in doomed])
        log.info("history: deleted %d finished job record(s)", deleted)
        return deleted

    # -- the node's own work ---------------------------------------------------

    async def run(self, stopping):
        """Schedule until stopping is set: on every wake-up record what units
        told us, fill free slots; every poll_interval also sweep."""
        next_sweep, last_problem = 0.0, None
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            self.progress["schedule"] = loop.time()
            try:
                if not self.units.connected:
                    await self.units.connect()
                    next_sweep = 0.0  # what happened while we were away?
                if loop.time() >= next_sweep:
                    # An idle node writes nothing: ask about etcd's space, so
                    # STATUS= says NOSPACE (etcd_error) before a write fails on it.
                    await self._store(self.store.check_space)
                    await self.sweep()
                    await self.watch_cluster()
                    # Once a sweep, not per job: the registration's counts are
                    # for people (lclusterc nodes), and each rewrite is an etcd write.
                    await self.publish()
                    next_sweep = loop.time() + self.config.poll_interval
                await self.record_changed()
                await self.fill_slots()
                if loop.time() >= self.next_prune:
                    self.next_prune = loop.time() + self.prune_every()
                    await self.prune()
            except (StoreUnavailable, UnitsUnavailable, OSError, etcd_store.LeaseExpired) as e:
                # (LeaseExpired: the heartbeat's next renewal hears it too, and fences.)
                if str(e) != last_problem:  # say it once, not every pass
                    log.warning("%s", e)
                last_problem = str(e)
            except Exception:
                log.exception("scheduling pass failed; retrying")
            else:
                last_problem = None
            room = core.free_slots(self.config.slots, len(self.mine)) > 0
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       CLAIM_POLL if room else self.config.poll_interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def sweep(self):
        """Bring etcd and systemd into agreement for this node."""
        units = await self.units.list()
        if not self._recovered:
            # After a (re)start we know nothing: find our live jobs in etcd.
            records = {job.uuid: (job, rev) for job, rev in await self._store(self.store.all_jobs)
                       if job.node == self.config.node_name and not job.terminal}
        else:
            records = {}
        gone = set()  # units whose record is not there any more
        for job_uuid in (self.mine | set(units)) - set(records):
            found = await self._store(self.store.get, job_uuid)
            if found is not None:
                records[job_uuid] = found
            else:
                gone.add(job_uuid)
        self._recovered = True
        jobs = {u: job for u, (job, _) in records.items()}
        settled = set()
        plan = core.reconcile(jobs, units, self.in_flight, self.config.node_name, self.clock(),
                              self.config.stop_timeout, gone)
        for action, job_uuid in plan:
            log.info("reconcile: %s %s", action, job_uuid)
            if action == core.RELEASE_ORPHAN:
                log.warning("job %s: its record is gone from etcd; stopping its unit %s",
                            job_uuid, core.unit_name(job_uuid))
                await self.units.release(job_uuid)
                self._forget_fenced(job_uuid)
            else:
                await self._apply(action, records[job_uuid], units.get(job_uuid))
            # A job holds its slot until its unit is gone: running, stopping or warned.
            if action == core.RECORD_RUNNING or action == core.WARN or (
                    action in (core.RELEASE_UNIT, core.RELEASE_ORPHAN)
                    and not units[job_uuid].finished):
                continue
            settled.add(job_uuid)
        # A record gone (and nothing loaded) holds no slot either.
        settled |= gone - set(units)
        self.mine = core.slot_holders(jobs, units, settled, self.config.node_name) | self.in_flight
        self._sweep_fence_markers(units)

    async def _apply(self, action, known, status):
        job_uuid = known[0].uuid
        if action == core.RECORD_END:
            await self._record_end(job_uuid, status, known)
        elif action == core.RELEASE_UNIT:
            await self.units.release(job_uuid)
        elif action == core.RECORD_RUNNING:
            await self._change(job_uuid, lambda j: core.transition(
                j, core.RUNNING, started_at=status.started_at or self.clock())
                if self._ours(j, core.STARTING) else None, known)
        elif action == core.REQUEUE:
            await self._change(job_uuid, lambda j: core.transition(
                j, core.QUEUED, node=None) if self._ours(j, core.STARTING) else None, known)
        elif action == core.WARN:
            why = (f"its unit has been stopping for {self.clock() - status.stopped_at:.0f} s "
                   f"and still has {status.processes} process(es)")
            log.warning("job %s warned: %s", job_uuid, why)
            await self._change(job_uuid, lambda j: core.warn(j, self.clock(), why)
                               if j.node == self.config.node_name and j.state in core.WARNABLE else None, known)
        elif action == core.CLEAR:
            job = await self._change(job_uuid, lambda j: core.clear(j, status, self.clock())
                                     if j.state == core.WARNED else None, known)
            log.info("job %s no longer warned: %s", job_uuid, job and job.state)
            await self.units.release(job_uuid)
        elif action == core.RECORD_VANISHED:
            # Its unit is gone (the machine rebooted, or we were fenced): it
            # did not end, its node lost it.
            await self._change(job_uuid, self._lose_mine, known)
            self._forget_fenced(job_uuid)

    # -- fence markers (contract C1): a unit killed by a fence ended no job --

    def _marker(self, job_uuid):
        return os.path.join(self.run_dir, FENCED_DIR, job_uuid)

    def _was_fenced(self, job_uuid):
        return job_uuid in self.fenced or os.path.exists(self._marker(job_uuid))

    def _mark_fenced(self, job_uuid):
        self.fenced.add(job_uuid)
        try:  # so that a restart of ours still knows (lclusterd-fence writes these too)
            os.makedirs(os.path.join(self.run_dir, FENCED_DIR), mode=0o755, exist_ok=True)
            open(self._marker(job_uuid), "w").close()
        except OSError as e:
            log.warning("cannot write the fence marker of job %s: %s", job_uuid, e)

    def _forget_fenced(self, job_uuid):
        """Once its record says what happened, the marker is done with."""
        self.fenced.discard(job_uuid)
        try:
            os.unlink(self._marker(job_uuid))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove the fence marker of job %s: %s", job_uuid, e)

    def _sweep_fence_markers(self, units):
        """Markers of units that are gone and of jobs no longer ours: nothing left to record."""
        try:
            names = os.listdir(os.path.join(self.run_dir, FENCED_DIR))
        except OSError:
            return
        for job_uuid in names:
            if job_uuid not in units and job_uuid not in self.mine and job_uuid not in self.in_flight:
                self._forget_fenced(job_uuid)

    def _ours(self, job, *states):
        """Is the record a live job of this node (in one of states, if given)?
        Once our lease expired, other nodes may have requeued or taken it."""
        return job.node == self.config.node_name and not job.terminal and job.state in (
            states or (core.STARTING, core.RUNNING))

    def _lose_mine(self, job):
        if self._ours(job):
            return core.lose(job, job.node, self.clock())
        return None

    async def _record_end(self, job_uuid, status, known=None):
        if self._was_fenced(job_uuid):  # a fence killed it: it did not end, it was lost
            decide = self._lose_mine
        else:
            decide = lambda j: (core.settle(j, status, self.clock())  # noqa: E731
                                if self._ours(j, core.STARTING, core.RUNNING, core.WARNED) else None)
        job = await self._change(job_uuid, decide, known)
        self._forget_fenced(job_uuid)
        self.mine.discard(job_uuid)
        if job is None:
            return  # no record of ours (another daemon's prefix): not ours to release
        await self.units.release(job_uuid, status)
        log.info("job %s %s: %s", job_uuid, job.state, job.reason)

    async def record_changed(self):
        """Record the outcome of units that systemd said changed, all at once
        (one by one, recording ends held the node under load: make bench)."""
        ready = self.changed - self.in_flight  # the others: once their start is recorded
        self.changed -= ready
        results = await asyncio.gather(*(self._record_if_ended(u) for u in ready),
                                       return_exceptions=True)
        for error in results:
            if isinstance(error, BaseException):
                raise error

    async def _record_if_ended(self, job_uuid):
        status = await self.units.status(job_uuid)
        if status is not None and status.finished:
            try:
                await self._record_end(job_uuid, status)
            except StoreUnavailable:
                self.changed.add(job_uuid)  # the unit keeps its result: retry later
                raise

    async def fill_slots(self):
        """Claim from the queue's head while we hold the prime and have room;
        give the prime up when full (core.PRIME_POLICY)."""
        if self.lease is None:
            self.primed = False  # not registered (etcd unreachable, or fenced): claim nothing
            return
        free = core.free_slots(self.config.slots, len(self.mine))
        action = core.prime_action(self.primed, free)
        if action == "keep" and self._prime_lease != self.lease:
            action = "campaign"  # taken under a lease gone since: make sure we hold it
        if action == "campaign":
            if asyncio.get_running_loop().time() < self._yield_until:
                return  # we left the queue's head to a node that can enforce its limits
            if self._prime_taken:
                return  # another node holds it: watch_cluster says when it is free
            self.primed = await self._store(self.store.campaign, self.config.node_name, self.lease)
            self._prime_lease = self.lease if self.primed else None
            self._prime_taken = not self.primed
        elif action == "resign":
            await self._store(self.store.resign, self.config.node_name)
            self.primed, self._prime_lease = False, None
        if not self.primed:
            return
        queued = await self._store(self.store.queued, free + LOOK_PAST)
        heads = [(job, rev) for job, rev in queued if self._can_enforce(job)][:free]
        results = await asyncio.gather(*(self._claim_and_start(job, rev) for job, rev in heads),
                                       return_exceptions=True)  # let every start finish
        if queued and not self._can_enforce(queued[0][0]):
            log.info("job %s asks for a limit this node cannot enforce: leaving it to another node",
                     queued[0][0].uuid)
            await self._store(self.store.resign, self.config.node_name)
            self.primed, self._prime_lease = False, None
            # (Long enough for every other node's sweep to see the prime free.)
            self._yield_until = asyncio.get_running_loop().time() + max(
                YIELD_PRIME, self.config.poll_interval + CLAIM_POLL)
        if not core.free_slots(self.config.slots, len(self.mine)):
            self.wake()  # full now: resign on the next pass
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def _claim_and_start(self, job, revision):
        node = self.config.node_name
        claimed = await self._write(job, core.transition(job, core.STARTING, now=self.clock(), node=node),
                                    revision, node)
        if not claimed:
            return  # cancelled or taken meanwhile
        self.mine.add(job.uuid)
        self.in_flight.add(job.uuid)
        try:
            try:
                if self.signing_key is not None and not core.verify(job, self.signing_key):
                    raise _NotStarted(core.UNSIGNED)
                if job.network and job.network.startswith("ns:"):
                    try:
                        await asyncio.to_thread(netns.ensure, job.network[3:])
                    except OSError as e:
                        raise _NotStarted(f"cannot make network namespace {job.network[3:]}: {e}")
                await self.units.start(job, self.unit_properties(job))
                self.counters.started += 1
                self.counters.dispatched(self.clock() - job.submitted_at)
            except UnitsUnavailable:
                # Losing the bus is not the job's fault: it stays starting, and
                # the sweep after reconnecting finds its unit, or requeues it.
                raise
            except Exception as e:  # noqa: BLE001  whatever it is, this attempt is over
                # (A requeue would claim it again and fail again, forever.)
                if isinstance(e, _NotStarted):
                    reason = str(e)
                elif isinstance(e, Refused):
                    reason = f"systemd refused to start it: {e}"
                else:
                    reason = f"its unit could not be started: {type(e).__name__}: {e}"
                reason = " ".join(reason.split())  # one line
                log.warning("job %s: start failed: %s", job.uuid, reason)
                self.mine.discard(job.uuid)
                await self._change(job.uuid, lambda j: core.transition(
                    j, core.FAILED, ended_at=self.clock(), reason=reason)
                    if self._ours(j, core.STARTING) else None)
                return
            await self._change(job.uuid, lambda j: core.transition(
                j, core.RUNNING, started_at=self.clock()) if self._ours(j, core.STARTING) else None)
        finally:
            self.in_flight.discard(job.uuid)
            if job.uuid in self.changed:
                self.wake()

    # -- the cluster: registration, lease, fencing, failed nodes ---------------

    def registration(self):
        free = core.free_slots(self.config.slots, len(self.mine))
        return {"name": self.config.node_name, "address": self.config.address,
                "slots": self.config.slots, "free": free, "running": len(self.mine),
                "machine": self.machine,  # tells a restart of ours from a namesake (C2)
                "enforces": sorted(self.enforceable)}

    async def publish(self):
        """Keep our registration's free slots and running jobs current."""
        info = self.registration()
        if self.lease is not None and info != self._published:
            await self._store(self.store.update_registration, info, self.lease)
            self._published = info

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
        beat = functools.partial(self._store, executor=self._beat)

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
                        self._recovered = False  # look at our records afresh
                        log.info("registered as node %s (lease %x, TTL %g s)",
                                 self.config.node_name, lease, ttl)
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
                    self.etcd_error = None
                    return True
                else:
                    expired = True  # the leader says so; another member may still say otherwise
        if expired:
            return False
        if isinstance(error, StoreUnavailable) and not pending:
            self.etcd_error = str(error)
        raise error if error is not None and not pending else asyncio.TimeoutError()

    async def _look_for_others(self, beat, wait):
        """Is another node live? (FENCE_FILE's others_live, from the start.)"""
        try:
            live, *_ = await asyncio.wait_for(beat(self.store.cluster), wait)
        except (StoreUnavailable, asyncio.TimeoutError):
            return  # the last answer stands until the next sweep looks
        self._others_live = bool(set(live) - {self.config.node_name})

    def _write_fence_file(self, deadline):
        """FENCE_FILE, replaced atomically (contract C1)."""
        path = os.path.join(self.run_dir, FENCE_FILE)
        info = {"node": self.config.node_name, "deadline": deadline,
                "others_live": self._others_live, "pid": os.getpid()}
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
        if not self._others_live:
            log.warning("%s; no other node is live to take our jobs over: keeping them", why)
            return
        log.warning("fencing: %s; stopping this node's jobs", why)
        self.counters.fenced += 1
        try:
            # A unit that has finished keeps its real result (recorded if the
            # record is still ours): only what still runs is killed and lost.
            units = [u for u, status in (await self.units.list()).items() if not status.finished]
            for job_uuid in units:
                self._mark_fenced(job_uuid)
            for job_uuid in units:
                await self.units.kill(job_uuid)
            for job_uuid in units:
                await self.units.stop_and_wait(job_uuid, FENCE_STOP_WAIT)
        except (UnitsUnavailable, OSError) as e:
            log.warning("fencing: %s", e)

    async def watch_cluster(self):
        """Record members whose lease expired as failed, and lose (requeue or
        fail) the jobs they were running, once REQUEUE_GUARD × TTL has passed
        since we first saw the lease gone (the fencing margin). Every
        registered node does this; the guarded transactions make doing it
        twice harmless."""
        if self.lease is None:
            return  # we may be the one cut off: judge nobody
        live, members, failed, prime = await self._store(self.store.cluster)
        self._others_live = bool(set(live) - {self.config.node_name})
        if self.primed and prime != self.config.node_name:
            self.primed, self._prime_lease = False, None  # deleted meanwhile (etcdctl del): campaign again
        self._prime_taken = prime is not None and prime != self.config.node_name
        now = self.clock()
        for name in core.failed_nodes(members, live, failed):
            if await self._store(self.store.record_failed, name, now):
                log.warning("node %s failed: its lease expired", name)
        missing = set(members) - set(live)
        seen = asyncio.get_running_loop().time()
        self._missing_since = {n: self._missing_since.get(n, seen) for n in missing}
        due = {n for n in missing
               if seen - self._missing_since[n] >= REQUEUE_GUARD * self.config.lease_ttl}
        self._judged &= due  # a node back with a new lease may fail again
        if not due - self._judged:
            return  # a dead node claims nothing: one look for its jobs is enough
        judged_live = set(live) | (missing - due)  # not yet past the guard: theirs still
        jobs = [job for job, _ in await self._store(self.store.all_jobs)]
        for job_uuid in core.lost_jobs(jobs, judged_live):
            job = await self._change(job_uuid, lambda j: core.lose(j, j.node, self.clock())
                                     if j.uuid in core.lost_jobs([j], judged_live) else None)
            if job is not None:
                log.warning("job %s lost with its node: %s", job_uuid, job.state)
        self._judged |= due

    async def nodes(self):
        await self._store(self.store.check_space)  # lclusterc nodes says NOSPACE (507)
        live, members, failed, prime = await self._store(self.store.cluster)
        warned = await self._store(self.store.warned)
        return core.with_warned(core.node_rows(members, live, failed, prime), warned)
