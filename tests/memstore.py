"""MemStore: lclusterd.store.Store in memory, for unit tests and the node's
in-memory harness (issue 11 item 7). Same public calls, same answers, same
exceptions (store.Unavailable, NoSpace, LeaseExpired, NameTaken); the
contract suite (tests/integration/test_store_contract.py) runs against both
so that it stays honest.

It keeps one flat keyspace as etcd does, with the same key names, a
revision per transaction and mod revisions per key, and moves the index keys
with the records by store.index_changes(), the rules the real Store writes by.

What it simulates beyond that, for tests:
    clock        the time leases expire by (default time.monotonic); with an
                 injected clock, expiry happens on the next call after the
                 deadline, or at expire_leases()
    down         True: every call raises store.Unavailable (etcd unreachable)
    nospace      True: check_space() raises store.NoSpace and writes fail
                 with it (reads and deletes still work, as in etcd)
    revision     the current revision (etcd revisions spent, for the bench)
Watches call back synchronously, before the call whose transaction made
the events returns (never under the store's lock), in revision order; a
call made while another thread is delivering leaves its events to that
thread. Deterministic for tests; the real Store calls back from a thread of
its own per watch, a few milliseconds later.
"""

import bisect
import hashlib
import itertools
import json
import logging
import threading
import time

from lclusterd import core
from lclusterd import store as etcd_store
from lclusterd.store import (IDEMPOTENCY_TTL, MAX_TXN_OPS, LeaseExpired, NameTaken, NoSpace,
                             Unavailable, index_changes)

log = logging.getLogger(__name__)


