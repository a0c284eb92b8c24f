"""etcd: the only module that talks to it. Holds job records and the queue.

Keyspace (PREFIX is the `prefix` setting, /lcluster by default):

    PREFIX/jobs/<uuid>                 the job record, JSON (core.Job.to_dict)
    PREFIX/queue/<rank>-<submit-ns>-<uuid>  present while the job is queued; the
                                       key sorts the queue: priority (rank =
                                       100 - priority), then submission order
    PREFIX/nodes/<name>                a live node's registration, JSON (name,
                                       address, slots, free, running), under
                                       the node's lease: gone when it dies
    PREFIX/members/<name>              the same, without a lease: every node
                                       that ever registered (lclusterc nodes)
    PREFIX/failed_nodes/<name>         {"name", "at"}: a member whose lease
                                       expired; deleted when it registers again
    PREFIX/prime                       the primed node's name, under its lease
    PREFIX/warned_jobs/<uuid>          present while the job is warned; its
                                       value is the job's node
    PREFIX/locks/<name>                held under a lease by one node at a time
                                       (history pruning); the value names it

Every change of a record is one transaction guarded by the record's
mod_revision, and moves the queue key in the same transaction, so a job is
never claimed twice and the queue never disagrees with the records.
The calls block (python3-etcd3 is synchronous): the daemon runs them in
threads.
"""

import json
import urllib.parse

import etcd3
import etcd3.exceptions
import etcd3.utils
import grpc

from lclusterd import core

CALL_TIMEOUT = 2  # seconds; etcd answers in milliseconds, and a dead member must
                  # not hold up the next endpoint longer than a fraction of the lease TTL
# gRPC backs off up to 2 minutes between reconnects; etcd back after an
# outage should be seen within a second.
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
GRPC_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000)]


class Unavailable(Exception):
    """etcd cannot be reached; nothing was written."""


