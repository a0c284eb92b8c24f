"""lclusterd/daemon.py and sandbox.py: supervision, the watchdog, the limits a
node can enforce, the etcd probe, check-config, the fd limit (no I/O)."""

import asyncio
import types

import pytest
from click.testing import CliRunner

from lclusterd import config, daemon, sandbox, store


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def conf(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_TLS", {k: str(tmp_path / "none") for k in config.DEFAULT_TLS})

    def write(text):
        path = tmp_path / "lclusterd.conf"
        path.write_text(text)
        return str(path)
    return write


# -- supervision (issue 9 item 6) -------------------------------------------------

async def forever(stopping):
    await stopping.wait()


def test_a_crashed_task_ends_them_all():
    cancelled = []

    async def crashes():
        await asyncio.sleep(0.01)
        raise KeyError("boom")

    async def survivor(stopping):
        try:
            await stopping.wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def go():
        stopping = asyncio.Event()
        await daemon.supervise({"scheduler": survivor(stopping), "heartbeat": crashes()}, stopping)
    with pytest.raises(daemon.TaskEnded) as e:
        run(go())
    assert e.value.name == "heartbeat" and isinstance(e.value.error, KeyError)
    assert cancelled == [True]


def test_a_task_that_returns_early_ends_them_too():
    async def go():
        stopping = asyncio.Event()

        async def quits():
            return None
        await daemon.supervise({"scheduler": forever(stopping), "heartbeat": quits()}, stopping)
    with pytest.raises(daemon.TaskEnded, match="task heartbeat returned") as e:
        run(go())
    assert e.value.error is None


def test_stopping_ends_the_tasks_quietly():
    async def go():
        stopping = asyncio.Event()
        asyncio.get_running_loop().call_later(0.01, stopping.set)
        await daemon.supervise({"a": forever(stopping), "b": asyncio.sleep(3600)}, stopping)
    run(go())  # no TaskEnded: the sleeping task was cancelled, not reported


def test_name_taken_exits_78_with_one_line(monkeypatch, conf):

    async def serve(cfg, path):
        raise daemon.TaskEnded("heartbeat", store.NameTaken("cl1", "http://10.0.0.5:7800"))
    monkeypatch.setattr(daemon, "serve", serve)
    result = CliRunner().invoke(daemon.main, ["--config", conf("[lclusterd]\n")])
    assert result.exit_code == daemon.EX_CONFIG == 78
    assert result.output.count("\n") == 1
    assert "node name cl1 is held by a live node on another machine, at http://10.0.0.5:7800" \
        in result.output


def test_any_other_crash_exits_1_for_restart(monkeypatch, conf):

    async def serve(cfg, path):
        raise daemon.TaskEnded("heartbeat", RuntimeError("dbus went away"))
    monkeypatch.setattr(daemon, "serve", serve)
    assert CliRunner().invoke(daemon.main, ["--config", conf("[lclusterd]\n")]).exit_code == 1


def test_fault_injection():
    async def go(fault):
        stopping = asyncio.Event()
        tasks = daemon.inject_fault({"scheduler": forever(stopping), "heartbeat": forever(stopping)},
                                    fault)
        await asyncio.wait_for(daemon.supervise(tasks, stopping), 1.5)
    with pytest.raises(daemon.TaskEnded, match="heartbeat.*crash injected"):
        run(go("crash:heartbeat"))
    with pytest.raises(asyncio.TimeoutError):
        run(go("stall:heartbeat"))  # hangs: the watchdog's business
    with pytest.raises(daemon.StartupError, match="want crash:TASK or stall:TASK"):
        run(go("explode:heartbeat"))


# -- the watchdog: petted only while both loops go round -------------------------

def test_stalled():
    assert daemon.stalled({"runner": 95, "placer": 97, "heartbeat": 99}, 100, 10, 0) == {}
    assert daemon.stalled({"runner": 80, "placer": 97, "heartbeat": 99}, 100, 10, 0) == {"runner": 20}
    assert daemon.stalled({"runner": 99, "placer": 99}, 100, 10, 95) == {}  # heartbeat not started yet
    assert daemon.stalled({"runner": 99, "placer": 99}, 100, 10, 50) == {"heartbeat": 50}
    assert daemon.stalled({"runner": 99, "heartbeat": 99}, 100, 10, 50) == {"placer": 50}


def test_stall_limit():
    c = config.Config(poll_interval=2.0, lease_ttl=10)
    assert daemon.stall_limit(c, "30000000") == 15  # half of WatchdogSec=30
    assert daemon.stall_limit(c, None) == 10  # no watchdog: the loops' own pace
    assert daemon.stall_limit(config.Config(poll_interval=0.5, lease_ttl=2), "4000000") == 2


class FakeNode:
    def __init__(self):
        self.units = types.SimpleNamespace(connected=True)
        self.etcd_error, self.lease, self.mine = None, 1, set()
        self.config = config.Config(slots=2)
        self.progress = {}


def test_status_says_etcd_is_away_even_while_the_bus_is_too():
    node = FakeNode()
    node.units.connected = False
    node.etcd_error = "etcd is unreachable at https://127.0.0.1:2379 (connection refused)"
    said = daemon.status(node)
    assert "D-Bus" in said and "etcd is unreachable" in said
    node.units.connected = True
    assert daemon.status(node).startswith("waiting for etcd: etcd is unreachable")


def test_report_pets_only_while_both_loops_go_round(monkeypatch):
    sent = []
    monkeypatch.setattr(daemon.sd, "notify", sent.append)
    monkeypatch.setattr(daemon, "REPORT_EVERY", 0.01)
    node = FakeNode()

    async def go():
        loop, stopping = asyncio.get_running_loop(), asyncio.Event()
        task = asyncio.create_task(daemon.report(node, stopping, ["a warning"], limit=0.2))
        for _ in range(10):  # both loops alive
            node.progress.update(runner=loop.time(), placer=loop.time(), heartbeat=loop.time())
            await asyncio.sleep(0.02)
        alive = list(sent)
        sent.clear()
        for _ in range(25):  # the heartbeat hangs
            node.progress.update(runner=loop.time(), placer=loop.time())
            await asyncio.sleep(0.02)
        stopping.set()
        await task
        return alive
    alive = run(go())
    assert sum("WATCHDOG=1" in m for m in alive) >= 5
    assert any("STATUS=running 0 job(s) of 2 slot(s); etcd ok; a warning" in m for m in alive)
    assert "WATCHDOG=1" not in sent[-1]
    assert any("the heartbeat has made no progress" in m and "watchdog not petted" in m for m in sent)


# -- limits a node can enforce (issue 9 item 17, contract C4) --------------------

V1_HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct {cpu},relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory {memory},relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids {pids},relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2 = "29 23 0:26 / /sys/fs/cgroup {opts},nosuid,nodev shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def v2_controllers(listed):
    return lambda mountpoint: listed.split() if mountpoint == "/sys/fs/cgroup" else ()


def test_v1_read_write_enforces_all():
    text = V1_HYBRID.format(cpu="rw", memory="rw", pids="rw")
    assert sandbox.enforceable(text, v2_controllers("")) == {"memory", "cpu", "pids"}


def test_v1_read_only_in_a_container_enforces_nothing_of_it():
    text = V1_HYBRID.format(cpu="ro", memory="ro", pids="rw")
    assert sandbox.enforceable(text, v2_controllers("")) == {"pids"}


def test_v2_by_its_controllers():
    assert sandbox.enforceable(V2.format(opts="rw"), v2_controllers("cpuset cpu io memory pids")) \
        == {"memory", "cpu", "pids"}
    assert sandbox.enforceable(V2.format(opts="rw"), v2_controllers("cpu pids")) == {"cpu", "pids"}
    assert sandbox.enforceable(V2.format(opts="ro"), v2_controllers("cpu memory pids")) == set()
    assert sandbox.enforceable(V2.format(opts="rw"), v2_controllers("memory"),
                               writable=lambda path: False) == set()


def test_describe_enforced():
    assert sandbox.describe_enforced(frozenset(sandbox.CONTROLLERS)) == \
        "enforces memory, cpu and pids limits"
    assert sandbox.describe_enforced(frozenset({"pids"})) == (
        "cannot enforce --memory (no writable memory cgroup controller), "
        "--cpus (no writable cpu cgroup controller)")


# -- the etcd anyone can write to (issue 10 item 1) ------------------------------

class ProbeStore:
    made = []
    open_to = ()

    def __init__(self, endpoints, prefix, tls=None):
        self.endpoints, self.tls = endpoints, tls
        ProbeStore.made.append(self)

    def lock(self, name, holder, ttl):
        if (self.endpoints[0].split(":")[0], bool(self.tls)) not in self.open_to:
            raise RuntimeError("permission denied")
        assert ttl == 1  # expires by itself
        return True

    def close(self):
        pass


def probe(endpoints, tls, open_to):
    ProbeStore.made, ProbeStore.open_to = [], open_to
    node = FakeNode()
    node.config = config.Config(etcd_endpoints=endpoints)
    warnings = []
    run(daemon.check_etcd_open(node, tls, warnings, store_class=ProbeStore))
    return warnings, [(s.endpoints, s.tls) for s in ProbeStore.made]


def test_plain_etcd_open_to_all_is_warned_about():
    warnings, tried = probe(("http://127.0.0.1:2379",), {}, {("http", False)})
    assert tried == [(["http://127.0.0.1:2379"], None)]
    assert len(warnings) == 1 and "accepts writes from anyone without TLS" in warnings[0]


def test_tls_etcd_with_client_certificates_is_not():
    tls = {"ca_cert": "/ca.pem", "cert_cert": "/c.pem", "cert_key": "/c.key"}
    warnings, tried = probe(("https://127.0.0.1:2379",), tls, set())
    assert warnings == []
    assert tried == [(["http://127.0.0.1:2379"], None), (["https://127.0.0.1:2379"], {"ca_cert": "/ca.pem"})]


def test_tls_etcd_without_client_certificate_auth_is():
    tls = {"ca_cert": "/ca.pem", "cert_cert": "/c.pem", "cert_key": "/c.key"}
    warnings, _ = probe(("https://127.0.0.1:2379",), tls, {("https", True)})
    assert "with TLS but no client certificate" in warnings[0]


# -- check-config (issue 9 item 20) ----------------------------------------------

def test_check_config_good_is_silent(conf):
    result = CliRunner().invoke(daemon.main, ["check-config", "--config", conf("[lclusterd]\nslots = 3\n")])
    assert (result.exit_code, result.output) == (0, "")


@pytest.mark.parametrize("text,said", [
    ("[lclusterd]\nslots = lots\n", "bad value for 'slots'"),
    ("[lclusterd]\nmax_connections = 10\nmax_connections_per_uid = 20\n", "is over 'max_connections'"),
    ("[lclusterd]\nrootfs = /nonexistent/rootfs\n", "is not a directory"),
    ("[lclusterd]\nnamespace = a/b\n", "not a valid network namespace name"),
    ("[lclusterd\n", "cannot read config file"),
])
def test_check_config_bad_is_one_line_and_78(conf, text, said):
    path = conf(text)
    result = CliRunner().invoke(daemon.main, ["check-config", "--config", path])
    assert result.exit_code == 78
    assert result.output.count("\n") == 1 and said in result.output
    assert result.output.startswith(f"lclusterd: {path}: ") or \
        result.output.startswith(f"lclusterd: cannot read config file {path}: ")


def test_check_config_takes_the_groups_config_option_too(conf):
    path = conf("[lclusterd]\nslots = 0\n")
    assert CliRunner().invoke(daemon.main, ["--config", path, "check-config"]).exit_code == 78


def test_check_config_missing_file(tmp_path):
    result = CliRunner().invoke(daemon.main, ["check-config", "--config", str(tmp_path / "nope")])
    assert result.exit_code == 78 and "does not exist" in result.output


# -- file descriptors (issue 10 item 6) -----------------------------------------

def test_fd_limit_soft_raised_to_hard(monkeypatch):
    set_to = []
    monkeypatch.setattr(daemon.resource, "getrlimit", lambda which: (1024, 524288))
    monkeypatch.setattr(daemon.resource, "setrlimit", lambda which, limits: set_to.append(limits))
    assert daemon.raise_fd_limit() == 524288
    assert set_to == [(524288, 524288)]


def test_watches_start_once_etcd_answers(monkeypatch):
    """The daemon starts before etcd may be reachable: the watches wait for it."""
    monkeypatch.setattr(daemon, "REPORT_EVERY", 0.01)
    tries = []

    class Watching:
        def watches(self, loop):
            tries.append(loop)
            if len(tries) < 3:
                raise daemon.etcd.Unavailable("etcd is unreachable")
            return ["cancel-1", "cancel-2"]

    async def go():
        stopping, cancels = asyncio.Event(), []
        await asyncio.wait_for(daemon.watch(Watching(), stopping, cancels), 2)
        return cancels
    assert run(go()) == ["cancel-1", "cancel-2"] and len(tries) == 3


def test_status_says_when_this_node_places_the_clusters_jobs():
    node = FakeNode()
    assert "primed" not in daemon.status(node)
    node.primed = True
    assert daemon.status(node) == "running 0 job(s) of 2 slot(s); etcd ok; primed: placing the cluster's jobs"


def test_grpc_waits_wake_once_a_second_not_ten_times():
    """Each etcd watch thread woke every 0.1 s in gRPC's wait for its next
    answer (a quarter of an idle node's CPU); a gRPC without that setting
    is left alone."""
    common = types.SimpleNamespace(MAXIMUM_WAIT_TIMEOUT=0.1)
    daemon.quieter_grpc_waits(common)
    assert common.MAXIMUM_WAIT_TIMEOUT == daemon.GRPC_WAIT_SLICE == 1.0
    other = types.SimpleNamespace()
    daemon.quieter_grpc_waits(other)
    assert not hasattr(other, "MAXIMUM_WAIT_TIMEOUT")
