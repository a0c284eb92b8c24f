"""Network namespaces (pyroute2): the only module that touches them."""

import errno
import threading

from pyroute2 import NetlinkError, NetNS, netns

NETNS_DIR = "/run/netns"
_making = threading.Lock()  # jobs start concurrently: one creation at a time


class Error(OSError):
    """A namespace could not be made or set up; the message says why."""


def names():
    """The named network namespaces of this machine (those in /run/netns)."""
    return sorted(netns.listnetns())


def ensure(name):
    """Create the named namespace, with loopback up, unless it exists.
    True if this call made it. Raises Error (an OSError)."""
    with _making:
        try:
            if name in names():
                return False
            try:
                netns.create(name)
            except OSError as e:  # made meanwhile by someone else (ip netns add)
                if e.errno != errno.EEXIST:
                    raise
                return False
            with NetNS(name) as ns:
                (lo,) = ns.link_lookup(ifname="lo")
                ns.link("set", index=lo, state="up")
            return True
        except NetlinkError as e:
            raise Error(e.code, f"netlink: {e}") from None
        except (OSError, ValueError) as e:
            raise Error(getattr(e, "errno", None) or errno.EIO, str(e)) from None


def path(name):
    return f"{NETNS_DIR}/{name}"
