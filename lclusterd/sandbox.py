"""Checks of what the node's jobs will be sandboxed in, made once at start-up
so that a bad rootfs or namespace is refused with a clear message instead of
failing every job at exec (which is also ~100x slower to fail). A missing
network namespace is made."""

import os

from lclusterd import core, netns


class SandboxError(Exception):
    pass


# The limits a job may ask for, by the cgroup controller that enforces them
# (contract C4: Node gets enforceable=frozenset of these names).
CONTROLLERS = ("memory", "cpu", "pids")
LIMIT_OF = {"memory": "--memory", "cpu": "--cpus", "pids": "--tasks"}
CGROUP_ROOT = "/sys/fs/cgroup"


def enforceable(mountinfo, v2_controllers, writable=lambda path: True):
    """Which of CONTROLLERS this node can enforce, from /proc/self/mountinfo's
    text: a v1 hierarchy of that controller mounted read-write, or the v2
    hierarchy mounted read-write at CGROUP_ROOT with it in
    v2_controllers(mountpoint) (its cgroup.controllers). In a container a v1
    controller is often mounted read-only: systemd then sets MemoryMax= and
    the like without effect, so such a controller counts as missing."""
    found = set()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        mountpoint, options = fields[4], fields[5].split(",")
        fstype, super_options = tail[0], tail[2].split(",")
        usable = "rw" in options and "ro" not in super_options and writable(mountpoint)
        if fstype == "cgroup" and usable:
            found |= set(CONTROLLERS) & set(super_options)
        elif fstype == "cgroup2" and mountpoint == CGROUP_ROOT and usable:
            found |= set(CONTROLLERS) & set(v2_controllers(mountpoint))
    return frozenset(found)


def node_enforces():
    """enforceable() of this machine."""
    def v2_controllers(mountpoint):
        try:
            with open(os.path.join(mountpoint, "cgroup.controllers"), encoding="ascii") as f:
                return f.read().split()
        except OSError:
            return ()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            mountinfo = f.read()
    except OSError:
        return frozenset()
    return enforceable(mountinfo, v2_controllers, lambda path: os.access(path, os.W_OK))


def describe_enforced(enforced):
    """One line for STATUS= and the journal."""
    missing = [c for c in CONTROLLERS if c not in enforced]
    if not missing:
        return "enforces memory, cpu and pids limits"
    said = ", ".join(f"{LIMIT_OF[c]} (no writable {c} cgroup controller)" for c in missing)
    return f"cannot enforce {said}"


def check(config):
    if config.rootfs:
        check_rootfs(config.rootfs)
    if config.namespace:
        check_namespace(config.namespace)


def check_rootfs(rootfs):
    if not os.path.isabs(rootfs):
        raise SandboxError(f"rootfs {rootfs} must be an absolute path")
    if not os.path.isdir(rootfs):
        raise SandboxError(f"rootfs {rootfs} is not a directory")
    shell = os.path.join(rootfs, "bin/sh")
    # bin/sh may be an absolute symlink meant for inside the rootfs.
    target = os.readlink(shell) if os.path.islink(shell) else None
    if target and os.path.isabs(target):
        shell = os.path.join(rootfs, target.lstrip("/"))
    if not (os.path.isfile(shell) and os.access(shell, os.X_OK)):
        raise SandboxError(f"rootfs {rootfs} has no executable /bin/sh: jobs could not start there")


def check_namespace(name):
    """The namespace exists afterwards: made (loopback up) if it was missing."""
    if not core.NAMESPACE_NAME.match(name):
        raise SandboxError(f"'{name}' is not a valid network namespace name")
    try:
        netns.ensure(name)
    except OSError as e:
        raise SandboxError(f"cannot create network namespace '{name}': {e}")
