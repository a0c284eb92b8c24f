"""The node: applies the core's rules to etcd (store) and systemd (units).

It owns what this machine runs: it claims jobs from the queue while it has
free slots, starts their units, records how they end, and on every sweep
brings etcd and systemd back into agreement (core.reconcile), which is also
how it recovers after a restart, a missed signal or an etcd outage.
"""

import asyncio
import logging
import pwd
import time
from dataclasses import dataclass

from lclusterd import core, netns
from lclusterd.store import Unavailable as StoreUnavailable
from lclusterd.units import Refused, Unavailable as UnitsUnavailable

log = logging.getLogger(__name__)

MAX_CHANGE_ATTEMPTS = 5  # re-reads of a record whose revision moved under us


class Conflict(Exception):
    """A record kept changing under us; the caller may retry."""


class PermissionDenied(core.Forbidden):
    pass


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    user: str


class Node:
    def __init__(self, config, store, units, clock=time.time):
        self.config = config
        self.store = store
        self.units = units
        self.clock = clock
        self.mine = set()  # uuids of live jobs on this node: they hold slots
        self.in_flight = set()  # uuids whose unit this process is starting now
        self.changed = set()  # uuids whose unit systemd told us about
        self.etcd_error = None  # why etcd is unreachable, or None
        self._wake = asyncio.Event()
        self._recovered = False

    # -- helpers --------------------------------------------------------------

    async def _store(self, method, *args):
        try:
            result = await asyncio.to_thread(method, *args)
        except StoreUnavailable as e:
            self.etcd_error = str(e)
            raise
        self.etcd_error = None
        return result

    async def _change(self, job_uuid, decide, known=None):
        """Apply decide(job) -> new job (or None: leave it) as one guarded
        transaction, re-reading and re-deciding if the record moved first.
        known: a (job, revision) already read. Returns the job as it stands."""
        for _ in range(MAX_CHANGE_ATTEMPTS):
            current = known or await self._store(self.store.get, job_uuid)
            known = None
            if current is None:
                return None
            job, revision = current
            new = decide(job)
            if new is None:
                return job
            if await self._store(self.store.update, job, new, revision):
                return new
        raise Conflict(f"job {job_uuid} kept changing; try again")

    def wake(self):
        self._wake.set()

    def unit_changed(self, job_uuid):
        """Called by units for every change of a job's unit."""
        self.changed.add(job_uuid)
        self.wake()

    # -- the API's verbs -------------------------------------------------------

    async def ping(self):
        await self._store(self.store.ping)

    async def submit(self, command, caller, request=None):
        """Queue command; request: what the job asks for (core.job_spec's
        fields, and user: whom to run as)."""
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
        job = core.new_job(command, uid, gid, user, self.clock(), submitter=caller.user,
                           submitter_uid=caller.uid, **spec)
        await self._store(self.store.submit, job)
        self.wake()
        return job

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
                                    self.config.namespace)

    async def list(self, limit=50, state=None):
        jobs = [job for job, _ in await self._store(self.store.all_jobs)
                if state is None or job.state == state]
        jobs.sort(key=lambda j: j.submitted_at, reverse=True)
        return jobs[:limit]

    async def remove(self, ref, caller):
        job = await self.find(ref)
        if caller.uid != 0 and caller.uid != job.owner_uid:
            owner = job.submitter or job.user
            raise PermissionDenied(f"permission denied: job {job.uuid} belongs to {owner}")

        def cancel(current):
            if current.terminal:
                return None  # already over: removing it again changes nothing
            return core.transition(current, core.CANCELLED, ended_at=self.clock(),
                                   reason=f"removed by {caller.user}")
        job = await self._change(job.uuid, cancel)
        if job.node == self.config.node_name:
            # Give systemd the grace period to SIGTERM and then SIGKILL it.
            await self.units.stop_and_wait(job.uuid, self.config.stop_timeout + 5)
            self.mine.discard(job.uuid)
            self.wake()
        return job

    # -- the node's own work ---------------------------------------------------

    async def run(self, stopping):
        """Schedule until stopping is set: on every wake-up record what units
        told us, fill free slots; every poll_interval also sweep."""
        next_sweep, last_problem = 0.0, None
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            try:
                if not self.units.connected:
                    await self.units.connect()
                    next_sweep = 0.0  # what happened while we were away?
                if loop.time() >= next_sweep:
                    await self.sweep()
                    next_sweep = loop.time() + self.config.poll_interval
                await self.record_changed()
                await self.fill_slots()
            except (StoreUnavailable, UnitsUnavailable, OSError) as e:
                if str(e) != last_problem:  # say it once, not every pass
                    log.warning("%s", e)
                last_problem = str(e)
            except Exception:
                log.exception("scheduling pass failed; retrying")
            else:
                last_problem = None
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
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
        for job_uuid in (self.mine | set(units)) - set(records):
            found = await self._store(self.store.get, job_uuid)
            if found is not None:
                records[job_uuid] = found
        self._recovered = True
        jobs = {u: job for u, (job, _) in records.items()}
        settled = set()
        for action, job_uuid in core.reconcile(jobs, units, self.in_flight):
            log.info("reconcile: %s %s", action, job_uuid)
            await self._apply(action, records[job_uuid], units.get(job_uuid))
            if action != core.RECORD_RUNNING:
                settled.add(job_uuid)
        live = {u for u, job in jobs.items() if not job.terminal}
        self.mine = ((live | set(units)) - settled) | self.in_flight

    async def _apply(self, action, known, status):
        job_uuid = known[0].uuid
        if action == core.RECORD_END:
            await self._record_end(job_uuid, status, known)
        elif action == core.RELEASE_UNIT:
            await self.units.release(job_uuid)
        elif action == core.RECORD_RUNNING:
            await self._change(job_uuid, lambda j: core.transition(
                j, core.RUNNING, started_at=status.started_at or self.clock())
                if j.state == core.STARTING else None, known)
        elif action == core.REQUEUE:
            await self._change(job_uuid, lambda j: core.transition(
                j, core.QUEUED, node=None) if j.state == core.STARTING else None, known)
        elif action == core.RECORD_VANISHED:
            await self._change(job_uuid, lambda j: core.transition(
                j, core.FAILED, ended_at=self.clock(),
                reason="its unit vanished while lclusterd was not watching (machine rebooted?)")
                if j.state == core.RUNNING else None, known)

    async def _record_end(self, job_uuid, status, known=None):
        job = await self._change(job_uuid, lambda j: None if j.terminal
                                 else core.finish(j, status, self.clock()), known)
        self.mine.discard(job_uuid)
        if job is None:
            return  # no record of ours (another daemon's prefix): not ours to release
        await self.units.release(job_uuid)
        log.info("job %s %s: %s", job_uuid, job.state, job.reason)

    async def record_changed(self):
        """Record the outcome of units that systemd said changed."""
        while self.changed:
            job_uuid = self.changed.pop()
            if job_uuid in self.in_flight:
                self.changed.add(job_uuid)  # look again once its start is recorded
                return
            status = await self.units.status(job_uuid)
            if status is not None and status.finished:
                try:
                    await self._record_end(job_uuid, status)
                except StoreUnavailable:
                    self.changed.add(job_uuid)  # the unit keeps its result: retry later
                    raise

    async def fill_slots(self):
        free = core.free_slots(self.config.slots, len(self.mine))
        if not free:
            return
        heads = await self._store(self.store.queued, free)
        results = await asyncio.gather(*(self._claim_and_start(job, rev) for job, rev in heads),
                                       return_exceptions=True)  # let every start finish
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def _claim_and_start(self, job, revision):
        node = self.config.node_name
        claimed = await self._store(self.store.update, job,
                                    core.transition(job, core.STARTING, node=node), revision)
        if not claimed:
            return  # cancelled or taken meanwhile
        self.mine.add(job.uuid)
        self.in_flight.add(job.uuid)
        try:
            try:
                if job.network and job.network.startswith("ns:"):
                    try:
                        await asyncio.to_thread(netns.ensure, job.network[3:])
                    except OSError as e:
                        raise Refused(f"cannot make network namespace {job.network[3:]}: {e}")
                await self.units.start(job, self.unit_properties(job))
            except Refused as e:  # the job cannot run here
                # (Losing the bus instead leaves it starting: the sweep after
                # reconnecting finds its unit, or requeues it.)
                log.warning("job %s: start failed: %s", job.uuid, e)
                self.mine.discard(job.uuid)
                await self._change(job.uuid, lambda j: core.transition(
                    j, core.FAILED, ended_at=self.clock(), reason=f"systemd refused to start it: {e}")
                    if j.state == core.STARTING else None)
                return
            await self._change(job.uuid, lambda j: core.transition(
                j, core.RUNNING, started_at=self.clock()) if j.state == core.STARTING else None)
        finally:
            self.in_flight.discard(job.uuid)
            if job.uuid in self.changed:
                self.wake()
