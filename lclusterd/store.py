"""etcd: the only module that talks to it. Holds job records and the queue.

Keyspace (PREFIX is the `prefix` setting, /lcluster by default):

    PREFIX/jobs/<uuid>                 the job record, JSON (core.Job.to_dict)
    PREFIX/queue/<rank>-<submit-ns>-<uuid>  present while the job is queued; the
                                       key sorts the queue: priority (rank =
                                       100 - priority), then submission order
    PREFIX/queued_by/<uid>/<uuid>      present while the job is queued, kept in
                                       the same transactions as its queue key:
                                       queued_count(uid) counts them (quota)
    PREFIX/idempotency/<uid>/<sha256>  the uuids a submission with that
                                       Idempotency-Key queued (JSON list),
                                       under a shared lease of IDEMPOTENCY_TTL
    PREFIX/nodes/<name>                a live node's registration, JSON (name,
                                       address, machine, slots, free, running),
                                       under the node's lease: gone when it dies
    PREFIX/members/<name>              the same, without a lease: every node
                                       that ever registered (lclusterc nodes)
    PREFIX/failed_nodes/<name>         {"name", "at"}: a member whose lease
                                       expired; deleted when it registers again
    PREFIX/prime                       the primed node's name, under its lease
    PREFIX/warned_jobs/<uuid>          present while the job is warned; its
                                       value is the job's node
    PREFIX/locks/<name>                held under a lease by one node at a time
                                       (history pruning); the value names it
    PREFIX/assigned/<node>/<uuid>      {"cpus", "memory", "array"}: present
                                       exactly while the record is starting,
                                       running or warned with node set (what it
                                       reserves there: the scheduler's load)
    PREFIX/drained/<name>              {"reason", "at", "by"}: no new jobs go
                                       there; no lease (drain() until resume())
    PREFIX/arrays/<id>                 {"id", "uuids", "max_running",
                                       "submitter_uid", "at"}: written with its
                                       members; deleted with the last of them
    PREFIX/dependents/<parent>/<child> "": child was submitted with parent in its
                                       `after`; deleted with the child's record
    PREFIX/finished/<at>/<uuid>        "": present exactly while the record is
                                       finished; <at> is its core.finished_at,
                                       seconds to the nanosecond, fixed width,
                                       so the keys sort oldest first: the
                                       history's prune reads these, then only
                                       the records it deletes

Every change of a record is one transaction guarded by the record's
mod_revision, and moves the index keys that follow it (queue, queued_by,
warned_jobs, assigned, finished; dependents on submission and deletion: the rules
are index_changes()) in the same transaction, so a job is never assigned
twice and no index ever disagrees with the records. update_many() writes
many such changes in few transactions, each change still guarded by its
own record (and all of them, for the primed node's placer, by the prime).

Every read of a prefix is paginated (PAGE_KEYS keys, and sized to about
PAGE_BYTES from the page before; a page gRPC refuses as over its 4 MiB is
asked again smaller), at one revision, so no answer is too big however many
or however large the records are.

Errors (one tree, the callers map it):
    Unavailable  etcd cannot be reached at any endpoint, whatever the gRPC
                 code; nothing was written (or, for a write whose answer was
                 lost, it may have been: guarded writes find out on re-read)
    NoSpace      (an Unavailable) etcd's NOSPACE alarm: out of its quota
    TooLarge     etcd refused the request as too large (--max-request-bytes)
    NameTaken    register(): another machine's live node holds the name
    LeaseExpired a write under a lease etcd no longer has (register afresh)

Calls added for the scheduler: queued_count(uid); submit_many(jobs,
idempotency_key=None) -> None when written, else the uuids the key queued
before; update_registration() -> False when the registration is gone or
another's; delete() also takes (Job, revision) and then drops a queued
record's queue keys; timeout= on ping, grant, renew, revoke, register and
update_registration: seconds per endpoint tried (the heartbeat's budget),
and the endpoint that answered is tried first next time.

Calls added for the cluster scheduler (contract K4): update_many(changes,
prime=None), get_many(uuids), assigned(node=None), dependents(parent),
queue_position(job), queue_positions(jobs), drain/resume/drains/forget, get_array(id), reindex()
(the assigned and finished keys of records from before them), finished(after, limit)
and delete_finished(entries) (the history's prune), and
watch(kind, callback, node=None) -> cancel: one gRPC watch stream per call,
on the Store's channels, resumed from the last revision seen after an error.

Maintenance: compact() keeps etcd's history short (the prune pass calls it)
and, while NOSPACE is raised, also defragments every member and disarms the
alarm (recover_space() does that on demand; lock() is granted to every caller
meanwhile, since no lease can be); space() says how big the db is, its quota
and whether NOSPACE is raised.

The calls block (python3-etcd3 is synchronous): the daemon runs them in
threads, and a Store is safe to share between threads: its channels are
made under a lock, and a channel that failed is replaced for new calls but
closed only once no call uses it any more.
"""

import bisect
import copy
import dataclasses
import hashlib
import json
import logging
import math
import re
import ssl
import threading
import time
import urllib.parse
import urllib.request

import etcd3
import etcd3.exceptions
import etcd3.utils
import grpc
from etcd3 import etcdrpc

from lclusterd import core

log = logging.getLogger(__name__)

CALL_TIMEOUT = 2  # seconds, per endpoint tried; etcd answers in milliseconds.
                  # The heartbeat passes a shorter timeout= (a dead member must
                  # not eat the lease's fencing budget).
# gRPC backs off up to 2 minutes between reconnects; etcd back after an
# outage should be seen within a second.
GRPC_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000)]
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops (per list of one transaction)
# Dependents read per parent in dependents_many's transaction (a parent with
# more is read on its own): 128 parents of 64 keys stay far below gRPC's 4 MiB.
DEPENDENTS_AT_ONCE = 64
PAGE_KEYS = 1000  # keys per range page at most
PAGE_BYTES = 1 << 20  # aim a page's keys+values at 1 MiB; gRPC refuses over 4 MiB
COMPACT_MARGIN = 100  # revisions of history kept by compact() (a revision is a
                      # transaction: ~4 per job, 1 per batch). Nothing of ours
                      # reads history: a paginated read whose revision is
                      # compacted under it just reads again
IDEMPOTENCY_TTL = 24 * 3600  # an Idempotency-Key is remembered this long (at least half)
MAINTENANCE_TIMEOUT = 60  # seconds for a defragmentation (it blocks the member)
# all_jobs() keeps what it decoded this long after it was last called:
# `lclusterc list` of 10,000 records takes 0.1-0.25 s again within it, 1.5 s
# without (at load average 16), but a node that listed once must not hold
# the ~20 MB of decoded records for good.
DECODED_TTL = 60.0  # seconds

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED,  # "Channel closed!" and the like
                grpc.StatusCode.UNKNOWN}  # transport: "Stream removed", "Socket closed"


class Unavailable(Exception):
    """etcd cannot be reached; nothing was written."""


class NoSpace(Unavailable):
    """etcd raised its NOSPACE alarm: it takes reads and deletes, no writes.
    (The one write that crossed the quota was applied all the same: etcd
    applies it, then raises the alarm.)"""


class TooLarge(Exception):
    """etcd refused a request as too large (nothing was written)."""


class LeaseExpired(Exception):
    """A write under a lease that etcd no longer has (it expired): grant anew."""


class NameTaken(Exception):
    """register(): another machine's live registration holds the node name."""

    def __init__(self, name, address):
        self.name, self.address = name, address
        super().__init__(f"node name {name} is already live on another machine "
                         f"(at {address or 'an unknown address'}): give this node another node_name")


# A job holds its reservation on a node (PREFIX/assigned/<node>/<uuid>) in
# these states: from the placer's assignment until its unit is gone.
HOLDS_NODE = frozenset((core.STARTING, core.RUNNING, core.WARNED))


