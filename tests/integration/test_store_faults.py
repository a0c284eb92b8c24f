"""store.py under faults, against a real etcd (see conftest.py): threads
sharing one Store across an etcd restart, fast failover with a per-call
timeout, every unreachability as Unavailable, a node name held by another
machine, etcd out of space, requests too large. Issue 9 items 10-12, issue
10 items 9 and 11."""

import os
import socket
import threading
import time

import grpc
import pytest

from lclusterd import core, store as store_module
from lclusterd.store import LeaseExpired, NameTaken, NoSpace, Store, TooLarge, Unavailable

from tests.integration.test_store import make_job


def connections_to(etcd):
    """This process's established TCP connections to etcd's client port, read
    from /proc: each etcd3 client (a gRPC channel) that has called holds one,
    until it is closed."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            ours.add(target[8:-1])
    found = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote_port, state, inode = int(fields[2].rsplit(":", 1)[1], 16), fields[3], fields[9]
                if remote_port == etcd.client_port and state == "01" and inode in ours:
                    found += 1
    return found


def settled_connections(etcd, at_most, within=10.0):
    """The connection count once it is at_most (gRPC closes asynchronously), or
    what it still is after within seconds."""
    deadline = time.monotonic() + within
    while (count := connections_to(etcd)) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def run_threads(count, target):
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads


# --- issue 9 item 12: one Store, many threads ---------------------------------------

def test_concurrent_first_calls_make_one_client(etcd, prefix):
    before = connections_to(etcd)
    s = Store([etcd.endpoint], prefix=prefix)
    barrier = threading.Barrier(8)
    errors = []

    def first(_):
        barrier.wait()
        try:
            s.ping()
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(repr(e))
    for t in run_threads(8, first):
        t.join(10)
    assert errors == []
    assert s.clients_made == 1, f"8 concurrent first calls made {s.clients_made} clients"
    assert connections_to(etcd) - before == 1
    s.close()
    assert settled_connections(etcd, before) == before


def test_threads_across_an_etcd_restart(etcd, prefix):
    """8 threads submit, read and list through one Store while etcd stops and
    starts again: during the outage they get Unavailable and nothing else,
    afterwards every call works, and no client is leaked."""
    before = connections_to(etcd)
    s = Store([etcd.endpoint], prefix=prefix)
    phase = ["up"]
    outcomes = {}  # (phase, "ok" | "unavailable") -> count
    others = []
    stop = threading.Event()
    lock = threading.Lock()

    def work(_):
        while not stop.is_set():
            at = phase[0]
            try:
                job = make_job()
                s.submit(job)
                assert s.get(job.uuid)[0] == job
                s.queued(3)
                s.cluster()
                outcome = "ok"
            except Unavailable:
                outcome = "unavailable"
            except Exception as e:  # noqa: BLE001 -- any other error is the bug
                others.append(f"{at}: {e!r}")
                outcome = "other"
            with lock:
                outcomes[at, outcome] = outcomes.get((at, outcome), 0) + 1
    threads = run_threads(8, work)
    try:
        time.sleep(0.5)
        phase[0] = "down"
        etcd.stop()
        time.sleep(1.5)
        phase[0] = "restarting"
        etcd.start()
        time.sleep(3)  # the threads' next calls reconnect
        phase[0] = "after"
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert others == [], f"errors other than Unavailable: {others[:5]} ({len(others)} in all)"
    assert outcomes.get(("up", "ok")) and outcomes.get(("down", "unavailable"))
    assert outcomes.get(("after", "ok")) and not outcomes.get(("after", "unavailable")), outcomes
    left = settled_connections(etcd, before + 1) - before
    assert left <= 1, f"{left} clients left open for one endpoint"
    s.close()
    assert settled_connections(etcd, before) == before, "clients never closed"


# --- issue 9 item 11: unreachable is Unavailable; fast failover --------------------

class Refusal(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code,details", [
    (grpc.StatusCode.CANCELLED, "Channel closed!"),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
    (grpc.StatusCode.UNKNOWN, "Stream removed"),
    (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2"),
])
def test_every_unreachability_is_unavailable(etcd, prefix, code, details):
    s = Store([etcd.endpoint], prefix=prefix)
    try:
        def fail(_):
            raise Refusal(code, details)
        with pytest.raises(Unavailable, match=f"etcd is unreachable at {etcd.endpoint}"):
            s._call(fail)
        s.ping()  # and the next call works
    finally:
        s.close()


def test_a_bug_of_ours_is_not_an_outage(store):
    def fail(_):
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: too many operations in txn request")
    with pytest.raises(grpc.RpcError):
        store._call(fail)


@pytest.fixture
def black_hole():
    """An endpoint that takes TCP connections and never answers (a cut-off host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_renew_fails_over_within_its_timeout_and_remembers(etcd, prefix, black_hole):
    s = Store([black_hole, etcd.endpoint], prefix=prefix)
    try:
        lease = Store([etcd.endpoint], prefix=prefix).grant(10)
        started = time.monotonic()
        assert s.renew(lease, timeout=0.3)
        first = time.monotonic() - started
        assert first < 1.0, f"the renewal took {first:.2f} s with a dead first member"
        started = time.monotonic()
        for _ in range(5):
            assert s.renew(lease, timeout=0.3)
        again = (time.monotonic() - started) / 5
        assert again < 0.2, f"renewals after failover took {again:.2f} s each: the live endpoint is not remembered"
        assert s.grant(5, timeout=0.3) and s.ping(timeout=0.3) is None
    finally:
        s.close()


class FreezingProxy:
    """A TCP proxy to etcd that can stop passing bytes while its connections
    stay open: a member cut off (or stopped) under an established channel."""

    def __init__(self, port):
        self.target, self.frozen = port, threading.Event()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while self.frozen.is_set():
                    time.sleep(0.01)  # hold it: the peer sees silence, not a close
                sink.sendall(data)
        except OSError:
            pass

    def close(self):
        self.server.close()


def test_renew_leaves_a_silent_member_within_its_timeout(etcd, prefix):
    proxy = FreezingProxy(etcd.client_port)
    s = Store([proxy.endpoint, etcd.endpoint], prefix=prefix)
    try:
        lease = s.grant(10)
        assert s.renew(lease, timeout=0.3)  # through the proxy: its channel is up
        proxy.frozen.set()
        started = time.monotonic()
        assert s.renew(lease, timeout=0.3)
        took = time.monotonic() - started
        assert took < 1.0, f"a renewal took {took:.2f} s with a silent first member"
        started = time.monotonic()
        assert s.renew(lease, timeout=0.3)
        assert time.monotonic() - started < 0.2  # the member that answered is asked first
    finally:
        proxy.frozen.clear()
        s.close()
        proxy.close()


def test_all_members_dead_within_the_timeouts(prefix, black_hole, dead_endpoint):
    s = Store([black_hole, dead_endpoint()], prefix=prefix)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="etcd is unreachable at"):
            s.renew(1234, timeout=0.3)
        assert time.monotonic() - started < 1.5
    finally:
        s.close()


