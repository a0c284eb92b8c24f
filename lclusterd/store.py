"""etcd: the only module that talks to it. Holds job records and the queue.

Keyspace (PREFIX is the `prefix` setting, /lcluster by default):

    PREFIX/jobs/<uuid>                 the job record, JSON (core.Job.to_dict)
    PREFIX/queue/<submit-ns>-<uuid>    present while the job is queued; the
                                       key sorts the queue in submission order

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

CALL_TIMEOUT = 5  # seconds; etcd answers loopback in milliseconds
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
    def __init__(self, endpoints, prefix="/lcluster"):
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self._clients = [None] * len(self.endpoints)
        self._current = 0

    # -- plumbing -----------------------------------------------------------

    def _client(self, index):
        if self._clients[index] is None:
            url = urllib.parse.urlsplit(self.endpoints[index])
            self._clients[index] = etcd3.client(host=url.hostname or "127.0.0.1",
                                                port=url.port or 2379, timeout=CALL_TIMEOUT,
                                                grpc_options=GRPC_OPTIONS)
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

    def _queue_key(self, job):
        return f"{self.prefix}/queue/{int(job.submitted_at * 1e9):020d}-{job.uuid}"

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
        def write(c):
            key = self._job_key(job.uuid)
            ok, _ = c.transaction(
                compare=[c.transactions.version(key) == 0],
                success=[c.transactions.put(key, _encode(job)),
                         c.transactions.put(self._queue_key(job), job.uuid)], failure=[])
            return ok
        if not self._call(write):
            raise RuntimeError(f"job {job.uuid} already exists")

    def update(self, old, new, revision):
        """Replace old with new if the record is still at revision; moves the
        queue key when the job enters or leaves the queue. False if someone
        changed the record first."""
        def write(c):
            key = self._job_key(new.uuid)
            ops = [c.transactions.put(key, _encode(new))]
            if old.state == core.QUEUED != new.state:
                ops.append(c.transactions.delete(self._queue_key(old)))
            if new.state == core.QUEUED != old.state:
                ops.append(c.transactions.put(self._queue_key(new), new.uuid))
            ok, _ = c.transaction(compare=[c.transactions.mod(key) == revision], success=ops, failure=[])
            return ok
        return self._call(write)


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