def reservation(job):
    """What a job holds on its node, as the assigned key's value."""
    return {"cpus": float(job.cpus or 0), "memory": int(job.memory or 0),
            "array": getattr(job, "array", None)}


def _assigned_key(prefix, job):
    if job is None or job.state not in HOLDS_NODE or not job.node:
        return None
    return f"{prefix}/assigned/{job.node}/{job.uuid}"


def finished_key(prefix, at, job_uuid):
    # 9 decimals tell apart any two times after February 1970 (floats are
    # 238 ns apart at today's times) and read back as the same float.
    return f"{prefix}/finished/{at:020.9f}/{job_uuid}"


def finished_entry(key):
    """(finished_at, uuid) of a finished/ key."""
    at, job_uuid = _b(key).decode().rsplit("/", 2)[1:]
    return float(at), job_uuid


def index_keys(prefix, job):
    """{key: value} of the index keys a record in job's state has (job None: none)."""
    if job is None:
        return {}
    keys = {}
    if job.terminal:
        keys[finished_key(prefix, core.finished_at(job), job.uuid)] = ""
    if job.state == core.QUEUED:
        keys[f"{prefix}/queue/{core.queue_rank(job)}"] = job.uuid
        keys[f"{prefix}/queued_by/{job.uid}/{job.uuid}"] = job.uuid
    if job.state == core.WARNED:
        keys[f"{prefix}/warned_jobs/{job.uuid}"] = job.node or ""
    held = _assigned_key(prefix, job)
    if held is not None:
        keys[held] = _dumps(reservation(job))
    return keys


def index_changes(prefix, old, new):
    """The keys that follow a record from old to new (None: no record,
    i.e. submitted or deleted): ({key: value} to put, [keys] to delete).
    Pure, the one statement of the keyspace's invariants; MemStore uses it too."""
    before, after = index_keys(prefix, old), index_keys(prefix, new)
    deletes = [key for key in before if key not in after]
    puts = {key: value for key, value in after.items() if before.get(key) != value}
    if old is None or new is None:  # a record made or dropped: its parents' dependents index
        job = new or old
        for parent in getattr(job, "after", ()) or ():
            key = f"{prefix}/dependents/{parent}/{job.uuid}"
            if old is None:
                puts[key] = ""
            else:
                deletes.append(key)
    return puts, deletes


class _Compacted(Exception):
    """A paginated read's revision was compacted meanwhile: read again."""


class _Conn:
    """One endpoint's client, shared by the threads that use it."""

    def __init__(self, index, client):
        self.index, self.client = index, client
        self.users, self.retired, self.closed = 0, False, False


