"""The API's verbs (K6): what api.py, ui.py and metrics ask a node. They
read etcd and write through the applier; placing and running jobs is the
placer's and the runner's."""

import asyncio
import functools
import json
import logging
import pwd
import uuid as uuidlib
from dataclasses import dataclass, replace

from dbus_next.errors import DBusError

from lclusterd import core, scheduler
from lclusterd import store as etcd_store
from lclusterd.groupcommit import GroupCommit
from lclusterd.placer import cancel_dependents
from lclusterd.peers import Unreachable as PeerUnreachable
from lclusterd.store import Unavailable as StoreUnavailable
from lclusterd.units import Unavailable as UnitsUnavailable

log = logging.getLogger("lclusterd.node")

# journald reads a job's stdout pipe on its own time: 100,000 lines reach the
# journal up to a second after the job ended. So output read within
# LATE_OUTPUT seconds of the end is complete only once the journal has had
# nothing new for the unit for QUIET seconds.
LATE_OUTPUT = 10.0
QUIET = 1.0
MAX_USERS = 1024  # passwd entries Verbs._user keeps
# An array's transaction within etcd's default --max-request-bytes (1.5 MiB):
# store.submit_size counts a member's keys and values; each put adds its
# protobuf framing (10 bytes measured, OP_OVERHEAD allowed), each member its
# uuid to the array's own record and to the idempotency key's (MEMBER_BYTES),
# and the rest of those, and the compares, fit the slack of ETCD_REQUEST_BYTES.
ETCD_REQUEST_BYTES = 3 * 512 * 1024 - 8 * 1024
OP_OVERHEAD = 16
MEMBER_BYTES = 2 * len('"00000000-0000-0000-0000-000000000000",')
ARRAY_GUARDS = 2  # compares of an array's transaction: its new arrays/<id>, the idempotency key


class PermissionDenied(core.Forbidden):
    pass


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    user: str


