"""This node's jobs: it starts the units of jobs assigned to it, records
them running and how they end, and on every sweep brings etcd and systemd
back into agreement (core.reconcile), which is also how it recovers after
a restart, a missed signal or an etcd outage.
"""

import asyncio
import dataclasses
import logging
import os

from lclusterd import core, netns
from lclusterd.store import Unavailable as StoreUnavailable
from lclusterd.units import Refused, Unavailable as UnitsUnavailable

log = logging.getLogger("lclusterd.node")

RUN_DIR = "/run/lclusterd"  # FENCE_FILE and FENCED_DIR live here (contract C1)
FENCED_DIR = "fenced"  # <uuid>: an empty file per unit killed by a fence; its job is lost
# A unit systemd said changed, read as not finished and not running (its
# state read before its exit code, processes still leaving, deactivating):
# read again after this, doubling up to poll_interval, rather than leave
# its slot held until the next sweep (a 1 s job held its slot ~2.3 s).
RECHECK_FIRST = 0.02
# A job whose unit started is recorded running this long after, or with the
# node's next write if that comes first: a job that ends by then is written
# once (starting -> its end), and the starts of many jobs share one
# transaction with each other and with ends (issue 13: one etcd revision a
# job fewer; users see "running" up to this much later).
RECORD_RUNNING_AFTER = 0.25


class _NotStarted(Exception):
    """A job this node will not start; the message is the record's reason."""


class FenceMarkers:
    """Contract C1: a unit killed by a fence ended no job; its job was lost.
    Kept in memory and as files, so that a restart of ours (and
    lclusterd-fence, which writes them too) still knows."""

    def __init__(self, run_dir=RUN_DIR):
        self.run_dir = run_dir
        self.fenced = set()  # uuids of units we killed when fenced

    def _path(self, job_uuid):
        return os.path.join(self.run_dir, FENCED_DIR, job_uuid)

    def was_fenced(self, job_uuid):
        return job_uuid in self.fenced or os.path.exists(self._path(job_uuid))

    def mark(self, job_uuid):
        self.fenced.add(job_uuid)
        try:
            os.makedirs(os.path.join(self.run_dir, FENCED_DIR), mode=0o755, exist_ok=True)
            open(self._path(job_uuid), "w").close()
        except OSError as e:
            log.warning("cannot write the fence marker of job %s: %s", job_uuid, e)

    def forget(self, job_uuid):
        """Once its record says what happened, the marker is done with."""
        self.fenced.discard(job_uuid)
        try:
            os.unlink(self._path(job_uuid))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove the fence marker of job %s: %s", job_uuid, e)

    def sweep(self, keep):
        """Markers of units that are gone and of jobs no longer ours: nothing left to record."""
        try:
            names = os.listdir(os.path.join(self.run_dir, FENCED_DIR))
        except OSError:
            return
        for job_uuid in names:
            if job_uuid not in keep:
                self.forget(job_uuid)


