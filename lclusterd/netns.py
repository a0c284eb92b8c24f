"""Network namespaces (pyroute2 to list them, iproute2's ip to make them):
the only module that touches them."""

import errno
import subprocess
import threading

from pyroute2 import netns

NETNS_DIR = "/run/netns"
IP_TIMEOUT = 10  # seconds; ip answers in milliseconds
_making = threading.Lock()  # jobs start concurrently: one creation at a time


class Error(OSError):
    """A namespace could not be made or set up; the message says why."""


def names():
    """The named network namespaces of this machine (those in /run/netns)."""
    return sorted(netns.listnetns())


def ensure(name):
    """Create the named namespace, with loopback up, unless it exists.
    True if this call made it. Raises Error (an OSError).

    Made with iproute2's `ip`, not pyroute2: pyroute2 0.7's netns.create and
    NetNS fork the daemon, and a fork of a process with gRPC's threads hangs
    on Debian 13 ("Waiting for thread pool to idle before forking")."""
    with _making:
        try:
            if name in names():
                return False
        except OSError as e:
            raise Error(e.errno or errno.EIO, str(e)) from None
        made = _ip("netns", "add", name)
        if made.returncode and name not in names():
            raise Error(errno.EIO, f"ip netns add {name}: {_said(made)}")
        up = _ip("-n", name, "link", "set", "lo", "up")
        if up.returncode:
            raise Error(errno.EIO, f"loopback of {name}: {_said(up)}")
        return made.returncode == 0


def _ip(*args):
    try:
        return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        raise Error(errno.EIO, f"ip {' '.join(args)}: {e}") from None


def _said(result):
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"


def path(name):
    return f"{NETNS_DIR}/{name}"