class Store:
    def __init__(self, endpoints, prefix="/lcluster", tls=None, page_keys=PAGE_KEYS,
                 decoded_ttl=DECODED_TTL):
        """tls: {"ca_cert", "cert_key", "cert_cert"} file paths, or None (plain).
        page_keys: keys per range page at most."""
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.page_keys = page_keys
        self.decoded_ttl = decoded_ttl
        self.tls = {k: v for k, v in (tls or {}).items() if v}
        self._lock = threading.Lock()  # guards everything below
        self._conns = [None] * len(self.endpoints)
        self.clients_made = 0  # one per endpoint, and one more after each failure
        self._current = 0  # the endpoint that answered last: tried first
        self._idem_lease = None  # (lease id, monotonic time to stop using it)
        self._compacted = 0
        self._quota = None
        self._decoded = {}  # key -> (mod_revision, Job) of the last all_jobs(), for decoded_ttl
        self._forget = None  # the timer that empties _decoded
        self._watches = set()  # live _Watch objects: close() cancels them

    # -- plumbing -----------------------------------------------------------

    def _connect(self, index):
        url = urllib.parse.urlsplit(self.endpoints[index])
        return etcd3.client(host=url.hostname or "127.0.0.1", port=url.port or 2379,
                            timeout=CALL_TIMEOUT, grpc_options=GRPC_OPTIONS, **self.tls)

    def _acquire(self, index):
        with self._lock:
            conn = self._conns[index]
            if conn is None:  # the client does not connect yet: cheap under the lock
                conn = self._conns[index] = _Conn(index, self._connect(index))
                self.clients_made += 1
            conn.users += 1
            return conn

    def _release(self, conn, failed=False):
        with self._lock:
            conn.users -= 1
            if failed and not conn.retired:
                # New calls get a fresh channel (not gRPC's backed-off one) and
                # start at the next endpoint; calls in flight keep this one.
                conn.retired = True
                if self._conns[conn.index] is conn:
                    self._conns[conn.index] = None
                if self._current == conn.index:
                    self._current = (conn.index + 1) % len(self.endpoints)
            close = conn.retired and conn.users == 0 and not conn.closed
            conn.closed = conn.closed or close
            watches = list(self._watches) if failed else []
        for watcher in watches:  # a stream on a failed channel may be silent, not broken
            watcher.leave(conn)
        if close:
            conn.client.close()

    def _call(self, fn, timeout=None):
        """Run fn(client), failing over through the endpoints in turn, from the
        one that answered last. timeout: seconds per endpoint tried (CALL_TIMEOUT)."""
        errors = []
        with self._lock:
            first = self._current
        for attempt in range(len(self.endpoints)):
            index = (first + attempt) % len(self.endpoints)
            conn = self._acquire(index)
            client = conn.client
            if timeout is not None:
                client = copy.copy(client)  # the same channel; python3-etcd3 reads .timeout per call
                client.timeout = timeout
            failed = False
            try:
                result = fn(client)
            except Exception as e:  # noqa: BLE001 -- sorted just below; the rest re-raised
                kind = _kind(e)
                if kind == "nospace":
                    raise NoSpace(self._nospace_message(e)) from None
                if kind == "lease":
                    raise LeaseExpired(f"etcd has no such lease any more ({_describe(e)})") from None
                if kind == "toolarge":
                    raise TooLarge(f"the request is too large for etcd ({_describe(e)}); etcd "
                                   "takes at most 1.5 MiB per request (--max-request-bytes)") from None
                if kind != "unreachable":
                    raise  # etcd answered: a bug of ours (or NameTaken, LookupError, ...)
                failed = True
                errors.append(e)
                continue
            finally:
                self._release(conn, failed)
            with self._lock:
                self._current = index
            return result
        where = ", ".join(self.endpoints)
        raise Unavailable(f"etcd is unreachable at {where} ({_describe(errors[-1])})")

    def _consistent(self, fn):
        """fn reads several pages at one revision: again if it was compacted meanwhile."""
        def run(c):
            for _ in range(3):
                try:
                    return fn(c)
                except _Compacted:
                    continue
            return fn(c)
        return run

    def close(self):
        with self._lock:
            watches, self._watches = list(self._watches), set()
            if self._forget is not None:
                self._forget.cancel()
        for watcher in watches:  # first: they hold channels
            watcher.cancel()
        with self._lock:
            conns, self._conns = self._conns, [None] * len(self.endpoints)
            for conn in conns:
                if conn is not None:
                    conn.retired = True
            idle = [c for c in conns if c is not None and c.users == 0 and not c.closed]
            for conn in idle:
                conn.closed = True
        for conn in idle:  # a call still in flight closes its own on release
            conn.client.close()

    def _job_key(self, job_uuid):
        return f"{self.prefix}/jobs/{job_uuid}"

    def _queue_key(self, job):
        return f"{self.prefix}/queue/{core.queue_rank(job)}"

    # -- reads --------------------------------------------------------------

    def ping(self, timeout=None):
        self._call(lambda c: c.get(f"{self.prefix}/ping"), timeout)

    def check_space(self):
        """Raise NoSpace while etcd's NOSPACE alarm is raised: reads still
        work then, so a ping alone would say all is well."""
        if self._call(_nospace_raised):
            raise NoSpace(self._nospace_message("its NOSPACE alarm is raised"))

    def get(self, job_uuid):
        """(Job, revision), or None when there is no such record."""
        value, meta = self._call(lambda c: c.get(self._job_key(job_uuid)))
        return None if value is None else (_decode(value), meta.mod_revision)

    def resolve(self, ref):
        """The full uuid that a validated ref (uuid or prefix) names."""
        prefix = self._job_key(ref)
        def read(c):  # two keys and the count: enough to answer, however many match
            answer = _range(c, prefix, _end(prefix), limit=2, keys_only=True)
            return answer.count, [kv.key.decode().rsplit("/", 1)[1] for kv in answer.kvs]
        count, uuids = self._call(read)
        if count > len(uuids):
            raise core.AmbiguousRef(f"'{ref}' matches {count} jobs: give more of the uuid")
        return core.pick_by_prefix(ref, uuids)

    def all_jobs(self):
        """Every record, as [(Job, revision)], read page by page at one revision."""
        kvs = self._call(self._consistent(
            lambda c: _scan(c, f"{self.prefix}/jobs/", self.page_keys)[0]))
        # Decoding costs 4 times the read: a record decoded by the last call
        # (if within decoded_ttl) and unchanged since (same mod_revision:
        # every write of a key gets a new one) is not decoded again.
        with self._lock:
            known = self._decoded
        decoded = {}
        for kv in kvs:
            seen = known.get(kv.key)
            if seen is None or seen[0] != kv.mod_revision:
                seen = (kv.mod_revision, _decode(kv.value))
            decoded[kv.key] = seen
        forget = threading.Timer(self.decoded_ttl, self._forget_decoded)
        forget.daemon = True
        with self._lock:
            self._decoded = decoded
            if self._forget is not None:
                self._forget.cancel()
            self._forget = forget
        forget.start()
        return [(job, rev) for rev, job in decoded.values()]

    def _forget_decoded(self):
        with self._lock:
            self._decoded = {}

    def finished(self, after=None, limit=PAGE_KEYS):
        """(count, [(finished_at, uuid)]): the history's index from its oldest
        end, or from just after the entry `after`: how many entries there
        are from there on, and the first `limit` of them (keys only)."""
        prefix = self._key("finished")
        start = prefix if after is None else finished_key(self.prefix, *after) + "\0"
        answer = self._call(lambda c: _range(c, start, _end(prefix), limit=min(limit, self.page_keys),
                                             keys_only=True))
        return answer.count, [finished_entry(kv.key) for kv in answer.kvs]

    def queued(self, limit):
        """The head of the queue, oldest first, as [(Job, revision)]."""
        if limit < 1:
            return []  # etcd reads a limit of 0 as "everything"
        def read(c):
            heads = _range(c, f"{self.prefix}/queue/", _end(f"{self.prefix}/queue/"),
                           limit=min(limit, self.page_keys)).kvs
            return _get_many(c, [self._job_key(kv.value.decode()) for kv in heads])
        return _still_queued(self._call(read))

    def queued_jobs(self, uuids):
        """[(Job, revision)] of those of uuids (queue heads, in queue order)
        whose records exist and say queued, in that order."""
        return _still_queued(self._call(lambda c: _get_many(c, [self._job_key(u) for u in uuids])))

    def assigned_and_queue(self, limit):
        """(assigned(), the uuids of the queue's first `limit` keys), at one
        revision, in one transaction: the placer read them in two calls, a
        pass's first two. More assignments than a page are read on, paged,
        at that revision (as assigned() does)."""
        prefix, queue = self._key("assigned"), f"{self.prefix}/queue/"
        def read(c):
            ops = [_prefix_range(prefix, self.page_keys)]
            if limit >= 1:  # etcd reads a limit of 0 as "everything"
                ops.append(_prefix_range(queue, min(limit, self.page_keys)))
            answer = _txn(c, [], ops)
            first, *heads = (r.response_range for r in answer.responses)
            kvs = list(first.kvs)
            if first.more and first.kvs:
                kvs += _scan(c, prefix, self.page_keys, revision=answer.header.revision,
                             start=first.kvs[-1].key + b"\0")[0]
            return kvs, [kv.value.decode() for r in heads for kv in r.kvs]
        kvs, heads = self._call(self._consistent(read))
        return self._assigned_map(kvs), heads

    def queued_count(self, uid):
        """How many jobs of uid are queued (a count-only read of an index)."""
        prefix = f"{self.prefix}/queued_by/{int(uid)}/"
        return self._call(lambda c: _range(c, prefix, _end(prefix), count_only=True).count)

    def get_many(self, uuids):
        """{uuid: (Job, revision)} of those records that exist (a few
        transactions of gets, bounded like every read)."""
        kvs = self._call(lambda c: _get_many(c, [self._job_key(u) for u in uuids]))
        return {kv.key.decode().rsplit("/", 1)[1]: (_decode(kv.value), kv.mod_revision) for kv in kvs}

    def assigned(self, node=None):
        """{node: {uuid: reservation}} of the jobs that hold a place on a
        node (starting, running, warned); given node, that node's only (and
        it is in the answer even with nothing assigned)."""
        prefix = self._key("assigned", f"{node}/" if node is not None else "")
        kvs = self._call(self._consistent(lambda c: _scan(c, prefix, self.page_keys)[0]))
        return self._assigned_map(kvs, node)

    def _assigned_map(self, kvs, node=None):
        found = {node: {}} if node is not None else {}
        for kv in kvs:
            name, job_uuid = kv.key.decode()[len(self._key("assigned")):].split("/", 1)
            found.setdefault(name, {})[job_uuid] = _loads(kv.value)
        return found

    def dependents(self, parent_uuid):
        """The uuids of the jobs submitted with parent_uuid in their `after`
        (those whose records still exist), in uuid order."""
        prefix = self._key("dependents", f"{parent_uuid}/")
        kvs = self._call(self._consistent(
            lambda c: _scan(c, prefix, self.page_keys, keys_only=True)[0]))
        return [kv.key.decode().rsplit("/", 1)[1] for kv in kvs]

    def dependents_many(self, parent_uuids):
        """{parent: dependents(parent)} of many parents, a transaction of
        ranges for up to MAX_TXN_OPS of them (the primed node read each
        ended job's dependents on its own: an etcd call a job); a parent
        with more than DEPENDENTS_AT_ONCE is read again on its own, paged."""
        parents, found = list(dict.fromkeys(parent_uuids)), {}
        for i in range(0, len(parents), MAX_TXN_OPS):
            batch = parents[i:i + MAX_TXN_OPS]
            ops = [_prefix_range(self._key("dependents", f"{p}/"), DEPENDENTS_AT_ONCE, keys_only=True)
                   for p in batch]
            answer = self._call(lambda c: _txn(c, [], ops))
            for p, r in zip(batch, answer.responses):
                kvs = r.response_range
                found[p] = (self.dependents(p) if kvs.more else
                            [kv.key.decode().rsplit("/", 1)[1] for kv in kvs.kvs])
        return found

    def queue_position(self, job):
        """(ahead, total): how many queue keys sort before the job's, and how
        many there are, counted (not read) at one revision. For one job
        (checkjob): etcd counts by walking the keys; for many, queue_positions()."""
        prefix = f"{self.prefix}/queue/"
        def count(c):
            total = _range(c, prefix, _end(prefix), count_only=True)
            ahead = _range(c, prefix, self._queue_key(job), count_only=True,
                           revision=total.header.revision)
            return ahead.count, total.count
        return self._call(self._consistent(count))

    def queue_positions(self, jobs):
        """{uuid: (ahead, total)} for many jobs at once (lclusterc list):
        one paged read of the queue's keys at one revision, then a bisection
        per job, where queue_position() would have etcd count per job."""
        prefix = f"{self.prefix}/queue/"
        kvs = self._call(self._consistent(
            lambda c: _scan(c, prefix, self.page_keys, keys_only=True)[0]))
        keys = [kv.key for kv in kvs]  # in key order: etcd's
        return {job.uuid: (bisect.bisect_left(keys, _b(self._queue_key(job))), len(keys)) for job in jobs}

    def drains(self):
        """{name: {"reason", "at", "by"}} of the drained nodes."""
        kvs = self._call(self._consistent(
            lambda c: _scan(c, self._key("drained"), self.page_keys)[0]))
        return {kv.key.decode().rsplit("/", 1)[1]: _loads(kv.value) for kv in kvs}

    def get_array(self, array_id):
        """The array's {"id", "uuids", "max_running", "submitter_uid", "at"}, or None."""
        value, _ = self._call(lambda c: c.get(self._key("arrays", array_id)))
        return None if value is None else _loads(value)

    # -- writes -------------------------------------------------------------

    def submit(self, job):
        self.submit_many([job])

    def submit_many(self, jobs, idempotency_key=None):
        """Queue new jobs, all or none, in one transaction (core.MAX_BATCH at
        most; an array's members up to what etcd takes in a request), with their index keys: queue, queued_by, dependents/<parent>/
        <uuid> for each of a job's `after`, and arrays/<id> for the members
        of an array (jobs with `array` set; the array must be new).
        idempotency_key: when a submission of the same user with that key
        was written already, write nothing and return its uuids (a list);
        otherwise record the key with ours in the same transaction. Returns
        None when it wrote."""
        keys = [self._job_key(job.uuid) for job in jobs]
        arrays = _arrays(jobs)
        if arrays and all(getattr(job, "array", None) for job in jobs):
            # The new arrays/<id> key guards its members (fresh uuid4s): a
            # compare per member would cap an array at etcd's --max-txn-ops.
            compares = []
        else:
            compares = [_version(key, 0) for key in keys]
        ops, records = [], [_encode(job) for job in jobs]
        for job, key, record in zip(jobs, keys, records):
            puts, _ = index_changes(self.prefix, None, job)
            ops += [_put(key, record)] + [_put(k, v) for k, v in puts.items()]
        for array_id, value in arrays.items():
            compares.append(_version(self._key("arrays", array_id), 0))
            ops.append(_put(self._key("arrays", array_id), json.dumps(value, separators=(",", ":"))))
        idem = None
        if idempotency_key is not None:
            digest = hashlib.sha256(str(idempotency_key).encode("utf-8", "surrogatepass")).hexdigest()
            idem = f"{self.prefix}/idempotency/{jobs[0].uid}/{digest}"
            compares.insert(0, _version(idem, 0))
        uuids = json.dumps([job.uuid for job in jobs])
        first = records[0].encode()

        def write(c):
            for again in (True, False):
                extra = []
                if idem is not None:
                    extra = [_put(idem, uuids, self._idempotency_lease(c))]
                try:
                    answer = _txn(c, compares, _nested(ops + extra, len(compares)),
                                  [_get(idem) if idem is not None else _get(keys[0]), _get(keys[0])])
                except grpc.RpcError as e:
                    if again and idem is not None and e.code() == grpc.StatusCode.NOT_FOUND:
                        with self._lock:  # our shared lease is gone (etcd restored?): a new one
                            self._idem_lease = None
                        continue
                    raise
                if answer.succeeded:
                    return None
                kvs = answer.responses[0].response_range.kvs
                if idem is not None and kvs:
                    return json.loads(kvs[0].value)
                # Our own write, applied by a member whose answer was lost
                # before we failed over? (fresh uuid4s: nobody else has them)
                kvs = answer.responses[1].response_range.kvs
                return None if kvs and kvs[0].value == first else False
        written = self._call(write)
        if written is False:
            raise RuntimeError(f"job {jobs[0].uuid if len(jobs) == 1 else 'uuid'} already exists")
        return written

    def _idempotency_lease(self, c):
        with self._lock:
            if self._idem_lease is not None and time.monotonic() < self._idem_lease[1]:
                return self._idem_lease[0]
        lease = c.lease(IDEMPOTENCY_TTL).id
        with self._lock:
            self._idem_lease = (lease, time.monotonic() + IDEMPOTENCY_TTL / 2)
        return lease

    def update(self, old, new, revision, prime=None):
        """Replace old with new if the record is still at revision; moves the
        index keys (queue, queued_by, warned_jobs, assigned) with it in the
        same transaction. Returns the record's new revision, or False if
        someone changed it first. prime: a node name; then only while that
        node holds the prime (a claim by a node whose lease expired fails)."""
        written = self.update_many([(old, new, revision)], prime=prime)[0]
        return written if written is not None else False

    def update_many(self, changes, prime=None):
        """Write changes [(old Job, new Job, revision)], each guarded by its
        record's mod_revision (and, with prime=name, all by PREFIX/prime ==
        name), in as few transactions as etcd's limits allow (MAX_TXN_OPS
        ops or compares, about PAGE_BYTES). Returns, per change, the
        record's new revision, or None: it was not written (its record
        moved, or the prime is not ours: re-read). A transaction that fails
        on a moved record is sent again without it, so one cancelled job does
        not undo a whole placement; a lost prime stops them all. None may
        also be a change that was written after all (its answer lost before
        a failover, the retry then finding the record moved): re-reading
        tells. Unavailable midway loses the answers of the batches before."""
        changes = list(changes)
        if len({new.uuid for _, new, _ in changes}) != len(changes):
            raise ValueError("update_many: a job may change only once per call")
        results = [None] * len(changes)
        prime_key = self._key("prime")
        guards = 1 if prime is not None else 0
        ops = [self._change_ops(old, new) for old, new, _ in changes]

        def send(c, batch):
            compares = [_mod(self._job_key(changes[i][1].uuid), changes[i][2]) for i in batch]
            if prime is not None:
                compares.append(_value(prime_key, prime))
            failure = [_get(self._job_key(changes[i][1].uuid), keys_only=True) for i in batch]
            if prime is not None:
                failure.append(_get(prime_key))
            return _txn(c, compares, _nested([op for i in batch for op in ops[i]], len(compares)), failure)

        sizes = [(len(change), sum(op.ByteSize() for op in change)) for change in ops]
        for batch in batches(sizes, guards):
            while batch:
                answer = self._call(lambda c: send(c, batch))
                if answer.succeeded:
                    for i in batch:
                        results[i] = answer.header.revision
                    break
                found = [r.response_range.kvs for r in answer.responses]
                if prime is not None:
                    holder = found.pop()
                    if not holder or holder[0].value.decode() != prime:
                        return results  # not primed (any more): nothing else may be written
                still = [i for i, kvs in zip(batch, found)
                         if kvs and kvs[0].mod_revision == changes[i][2]]
                if len(still) == len(batch):
                    break  # nothing moved that we can see: let the caller re-read
                batch = still
        return results

    def _change_ops(self, old, new):
        puts, deletes = index_changes(self.prefix, old, new)
        return ([_put(self._job_key(new.uuid), _encode(new))]
                + [_delete(key) for key in deletes] + [_put(k, v) for k, v in puts.items()])

    # -- the cluster: leases, registrations, the prime --------------------------

    def _key(self, kind, name=""):
        return f"{self.prefix}/{kind}/{name}" if kind != "prime" else f"{self.prefix}/prime"

    def grant(self, ttl, timeout=None):
        """A new lease of ttl seconds; its id. timeout: seconds per endpoint tried."""
        return self._call(lambda c: c.lease(ttl).id, timeout)

    def renew(self, lease, timeout=None):
        """Keep the lease alive; False if etcd says it has expired already.
        timeout: seconds per endpoint tried (the heartbeat's budget divided
        among them); the endpoint that answers is tried first next time."""
        def keepalive(c):
            return any(r.TTL > 0 for r in c.refresh_lease(lease))
        return self._call(keepalive, timeout)

    def revoke(self, lease, timeout=None):
        self._call(lambda c: c.revoke_lease(lease), timeout)

    def register(self, info, lease, timeout=None):
        """Announce this node (info: a dict with at least "name"; "machine",
        the /etc/machine-id, names the machine) under lease, as a member, and
        no longer failed: one transaction. A live registration of the name
        by another machine (both have a "machine" and they differ) raises
        NameTaken; one of this machine (a restart) is taken over."""
        name, value = info["name"], json.dumps(info, separators=(",", ":"))
        key = self._key("nodes", name)
        ops = [_put(key, value, lease), _put(self._key("members", name), value),
               _delete(self._key("failed_nodes", name))]
        def write(c):
            guard = _version(key, 0)
            for _ in range(10):  # the holder's registration may change under us
                answer = _txn(c, [guard], ops, [_get(key)])
                if answer.succeeded:
                    return
                kvs = answer.responses[0].response_range.kvs
                if not kvs:
                    guard = _version(key, 0)
                    continue
                holder = _loads(kvs[0].value)
                theirs, ours = holder.get("machine"), info.get("machine")
                if kvs[0].lease != lease and theirs and ours and theirs != ours:
                    raise NameTaken(name, holder.get("address"))
                guard = _mod(key, kvs[0].mod_revision)
            raise Unavailable(f"the registration of {name} kept changing while we registered")
        self._call(write, timeout)

    def update_registration(self, info, lease, timeout=None):
        """Refresh the live registration (free slots, running jobs), only while
        it is still ours (under lease). True if written; False if the
        registration is gone or another's (register afresh)."""
        key = self._key("nodes", info["name"])
        value = json.dumps(info, separators=(",", ":"))
        return self._call(lambda c: _txn(c, [_lease_is(key, lease)], [_put(key, value, lease)],
                                         []).succeeded, timeout)

    def cluster(self):
        """(live, members, failed, prime): {name: dict} three times and the
        primed node's name (or None), read page by page at one revision."""
        def read(c):
            live, revision = _scan(c, self._key("nodes"), self.page_keys)
            members, _ = _scan(c, self._key("members"), self.page_keys, revision=revision)
            failed, _ = _scan(c, self._key("failed_nodes"), self.page_keys, revision=revision)
            prime = _range(c, self._key("prime"), revision=revision).kvs
            return live, members, failed, prime
        *ranges, prime = self._call(self._consistent(read))
        maps = [{kv.key.decode().rsplit("/", 1)[1]: json.loads(kv.value) for kv in kvs}
                for kvs in ranges]
        return (*maps, prime[0].value.decode() if prime else None)

    def record_failed(self, name, at):
        """Record a member as failed unless it is (alive, or recorded) meanwhile."""
        def write(c):
            ok, _ = c.transaction(
                compare=[c.transactions.version(self._key("nodes", name)) == 0,
                         c.transactions.version(self._key("failed_nodes", name)) == 0],
                success=[c.transactions.put(self._key("failed_nodes", name),
                                            json.dumps({"name": name, "at": at}))], failure=[])
            return ok
        return self._call(write)

    def campaign(self, name, lease):
        """Take the prime if nobody holds it; True if we hold it now. Held
        under our name but another lease (this node's daemon before a
        restart, whose lease has yet to run out), it moves to ours: left
        there, it would go with that lease and stall placement once."""
        key = self._key("prime")
        def write(c):
            ok, ranges = c.transaction(
                compare=[c.transactions.version(key) == 0],
                success=[c.transactions.put(key, name, lease=lease)],
                failure=[c.transactions.get(key)])
            if ok:
                return True
            held = [(v, meta) for kvs in ranges for v, meta in kvs]
            if not held or held[0][0].decode() != name:
                return False
            if held[0][1].lease_id == lease:
                return True
            ok, _ = c.transaction(
                compare=[c.transactions.mod(key) == held[0][1].mod_revision],
                success=[c.transactions.put(key, name, lease=lease)], failure=[])
            return ok
        return self._call(write)

    def resign(self, name):
        """Give the prime up if we hold it."""
        key = self._key("prime")
        self._call(lambda c: c.transaction(compare=[c.transactions.value(key) == name],
                                           success=[c.transactions.delete(key)], failure=[]))

    def delete(self, records):
        """Delete records [(uuid or Job, revision)] whose record is still at
        that revision (a batch in which one moved is skipped: the next pass
        sees it again), with every index key that follows the record (queue,
        queued_by, warned_jobs, assigned, its dependents keys); an array
        whose last member goes loses its arrays/<id> too. Given a uuid, the
        record is read first to learn its keys. Returns how many were deleted."""
        def write(c, batch):
            unknown = [self._job_key(r) for r, _ in batch if not isinstance(r, core.Job)]
            read = {kv.key.decode(): (kv.mod_revision, kv.value) for kv in _get_many(c, unknown)}
            compares, ops, arrays = [], [], set()
            for record, rev in batch:
                job_uuid = record.uuid if isinstance(record, core.Job) else record
                key = self._job_key(job_uuid)
                compares.append(_mod(key, rev))
                ops.append(_delete(key))
                job = record if isinstance(record, core.Job) else None
                if job is None and key in read and read[key][0] == rev:
                    job = _decode(read[key][1])
                if job is not None:
                    ops += [_delete(k) for k in index_changes(self.prefix, job, None)[1]]
                    if getattr(job, "array", None):
                        arrays.add(job.array)
            if not _txn(c, compares, _nested(ops, len(compares))).succeeded:
                return 0
            for array_id in arrays:
                self._drop_array_if_empty(c, array_id)
            return len(batch)
        step = MAX_TXN_OPS // 2
        return sum(self._call(lambda c: write(c, records[i:i + step]))
                   for i in range(0, len(records), step))

    def delete_finished(self, entries):
        """Delete the records of finished() entries [(finished_at, uuid)]
        that are still finished at that time (with their index keys, as
        delete() does). An entry whose record is gone, or no longer says it
        (an older lclusterd deleted or changed it without this key), is
        dropped, guarded by the record. Returns (deleted, dropped)."""
        doomed, stale = self._check_finished(entries)
        return (self.delete(doomed) if doomed else 0), self._drop_stale(stale)

    def _check_finished(self, entries):
        """([(Job, revision)] of the records that say these finished/
        entries, [(key, guard)] of the entries none says)."""
        found = self.get_many([u for _, u in entries])
        said, stale = [], []
        for at, job_uuid in entries:
            job, rev = found.get(job_uuid, (None, 0))
            key = finished_key(self.prefix, at, job_uuid)
            if job is not None and key in index_keys(self.prefix, job):
                said.append((job, rev))
            else:
                record = self._job_key(job_uuid)
                stale.append((key, _mod(record, rev) if rev else _version(record, 0)))
        return said, stale

    def _drop_stale(self, stale):
        dropped = 0
        for key, guard in stale:
            answer = self._call(lambda c: _txn(c, [guard], [_delete(key)]))
            dropped += answer.succeeded and answer.responses[0].response_delete_range.deleted
        return dropped

    def _drop_array_if_empty(self, c, array_id):
        key = self._key("arrays", array_id)
        kvs = _range(c, key).kvs
        if not kvs:
            return
        uuids = _loads(kvs[0].value).get("uuids") or []
        # Members are made only with their array: once none is left, none comes back.
        for i in range(0, len(uuids), MAX_TXN_OPS - 1):
            if _get_many(c, [self._job_key(u) for u in uuids[i:i + MAX_TXN_OPS - 1]]):
                return
        _txn(c, [_mod(key, kvs[0].mod_revision)], [_delete(key)])

    def drain(self, name, info):
        """Mark a node drained (info: {"reason", "at", "by"}): no lease, it
        stays until resume() or forget()."""
        value = json.dumps(info, separators=(",", ":"))
        self._call(lambda c: _txn(c, [], [_put(self._key("drained", name), value)]))

    def resume(self, name):
        """Undo drain(); False if the node was not drained."""
        answer = self._call(lambda c: _txn(c, [], [_delete(self._key("drained", name))]))
        return answer.responses[0].response_delete_range.deleted > 0

    def forget(self, name):
        """Drop a node that is not live from the table: its members,
        failed_nodes and drained keys. False if there was none of them;
        core.Busy if the node is live (checked in the same transaction)."""
        keys = [self._key(kind, name) for kind in ("members", "failed_nodes", "drained")]
        live = self._key("nodes", name)
        answer = self._call(lambda c: _txn(c, [_version(live, 0)], [_delete(k) for k in keys]))
        if not answer.succeeded:
            raise core.Busy(f"node {name} is live: stop it before forgetting it")
        return any(r.response_delete_range.deleted for r in answer.responses)

    def drop_orphan(self, node, job_uuid):
        """Delete node's assigned/ key of a job whose record is gone (deleted
        by hand): it would hold its share of the node for good. Checked in
        the same transaction, so a record that exists keeps its key. True
        if a key was deleted."""
        answer = self._call(lambda c: _txn(c, [_version(self._job_key(job_uuid), 0)],
                                           [_delete(self._key("assigned", f"{node}/{job_uuid}"))]))
        return answer.succeeded and answer.responses[0].response_delete_range.deleted > 0

    def reindex(self):
        """Write the index keys that records written by an older lclusterd
        lack (it kept no assigned/ nor finished/ keys), and drop the
        finished/ keys whose record an older one deleted or changed, each
        guarded by its record's revision. Reads the records a page at a
        time (never all of them at once). The primed node calls it when it
        takes the prime, so the placer counts every job that holds a node;
        history.py at start-up and then hourly, so every finished record is
        pruned. Returns how many keys it wrote or dropped."""
        held = self.assigned()
        indexed = set()
        for kvs in self._pages(self._key("finished"), keys_only=True):
            indexed.update(kv.key for kv in kvs)
        fixed = 0
        for kvs in self._pages(self._key("jobs")):
            missing = []
            for kv in kvs:
                job, puts = _decode(kv.value), {}
                held_key = _assigned_key(self.prefix, job)
                if held_key is not None and job.uuid not in held.get(job.node, {}):
                    puts[held_key] = _dumps(reservation(job))
                if job.terminal:
                    done = _b(finished_key(self.prefix, core.finished_at(job), job.uuid))
                    if done in indexed:
                        indexed.discard(done)
                    else:
                        puts[done] = ""
                if puts:
                    missing.append((job.uuid, kv.mod_revision, puts))
            step = MAX_TXN_OPS // 2
            for i in range(0, len(missing), step):
                batch = missing[i:i + step]
                compares = [_mod(self._job_key(u), rev) for u, rev, _ in batch]
                ops = [_put(k, v) for _, _, puts in batch for k, v in puts.items()]
                # One moved: the next call sees it again.
                if self._call(lambda c: _txn(c, compares, ops)).succeeded:
                    fixed += len(ops)
        # What is left of indexed had no record that said it when read.
        _, stale = self._check_finished([finished_entry(key) for key in indexed])
        return fixed + self._drop_stale(stale)

    def _pages(self, prefix, keys_only=False):
        """The keys under prefix a page at a time (each page at its own
        revision): for reads that must not hold all of them at once."""
        start, end, limit = _b(prefix), _end(prefix), self.page_keys
        while True:
            answer, limit = self._call(lambda c: _page(c, start, end, limit, keys_only))
            if answer.kvs:
                yield answer.kvs
            if not answer.more or not answer.kvs:
                return
            start = answer.kvs[-1].key + b"\0"
            limit = _next_size(answer.kvs, self.page_keys)

    def warned(self):
        """{uuid: node} of the warned jobs."""
        kvs = self._call(self._consistent(
            lambda c: _scan(c, f"{self.prefix}/warned_jobs/", self.page_keys)[0]))
        return {kv.key.decode().rsplit("/", 1)[1]: kv.value.decode() for kv in kvs}

    def lock(self, name, holder, ttl):
        """Take PREFIX/locks/<name> for ttl seconds (a lease), if nobody else
        holds it (holder may take it again, e.g. after a restart). True if we
        got it; the lease runs out by itself. While etcd is out of space it
        grants no lease: then every caller gets it, since what it guards
        (pruning: guarded deletes, compaction) is safe to run twice and is
        what frees the space."""
        key = f"{self.prefix}/locks/{name}"
        def take(c):
            lease = c.lease(max(1, int(ttl)))
            for free in (c.transactions.create(key) == 0, c.transactions.value(key) == holder):
                ok, _ = c.transaction(compare=[free], success=[c.transactions.put(key, holder, lease)],
                                      failure=[])
                if ok:
                    return True
            lease.revoke()
            return False
        try:
            return self._call(take)
        except NoSpace:
            return True

    # -- watches ---------------------------------------------------------------

    WATCHED = ("queue", "nodes", "assigned", "prime", "drained")

    def watch(self, kind, callback, node=None):
        """Call callback(events) from a thread of its own for every change
        under one kind of key: "queue", "nodes", "assigned" (node given: that
        node's only), "prime", "drained". events: [(key suffix, deleted)],
        the suffix being the key less the watched prefix ("<node>/<uuid>"
        for all of assigned, "<uuid>" for one node's, "" for the prime). The
        watch starts at the revision current when watch() returns, and
        after an error resumes where it stopped; if etcd compacted that
        history meanwhile, callback([]) says "events were missed: read
        again" (so it does once etcd answers, for a watch made while etcd
        was unreachable: that raises nothing). Returns cancel(): stops the
        thread and ends its stream."""
        if kind not in self.WATCHED:
            raise ValueError(f"watch: unknown kind {kind!r}")
        if kind == "prime":
            key, end = self._key("prime"), b""
        else:
            key = self._key(kind, f"{node}/" if kind == "assigned" and node is not None else "")
            end = _end(key)
        try:
            start = self._call(lambda c: _range(c, key, end, count_only=True).header.revision) + 1
        except Unavailable:
            start = None  # the thread waits for etcd, then says callback([]): read everything
        watcher = _Watch(self, key, end, callback, start)
        with self._lock:
            self._watches.add(watcher)
        watcher.start()
        return watcher.cancel

    # -- maintenance: etcd's history and space -----------------------------------

    def compact(self, margin=COMPACT_MARGIN):
        """Compact etcd's history (the whole keyspace, all members) to the
        current revision minus margin. Returns the revision compacted to, or
        None when there was nothing new to compact. While etcd's NOSPACE
        alarm is raised (the prune pass calls this after deleting what it
        could) it goes on as recover_space() does."""
        if self._call(_nospace_raised):
            self._recover()
            return self._compacted
        return self._compact_to(margin)

    def _compact_to(self, margin, physical=False):
        """physical: wait until the members have dropped it (before a defragmentation)."""
        def run(c):
            revision = _range(c, f"{self.prefix}/ping", count_only=True).header.revision
            target = revision - margin
            with self._lock:
                if target <= self._compacted or target < 1:
                    return None
            try:
                c.kvstub.Compact(etcdrpc.CompactionRequest(revision=target, physical=physical), c.timeout,
                                 credentials=c.call_credentials, metadata=c.metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.OUT_OF_RANGE:
                    raise
                target = None  # someone compacted as far already
            with self._lock:
                self._compacted = max(self._compacted, target or revision - margin)
            return target
        return self._call(run, MAINTENANCE_TIMEOUT if physical else None)

    def space(self):
        """{"db_size": bytes of the member that answers, "quota": its
        --quota-backend-bytes (None if it cannot be read), "nospace": True
        while etcd's NOSPACE alarm is raised}."""
        def read(c):
            return c.status().db_size, _nospace_raised(c)
        size, nospace = self._call(read)
        return {"db_size": size, "quota": self._read_quota(), "nospace": nospace}

    def recover_space(self):
        """What an admin does after NOSPACE: compact all history, defragment
        every member it can reach (one after the other: it blocks each for a
        moment) and disarm the NOSPACE alarm. Returns space()."""
        self._recover()
        return self.space()

    def _recover(self):
        self._compact_to(0, physical=True)
        for index in range(len(self.endpoints)):
            conn = self._acquire(index)
            client = copy.copy(conn.client)
            client.timeout = MAINTENANCE_TIMEOUT
            failed = False
            try:
                client.defragment()
            except Exception as e:  # noqa: BLE001 -- an unreachable member is skipped
                if _kind(e) != "unreachable":
                    raise
                failed = True
            finally:
                self._release(conn, failed)
        def disarm(c):  # etcd disarms one member's alarm at a time
            for alarm in list(c.list_alarms()):
                if alarm.alarm_type == etcdrpc.NOSPACE:
                    c.disarm_alarm(alarm.member_id)
        self._call(disarm)

    def _read_quota(self):
        """etcd's quota, from its /metrics (etcd has no RPC that says it); cached."""
        with self._lock:
            if self._quota is not None:
                return self._quota
        context = None
        if self.tls.get("ca_cert"):
            context = ssl.create_default_context(cafile=self.tls["ca_cert"])
            if self.tls.get("cert_cert"):
                context.load_cert_chain(self.tls["cert_cert"], self.tls.get("cert_key"))
        for endpoint in self.endpoints:
            try:
                with urllib.request.urlopen(endpoint.rstrip("/") + "/metrics", timeout=1,
                                            context=context) as answer:
                    text = answer.read(4 << 20).decode("utf-8", "replace")
            except (OSError, ValueError):
                continue
            found = re.search(r"^etcd_server_quota_backend_bytes\s+(\S+)$", text, re.M)
            if found:
                with self._lock:
                    self._quota = int(float(found.group(1)))
                return self._quota
        return None

    def _nospace_message(self, error):
        quota = self._read_quota()
        return (f"etcd is out of space (quota {quota if quota else 'unknown'} bytes): "
                f"{_describe(error)}; fix: delete old records (a lower max_finished_jobs), then "
                "'etcdctl compact <current revision>', 'etcdctl defrag' on every member and "
                "'etcdctl alarm disarm' (lclusterd's prune pass does this), or raise etcd's "
                "--quota-backend-bytes")


class _Watch:
    """One watch stream, on the Store's channels, re-established after errors."""

    BACKOFF = (0.1, 1.0)  # seconds: first and longest wait before reconnecting

    def __init__(self, store, key, end, callback, start_revision):
        """start_revision None: from when the stream is made, then callback([])."""
        self.store, self.key, self.end, self.callback = store, _b(key), _b(end), callback
        self.next_revision = start_revision or 0  # 0: etcd's "from now"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stream = self._conn = None  # the stream open now, and its channel
        self._moving = False  # its channel failed under another call: move at once
        self._thread = threading.Thread(target=self._run, name=f"watch {key}", daemon=True)

    def start(self):
        self._thread.start()

    def cancel(self):
        self._stop.set()
        with self.store._lock:
            self.store._watches.discard(self)
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()
        if threading.current_thread() is not self._thread:  # cancelled from its callback: it ends by itself
            self._thread.join()

    def leave(self, conn):
        """conn failed a call (Store._release): if the stream is on it, end
        the stream; the watch resumes on the endpoint tried next."""
        with self._lock:
            stream = self._stream if self._conn is conn else None
            self._moving = stream is not None
        if stream is not None:
            stream.cancel()

    def _requests(self):
        # Only the create: the stream is then half-closed, which etcd (3.4,
        # 3.5) takes as "no more requests", not as the end of the watch; so
        # gRPC's thread that sends requests ends at once (one thread a watch).
        yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=self.key, range_end=self.end, start_revision=self.next_revision))

    def _run(self):
        wait = self.BACKOFF[0]
        while not self._stop.is_set():
            with self.store._lock:
                index = self.store._current
            conn = self.store._acquire(index)
            failed = False
            try:
                c = conn.client
                # hasleader: a member cut off from its cluster ends the stream
                # (else it would stay open and silent).
                stream = etcdrpc.WatchStub(c.channel).Watch(
                    self._requests(), credentials=c.call_credentials,
                    metadata=(c.metadata or ()) + (("hasleader", "true"),))
                with self._lock:
                    self._stream, self._conn = stream, conn
                if self._stop.is_set() or conn.retired:
                    stream.cancel()
                for answer in stream:
                    wait = self.BACKOFF[0]
                    if answer.created and answer.header.revision + 1 < self.next_revision:
                        # etcd is behind what we saw (restored, or made anew):
                        # a watch from our revision would wait for it silently.
                        self.next_revision = 0
                        with self._lock:
                            self._moving = True  # again at once, from now
                        stream.cancel()
                        continue
                    if answer.created and not self.next_revision:
                        # Started with no revision to resume from: from this
                        # one on, and whatever came before is unknown.
                        self.next_revision = answer.header.revision + 1
                        self._deliver([])
                    if answer.compact_revision:
                        # The history we would resume from is gone: start from
                        # what is left, and say that something was missed.
                        self.next_revision = answer.compact_revision
                        self._deliver([])
                        break
                    if answer.canceled:
                        break
                    events = []
                    for event in answer.events:
                        events.append((event.kv.key[len(self.key):].decode(),
                                       event.type == event.DELETE))
                        self.next_revision = event.kv.mod_revision + 1
                    if events:
                        self._deliver(events)
            except grpc.RpcError as e:
                if self._stop.is_set():
                    break
                # "no leader" is unreachable too: then the next endpoint. A
                # stream we ended because its channel failed elsewhere is not.
                failed = _kind(e) == "unreachable" and not self._moving
                log.debug("watch of %s broke: %s", self.key.decode(), _describe(e))
            except Exception:  # noqa: BLE001 -- a bug of ours: logged, and the watch goes on
                log.exception("watch of %s failed", self.key.decode())
            finally:
                with self._lock:
                    self._stream = self._conn = None
                    moving, self._moving = self._moving, False
                self.store._release(conn, failed)
            if moving:
                continue  # another call found the next endpoint live: no wait
            if self._stop.wait(wait):
                break
            wait = min(self.BACKOFF[1], wait * 2)

    def _deliver(self, events):
        if self._stop.is_set():
            return
        try:
            self.callback(events)
        except Exception:  # noqa: BLE001 -- a caller's bug must not end the watch
            log.exception("watch callback for %s failed", self.key.decode())