class Runner:
    def __init__(self, config, applier, units, markers, clock, signing_key=None, wake=lambda: None,
                 registered=lambda: True):
        """registered(): do we hold our lease? Without it we start nothing: our
        assignments may be another node's by now."""
        self.config = config
        self.applier = applier
        self.store = applier.store
        self.units = units
        self.markers = markers
        self.clock = clock
        self.signing_key = signing_key  # core.signing_key(token), None: records unsigned (C3)
        self.wake = wake
        self.registered = registered
        self.mine = set()  # uuids of live jobs on this node: they hold slots
        self.in_flight = set()  # uuids whose unit this process is starting now
        self.changed = set()  # uuids whose unit systemd told us about
        self.assigned = set()  # uuids etcd said were assigned to us (the watch): to start
        self.ending = set()  # uuids whose end this node is writing now
        self.recheck = {}  # uuid -> seconds until the next re-read of its changing unit
        # uuid -> (job, revision, started_at, loop time) of jobs whose unit
        # started and whose record is not written running yet
        self.started = {}
        self.private_pids = False  # whether systemd has PrivatePIDs=: asked at start-up (daemon.py)

    @property
    def me(self):
        return self.config.node_name

    def unit_properties(self, job):
        """The systemd properties this node gives the job's unit."""
        return core.unit_properties(job, self.config.stop_timeout, self.config.rootfs,
                                    self.config.namespace, self.config.job_tmp_size,
                                    self.private_pids)

    def unit_changed(self, job_uuid):
        """Called by units for every change of a job's unit."""
        self.changed.add(job_uuid)
        self.wake()

    def ours(self, job, *states):
        """Is the record a live job of this node (in one of states, if given)?
        Once our lease expired, other nodes may have requeued or taken it."""
        return job.node == self.me and not job.terminal and job.state in (
            states or (core.STARTING, core.RUNNING))

    def lose_mine(self, job):
        if self.ours(job):
            return core.lose(job, job.node, self.clock())
        return None

    # -- starting ------------------------------------------------------------

    async def start_many(self, records):
        """Start the units of jobs assigned to us, [(job, revision)], all at
        once, and record how each went in as few transactions as etcd takes:
        failed for good now (a requeue would place it again and fail again,
        forever); running with the next write (RECORD_RUNNING_AFTER)."""
        records = [(job, rev) for job, rev in records if job.uuid not in self.in_flight]
        for job, _ in records:
            self.mine.add(job.uuid)
            self.in_flight.add(job.uuid)
        try:
            outcomes = await asyncio.gather(*(self._start_unit(job) for job, _ in records),
                                            return_exceptions=True)
            why, bus_lost = {}, None
            for (job, _), outcome in zip(records, outcomes):
                if isinstance(outcome, UnitsUnavailable):
                    # Losing the bus is not the job's fault: it stays starting, and
                    # the sweep after reconnecting finds its unit, or starts it.
                    self.mine.discard(job.uuid)
                    bus_lost = outcome
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    why[job.uuid] = outcome
                    if outcome is not None:
                        self.mine.discard(job.uuid)
            now, loop = self.clock(), asyncio.get_running_loop()
            started = [(job, rev) for job, rev in records if job.uuid in why and why[job.uuid] is None]
            for job, rev in started:
                self.started[job.uuid] = (job, rev, now, loop.time())
            if started:
                loop.call_later(RECORD_RUNNING_AFTER, self.wake)
            refused = {job.uuid: (job, rev) for job, rev in records if why.get(job.uuid) is not None}
            await self.applier.change_many(refused, lambda j: core.transition(
                j, core.FAILED, ended_at=now, reason=why[j.uuid])
                if self.ours(j, core.STARTING) else None)
            if bus_lost is not None:
                raise bus_lost
        finally:
            for job, _ in records:
                self.in_flight.discard(job.uuid)
            if any(job.uuid in self.changed for job, _ in records):
                self.wake()

    async def _start_unit(self, job):
        """Start job's unit: None once started, else why it will not run (one
        line). units.Unavailable is raised: the bus, not the job, failed."""
        try:
            if self.signing_key is not None and not core.verify(job, self.signing_key):
                raise _NotStarted(core.UNSIGNED)
            if job.network and job.network.startswith("ns:"):
                try:
                    await asyncio.to_thread(netns.ensure, job.network[3:])
                except OSError as e:
                    raise _NotStarted(f"cannot make network namespace {job.network[3:]}: {e}")
            await self.units.start(job, self.unit_properties(job))
        except UnitsUnavailable:
            raise
        except Exception as e:  # noqa: BLE001  whatever it is, this attempt is over
            if isinstance(e, _NotStarted):
                reason = str(e)
            elif isinstance(e, Refused):
                reason = f"systemd refused to start it: {e}"
            else:
                reason = f"its unit could not be started: {type(e).__name__}: {e}"
            reason = " ".join(reason.split())  # one line
            log.warning("job %s: start failed: %s", job.uuid, reason)
            return reason
        self.applier.counters.started += 1
        self.applier.counters.dispatched(self.clock() - job.submitted_at)
        return None

    def assignment_events(self, events):
        """store.watch("assigned", node=us): [(key suffix, deleted)], from its
        thread via the loop. A new assignment is started on the next pass; a
        removed one (the job ended or was cancelled) is looked at then too."""
        for suffix, deleted in events:
            job_uuid = suffix.rsplit("/", 1)[-1]
            if deleted:
                # (Not our own write of its end: that is a status read of a
                # released unit for nothing, 12 Gets, most jobs.)
                if job_uuid in self.mine and job_uuid not in self.ending:
                    self.changed.add(job_uuid)  # cancelled elsewhere? reconcile it now
            else:
                self.assigned.add(job_uuid)
        self.wake()

    async def start_assigned(self):
        """Start what the watch said was assigned to us, all at once."""
        self.assigned -= self.mine | self.in_flight  # started already (the sweep): not read again
        todo = set(self.assigned)
        if not todo or not self.registered():
            return  # (kept for when we are registered again)
        self.assigned.clear()
        # What this node's own placer assigned (the primed node's jobs) is
        # known as it wrote it: no read. A record that moved since fails the
        # guarded write that follows, and is read then.
        found = {u: self.applier.written[u] for u in todo if u in self.applier.written
                 and self.applier.written[u][0].state == core.STARTING}
        if todo - set(found):
            found.update(await self.applier.call(self.store.get_many, sorted(todo - set(found))))
        await self.start_many([(job, rev) for job, rev in found.values()
                               if self.ours(job, core.STARTING)])

    # -- the sweep -------------------------------------------------------------

    async def sweep(self):
        """Bring etcd and systemd into agreement for this node."""
        # Jobs this process started (or is starting) before the unit list was
        # read: one missing from that list was started after, not lost.
        known = self.mine | self.in_flight
        units = await self.units.list()
        # What etcd says is assigned to us, every sweep: after a (re)start we
        # know nothing, and a watch event may have been missed (START_UNIT).
        records = await self._our_records()
        missing = (self.mine | set(units)) - set(records)
        found = await self.applier.call(self.store.get_many, sorted(missing)) if missing else {}
        records.update(found)
        gone = missing - set(found)  # units whose record is not there any more
        jobs = {u: job for u, (job, _) in records.items()}
        settled = set()
        plan = core.reconcile(jobs, units, self.in_flight, self.me, self.clock(),
                              self.config.stop_timeout, gone)
        for action, job_uuid in plan:
            if action == core.START_UNIT and job_uuid in known:
                continue  # started since the unit list was read (the watch's start)
            if action == core.RECORD_RUNNING and job_uuid in self.started:
                continue  # written with the next write (record_ends)
            log.info("reconcile: %s %s", action, job_uuid)
            if action == core.RELEASE_ORPHAN:
                log.warning("job %s: its record is gone from etcd; stopping its unit %s",
                            job_uuid, core.unit_name(job_uuid))
                await self.units.release(job_uuid)
                self.markers.forget(job_uuid)
            else:
                await self._apply(action, records[job_uuid], units.get(job_uuid))
            # A job holds its slot until its unit is gone: running, stopping or
            # warned; one started now holds it unless its start failed.
            if action == core.START_UNIT and job_uuid in self.mine:
                continue
            if action in (core.RECORD_RUNNING, core.WARN) or (
                    action in (core.RELEASE_UNIT, core.RELEASE_ORPHAN)
                    and not units[job_uuid].finished):
                continue
            settled.add(job_uuid)
        # A record gone (and nothing loaded) holds no slot either.
        settled |= gone - set(units)
        self.mine = core.slot_holders(jobs, units, settled, self.me) | self.in_flight
        self.started = {u: v for u, v in self.started.items() if u in self.mine}
        # What is kept per job is kept for live jobs only (RSS grew 75 -> 290
        # MB over a 20,000-job burst): the rest went elsewhere or ended unseen.
        self.applier.keep_only(self.mine | set(units))
        self.recheck = {u: d for u, d in self.recheck.items() if u in units}
        self.markers.sweep(set(units) | self.mine | self.in_flight)

    async def _our_records(self):
        """{uuid: (job, revision)} of the live records assigned to this node."""
        uuids = sorted((await self.applier.call(self.store.assigned, self.me)).get(self.me, {}))
        found = await self.applier.call(self.store.get_many, uuids) if uuids else {}
        for job_uuid in set(uuids) - set(found):
            # Its record was deleted by hand (etcdctl del): without this its
            # reservation would hold a share of this node for good.
            if await self.applier.call(self.store.drop_orphan, self.me, job_uuid):
                log.warning("job %s: its record is gone from etcd; its reservation here is dropped",
                            job_uuid)
        return {u: r for u, r in found.items() if r[0].node == self.me and not r[0].terminal}

    async def _apply(self, action, known, status):
        job_uuid = known[0].uuid
        change = self.applier.change
        if action == core.RECORD_END:
            await self.record_end(job_uuid, status, known)
        elif action == core.RELEASE_UNIT:
            await self.units.release(job_uuid)
        elif action == core.START_UNIT:
            if self.registered() and job_uuid not in self.mine | self.in_flight:
                await self.start_many([known])
        elif action == core.RECORD_RUNNING:
            await change(job_uuid, lambda j: core.transition(
                j, core.RUNNING, started_at=status.started_at or self.clock())
                if self.ours(j, core.STARTING) else None, known)
        elif action == core.WARN:
            why = (f"its unit has been stopping for {self.clock() - status.stopped_at:.0f} s "
                   f"and still has {status.processes} process(es)")
            log.warning("job %s warned: %s", job_uuid, why)
            await change(job_uuid, lambda j: core.warn(j, self.clock(), why)
                         if j.node == self.me and j.state in core.WARNABLE else None, known)
        elif action == core.CLEAR:
            job = await change(job_uuid, lambda j: core.clear(j, status, self.clock())
                               if j.state == core.WARNED else None, known)
            log.info("job %s no longer warned: %s", job_uuid, job and job.state)
            await self.units.release(job_uuid)
        elif action == core.RECORD_VANISHED:
            # Its unit is gone (the machine rebooted, or we were fenced): it
            # did not end, its node lost it.
            await change(job_uuid, self.lose_mine, known)
            self.markers.forget(job_uuid)

    # -- ends ------------------------------------------------------------------

    async def record_end(self, job_uuid, status, known=None):
        await self.record_ends({job_uuid: status}, {job_uuid: known} if known else None)

    async def record_ends(self, ended, known=None):
        """ended: {uuid: its unit's finished status}: record each outcome (a
        loss if a fence killed it), and every start not yet recorded, in as
        few transactions as etcd takes; then release the units. known:
        {uuid: (job, revision)} already read."""
        due = asyncio.get_running_loop().time() - RECORD_RUNNING_AFTER
        started = dict(self.started) if ended or any(
            t <= due for *_, t in self.started.values()) else {}
        if not ended and not started:
            return
        records = {u: (known or {}).get(u) or self.applier.written.get(u)
                   or (started[u][:2] if u in started else None) for u in ended}
        missing = [u for u, r in records.items() if r is None]
        records = {u: r for u, r in records.items() if r is not None}
        if missing:
            records.update(await self.applier.call(self.store.get_many, missing))
        for u, (job, rev, _, _) in started.items():
            records.setdefault(u, self.applier.written.get(u) or (job, rev))
        now = self.clock()

        def decide(j):
            if j.uuid not in ended:  # started: running since then
                return (core.transition(j, core.RUNNING, started_at=started[j.uuid][2])
                        if self.ours(j, core.STARTING) and not self.markers.was_fenced(j.uuid)
                        else None)
            if self.markers.was_fenced(j.uuid):  # it did not end, it was lost
                return self.lose_mine(j)
            if self.ours(j, core.STARTING, core.RUNNING, core.WARNED):
                status = ended[j.uuid]
                if status.started_at is None and j.uuid in started:  # (systemd said no time)
                    status = dataclasses.replace(status, started_at=started[j.uuid][2])
                return core.settle(j, status, now)
            return None
        self.ending |= set(ended)
        try:
            done = await self.applier.change_many(records, decide)
        finally:
            self.ending -= set(ended)
        for job_uuid in started:
            if self.started.get(job_uuid) == started[job_uuid]:
                del self.started[job_uuid]
        for job_uuid in ended:
            self.markers.forget(job_uuid)
            self.mine.discard(job_uuid)
            self.recheck.pop(job_uuid, None)
            self.started.pop(job_uuid, None)
        # (Units without a record of ours, another daemon's prefix: not ours to release.)
        released = [u for u in ended if u in records]
        # All at once: one round trip's wait, not one per job.
        outcomes = await asyncio.gather(*(self.units.release(u, ended[u]) for u in released),
                                        return_exceptions=True)
        for job_uuid in released:
            job = done.get(job_uuid) or records[job_uuid][0]
            log.info("job %s %s: %s", job_uuid, job.state, job.reason)
        for error in outcomes:
            if isinstance(error, BaseException):
                raise error

    def _read_again(self, uuids, statuses):
        """Units that changed towards an end not yet readable: look again soon."""
        loop = asyncio.get_running_loop()
        for u, s in zip(uuids, statuses):
            settled = (isinstance(s, BaseException) or s is None or s.finished
                       or s.active_state == "active" and s.sub_state == "running")
            if settled:
                self.recheck.pop(u, None)
                continue
            delay = self.recheck.get(u, RECHECK_FIRST)
            self.recheck[u] = min(2 * delay, self.config.poll_interval)
            loop.call_later(delay, self.unit_changed, u)

    async def record_changed(self):
        """Record the outcome of units that systemd said changed, all at once
        (one by one, recording ends held the node under load: make bench)."""
        ready = sorted(self.changed - self.in_flight)  # the others: once their start is recorded
        self.changed -= set(ready)
        if not ready and not self.started:
            return
        statuses = await asyncio.gather(*(self.units.status(u) for u in ready),
                                        return_exceptions=True)
        ended = {u: s for u, s in zip(ready, statuses)
                 if not isinstance(s, BaseException) and s is not None and s.finished}
        self._read_again(ready, statuses)
        try:
            await self.record_ends(ended)
        except StoreUnavailable:
            self.changed |= set(ended)  # the units keep their results: retry later
            raise
        for error in statuses:
            if isinstance(error, BaseException):
                raise error