class MemStore:
    def __init__(self, prefix="/lcluster", clock=time.monotonic, page_keys=etcd_store.PAGE_KEYS):
        self.prefix = prefix
        self.clock = clock
        self.page_keys = page_keys
        self.down = False
        self.nospace = False
        self._lock = threading.RLock()
        self._kv = {}  # key -> [value (str), mod_revision, lease id or 0]
        self._keys = []  # the keys of _kv in order: ranges are bisected, not sorted per read
        self._revision = 1  # etcd starts at 1
        self._compacted = 0
        self._leases = {}  # id -> [ttl, deadline]
        self._lease_ids = itertools.count(0x1000)
        self._idem_lease = None  # (lease id, clock time to stop using it), as Store's
        self._watches = {}  # id -> (key, end or None for one key, callback)
        self._watch_ids = itertools.count(1)
        self._pending = []  # [(watch id, events)] in revision order, not yet delivered
        self._delivering = False
        self._resync = set()  # watches made while down, owed a callback([])

    @property
    def revision(self):
        with self._lock:
            return self._revision

    # -- the keyspace ------------------------------------------------------------

    def _enter(self, write=False):
        """Every call starts here (under the lock): etcd down, out of space, leases run out."""
        if self.down:
            raise Unavailable("etcd is unreachable at memory (MemStore.down)")
        if self._resync:  # watches made while it was down: "read everything"
            self._pending += [(watch_id, []) for watch_id in sorted(self._resync)]
            self._resync.clear()
        if write and self.nospace:
            raise NoSpace("etcd is out of space (quota unknown bytes): database space exceeded")
        self._expire()

    def _expire(self):
        now = self.clock()
        for lease, (_, deadline) in list(self._leases.items()):
            if deadline <= now:
                self._drop_lease(lease)

    def _drop_lease(self, lease):
        del self._leases[lease]
        keys = [k for k, (_, _, owner) in self._kv.items() if owner == lease]
        if keys:
            self._apply([("delete", k) for k in keys])

    def _key(self, kind, name=""):
        return f"{self.prefix}/{kind}/{name}" if kind != "prime" else f"{self.prefix}/prime"

    def _job_key(self, job_uuid):
        return f"{self.prefix}/jobs/{job_uuid}"

    def _value(self, key):
        found = self._kv.get(key)
        return None if found is None else found[0]

    def _mod(self, key):
        found = self._kv.get(key)
        return 0 if found is None else found[1]

    def _range(self, prefix, limit=None):
        """[(key, value, mod_revision)] under prefix, in key order (the first limit)."""
        found, i = [], bisect.bisect_left(self._keys, prefix)
        while i < len(self._keys) and self._keys[i].startswith(prefix) and len(found) != limit:
            value = self._kv[self._keys[i]]
            found.append((self._keys[i], value[0], value[1]))
            i += 1
        return found

    def _apply(self, ops):
        """One transaction's writes at one new revision: ops [("put", key,
        value, lease) | ("delete", key)]. Returns the revision it wrote at
        (unchanged if nothing changed: etcd does not count deletes of nothing)."""
        if any(op[0] == "put" and op[3] and op[3] not in self._leases for op in ops):
            raise LeaseExpired("etcd has no such lease any more (requested lease not found)")
        events, revision = [], self._revision + 1
        for op in ops:
            if op[0] == "put":
                _, key, value, lease = op
                if key not in self._kv:
                    bisect.insort(self._keys, key)
                self._kv[key] = [value, revision, lease or 0]
                events.append((key, False))
            elif self._kv.pop(op[1], None) is not None:
                del self._keys[bisect.bisect_left(self._keys, op[1])]
                events.append((op[1], True))
        if events:
            self._revision = revision
            self._queue_events(events)
        return self._revision

    def _put(self, key, value, lease=0):
        return ("put", key, value, lease)

    # -- watches -----------------------------------------------------------------

    def _queue_events(self, events):
        for watch_id, (key, end, _) in self._watches.items():
            mine = [(k[len(key):], deleted) for k, deleted in events
                    if (k == key if end is None else k.startswith(key))]
            if mine:
                self._pending.append((watch_id, mine))

    def _deliver(self):
        """Deliver what is pending, outside the lock; one thread at a time
        (the one delivering takes what others add meanwhile), so every
        watch sees its events in revision order."""
        with self._lock:
            if self._delivering:
                return
            self._delivering = True
        try:
            while True:
                with self._lock:
                    if not self._pending:
                        self._delivering = False
                        return
                    watch_id, events = self._pending.pop(0)
                    watch = self._watches.get(watch_id)
                if watch is not None:
                    try:
                        watch[2](events)
                    except Exception:  # noqa: BLE001 -- as Store: logged, the watch goes on
                        log.exception("watch callback for %s failed", watch[0])
        except BaseException:
            with self._lock:
                self._delivering = False
            raise

    def watch(self, kind, callback, node=None):
        if kind not in etcd_store.Store.WATCHED:
            raise ValueError(f"watch: unknown kind {kind!r}")
        with self._lock:
            if kind == "prime":
                key, end = self._key("prime"), None
            else:
                key = self._key(kind, f"{node}/" if kind == "assigned" and node is not None else "")
                end = True
            watch_id = next(self._watch_ids)
            self._watches[watch_id] = (key, end, callback)
            if self.down:  # as Store: no error; callback([]) once etcd answers again
                self._resync.add(watch_id)

        def cancel():
            with self._lock:
                self._watches.pop(watch_id, None)
        return cancel

    def _write(self, fn):
        """Run fn() under the lock as one call, then deliver its watch events."""
        try:
            with self._lock:
                return fn()
        finally:
            self._deliver()

    def _read(self, fn):
        """A read: leases may run out on the way in, so it delivers too."""
        def read():
            self._enter()
            return fn()
        return self._write(read)

    # -- reads -------------------------------------------------------------------

    def ping(self, timeout=None):
        self._read(lambda: None)

    def check_space(self):
        def read():
            if self.nospace:
                raise NoSpace("etcd is out of space (quota unknown bytes): its NOSPACE alarm is raised")
        self._read(read)

    def get(self, job_uuid):
        def read():
            value = self._value(self._job_key(job_uuid))
            return None if value is None else (_decode(value), self._mod(self._job_key(job_uuid)))
        return self._read(read)

    def resolve(self, ref):
        def read():
            return [k.rsplit("/", 1)[1] for k, _, _ in self._range(self._job_key(ref))]
        uuids = self._read(read)
        if len(uuids) > 2:  # Store reads two keys and the count
            raise core.AmbiguousRef(f"'{ref}' matches {len(uuids)} jobs: give more of the uuid")
        return core.pick_by_prefix(ref, uuids)

    def all_jobs(self):
        return self._read(lambda: [(_decode(v), rev) for _, v, rev in self._range(f"{self.prefix}/jobs/")])

    def get_many(self, uuids):
        def read():
            found = {}
            for job_uuid in uuids:
                value = self._value(self._job_key(job_uuid))
                if value is not None:
                    found[job_uuid] = (_decode(value), self._mod(self._job_key(job_uuid)))
            return found
        return self._read(read)

    def finished(self, after=None, limit=etcd_store.PAGE_KEYS):
        def read():
            prefix = self._key("finished")
            start = prefix if after is None else etcd_store.finished_key(self.prefix, *after) + "\0"
            i = bisect.bisect_left(self._keys, start)
            keys = list(itertools.takewhile(lambda k: k.startswith(prefix), self._keys[i:]))
            return len(keys), [etcd_store.finished_entry(k) for k in keys[:min(limit, self.page_keys)]]
        return self._read(read)

    def queued(self, limit):
        if limit < 1:
            return []
        def read():
            heads = self._range(f"{self.prefix}/queue/", min(limit, self.page_keys))
            return self._still_queued([u for _, u, _ in heads])
        return self._read(read)

    def queued_jobs(self, uuids):
        return self._read(lambda: self._still_queued(uuids))

    def _still_queued(self, uuids):
        found = [(self._value(self._job_key(u)), self._mod(self._job_key(u))) for u in uuids]
        jobs = [(_decode(v), rev) for v, rev in found if v is not None]
        return [(job, rev) for job, rev in jobs if job.state == core.QUEUED]

    def assigned_and_queue(self, limit):
        def read():  # one read: one revision, as Store's one transaction
            heads = self._range(f"{self.prefix}/queue/", min(limit, self.page_keys)) if limit >= 1 else []
            return self._assigned(), [u for _, u, _ in heads]
        return self._read(read)

    def queued_count(self, uid):
        return self._read(lambda: len(self._range(f"{self.prefix}/queued_by/{int(uid)}/")))

    def queue_position(self, job):
        def read():
            mine = f"{self.prefix}/queue/{core.queue_rank(job)}"
            keys = [k for k, _, _ in self._range(f"{self.prefix}/queue/")]
            return sum(k < mine for k in keys), len(keys)
        return self._read(read)

    def queue_positions(self, jobs):
        def read():
            keys = [k for k, _, _ in self._range(f"{self.prefix}/queue/")]
            return {job.uuid: (bisect.bisect_left(keys, f"{self.prefix}/queue/{core.queue_rank(job)}"),
                               len(keys)) for job in jobs}
        return self._read(read)

    def assigned(self, node=None):
        return self._read(lambda: self._assigned(node))

    def _assigned(self, node=None):
        base = self._key("assigned")
        found = {node: {}} if node is not None else {}
        for key, value, _ in self._range(self._key("assigned", f"{node}/" if node is not None else "")):
            name, job_uuid = key[len(base):].split("/", 1)
            found.setdefault(name, {})[job_uuid] = json.loads(value)
        return found

    def dependents(self, parent_uuid):
        return self._read(lambda: [k.rsplit("/", 1)[1]
                                   for k, _, _ in self._range(self._key("dependents", f"{parent_uuid}/"))])

    def dependents_many(self, parent_uuids):
        return {p: self.dependents(p) for p in parent_uuids}

    def drains(self):
        return self._read(lambda: {k.rsplit("/", 1)[1]: json.loads(v)
                                   for k, v, _ in self._range(self._key("drained"))})

    def get_array(self, array_id):
        def read():
            value = self._value(self._key("arrays", array_id))
            return None if value is None else json.loads(value)
        return self._read(read)

    def reindex(self):
        def write():
            self._enter(write=True)
            ops, indexed = [], set(k for k, _, _ in self._range(self._key("finished")))
            for key, value, _ in self._range(f"{self.prefix}/jobs/"):
                job = _decode(value)
                held = etcd_store._assigned_key(self.prefix, job)
                if held is not None and held not in self._kv:
                    ops.append(self._put(held, _dumps(etcd_store.reservation(job))))
                if job.terminal:
                    done = etcd_store.finished_key(self.prefix, core.finished_at(job), job.uuid)
                    if done in indexed:
                        indexed.discard(done)
                    else:
                        ops.append(self._put(done, ""))
            ops += [("delete", key) for key in indexed]  # no record says them
            if ops:
                self._apply(ops)
            return len(ops)
        return self._write(write)

    def delete_finished(self, entries):
        found = self.get_many([u for _, u in entries])  # as Store: tests count what it reads
        doomed, stale = [], []
        for at, job_uuid in entries:
            job, rev = found.get(job_uuid, (None, 0))
            key = etcd_store.finished_key(self.prefix, at, job_uuid)
            if job is not None and key in etcd_store.index_keys(self.prefix, job):
                doomed.append((job, rev))
            else:
                stale.append((key, job_uuid, rev))

        def drop():  # each guarded by its record (its revision, or its absence)
            self._enter()
            ops = [("delete", key) for key, job_uuid, rev in stale
                   if key in self._kv and self._mod(self._job_key(job_uuid)) == rev]
            if ops:
                self._apply(ops)
            return len(ops)
        dropped = self._write(drop) if stale else 0
        return (self.delete(doomed) if doomed else 0), dropped

    def warned(self):
        return self._read(lambda: {k.rsplit("/", 1)[1]: v
                                   for k, v, _ in self._range(f"{self.prefix}/warned_jobs/")})

    def cluster(self):
        def read():
            maps = [{k.rsplit("/", 1)[1]: json.loads(v) for k, v, _ in self._range(self._key(kind))}
                    for kind in ("nodes", "members", "failed_nodes")]
            return (*maps, self._value(self._key("prime")))
        return self._read(read)

    # -- writes ------------------------------------------------------------------

    def submit(self, job):
        self.submit_many([job])

    def submit_many(self, jobs, idempotency_key=None):
        def write():
            self._enter(write=True)
            idem = None
            if idempotency_key is not None:
                digest = hashlib.sha256(str(idempotency_key).encode("utf-8", "surrogatepass")).hexdigest()
                idem = f"{self.prefix}/idempotency/{jobs[0].uid}/{digest}"
                if self._value(idem) is not None:
                    return json.loads(self._value(idem))
            arrays = etcd_store._arrays(jobs)
            for job in jobs:
                if self._value(self._job_key(job.uuid)) is not None:
                    raise RuntimeError(f"job {jobs[0].uuid if len(jobs) == 1 else 'uuid'} already exists")
            if any(self._value(self._key("arrays", a)) is not None for a in arrays):
                raise RuntimeError("job uuid already exists")  # what Store says: its guard failed
            ops = []
            for job in jobs:
                puts, _ = index_changes(self.prefix, None, job)
                ops += [self._put(self._job_key(job.uuid), _encode(job))]
                ops += [self._put(k, v) for k, v in puts.items()]
            for array_id, value in arrays.items():
                ops.append(self._put(self._key("arrays", array_id), _dumps(value)))
            if idem is not None:
                ops.append(self._put(idem, json.dumps([job.uuid for job in jobs]), self._idempotency_lease()))
            self._apply(ops)
            return None
        return self._write(write)

    def _idempotency_lease(self):
        now = self.clock()
        if self._idem_lease is None or now >= self._idem_lease[1] or self._idem_lease[0] not in self._leases:
            lease = self._grant(IDEMPOTENCY_TTL)
            self._idem_lease = (lease, now + IDEMPOTENCY_TTL / 2)
        return self._idem_lease[0]

    def update(self, old, new, revision, prime=None):
        written = self.update_many([(old, new, revision)], prime=prime)[0]
        return written if written is not None else False

    def update_many(self, changes, prime=None):
        changes = list(changes)
        if len({new.uuid for _, new, _ in changes}) != len(changes):
            raise ValueError("update_many: a job may change only once per call")

        def write():
            self._enter(write=True)
            results = [None] * len(changes)
            if prime is not None and self._value(self._key("prime")) != prime:
                return results
            ops = []
            for old, new, _ in changes:
                puts, deletes = index_changes(self.prefix, old, new)
                ops.append([self._put(self._job_key(new.uuid), _encode(new))]
                           + [("delete", k) for k in deletes] + [self._put(k, v) for k, v in puts.items()])
            # In Store's transactions (the same revisions); a moved record is
            # left out of its own, as Store sends it again without it.
            sizes = [(len(o), sum(len(op[1]) + len(op[2]) if op[0] == "put" else len(op[1]) for op in o))
                     for o in ops]
            for batch in etcd_store.batches(sizes, 1 if prime is not None else 0):
                written = [i for i in batch if self._mod(self._job_key(changes[i][1].uuid)) == changes[i][2]]
                if written:
                    revision = self._apply([op for i in written for op in ops[i]])
                    for i in written:
                        results[i] = revision
            return results
        return self._write(write)

    def delete(self, records):
        def write():
            self._enter()
            deleted = 0
            step = MAX_TXN_OPS // 2  # Store's batches: one that moved is skipped whole
            for i in range(0, len(records), step):
                batch = records[i:i + step]
                keys = [self._job_key(r.uuid if isinstance(r, core.Job) else r) for r, _ in batch]
                if any(self._mod(key) != rev for key, (_, rev) in zip(keys, batch)):
                    continue
                ops, arrays = [], set()
                for key in keys:
                    ops.append(("delete", key))
                    if self._value(key) is None:
                        continue
                    job = _decode(self._value(key))
                    ops += [("delete", k) for k in index_changes(self.prefix, job, None)[1]]
                    if getattr(job, "array", None):
                        arrays.add(job.array)
                self._apply(ops)
                for array_id in arrays:
                    value = self._value(self._key("arrays", array_id))
                    if value is not None and not any(self._value(self._job_key(u)) is not None
                                                     for u in json.loads(value).get("uuids") or []):
                        self._apply([("delete", self._key("arrays", array_id))])
                deleted += len(batch)
            return deleted
        return self._write(write)

    def drain(self, name, info):
        def write():
            self._enter(write=True)
            self._apply([self._put(self._key("drained", name), _dumps(info))])
        self._write(write)

    def resume(self, name):
        def write():
            self._enter()
            found = self._value(self._key("drained", name)) is not None
            self._apply([("delete", self._key("drained", name))])
            return found
        return self._write(write)

    def drop_orphan(self, node, job_uuid):
        def write():
            self._enter()
            key = self._key("assigned", f"{node}/{job_uuid}")
            if self._value(self._job_key(job_uuid)) is not None or self._value(key) is None:
                return False
            self._apply([("delete", key)])
            return True
        return self._write(write)

    def forget(self, name):
        def write():
            self._enter()
            if self._value(self._key("nodes", name)) is not None:
                raise core.Busy(f"node {name} is live: stop it before forgetting it")
            keys = [self._key(kind, name) for kind in ("members", "failed_nodes", "drained")]
            found = any(self._value(k) is not None for k in keys)
            self._apply([("delete", k) for k in keys])
            return found
        return self._write(write)

    # -- leases, registrations, the prime ------------------------------------------

    def _grant(self, ttl):
        lease = next(self._lease_ids)
        self._leases[lease] = [ttl, self.clock() + ttl]
        return lease

    def grant(self, ttl, timeout=None):
        def write():
            self._enter(write=True)  # etcd grants no lease under NOSPACE
            return self._grant(ttl)
        return self._write(write)

    def renew(self, lease, timeout=None):
        def write():
            self._enter()
            if lease not in self._leases:
                return False
            self._leases[lease][1] = self.clock() + self._leases[lease][0]
            return True
        return self._write(write)

    def revoke(self, lease, timeout=None):
        def write():
            self._enter()
            if lease in self._leases:
                self._drop_lease(lease)
        self._write(write)

    def expire_leases(self):
        """Let leases past their deadline (by clock) expire now, as etcd would have."""
        self._write(self._expire)

    def register(self, info, lease, timeout=None):
        name = info["name"]
        def write():
            self._enter(write=True)
            key = self._key("nodes", name)
            held = self._kv.get(key)
            if held is not None:
                holder = _loads(held[0])
                theirs, ours = holder.get("machine"), info.get("machine")
                if held[2] != lease and theirs and ours and theirs != ours:
                    raise NameTaken(name, holder.get("address"))
            value = _dumps(info)
            self._apply([self._put(key, value, lease), self._put(self._key("members", name), value),
                         ("delete", self._key("failed_nodes", name))])
        self._write(write)

    def update_registration(self, info, lease, timeout=None):
        def write():
            self._enter(write=True)
            key = self._key("nodes", info["name"])
            held = self._kv.get(key)
            if held is None or held[2] != lease:
                return False
            self._apply([self._put(key, _dumps(info), lease)])
            return True
        return self._write(write)

    def record_failed(self, name, at):
        def write():
            self._enter(write=True)
            if self._value(self._key("nodes", name)) is not None or \
                    self._value(self._key("failed_nodes", name)) is not None:
                return False
            self._apply([self._put(self._key("failed_nodes", name), json.dumps({"name": name, "at": at}))])
            return True
        return self._write(write)

    def campaign(self, name, lease):
        def write():
            self._enter(write=True)
            holder = self._value(self._key("prime"))
            if holder is None or (holder == name and self._kv[self._key("prime")][2] != lease):
                self._apply([self._put(self._key("prime"), name, lease)])
                return True
            return holder == name
        return self._write(write)

    def resign(self, name):
        def write():
            self._enter()
            if self._value(self._key("prime")) == name:
                self._apply([("delete", self._key("prime"))])
        self._write(write)

    def lock(self, name, holder, ttl):
        def write():
            try:
                self._enter(write=True)
            except NoSpace:
                return True  # as Store: pruning is what frees the space
            key = f"{self.prefix}/locks/{name}"
            if self._value(key) not in (None, holder):
                return False
            self._apply([self._put(key, holder, self._grant(max(1, int(ttl))))])
            return True
        return self._write(write)

    # -- maintenance -------------------------------------------------------------

    def compact(self, margin=etcd_store.COMPACT_MARGIN):
        return self._read(lambda: self._compact(margin))

    def _compact(self, margin):
        if self.nospace:
            self.nospace = False  # Store's compact() recovers the space then
            return self._compacted
        target = self._revision - margin
        if target <= self._compacted or target < 1:
            return None
        self._compacted = target
        return target

    def space(self):
        def read():
            size = sum(len(k) + len(v[0]) for k, v in self._kv.items())
            return {"db_size": size, "quota": None, "nospace": self.nospace}
        return self._read(read)

    def recover_space(self):
        with self._lock:
            self.nospace = False
        return self.space()

    def close(self):
        with self._lock:
            self._watches.clear()

    def snapshot(self):
        """{key: value} of the whole keyspace (for tests that look at the keys)."""
        with self._lock:
            return {k: self._kv[k][0] for k in self._keys}


# The same bytes as Store writes.
_encode, _decode, _loads = etcd_store._encode, etcd_store._decode, etcd_store._loads


def _dumps(value):
    return json.dumps(value, separators=(",", ":"))