# --- issue 9 item 10 (contract C2): one live node per name ---------------------------

def registration(name, machine, address):
    return {"name": name, "machine": machine, "address": address, "slots": 1}


def test_a_name_live_on_another_machine_is_refused(store):
    ours = store.grant(10)
    store.register(registration("cl1", "m-one", "http://10.0.0.1:7800"), ours)
    theirs = store.grant(10)
    with pytest.raises(NameTaken) as e:
        store.register(registration("cl1", "m-two", "http://10.0.0.2:7800"), theirs)
    assert (e.value.name, e.value.address) == ("cl1", "http://10.0.0.1:7800")
    assert "http://10.0.0.1:7800" in str(e.value)
    live, members, _, _ = store.cluster()
    assert live["cl1"]["machine"] == members["cl1"]["machine"] == "m-one"
    # Its periodic refresh cannot take the name either.
    assert not store.update_registration(registration("cl1", "m-two", "x"), theirs)
    assert store.cluster()[0]["cl1"]["machine"] == "m-one"
    assert store.update_registration(registration("cl1", "m-one", "http://10.0.0.1:7800"), ours)
    # Once the holder's lease is gone, the name is free.
    store.revoke(ours)
    store.register(registration("cl1", "m-two", "http://10.0.0.2:7800"), theirs)
    assert store.cluster()[0]["cl1"]["machine"] == "m-two"
    assert not store.update_registration(registration("cl1", "m-one", "x"), ours)


