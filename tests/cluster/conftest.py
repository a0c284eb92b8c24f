"""Cluster-test fixtures: the three-node cluster of tests/cluster/harness.py,
one per test module."""

import pytest

from tests.cluster.harness import booted
from tests.system.conftest import deb_dir, rootfs  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def cluster(rootfs, deb_dir):  # noqa: F811
    with booted(rootfs, deb_dir, tls=True) as nodes:  # HTTPS between the nodes (issue 12 item 4)
        yield nodes