# -- requests built by hand (python3-etcd3 0.12 drops limit=, revision=,
#    count_only=, nested transactions and lease compares) --------------------------

def _b(value):
    return etcd3.utils.to_bytes(value)


def _end(prefix):
    return etcd3.utils.increment_last_byte(_b(prefix))


def _put(key, value, lease=0):
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=_b(key), value=_b(value),
                                                            lease=lease or 0))


def _delete(key):
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=_b(key)))


def _get(key, keys_only=False):
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=_b(key), keys_only=keys_only))


def _prefix_range(prefix, limit, keys_only=False):
    """The first limit keys under prefix (with their values unless
    keys_only), in key order."""
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
        key=_b(prefix), range_end=_end(prefix), limit=limit, keys_only=keys_only))


def _value(key, value):
    return etcdrpc.Compare(key=_b(key), target=etcdrpc.Compare.VALUE,
                           result=etcdrpc.Compare.EQUAL, value=_b(value))


def _version(key, version):
    return etcdrpc.Compare(key=_b(key), target=etcdrpc.Compare.VERSION,
                           result=etcdrpc.Compare.EQUAL, version=version)


def _mod(key, revision):
    return etcdrpc.Compare(key=_b(key), target=etcdrpc.Compare.MOD,
                           result=etcdrpc.Compare.EQUAL, mod_revision=revision)