class Verbs:
    def __init__(self, config, applier, runner, membership, units, job_log=None, peers=None,
                 clock=None, signing_key=None, wake=lambda: None):
        self.config = config
        self.applier = applier
        self.call = applier.call
        self.store = applier.store
        self.runner = runner
        self.membership = membership
        self.units = units
        self.job_log = job_log  # journal.JobLog: a job's output on this node
        self.peers = peers  # peers.Peers: the output of jobs that ran on other nodes
        self.clock = clock
        self.signing_key = signing_key
        self.wake = wake
        self._live = None  # (loop time, live registrations) as _check_fits last read them
        self._live_read = None  # the read of them under way
        self._users = {}  # name -> (loop time, pwd entry) as submit last looked it up
        # Single jobs share transactions; arrays and keyed requests keep their own.
        self.commits = GroupCommit(lambda jobs: self.call(self.store.submit_many, jobs),
                                   lambda job: etcd_store.submit_size(job, self.store.prefix))

    @property
    def me(self):
        return self.config.node_name

    async def ping(self):
        await self.call(self.store.ping)
        await self.call(self.store.check_space)  # NOSPACE: reads work, writes do not

    # -- submit ------------------------------------------------------------------

    async def submit(self, command, caller, request=None, count=None, idempotency_key=None,
                     commands=None):
        """Queue command; request: what the job asks for (core.job_spec's
        fields: after, after_mode, constraints, max_running too; and user:
        whom to run as). count (copies of command) or commands (one member
        per command) make an array: all queued or none, answered as
        (array_id, [Job]). idempotency_key: the client's key for this
        request; a repeated key queues nothing and answers with what the
        first one queued. A single job without a key shares its etcd
        transaction with those submitted meanwhile (groupcommit)."""
        request = dict(request or {})
        if request.get("after") is not None:
            request["after"] = await self._resolve_parents(request["after"])
        spec = core.job_spec(request, self.config)
        uid, gid, user = caller.uid, caller.gid, caller.user
        name = core.run_as(caller.uid, caller.user, request.get("user"))
        if name is not None:
            entry = self._user(name)
            uid, gid, user = entry.pw_uid, entry.pw_gid, entry.pw_name
        if commands is not None:
            if not isinstance(commands, (list, tuple)) or not commands:
                raise core.InvalidInput("commands must be a non-empty list of commands")
            commands = [core.validate_command(c) for c in commands]
            core.validate_count(len(commands))
        elif count is not None:
            core.validate_count(count)
            commands = [core.validate_command(command)] * count
        array = commands is not None
        if not array:
            spec.pop("max_running", None)  # it throttles an array's members only
        now = self.clock()
        array_id = str(uuidlib.uuid4()) if array else None
        jobs = core.new_jobs(commands if array else [command], uid, gid, user, now, self.signing_key,
                             array=array_id, submitter=caller.user, submitter_uid=caller.uid, **spec)
        if array:
            self._check_one_transaction(jobs)
        await self._check_fits(jobs[0])
        await self._check_quota(caller, uid, len(jobs))
        if array or idempotency_key is not None:  # its own transaction: its compares are its own
            existing = await self.call(functools.partial(
                self.store.submit_many, jobs, idempotency_key=idempotency_key))
        else:
            existing = await self.commits.submit(jobs[0])  # answered once its transaction committed
        if existing is not None:  # this key queued these before: answer with them
            jobs = [await self.find(u) for u in existing]
            array_id = jobs[0].array if array else None
        else:
            self.applier.counters.submitted += len(jobs)
        self.wake()
        return (array_id, jobs) if array else jobs[0]

    def _check_one_transaction(self, jobs):
        """An array is written in one etcd transaction: refuse (TooLarge) one
        whose records and index keys etcd would not take in one request.
        Members differ only in their uuid (one length), index and command:
        the last one's size (the widest index) with each one's command is
        each one's size, without encoding them all (submit_many does)."""
        last = jobs[-1]
        each, widest = etcd_store.submit_size(last, self.store.prefix)
        own = len(json.dumps(last.command))  # as the record holds it
        size = sum(widest - own + (own if job.command is last.command else len(json.dumps(job.command)))
                   for job in jobs)
        ops = each * len(jobs)
        if size + len(jobs) * MEMBER_BYTES + ops * OP_OVERHEAD > ETCD_REQUEST_BYTES:
            raise core.TooLarge(
                f"an array of {len(jobs)} such jobs is more than the 1.5 MiB etcd takes in one "
                "transaction: queue fewer jobs a call, or shorten their command, env or workdir")
        ops += 2  # the arrays/<id> key, the idempotency key
        if not etcd_store.fits(ARRAY_GUARDS, ops):
            raise core.TooLarge(
                f"an array of {len(jobs)} jobs with {len(jobs[0].after)} parent(s) each is {ops} "
                "etcd operations, more than one transaction takes: queue fewer jobs a call, or "
                "give fewer --after jobs")

    def _user(self, name):
        """name's passwd entry, looked up at most once a poll_interval (NSS
        reads /etc/passwd a call); a name not found is looked up every time."""
        now = asyncio.get_running_loop().time()
        known = self._users.get(name)
        if known is not None and now - known[0] < self.config.poll_interval:
            return known[1]
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            self._users.pop(name, None)
            raise core.InvalidInput(f"no such user '{name}' on this node") from None
        if len(self._users) >= MAX_USERS:
            self._users.clear()
        self._users[name] = (now, entry)
        return entry

    async def _resolve_parents(self, refs):
        """--after's refs (uuids, prefixes or array ids) as full job uuids."""
        parents = []
        for ref in core.string_list(refs, "after must be a list of job uuids"):
            ref = ref.strip().lower()
            try:
                ref = core.validate_ref(ref)
            except core.InvalidInput:
                raise core.InvalidInput(f"after: '{ref[:40]}' is not a job uuid") from None
            found = []
            if core.is_full_uuid(ref):
                if await self.call(self.store.get, ref) is not None:
                    found = [ref]
                else:
                    array = await self.call(self.store.get_array, ref)
                    found = list(array["uuids"]) if array else []
            else:
                try:
                    found = [await self.call(self.store.resolve, ref)]
                except core.AmbiguousRef as e:
                    raise core.InvalidInput(f"after: {e}") from None
                except LookupError:
                    found = []
            if not found:
                raise core.InvalidInput(f"no job matches '{ref}' (after)")
            parents += [u for u in found if u not in parents]
        return parents

    async def _check_fits(self, job):
        """A job no registered node could ever run is refused now, with why.
        The registrations are read at most once a poll_interval (a read of
        every node's per submission would cost more than the submission)."""
        now = asyncio.get_running_loop().time()
        if self._live is None or now - self._live[0] >= self.config.poll_interval:
            # One read at a time: the submissions that come meanwhile share it
            # (32 concurrent clients read it 32 times, a third of their CPU).
            if self._live_read is None:
                self._live_read = asyncio.ensure_future(self.call(self.store.cluster))
                self._live_read.add_done_callback(self._live_read_done)
            live, *_ = await asyncio.shield(self._live_read)
            self._live = (now, live)
        live = dict(self._live[1])
        live.setdefault(self.me, self.membership.registration())
        why = scheduler.never_fits(job, scheduler.node_views(live))
        if why is not None:
            raise core.InvalidInput(why)

    def _live_read_done(self, read):
        self._live_read = None
        if not read.cancelled():
            read.exception()  # its waiters raise it; none may be left to

    async def _check_quota(self, caller, uid, copies):
        """At most max_queued_per_user queued jobs per user (so one user
        cannot fill etcd), counted by whom they run as (store.queued_count's
        index; a user's jobs always run as that user). Root is trusted."""
        limit = self.config.max_queued_per_user
        if caller.uid == 0 or not limit:
            return
        queued = await self.call(self.store.queued_count, uid)
        if queued + copies > limit:
            raise core.QuotaExceeded(f"{caller.user} has {queued} job(s) queued; at most {limit} "
                                     "per user (max_queued_per_user)")

    # -- reads -----------------------------------------------------------------------

    async def find(self, ref):
        ref = core.validate_ref(ref)
        job_uuid = ref if core.is_full_uuid(ref) else await self.call(self.store.resolve, ref)
        found = await self.call(self.store.get, job_uuid)
        if found is None:
            raise LookupError(f"no job matches '{ref}'")
        return found[0]

    async def find_array(self, ref):
        """{"id", "max_running", "jobs": [Job in index order]}, or LookupError."""
        ref = core.validate_ref(ref)
        array = await self.call(self.store.get_array, ref) if core.is_full_uuid(ref) else None
        if array is None:
            raise LookupError(f"no array matches '{ref}'")
        found = await self.call(self.store.get_many, list(array["uuids"]))
        jobs = sorted((job for job, _ in found.values()), key=lambda j: j.array_index or 0)
        return {"id": array["id"], "max_running": array.get("max_running"), "jobs": jobs}

    def unit_properties(self, job):
        return self.runner.unit_properties(job)

    async def list(self, limit=50, **filters):
        """Jobs matching filters (core.select's), live ones first."""
        jobs = [job for job, _ in await self.call(self.store.all_jobs)]
        return core.select(jobs, limit=limit, **filters)

    async def _snapshot(self):
        """What the scheduler sees: (node views, loads, array_live)."""
        live, *_ = await self.call(self.store.cluster)
        drains = await self.call(self.store.drains)
        assigned = await self.call(self.store.assigned)
        return (scheduler.node_views(live, drains), scheduler.loads(assigned), scheduler.array_live(assigned))

    async def waiting(self, jobs):
        """{uuid: {"kind", "text", "ahead", "total"}} for the queued ones of
        jobs: why each waits (scheduler.explain) and its place in the queue."""
        queued = [job for job in jobs if job.state == core.QUEUED]
        if not queued:
            return {}
        nodes, loads, array_live = await self._snapshot()
        wanted = sorted({p for job in queued for p in job.after})
        found = await self.call(self.store.get_many, wanted) if wanted else {}
        parents = {u: found[u][0] if u in found else None for u in wanted}
        positions = await self.call(self.store.queue_positions, queued)  # one read, not one per job
        answer = {}
        for job in queued:
            ahead, total = positions[job.uuid]
            why = scheduler.explain(job, nodes, loads, parents, array_live, ahead, total)
            if why is None:  # it fits now: next to be placed
                why = scheduler.Waiting("priority", f"{ahead} of {total} ahead; being placed")
            answer[job.uuid] = {"kind": why.kind, "text": why.text, "ahead": ahead, "total": total}
        return answer

    # -- remove ----------------------------------------------------------------------

    @staticmethod
    def _check_owner(job, caller):
        """Only who queued the job, or root, may remove it or read its output."""
        if caller.uid != 0 and caller.uid != job.owner_uid:
            owner = job.submitter or job.user
            raise PermissionDenied(f"permission denied: job {job.uuid} belongs to {owner}")

    def _cancel(self, reason):
        def cancel(current):
            if current.terminal or current.state == core.WARNED:
                return None  # already over, or being stopped: removing it again changes nothing
            return core.transition(current, core.CANCELLED, ended_at=self.clock(), reason=reason)
        return cancel

    async def remove(self, ref, caller):
        """Cancel a job (-> Job), or every live member of an array (-> {"id",
        "cancelled": [uuids], "jobs": [Job]})."""
        try:
            job = await self.find(ref)
        except core.AmbiguousRef:
            raise
        except LookupError as missing:
            try:
                array = await self.find_array(ref)  # not a job: an array's id?
            except LookupError:
                raise missing from None  # neither: the job's "no job matches"
            return await self._remove_array(array, caller)
        self._check_owner(job, caller)
        if self.runner.ours(job):
            # Its unit is ours to stop: ask systemd first, so that with the bus
            # down (units.Unavailable, DBusError: the API's 503) nothing is written.
            await self.units.status(job.uuid)
        reason = f"removed by {caller.user}"
        job = await self.applier.change(job.uuid, self._cancel(reason))
        if job is not None and job.state == core.CANCELLED:
            await cancel_dependents(self.applier, [job.uuid], self.clock)  # --after it: never now
        # On another node its runner sees the assignment go (the watch) and
        # stops the unit (core.reconcile: RELEASE_UNIT).
        return await self._stop_here(job, reason)

    async def _remove_array(self, array, caller):
        if not array["jobs"]:
            raise LookupError(f"no job matches '{array['id']}'")
        for job in array["jobs"]:
            self._check_owner(job, caller)
        if any(self.runner.ours(job) for job in array["jobs"]):
            await self.units.status(array["jobs"][0].uuid)  # the bus is there (see remove)
        reason = f"removed by {caller.user}"
        found = await self.call(self.store.get_many, [j.uuid for j in array["jobs"]])
        cancelled = await self.applier.change_many(found, self._cancel(reason))
        await cancel_dependents(self.applier, sorted(cancelled), self.clock)
        for job in cancelled.values():
            await self._stop_here(job, reason)
        fresh = await self.call(self.store.get_many, [j.uuid for j in array["jobs"]])
        jobs = sorted((job for job, _ in fresh.values()), key=lambda j: j.array_index or 0)
        return {"id": array["id"], "cancelled": sorted(cancelled), "jobs": jobs}

    async def _stop_here(self, job, reason):
        """A job just cancelled whose unit runs on this node: stop it now."""
        if job is None or job.state != core.CANCELLED or job.node != self.me:
            return job
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
            return await self.applier.change(job.uuid, lambda j: replace(j, reason=why)
                                             if j.state == core.CANCELLED and j.reason == reason
                                             else None) or job
        if stopped:
            self.runner.mine.discard(job.uuid)
            self.wake()
        else:  # it keeps its slot; the sweep watches it and clears it once it stops
            why = f"still has processes {grace:g} s after removejob (SIGTERM, then SIGKILL)"
            log.warning("job %s warned: %s", job.uuid, why)
            job = await self.applier.change(job.uuid, lambda j: core.warn(j, self.clock(), why)
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
        if job.node != self.me:
            live, members, _, _ = await self.call(self.store.cluster)
            address = (live.get(job.node) or members.get(job.node) or {}).get("address")
            chunks = self.peers.logs(job.node, address, job.uuid, follow=1 if follow else None,
                                     tail=tail, since=since)
            try:
                async for chunk in chunks:
                    yield chunk
            except PeerUnreachable as e:
                raise core.Elsewhere(str(e)) from None
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
            found = await self.call(self.store.get, job.uuid)
        except StoreUnavailable:
            return job
        return found[0] if found else replace(job, state=core.CANCELLED)

    # -- nodes -------------------------------------------------------------------------

    async def nodes(self):
        await self.call(self.store.check_space)  # lclusterc nodes says NOSPACE (507)
        live, members, failed, prime = await self.call(self.store.cluster)
        drains = await self.call(self.store.drains)
        assigned = await self.call(self.store.assigned)
        warned = await self.call(self.store.warned)
        rows = core.node_rows(members, live, failed, prime, drains, scheduler.loads(assigned))
        return core.with_warned(rows, warned)

    async def _known_node(self, name, caller, verb):
        """(live, members) once name is a node and caller is root."""
        if caller.uid != 0:
            raise core.Forbidden(f"permission denied: only root may {verb} a node")
        live, members, _, _ = await self.call(self.store.cluster)
        if name not in live and name not in members:
            raise LookupError(f"no node named '{name}'")
        return live, members

    async def drain(self, name, reason, caller):
        """No new placements on name; its running jobs finish."""
        await self._known_node(name, caller, "drain")
        reason = " ".join(str(reason or "").split())[:200] or None
        await self.call(self.store.drain, name, {"reason": reason, "at": self.clock(), "by": caller.user})
        log.info("node %s drained by %s: %s", name, caller.user, reason)
        self.wake()

    async def resume(self, name, caller):
        await self._known_node(name, caller, "resume")
        await self.call(self.store.resume, name)
        log.info("node %s resumed by %s", name, caller.user)
        self.wake()

    async def forget(self, name, caller):
        """Drop a failed node from the table (and its drain)."""
        live, _ = await self._known_node(name, caller, "forget")
        if name in live:
            raise core.Busy(f"node {name} is live: only a failed node can be forgotten")
        await self.call(self.store.forget, name)
        log.info("node %s forgotten by %s", name, caller.user)