class Store:
    def __init__(self, endpoints, prefix="/lcluster", tls=None):
        """tls: {"ca_cert", "cert_key", "cert_cert"} file paths, or None (plain)."""
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.tls = {k: v for k, v in (tls or {}).items() if v}
        self._clients = [None] * len(self.endpoints)
        self._current = 0

    # -- plumbing -----------------------------------------------------------

    def _client(self, index):
        if self._clients[index] is None:
            url = urllib.parse.urlsplit(self.endpoints[index])
            self._clients[index] = etcd3.client(host=url.hostname or "127.0.0.1",
                                                port=url.port or 2379, timeout=CALL_TIMEOUT,
                                                grpc_options=GRPC_OPTIONS, **self.tls)
        return self._clients[index]

    def _call(self, fn):
        """Run fn(client), failing over through the endpoints in turn."""
        last = None
        for attempt in range(len(self.endpoints)):
            index = (self._current + attempt) % len(self.endpoints)
            try:
                result = fn(self._client(index))
                self._current = index
                return result
            except (etcd3.exceptions.ConnectionFailedError,
                    etcd3.exceptions.ConnectionTimeoutError, grpc.RpcError) as e:
                if isinstance(e, grpc.RpcError) and e.code() not in UNREACHABLE:
                    raise  # etcd answered: a bug of ours, not an outage
                last = e
                self._drop(index)  # a fresh channel next time, not gRPC's backed-off one
        where = ", ".join(self.endpoints)
        raise Unavailable(f"etcd is unreachable at {where} ({_describe(last)})")

    def _drop(self, index):
        if self._clients[index] is not None:
            self._clients[index].close()
            self._clients[index] = None

    def close(self):
        for index in range(len(self._clients)):
            self._drop(index)

    def _job_key(self, job_uuid):
        return f"{self.prefix}/jobs/{job_uuid}"

    def _warned_key(self, job_uuid):
        return f"{self.prefix}/warned_jobs/{job_uuid}"

    def _queue_key(self, job):
        return f"{self.prefix}/queue/{core.queue_rank(job)}"

    # -- reads --------------------------------------------------------------

    def ping(self):
        self._call(lambda c: c.get(f"{self.prefix}/ping"))

    def get(self, job_uuid):
        """(Job, revision), or None when there is no such record."""
        value, meta = self._call(lambda c: c.get(self._job_key(job_uuid)))
        return None if value is None else (_decode(value), meta.mod_revision)

    def resolve(self, ref):
        """The full uuid that a validated ref (uuid or prefix) names."""
        keys = self._call(lambda c: [m.key.decode() for _, m in c.get_prefix(
            self._job_key(ref), keys_only=True)])
        return core.pick_by_prefix(ref, [k.rsplit("/", 1)[1] for k in keys])

    def all_jobs(self):
        """Every record, as [(Job, revision)]."""
        return self._call(lambda c: [(_decode(v), m.mod_revision)
                                     for v, m in c.get_prefix(f"{self.prefix}/jobs/")])

    def queued(self, limit):
        """The head of the queue, oldest first, as [(Job, revision)]."""
        if limit < 1:
            return []  # etcd reads a limit of 0 as "everything"
        def read(c):
            heads = [kv.value.decode() for kv in _range(c, f"{self.prefix}/queue/", limit)]
            found = []
            # A few round trips for all the records: etcd caps a transaction's operations.
            for start in range(0, len(heads), MAX_TXN_OPS):
                _, ranges = c.transaction(compare=[], success=[
                    c.transactions.get(self._job_key(u)) for u in heads[start:start + MAX_TXN_OPS]],
                    failure=[])
                found += [(_decode(v), m.mod_revision) for kvs in ranges for v, m in kvs]
            return found
        return [(job, rev) for job, rev in self._call(read) if job.state == core.QUEUED]

    # -- writes -------------------------------------------------------------

    def submit(self, job):
        self.submit_many([job])

    def submit_many(self, jobs):
        """Queue new jobs, all or none, in one transaction (core.MAX_BATCH at most)."""
        def write(c):
            keys = [self._job_key(job.uuid) for job in jobs]
            ok, _ = c.transaction(
                compare=[c.transactions.version(key) == 0 for key in keys],
                success=[op for job, key in zip(jobs, keys)
                         for op in (c.transactions.put(key, _encode(job)),
                                    c.transactions.put(self._queue_key(job), job.uuid))],
                failure=[])
            return ok
        if not self._call(write):
            raise RuntimeError(f"job {jobs[0].uuid if len(jobs) == 1 else 'uuid'} already exists")

    def update(self, old, new, revision, prime=None):
        """Replace old with new if the record is still at revision; moves the
        queue key when the job enters or leaves the queue. Returns the
        record's new revision, or False if someone changed it first. prime:
        a node name; then only while that node holds the prime (a claim by a
        node whose lease expired fails)."""
        def write(c):
            key = self._job_key(new.uuid)
            ops = [c.transactions.put(key, _encode(new))]
            if old.state == core.QUEUED != new.state:
                ops.append(c.transactions.delete(self._queue_key(old)))
            if new.state == core.QUEUED != old.state:
                ops.append(c.transactions.put(self._queue_key(new), new.uuid))
            if old.state == core.WARNED != new.state:
                ops.append(c.transactions.delete(self._warned_key(old.uuid)))
            if new.state == core.WARNED != old.state:
                ops.append(c.transactions.put(self._warned_key(new.uuid), new.node or ""))
            compare = [c.transactions.mod(key) == revision]
            if prime is not None:
                compare.append(c.transactions.value(self._key("prime")) == prime)
            ok, responses = c.transaction(compare=compare, success=ops, failure=[])
            return ok and responses[0].response_put.header.revision
        return self._call(write)

    # -- the cluster: leases, registrations, the prime --------------------------

    def _key(self, kind, name=""):
        return f"{self.prefix}/{kind}/{name}" if kind != "prime" else f"{self.prefix}/prime"

    def grant(self, ttl):
        """A new lease of ttl seconds; its id."""
        return self._call(lambda c: c.lease(ttl).id)

    def renew(self, lease):
        """Keep the lease alive; False if etcd says it has expired already."""
        def keepalive(c):
            return any(r.TTL > 0 for r in c.refresh_lease(lease))
        return self._call(keepalive)

    def revoke(self, lease):
        self._call(lambda c: c.revoke_lease(lease))

    def register(self, info, lease):
        """Announce this node (info: a dict with at least "name") under lease,
        as a member, and no longer failed: one transaction."""
        name, value = info["name"], json.dumps(info, separators=(",", ":"))
        def write(c):
            c.transaction(compare=[], success=[
                c.transactions.put(self._key("nodes", name), value, lease=lease),
                c.transactions.put(self._key("members", name), value),
                c.transactions.delete(self._key("failed_nodes", name))], failure=[])
        self._call(write)

    def update_registration(self, info, lease):
        """Refresh the live registration (free slots, running jobs)."""
        self._call(lambda c: c.put(self._key("nodes", info["name"]),
                                   json.dumps(info, separators=(",", ":")), lease=lease))

    def cluster(self):
        """(live, members, failed, prime): {name: dict} three times and the
        primed node's name (or None), read in one transaction."""
        def read(c):
            _, ranges = c.transaction(compare=[], success=[
                c.transactions.get(self._key(kind), range_end=_end(self._key(kind)))
                for kind in ("nodes", "members", "failed_nodes")] + [
                c.transactions.get(self._key("prime"))], failure=[])
            return ranges
        ranges = self._call(read)
        maps = [{m.key.decode().rsplit("/", 1)[1]: json.loads(v) for v, m in kvs}
                for kvs in ranges[:3]]
        prime = ranges[3][0][0].decode() if ranges[3] else None
        return (*maps, prime)

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
        """Take the prime if nobody holds it; True if we hold it now."""
        key = self._key("prime")
        def write(c):
            ok, ranges = c.transaction(
                compare=[c.transactions.version(key) == 0],
                success=[c.transactions.put(key, name, lease=lease)],
                failure=[c.transactions.get(key)])
            return ok or any(v.decode() == name for kvs in ranges for v, _ in kvs)
        return self._call(write)

    def resign(self, name):
        """Give the prime up if we hold it."""
        key = self._key("prime")
        self._call(lambda c: c.transaction(compare=[c.transactions.value(key) == name],
                                           success=[c.transactions.delete(key)], failure=[]))

    def delete(self, records):
        """Delete records [(uuid, revision)] whose record is still at that
        revision (a batch in which one moved is skipped: the next pass sees
        it again). Returns how many were deleted."""
        def write(c, batch):
            ok, _ = c.transaction(
                compare=[c.transactions.mod(self._job_key(u)) == rev for u, rev in batch],
                success=[c.transactions.delete(self._job_key(u)) for u, _ in batch], failure=[])
            return len(batch) if ok else 0
        step = MAX_TXN_OPS // 2  # compares and deletes both count
        return sum(self._call(lambda c: write(c, records[i:i + step]))
                   for i in range(0, len(records), step))

    def warned(self):
        """{uuid: node} of the warned jobs."""
        return self._call(lambda c: {m.key.decode().rsplit("/", 1)[1]: v.decode() for v, m in
                                     c.get_prefix(f"{self.prefix}/warned_jobs/")})

    def lock(self, name, holder, ttl):
        """Take PREFIX/locks/<name> for ttl seconds (a lease), if nobody else
        holds it (holder may take it again, e.g. after a restart). True if we
        got it; the lease runs out by itself."""
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
        return self._call(take)


def _end(prefix):
    return etcd3.utils.increment_last_byte(etcd3.utils.to_bytes(prefix))


def _range(c, prefix, limit):
    """The first limit keys under prefix, in key order. (python3-etcd3 0.12
    accepts limit= but never puts it into the request.)"""
    request = c._build_get_range_request(
        prefix, range_end=etcd3.utils.increment_last_byte(etcd3.utils.to_bytes(prefix)),
        sort_order="ascend", sort_target="key")
    request.limit = limit
    return c.kvstub.Range(request, c.timeout, credentials=c.call_credentials,
                          metadata=c.metadata).kvs


def _encode(job):
    return json.dumps(job.to_dict(), separators=(",", ":"))


def _decode(value):
    return core.Job.from_dict(json.loads(value))


def _describe(error):
    if isinstance(error, grpc.RpcError) and hasattr(error, "details"):
        return error.details() or str(error.code())
    return str(error) or type(error).__name__