def test_the_same_machine_takes_its_name_over(store):
    before = store.grant(10)
    store.register(registration("cl1", "m-one", "http://a"), before)
    after = store.grant(10)  # restarted: a new lease, the old one still live
    store.register(registration("cl1", "m-one", "http://b"), after)
    assert store.cluster()[0]["cl1"]["address"] == "http://b"
    store.revoke(before)  # the old lease no longer holds the registration
    assert store.cluster()[0]["cl1"]["address"] == "http://b"
    assert store.update_registration(registration("cl1", "m-one", "http://c"), after)


# --- issue 10 items 9 and 11 (contract C7): out of space, too large -------------------

QUOTA = 2 * 1024 * 1024


def test_nospace_is_reported_and_recovered(etcd_factory, prefix):
    small = etcd_factory(f"--quota-backend-bytes={QUOTA}")
    s = Store([small.endpoint], prefix=prefix)
    try:
        written = []
        with pytest.raises(NoSpace) as e:
            for _ in range(200):  # 200 x 16 x 60 KiB: far over the quota
                jobs = [make_job(command="x" * 60000) for _ in range(16)]
                s.submit_many(jobs)
                written += jobs
        crossing = len(jobs)  # etcd applies the write that crosses the quota, then says NOSPACE
        message = str(e.value)
        assert message.startswith(f"etcd is out of space (quota {QUOTA} bytes): ")
        assert "defrag" in message and "alarm disarm" in message
        assert isinstance(e.value, Unavailable)
        assert s.space()["nospace"] and s.space()["quota"] == QUOTA
        s.ping()  # reads still work: health must ask about the alarm itself
        with pytest.raises(NoSpace, match=r"^etcd is out of space \(quota"):
            s.check_space()
        with pytest.raises(NoSpace):
            s.submit(make_job())
        # What the prune pass does: its lock (no lease is granted now), reads
        # and deletes still work, and its compact() recovers.
        assert s.lock("prune", "n1", 10)
        records = s.all_jobs()
        assert len(written) <= len(records) <= len(written) + crossing
        assert s.delete(records[1:]) == len(records) - 1
        assert s.compact()
        space = s.space()
        assert not space["nospace"] and space["db_size"] < QUOTA
        s.check_space()  # recovered: no alarm
        job = make_job()
        s.submit(job)
        assert s.get(job.uuid)[0] == job
        assert [j.uuid for j, _ in s.all_jobs()] == sorted([records[0][0].uuid, job.uuid])
    finally:
        s.close()


def test_recover_space_by_hand(store):
    space = store.recover_space()  # with no alarm: compaction and defragmentation only
    assert not space["nospace"] and space["db_size"] > 0 and space["quota"] > 0
    store.submit(make_job())


def test_requests_too_large_are_toolarge(store):
    for count in (26, 40):  # 1.7 MB: etcd's "request is too large"; 2.6 MB: its gRPC limit
        jobs = [make_job(command="x" * core.MAX_COMMAND_BYTES) for _ in range(count)]
        with pytest.raises(TooLarge, match="too large"):
            store.submit_many(jobs)
        assert all(store.get(job.uuid) is None for job in jobs[:3])
    assert store.all_jobs() == []
    assert store_module.TooLarge is TooLarge and not issubclass(TooLarge, Unavailable)


def test_a_write_under_a_lease_gone_is_lease_expired(store):
    lease = store.grant(5)
    store.revoke(lease)
    with pytest.raises(LeaseExpired, match="no such lease"):
        store.register(registration("cl1", "m-one", "http://a"), lease)
    with pytest.raises(LeaseExpired):
        store.campaign("cl1", lease)
    assert store.cluster()[0] == {}


def test_a_submission_applied_before_a_failover_is_not_refused(store):
    """A member applies a batch and dies before it answers; the store asks
    the next member again: the same records already there are ours."""
    jobs = [make_job() for _ in range(3)]
    store.submit_many(jobs)
    assert store.submit_many(jobs) is None  # the retry
    assert [job.uuid for job, _ in store.queued(10)] == [job.uuid for job in jobs]
    with pytest.raises(RuntimeError, match="already exists"):
        store.submit_many([make_job(jobs[0].uuid, "rm -rf /")])
