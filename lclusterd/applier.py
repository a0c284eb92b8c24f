"""The one place a node writes to etcd from: every store call goes through
Applier.call (so errors and latency are counted, and etcd_error says why
etcd is away), and every change of a job record is a guarded write here.

A rule decides (a pure function of the record: core's); the applier writes
its answer, and when the record moved first it re-reads and re-decides with
the same function, never with a second hand-written guard.
"""

import asyncio
import contextlib
import logging
import time

from lclusterd import core, store as etcd_store
from lclusterd.store import Unavailable as StoreUnavailable

log = logging.getLogger("lclusterd.node")

MAX_CHANGE_ATTEMPTS = 5  # re-reads of a record whose revision moved under us

Conflict = core.Conflict


class Passes:
    """How a loop's passes say what went wrong: an expected problem (etcd
    away, ...) once, not every pass, until a pass succeeds; anything else
    with its traceback every time. The loop goes on either way."""

    def __init__(self, what, expected):
        self.what, self.expected, self.last_problem = what, expected, None

    @contextlib.contextmanager
    def one(self):
        try:
            yield
        except self.expected as e:
            if str(e) != self.last_problem:
                log.warning("%s", e)
            self.last_problem = str(e)
        except Exception:
            log.exception("%s pass failed; retrying", self.what)
        else:
            self.last_problem = None


async def woken(event, timeout):
    """Wait until event is set or timeout passed, then clear it."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    event.clear()


class Applier:
    def __init__(self, store, counters, node_name, was_fenced=lambda job_uuid: False):
        """was_fenced(uuid): did a fence kill that job's unit (its end is then a loss)?"""
        self.store = store
        self.counters = counters
        self.node_name = node_name
        self.was_fenced = was_fenced
        self.etcd_error = None  # why etcd is unreachable, or None
        # (job, revision) as this node last wrote them, for its live jobs: the
        # next change of a job needs no read first (2 etcd reads a job fewer;
        # a stale one only fails its guarded write, and is read then).
        self.written = {}

    async def call(self, method, *args, executor=None):
        """method(*args) in a thread, counted (GET /metrics) and timed."""
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

    async def change(self, job_uuid, decide, known=None):
        """Apply decide(job) -> new job (or None: leave it) as one guarded
        transaction, re-reading and re-deciding if the record moved first.
        known: a (job, revision) already read. Returns the job as it stands."""
        cached = self.written.pop(job_uuid, None)
        known = known or cached
        for _ in range(MAX_CHANGE_ATTEMPTS):
            current = known or await self.call(self.store.get, job_uuid)
            known = None
            if current is None:
                return None
            job, revision = current
            new = decide(job)
            if new is None:
                return job
            if await self.write(job, new, revision):
                return new
        raise Conflict(f"job {job_uuid} kept changing; try again")

    async def write(self, job, new, revision, *prime):
        """One guarded write (store.update); remembers what it wrote while the job is live here."""
        written = await self.call(self.store.update, job, new, revision, *prime)
        if written:
            self._wrote(job, new, written)
        return written

    async def write_many(self, changes, prime=None, executor=None):
        """[(old, new, revision)] in as few guarded transactions as etcd takes
        (store.update_many); per change its new revision, or None (re-read).
        executor: the threads to call etcd from (default: the loop's)."""
        if not changes:
            return []
        if prime is None:
            results = await self.call(self.store.update_many, changes, executor=executor)
        else:
            results = await self.call(lambda: self.store.update_many(changes, prime=prime),
                                      executor=executor)
        for (job, new, _), written in zip(changes, results):
            if written:
                self._wrote(job, new, written)
        return results

    async def change_many(self, records, decide, prime=None):
        """decide over records {uuid: (job, revision)} as write_many, then
        one by one (change) for those whose record moved first. Returns
        {uuid: job as it stands} for the ones decide changed."""
        changes = []
        for job, revision in records.values():
            new = decide(job)
            if new is not None:
                changes.append((job, new, revision))
        results = await self.write_many(changes, prime)
        done = {new.uuid: new for (_, new, _), written in zip(changes, results) if written}
        for job, _, _ in changes:
            if job.uuid not in done and prime is None:
                found = await self.change(job.uuid, decide)
                if found is not None:
                    done[job.uuid] = found
        return done

    def keep_only(self, uuids):
        """Forget what was written of jobs not in uuids (ended, or moved to
        another node by someone else's write, which _wrote never saw)."""
        for u in set(self.written) - set(uuids):
            del self.written[u]

    def _wrote(self, job, new, revision):
        me = self.node_name
        if not new.terminal and new.node == me:
            self.written[new.uuid] = (new, revision)
        else:
            self.written.pop(new.uuid, None)
        ended = job.terminal or job.state == core.WARNED and job.warned_from in core.TERMINAL
        if job.node == me and not ended:  # how an attempt of ours ended (once)
            if new.terminal:
                self.counters.end(new.state)
            elif new.state == core.QUEUED:  # lost here (fenced, its unit vanished): requeued
                self.counters.end(core.LOST)
            if (new.state == core.QUEUED or new.reason == core.NODE_LOST) and self.was_fenced(new.uuid):
                self.counters.fenced_jobs += 1  # lost because a fence killed its unit
