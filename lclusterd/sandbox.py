"""Checks of what the node's jobs will be sandboxed in, made once at start-up
so that a bad rootfs or namespace is refused with a clear message instead of
failing every job at exec (which is also ~100x slower to fail). A missing
network namespace is made."""

import os

from lclusterd import core, netns


class SandboxError(Exception):
    pass



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
