"""Root filesystems for jobs, built with debootstrap: the only module that runs it."""

import datetime
import glob
import os
import shutil
import subprocess
import tempfile

DEFAULT_PATH = "/var/lib/lclusterd/rootfs"
DEFAULT_SUITE = "bookworm"
# Written into every rootfs we build: what it is, for people and for tests.
MARKER = "etc/lclusterd-rootfs"


class RootfsError(Exception):
    pass


def build(path, suite=DEFAULT_SUITE, include=(), mirror=None):
    """A minimal Debian rootfs at path (absent or empty), built beside it and
    renamed into place, so that a failed build leaves nothing half made."""
    path = os.path.abspath(path)
    if os.geteuid() != 0:
        raise RootfsError("building a rootfs needs root (debootstrap)")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise RootfsError(f"{path} exists and is not an empty directory")
    if not shutil.which("debootstrap"):
        raise RootfsError("debootstrap is not installed (apt install debootstrap)")
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o755, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        os.chmod(tmp, 0o755)  # a job's / must be readable by its user
        cmd = ["debootstrap", "--variant=minbase"]
        if include:
            cmd.append("--include=" + ",".join(include))
        cmd += [suite, tmp] + ([mirror] if mirror else [])
        if subprocess.run(cmd).returncode:
            raise RootfsError(f"debootstrap failed: {' '.join(cmd)}")
        # Downloaded packages and package lists: ~80 MB that jobs never use
        # (apt-get update in the rootfs brings the lists back).
        for leftover in (glob.glob(os.path.join(tmp, "var/cache/apt/archives/*.deb"))
                         + glob.glob(os.path.join(tmp, "var/lib/apt/lists/*_*"))):
            os.unlink(leftover)
        # minbase has no /etc/hosts: jobs could not resolve localhost.
        with open(os.path.join(tmp, "etc/hosts"), "w") as f:
            f.write("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(f"built by lclusterd mkrootfs on {datetime.date.today()}: debootstrap "
                    f"--variant=minbase, suite {suite}, extra packages: {' '.join(include) or '-'}\n")
        if os.path.isdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(tree):
    """Unmount what an interrupted debootstrap left mounted (proc, sys) in tree, then remove it."""
    prefix = tree.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(tree, ignore_errors=True)
