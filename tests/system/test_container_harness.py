"""The system-test harness itself: a container boots with systemd as PID 1, runs
Debian's etcd, takes a non-root user, and two boot side by side from one rootfs.

Needs root, debootstrap and systemd-container; it fails (never skips) without them.
"""
import threading
from pathlib import Path

import pytest

from tests.system.container import Container, build_rootfs, check_host, unique_name


@pytest.fixture(scope="module")
def rootfs():
    check_host()
    return build_rootfs()


@pytest.fixture(scope="module")
def container(rootfs):
    with Container(unique_name(), rootfs) as c:
        yield c


def test_systemd_is_pid1(container):
    assert container.run("ps -p1 -o comm=").stdout.strip() == "systemd"
    assert container.run("readlink /proc/1/exe").stdout.strip().endswith("/systemd")


def test_system_running(container):
    state = container.run("systemctl is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded"), container.run(
        "systemctl --failed --no-pager", check=False).stdout


def test_hostname_is_machine_name(container):
    assert container.run("hostname").stdout.strip() == container.name


def test_etcd_serves(container):
    container.run("systemctl is-active etcd.service")
    # etcd may still be electing itself right after boot: give it a few seconds.
    r = container.run("for i in $(seq 50); do ETCDCTL_API=3 etcdctl endpoint health && exit 0;"
                      " sleep 0.2; done; exit 1")
    assert "is healthy" in r.stdout + r.stderr


def test_non_root_user(container):
    container.run("useradd --create-home --shell /bin/sh alice")
    r = container.run('id -un; echo "$HOME"; echo "$XDG_RUNTIME_DIR"; pwd', user="alice")
    assert r.stdout.split("\n")[:4] == ["alice", "/home/alice", "", "/home/alice"]


def test_failed_command_reports_everything(container):
    with pytest.raises(RuntimeError) as e:
        container.run("echo out; echo err >&2; exit 3")
    assert all(s in str(e.value) for s in ("exit 3", "exited 3", "out", "err"))


def test_two_containers_side_by_side(rootfs):
    cs = [Container(unique_name(), rootfs) for _ in range(2)]
    errors = []

    def boot(c):
        try:
            c.start()
        except Exception as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=boot, args=(c,)) for c in cs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for c in cs:  # each has its own etcd on 127.0.0.1:2379 (--private-network)
            assert c.run("systemctl is-system-running", check=False).stdout.strip() in (
                "running", "degraded")
            c.run("for i in $(seq 50); do ETCDCTL_API=3 etcdctl endpoint health && exit 0;"
                  " sleep 0.2; done; exit 1")
        assert cs[0].run("cat /etc/machine-id").stdout != cs[1].run("cat /etc/machine-id").stdout
    finally:
        for c in cs:
            c.stop()


def test_poweroff_hard_then_stop_is_clean(rootfs):
    c = Container(unique_name(), rootfs)
    c.start()
    cgroups = list(c._cgroups)
    c.poweroff_hard()
    c.stop()  # idempotent
    assert not any(cg.exists() for cg in cgroups)
    assert not list(rootfs.parent.glob(f".#*{c.name}*"))
    assert not Path(f"/run/systemd/nspawn/propagate/{c.name}").exists()