def _lease_is(key, lease):
    return etcdrpc.Compare(key=_b(key), target=etcdrpc.Compare.LEASE,
                           result=etcdrpc.Compare.EQUAL, lease=lease)


def submit_size(job, prefix="/lcluster"):
    """(ops, bytes) of a new job in submit_many's transaction: its record and
    index keys (what batches() cuts a group commit's transactions by)."""
    puts, _ = index_changes(prefix, None, job)
    size = len(prefix) + 6 + len(job.uuid) + len(_encode(job))
    return 1 + len(puts), size + sum(len(k) + len(v) for k, v in puts.items())


def _txn(c, compare, success, failure=()):
    request = etcdrpc.TxnRequest(compare=compare, success=success, failure=list(failure))
    return c.kvstub.Txn(request, c.timeout, credentials=c.call_credentials, metadata=c.metadata)


def _nested(ops, compares):
    """ops as one transaction's success list within etcd's --max-txn-ops:
    more than it takes go into nested transactions (etcd checks each nested
    list against what the outer lists leave of the limit)."""
    if len(ops) <= MAX_TXN_OPS:
        return ops
    size = MAX_TXN_OPS - compares
    while max(compares, -(-len(ops) // size)) + size > MAX_TXN_OPS:
        size -= 1
    return [etcdrpc.RequestOp(request_txn=etcdrpc.TxnRequest(success=ops[i:i + size]))
            for i in range(0, len(ops), size)]


def batches(sizes, guards=0):
    """Indexes of guarded changes, given sizes [(ops, bytes)] one per
    change, in batches that one transaction takes: a compare per change
    (and `guards` more), their ops nested as _nested() does within etcd's
    --max-txn-ops, about PAGE_BYTES in all (etcd takes 1.5 MiB a request);
    a change bigger than that goes alone. (MemStore batches by it too: the
    same transactions, so the same revisions.)"""
    batch, count, size = [], 0, 0
    for i, (n, b) in enumerate(sizes):
        if batch and (not fits(len(batch) + 1 + guards, count + n) or size + b > PAGE_BYTES):
            yield batch
            batch, count, size = [], 0, 0
        batch.append(i)
        count, size = count + n, size + b
    if batch:
        yield batch


def fits(compares, ops):
    """Whether one transaction takes that many compares and success ops,
    nested as _nested() nests them: n lists of s ops pass etcd's check when
    max(compares, n) + s <= MAX_TXN_OPS (each nested list is checked against
    what the outer lists leave)."""
    if max(compares, ops) <= MAX_TXN_OPS:
        return True
    if compares >= MAX_TXN_OPS:
        return False
    root = math.isqrt(ops)
    for s in {min(MAX_TXN_OPS - compares, root), min(MAX_TXN_OPS - compares, root + 1)}:
        if s > 0 and max(compares, -(-ops // s)) + s <= MAX_TXN_OPS:
            return True
    return False


def _range(c, key, end=b"", limit=0, revision=0, keys_only=False, count_only=False):
    request = etcdrpc.RangeRequest(key=_b(key), range_end=_b(end), limit=limit, revision=revision,
                                   keys_only=keys_only, count_only=count_only)
    try:
        return c.kvstub.Range(request, c.timeout, credentials=c.call_credentials,
                              metadata=c.metadata)
    except grpc.RpcError as e:
        if revision and e.code() == grpc.StatusCode.OUT_OF_RANGE:
            raise _Compacted() from None
        raise


def _too_big(error):
    """gRPC refused an answer over its receive limit (4 MiB)."""
    return (isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "larger than max" in (error.details() or ""))


def _next_size(kvs, most):
    """How many of such records make about PAGE_BYTES."""
    size = sum(len(kv.key) + len(kv.value) for kv in kvs)
    return max(1, min(most, PAGE_BYTES * len(kvs) // max(1, size)))


def _page(c, start, end, limit, keys_only=False, revision=0):
    """One page of keys from start, up to limit of them, fewer if that many
    make a message gRPC refuses: (the range's answer, the limit it took)."""
    while True:
        try:
            # No sort order: etcd returns keys in order anyway, and a sorted
            # range would make it read the whole prefix for every page.
            return _range(c, start, end, limit=limit, revision=revision, keys_only=keys_only), limit
        except grpc.RpcError as e:
            if _too_big(e) and limit > 1:
                limit = max(1, limit // 4)
                continue
            raise


def _scan(c, prefix, page_keys, keys_only=False, revision=0, start=None):
    """Every key under prefix (from start on), in key order, pages of
    page_keys keys at most, all at one revision: ([KeyValue], revision)."""
    start, end, limit, kvs = start or _b(prefix), _end(prefix), page_keys, []
    while True:
        answer, limit = _page(c, start, end, limit, keys_only, revision)
        revision = revision or answer.header.revision
        kvs.extend(answer.kvs)
        if not answer.more or not answer.kvs:
            return kvs, revision
        start = answer.kvs[-1].key + b"\0"
        limit = _next_size(answer.kvs, page_keys)


def _still_queued(kvs):
    """[(Job, revision)] of the records kvs that say queued (one placed or
    cancelled since its queue key was read says otherwise)."""
    found = [(_decode(kv.value), kv.mod_revision) for kv in kvs]
    return [(job, rev) for job, rev in found if job.state == core.QUEUED]


def _get_many(c, keys):
    """The records at keys (those that exist), in order, a few transactions
    of gets each bounded by etcd's --max-txn-ops and by bytes."""
    found, i, step = [], 0, 32
    while i < len(keys):
        batch = keys[i:i + step]
        try:
            answer = _txn(c, [], [_get(key) for key in batch])
        except grpc.RpcError as e:
            if _too_big(e) and step > 1:
                step = max(1, step // 4)
                continue
            raise
        kvs = [kv for r in answer.responses for kv in r.response_range.kvs]
        found += kvs
        i += len(batch)
        if kvs:
            step = _next_size(kvs, MAX_TXN_OPS)
    return found


def _kind(error):
    """What a failed call means: "unreachable", "nospace", "toolarge" or None (a bug)."""
    if isinstance(error, (etcd3.exceptions.ConnectionFailedError,
                          etcd3.exceptions.ConnectionTimeoutError)):
        return "unreachable"
    if isinstance(error, etcd3.exceptions.Etcd3Exception) and isinstance(error.__context__, grpc.RpcError):
        error = error.__context__  # python3-etcd3 translated it
    if not isinstance(error, grpc.RpcError) or not hasattr(error, "code"):
        return None
    details = error.details() or ""
    if "database space exceeded" in details:
        return "nospace"
    if error.code() == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return "lease"
    if "request is too large" in details or (error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                                             and "larger than max" in details):
        return "toolarge"
    if error.code() in _UNREACHABLE:
        return "unreachable"
    if error.code() == grpc.StatusCode.INTERNAL and not details.startswith("etcdserver:"):
        return "unreachable"  # the transport's (a reset stream), not etcd's answer
    return None


def _nospace_raised(c):
    return any(a.alarm_type == etcdrpc.NOSPACE for a in c.list_alarms())


def _arrays(jobs):
    """{array id: its arrays/<id> value} for the arrays among jobs."""
    found = {}
    for job in jobs:
        array_id = getattr(job, "array", None)
        if array_id:
            entry = found.setdefault(array_id, {
                "id": array_id, "uuids": [], "max_running": getattr(job, "max_running", None),
                "submitter_uid": job.submitter_uid, "at": job.submitted_at})
            entry["uuids"].append(job.uuid)
    return found


def _dumps(value):
    return json.dumps(value, separators=(",", ":"))


def _encode(job):
    """job.to_dict() as JSON, without dataclasses.asdict's deep copy (4/5 of
    a placement's time at 5,000 jobs): the fields are JSON-able as they are.
    test_store_contract checks the bytes are to_dict()'s."""
    record = {name: getattr(job, name) for name in _fields(type(job))}
    record["unit"] = job.unit
    return json.dumps(record, separators=(",", ":"))


_FIELDS = {}


def _fields(cls):
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _decode(value):
    return core.Job.from_dict(json.loads(value))


def _loads(value):
    try:
        found = json.loads(value)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _describe(error):
    if isinstance(error, etcd3.exceptions.Etcd3Exception) and isinstance(error.__context__, grpc.RpcError):
        error = error.__context__
    if isinstance(error, grpc.RpcError) and hasattr(error, "details"):
        return error.details() or str(error.code())
    return str(error) or type(error).__name__
