"""The Debian 12/13 matrix of tests/system/conftest.py, as pytest plans it
(--collect-only, --setup-plan: nothing boots): LCLUSTER_TEST_SUITES picks the
suites, each module gets one container per suite, the cluster suite stays on
bookworm, and an unknown suite is one clear error."""

import os
import re
import subprocess
import sys

from tests.system.conftest import REPO


def pytest(*args, suites=None):
    env = {k: v for k, v in os.environ.items() if k != "LCLUSTER_TEST_SUITES"}
    if suites is not None:
        env["LCLUSTER_TEST_SUITES"] = suites
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def ids(out):
    return re.findall(r"::(\w+)\[(\w+)\]$", out, re.M)


def test_default_is_both_suites_and_the_variable_picks():
    both = ids(pytest("--collect-only", "tests/system/test_batch.py").stdout)
    assert {suite for _, suite in both} == {"bookworm", "trixie"}
    assert len(both) == 2 * len({name for name, _ in both})
    only = ids(pytest("--collect-only", "tests/system/test_batch.py", suites=" trixie ").stdout)
    assert {suite for _, suite in only} == {"trixie"} and len(only) == len(both) // 2


def test_one_container_per_module_and_suite():
    """A fresh container per test would make the suite many times slower: pytest
    reuses a parametrized fixture only for the very same param object."""
    for suites in (None, "bookworm", "trixie,bookworm"):
        r = pytest("--setup-plan", "tests/system/test_batch.py", "tests/system/test_spine.py",
                   suites=suites)
        assert r.returncode == 0, r.stdout + r.stderr
        n = 2 if suites is None else len(suites.split(","))
        assert r.stdout.count("SETUP    M box") == 2 * n, (suites, r.stdout)
        assert len(re.findall(r"SETUP    S rootfs\[", r.stdout)) == n


def test_the_cluster_suite_stays_on_bookworm():
    out = pytest("--collect-only", "tests/cluster").stdout
    assert "tests/cluster/" in out and "[bookworm]" not in out and "[trixie]" not in out


def test_an_unknown_suite_is_one_clear_error():
    r = pytest("--collect-only", "tests/system/test_batch.py", suites="bookworm,sid")
    assert r.returncode != 0
    assert "LCLUSTER_TEST_SUITES='bookworm,sid': unknown suite sid; known: bookworm,trixie" in (
        r.stdout + r.stderr)
