"""A real etcd for the integration tests: Debian's `etcd` binary on 127.0.0.1.

One etcd per test module (start-up costs about a second); each test gets its
own key prefix through the `store` fixture, so tests do not see each other's
records. A test may stop() and start() it (outages); the next test finds it
running again.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid

import etcd3
import pytest

from lclusterd.store import Store

ETCD = "/usr/bin/etcd"
START_DEADLINE = 20  # seconds; it answers in about one on loopback
STOP_DEADLINE = 10


def free_port():
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member, started and stopped by the test; its own PID only."""

    def __init__(self, workdir, extra_args=(), name="test"):
        self.extra_args = list(extra_args)  # e.g. a tiny --quota-backend-bytes
        self.name = name
        self.client_port, self.peer_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.peer = f"http://127.0.0.1:{self.peer_port}"
        self.initial_cluster = f"{name}={self.peer}"  # a member of one; EtcdCluster sets all
        self.token = f"lclusterd-test-{uuid.uuid4()}"
        self.data_dir = os.path.join(workdir, "data")
        self.log_path = os.path.join(workdir, "etcd.log")
        self.process = None

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def start(self):
        """Start (or restart, on the same ports and data dir) and wait until it answers."""
        self.launch()
        self._wait_until_ready()

    def launch(self):
        """Start it, not waiting (a member of several answers once a quorum runs)."""
        assert not self.running, "etcd is already running"
        os.makedirs(os.path.dirname(self.data_dir), exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                [ETCD, "--name", self.name,
                 "--data-dir", self.data_dir,
                 "--listen-client-urls", self.endpoint,
                 "--advertise-client-urls", self.endpoint,
                 "--listen-peer-urls", self.peer,
                 "--initial-advertise-peer-urls", self.peer,
                 "--initial-cluster", self.initial_cluster,
                 "--initial-cluster-state", "new",
                 "--initial-cluster-token", self.token,
                 "--listen-metrics-urls", "",
                 "--logger", "zap", "--log-outputs", "stderr", *self.extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)  # a ^C in the terminal is ours to pass on
        finally:
            log.close()

    def _wait_until_ready(self):
        deadline = time.monotonic() + START_DEADLINE
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                last = f"etcd exited with status {self.process.returncode}"
                break
            # etcd's /health over plain HTTP ("true" once it has a leader), not
            # a gRPC client: a closed channel's connection can outlive it, and
            # the fault tests count this process's connections to etcd.
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as answer:
                    if json.load(answer).get("health") == "true":
                        return
                    last = "no leader yet"
            except (OSError, ValueError) as e:  # anything means 'not yet'
                last = e
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"etcd at {self.endpoint} did not answer within {START_DEADLINE} s "
                    f"({last}); the last lines of its log:\n{self.log_tail()}", pytrace=False)

    def stop(self):
        """SIGTERM, then SIGKILL; idempotent."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def revision(self):
        """etcd's current revision, from the header of a read."""
        client = etcd3.client(host="127.0.0.1", port=self.client_port, timeout=5)
        try:
            return client.get_response("/revision-probe").header.revision
        finally:
            client.close()


class EtcdCluster:
    """Three members on loopback, each its own process, ports and data dir."""

    def __init__(self, workdir, size=3):
        self.members = [Etcd(os.path.join(workdir, f"m{i}"), name=f"m{i}") for i in range(size)]
        everyone = ",".join(f"{m.name}={m.peer}" for m in self.members)
        for m in self.members:
            m.initial_cluster, m.token = everyone, self.members[0].token
        self.endpoints = [m.endpoint for m in self.members]

    def start(self):
        for m in self.members:
            m.launch()
        for m in self.members:
            m._wait_until_ready()

    def stop(self):
        for m in self.members:
            m.stop()


@pytest.fixture
def etcd_cluster(tmp_path):
    """A 3-member etcd of the test's own; stopped after it."""
    cluster = EtcdCluster(str(tmp_path))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    if not os.access(ETCD, os.X_OK):
        pytest.fail(f"{ETCD} is missing: the integration tests need Debian's etcd "
                    "('make test' installs it; or apt-get install etcd-server)", pytrace=False)
    workdir = tmp_path_factory.mktemp("etcd")
    server = Etcd(str(workdir))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def etcd_factory(tmp_path):
    """Start an etcd of the test's own (extra etcd flags as arguments); stopped after it."""
    started = []

    def start(*extra_args):
        server = Etcd(str(tmp_path / f"etcd{len(started)}"), extra_args)
        os.makedirs(tmp_path / f"etcd{len(started)}")
        started.append(server)
        server.start()
        return server
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def etcd(etcd_server):
    """The module's etcd, running: restarted if the previous test left it stopped."""
    if not etcd_server.running:
        etcd_server.start()
    yield etcd_server


@pytest.fixture
def dead_endpoint():
    """An etcd endpoint where nothing listens."""
    return lambda: f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def prefix():
    return f"/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(etcd, prefix):
    s = Store([etcd.endpoint], prefix=prefix)
    yield s
    s.close()
