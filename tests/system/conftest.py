"""System-test fixtures: the built .deb, installed with apt into a Debian 12
(bookworm) and a Debian 13 (trixie) container booted with systemd as PID 1.
Nothing here is faked.

LCLUSTER_TEST_SUITES=bookworm,trixie (the default: every suite of
container.SUITES) says which releases this session runs the system tests on;
each test that boots a container runs once per suite, its id ending in
[bookworm] or [trixie]. Tests outside tests/system (the cluster suite imports
`rootfs`) get the default suite, bookworm.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.system import container as ct

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "dist"
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="session")
def deb_dir():
    """dist/ with a freshly built lclusterd_<version>_all.deb; or, when
    LCLUSTER_TEST_DEB_DIR names a directory, the .deb already there (built once
    for several sessions, or by hand)."""
    given = os.environ.get("LCLUSTER_TEST_DEB_DIR")
    if given:
        debs = sorted(Path(given).glob("lclusterd_*_all.deb"))
        assert debs, f"LCLUSTER_TEST_DEB_DIR={given}: no lclusterd_*_all.deb there"
        return Path(given).resolve()
    build = subprocess.run(["make", "-C", str(REPO), "deb"], capture_output=True, text=True)
    assert build.returncode == 0, f"make deb failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    debs = sorted(DIST.glob("lclusterd_*_all.deb"))
    assert debs, "make deb built no dist/lclusterd_*_all.deb"
    return DIST


def suites():
    """The suites this session tests on, from LCLUSTER_TEST_SUITES (or all)."""
    raw = os.environ.get("LCLUSTER_TEST_SUITES", "").strip()
    if not raw:
        return list(ct.SUITES)
    chosen = [s.strip() for s in raw.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in ct.SUITES]
    if unknown or not chosen:
        raise pytest.UsageError(f"LCLUSTER_TEST_SUITES={raw!r}: unknown suite "
                                f"{', '.join(unknown) or '(none)'}; known: {','.join(ct.SUITES)}")
    # container.SUITES' own string objects: pytest tells a parametrized fixture's
    # instances apart by identity (`is`), and a fresh "bookworm" per test would
    # boot a fresh container per test.
    return [next(s for s in ct.SUITES if s == c) for c in dict.fromkeys(chosen)]


def pytest_generate_tests(metafunc):
    """Run every test that uses this file's `rootfs` (through `box` or its own
    fixture built on it) once per suite. Session-scoped parameters: pytest
    groups the tests by suite, so each rootfs is built or found once."""
    defs = getattr(metafunc, "_arg2fixturedefs", {}).get("rootfs")
    func = defs[-1].func if defs else None  # the rootfs this test gets: ours, or its module's
    if getattr(func, "__module__", None) == __name__ and func.__name__ == "rootfs":
        metafunc.parametrize("rootfs", suites(), indirect=True, scope="session")


@pytest.fixture(scope="session")
def rootfs(request):
    """The cached rootfs of this test's suite (bookworm where not parametrized)."""
    ct.check_host()
    return ct.build_rootfs(suite=getattr(request, "param", ct.SUITE))


class Box:
    """A booted container with lclusterd installed, and helpers to drive it
    with the user's own commands."""

    def __init__(self, container):
        self.c = container
        self._suite = None

    @property
    def suite(self):
        """The container's Debian release: "bookworm", "trixie"."""
        if self._suite is None:
            self._suite = self.sh(". /etc/os-release && echo $VERSION_CODENAME").stdout.strip()
        return self._suite

    def sh(self, cmd, **kw):
        return self.c.run(cmd, **kw)

    def lc(self, args, user=None, check=True, **kw):
        """Run `lclusterc ARGS` (a shell string) as root or as user."""
        return self.c.run(f"lclusterc {args}", user=user, check=check, **kw)

    def job(self, ref):
        return json.loads(self.lc(f"checkjob {ref} --json").stdout)

    def wait_state(self, ref, states=TERMINAL, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(ref)
            if job["state"] in states:
                return job
            assert time.monotonic() < deadline, f"job {ref} still {job['state']} after {timeout} s"
            time.sleep(0.2)

    def unit_state(self, unit):
        return self.sh(f"systemctl show -p LoadState,ActiveState --value {unit}").stdout.split()

    def fill_slots(self, user="alice"):
        """Take every slot of the node with a `sleep 600` job; their uuids."""
        slots = int(self.sh("nproc").stdout)
        blockers = [self.lc("addjob 'sleep 600'", user=user).stdout.strip() for _ in range(slots)]
        for uuid in blockers:
            self.wait_state(uuid, ("running",))
        return blockers

    def job_count(self):
        return len(json.loads(self.lc("list --json --limit 100000").stdout))


ROOT_ETCDCTL = """#!/bin/sh
exec /usr/bin/etcdctl --endpoints=https://127.0.0.1:2379 --cacert=/etc/lclusterd/etcd/ca.pem \\
  --cert=/etc/lclusterd/etcd/client.pem --key=/etc/lclusterd/etcd/client.key "$@"
"""


@pytest.fixture(scope="module")
def box(rootfs, deb_dir):
    """One container per test module, with the package installed by apt, and
    two ordinary users, alice and bob."""
    with ct.Container(ct.unique_name("lcsys"), rootfs, binds_ro={str(deb_dir): "/mnt/debs"}) as c:
        c.run("apt-get install -y /mnt/debs/lclusterd_*_all.deb", timeout=300)
        c.run("useradd -m alice && useradd -m bob")
        # The package's etcd takes only its client certificate (root's): the
        # tests' plain `etcdctl` as root goes through this root-only wrapper
        # (first in PATH); ordinary users still find only /usr/bin/etcdctl.
        c.run("cat > /usr/local/sbin/etcdctl && chmod 700 /usr/local/sbin/etcdctl",
              input=ROOT_ETCDCTL)
        yield Box(c)
