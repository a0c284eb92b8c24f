"""Network namespaces (pyroute2): the only module that touches them."""

from pyroute2 import NetNS, netns

NETNS_DIR = "/run/netns"


def names():
    """The named network namespaces of this machine (those in /run/netns)."""
    return sorted(netns.listnetns())


def ensure(name):
    """Create the named namespace, with loopback up, unless it exists."""
    if name in names():
        return False
    netns.create(name)
    with NetNS(name) as ns:
        (lo,) = ns.link_lookup(ifname="lo")
        ns.link("set", index=lo, state="up")
    return True


def path(name):
    return f"{NETNS_DIR}/{name}"
