"""Network namespaces (pyroute2): the only module that touches them."""

from pyroute2 import netns

NETNS_DIR = "/run/netns"


def names():
    """The named network namespaces of this machine (those in /run/netns)."""
    return sorted(netns.listnetns())


def path(name):
    return f"{NETNS_DIR}/{name}"
