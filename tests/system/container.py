"""System-test harness: cached Debian 12 (bookworm) and 13 (trixie) rootfs trees
and systemd-nspawn containers booted with systemd as PID 1, on a host whose own
PID 1 is not systemd.

The recipe is DESIGN.md's "Booting systemd on a machine whose PID 1 is not
systemd". Stdlib only; usable from pytest and as a script:

    python3 -m tests.system.container rootfs [--suite trixie]   # build/print the cached rootfs
    python3 -m tests.system.container demo --deb-dir DIR [--suite trixie]
    python3 -m tests.system.container shell [--suite trixie]
"""
import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"  # the default: what build_rootfs() and the cluster harness boot
# The Debian releases the package is tested on (tests/system/conftest.py runs the
# system suite on each of LCLUSTER_TEST_SUITES, default all of these).
SUITES = ("bookworm", "trixie")
CACHE_DIR = Path("/var/cache/lclusterd-tests")
LOG_DIR = Path("/tmp/lclusterd-tests")
# Bump when build_rootfs changes what it puts into a rootfs, so old caches are not reused.
ROOTFS_RECIPE = "3"

# Always needed to boot: systemd as PID 1 and a system bus.
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3"]
# What the system tests put into the rootfs beforehand, so that
# `apt-get install ./lclusterd_*.deb` runs offline in a --private-network container.
TEST_PACKAGES = [
    # runtime dependencies of our .deb (debian/control Depends)
    "python3-etcd3", "python3-dbus-next", "python3-systemd", "python3-pyroute2",
    "python3-click", "python3-aiohttp", "etcd-server",
    # etcdctl, to look at etcd from the tests
    "etcd-client",
    # the .deb Depends on it: its postinst makes the local etcd's TLS certificates
    "openssl",
    # ps, ip, and adduser/useradd to add a non-root test user
    "procps", "iproute2", "adduser", "passwd",
    # what the .deb Recommends (else the offline install tries to fetch it)
    "debootstrap",
    # the shells lclusterc's completion is for (bash-completion loads it as a user's bash does)
    "bash-completion", "zsh", "fish",
    # the metrics endpoint's library (lclusterd/metrics.py)
    "python3-prometheus-client",
]

# A sane environment for commands run inside: nothing leaks in from the host
# (XDG_RUNTIME_DIR, pyenv's PATH, locale, ...).
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INNER_ENV = ["PATH=" + INNER_PATH, "LANG=C.UTF-8", "TERM=dumb",
             "DEBIAN_FRONTEND=noninteractive"]
# runuser keeps the caller's environment: set the user's own HOME/USER/LOGNAME.
AS_USER = ('u=$(id -un); HOME=$(getent passwd "$u" | cut -d: -f6); '
           'export HOME USER="$u" LOGNAME="$u"; cd "$HOME" 2>/dev/null; exec sh -c "$1"')
# Runs in the child between setsid and exec: join the container's own cgroups.
JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ >"$1" || exit 125; shift; done; shift; exec "$@"'


class ContainerError(RuntimeError):
    pass


def check_host():
    """Fail with a clear message when this host cannot run system tests."""
    missing = [t for t in ("debootstrap", "systemd-nspawn", "nsenter", "chroot")
               if not shutil.which(t, path="/usr/sbin:/usr/bin:/sbin:/bin")]
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (debootstrap, nspawn, cgroups)")
    if missing:
        problems.append("missing tools: %s (apt-get install systemd-container "
                        "debootstrap util-linux coreutils)" % " ".join(missing))
    if problems:
        raise ContainerError("cannot run system tests: " + "; ".join(problems))


def apt_mirror(suite=SUITE):
    """The Debian mirror this host's apt uses for suite (so debootstrap works on this network)."""
    d = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list"), *sorted(d.glob("*.list")), *sorted(d.glob("*.sources"))]
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text()
        if f.suffix == ".sources":  # deb822: paragraphs of "Field: value"
            for para in re.split(r"\n\s*\n", text):
                fields = dict(m.groups() for m in
                              re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", para, re.M))
                if (fields.get("Enabled", "yes") != "no"
                        and "deb" in fields.get("Types", "").split()
                        and suite in fields.get("Suites", "").split()):
                    return fields["URIs"].split()[0]
        else:
            for m in re.finditer(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
                if m.group(2) == suite:
                    return m.group(1)
    return "http://deb.debian.org/debian"


def _umount_under(path):
    """Unmount whatever an interrupted debootstrap left mounted (proc, sys) below path."""
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], check=False)


def _remove_tree(path):
    _umount_under(path)
    shutil.rmtree(path, ignore_errors=True)


def build_rootfs(extra_packages=TEST_PACKAGES, suite=SUITE):
    """Return a Debian rootfs of suite with BASE_PACKAGES + extra_packages, built once and cached.

    Built into a temp dir beside the cache and renamed into place, under a lock,
    so an interrupted build leaves no half cache and concurrent callers build once.
    """
    if suite not in SUITES:
        raise ContainerError(f"unknown Debian suite {suite!r} (known: {', '.join(SUITES)})")
    packages = sorted(set(BASE_PACKAGES) | set(extra_packages))
    key = hashlib.sha256(f"{suite} {ROOTFS_RECIPE} {' '.join(packages)}".encode()).hexdigest()[:16]
    final = CACHE_DIR / f"rootfs-{key}"
    if final.is_dir():
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f"rootfs-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():  # built by another caller while we waited
            return final
        for stale in CACHE_DIR.glob(f".rootfs-{key}.tmp-*"):  # interrupted builds
            _remove_tree(stale)
        tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=f".rootfs-{key}.tmp-"))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700: the container's / would shut out non-root users
        log = CACHE_DIR / f"rootfs-{key}.log"
        try:
            with open(log, "wb") as out:
                r = subprocess.run(["debootstrap", "--variant=minbase",
                                    "--include=" + ",".join(packages),
                                    suite, str(tmp), apt_mirror(suite)],
                                   stdout=out, stderr=subprocess.STDOUT)
            # Seen on trixie: debootstrap fails configuring python3-grpcio (its
            # resolver left out libre2) and stops there; apt can finish the job.
            if r.returncode and "Failure while configuring base packages" not in log.read_text(
                    errors="replace"):
                raise ContainerError(f"debootstrap failed ({r.returncode}), see {log}:\n"
                                     + _tail(log))
            _umount_under(tmp)
            _finish_debootstrap(tmp)
            _mend_packages(tmp, log)
            # A minbase rootfs has no /etc/hosts: Debian's etcd.service then cannot resolve localhost.
            (tmp / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
            # debootstrap copies the host's /etc/hostname: without one, nspawn's -M NAME
            # becomes the hostname, so each container (cluster node) has its own.
            (tmp / "etc/hostname").unlink(missing_ok=True)
            # No machine-id: every boot gets its own, so containers from one rootfs differ
            # (systemd would copy dbus's, and all containers would share it).
            (tmp / "etc/machine-id").write_text("")
            (tmp / "var/lib/dbus/machine-id").unlink(missing_ok=True)
            # Keep the cache small.
            subprocess.run(["chroot", str(tmp), "apt-get", "clean"], check=True,
                           stdout=subprocess.DEVNULL)
            for f in (tmp / "var/lib/apt/lists").glob("*_*"):
                f.unlink()
            os.rename(tmp, final)
        except BaseException:
            _remove_tree(tmp)
            raise
    return final


def _finish_debootstrap(root):
    """What debootstrap does after configuring the base system, which it skips
    when that fails: put the real start-stop-daemon back and remove its
    policy-rc.d (exit 101, "start nothing": the package's postinst could not
    start lclusterd.socket) and its work dir. A no-op after a good run."""
    for d in ("sbin", "usr/sbin"):
        real = root / d / "start-stop-daemon.REAL"
        if real.exists() and not real.is_symlink():
            os.replace(real, root / d / "start-stop-daemon")
    (root / "usr/sbin/policy-rc.d").unlink(missing_ok=True)
    if (root / "debootstrap/debootstrap.log").is_file():
        os.replace(root / "debootstrap/debootstrap.log", root / "var/log/bootstrap.log")
    shutil.rmtree(root / "debootstrap", ignore_errors=True)


def _mend_packages(root, log):
    """Configure what debootstrap left half-installed, or fail naming the packages.

    Seen on trixie: python3-grpcio unconfigured (libre2 missing); `apt-get
    --fix-broken install` in a chroot mends it. Nothing to do after a good
    run (bookworm): then this only checks."""
    env = {"PATH": INNER_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
    audit = subprocess.run(["chroot", str(root), "dpkg", "--audit"], capture_output=True,
                           text=True, env=env)
    if audit.stdout.strip() or audit.returncode:
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        try:
            with open(log, "ab") as out:
                for cmd in (["apt-get", "update", "-q"],
                            ["apt-get", "--fix-broken", "install", "-y", "-q"],
                            ["dpkg", "--configure", "-a"]):
                    subprocess.run(["chroot", str(root), *cmd], stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
        finally:
            _umount_under(root)
    audit = subprocess.run(["chroot", str(root), "dpkg", "--audit"], capture_output=True,
                           text=True, env={"PATH": INNER_PATH, "LANG": "C.UTF-8"})
    if audit.stdout.strip() or audit.returncode:
        raise ContainerError(f"packages left broken in the rootfs (see {log}):\n"
                             + audit.stdout[-2000:])


def _tail(path, n=30):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def _children(pid):
    """PIDs whose parent is pid (scan /proc: works without CONFIG_PROC_CHILDREN)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after "(comm)"
                kids.append(int(d))
    return kids


def _comm(pid):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


class Container:
    """A Debian container booted with systemd-nspawn, systemd as its PID 1.

    Lifecycle: start() -> run(...)* -> stop() (idempotent) or poweroff_hard().
    """

    def __init__(self, name, rootfs, binds_ro=None, private_network=True, netns=None):
        """netns: boot in the named network namespace /run/netns/NETNS (a
        cluster node on a test bridge) instead of a private network."""
        self.name = name
        self.netns = netns
        self.rootfs = Path(rootfs)
        self.binds_ro = dict(binds_ro or {})
        self.private_network = private_network
        self.log_path = LOG_DIR / f"{name}.log"
        self.nspawn = None        # subprocess.Popen of systemd-nspawn
        self.init_pid = None      # the container's systemd, as seen from the host
        self._cgroups = []        # cgroup dirs we made, removed by stop()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _make_cgroups(self):
        """A cgroup of our own in every hierarchy (DESIGN.md: with --keep-unit nspawn
        would share its caller's cgroup, and two containers' systemds would collide)."""
        procs = []
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctl, path = line.split(":", 2)
            ctl = ctl.replace("name=", "") or "unified"
            parent = Path("/sys/fs/cgroup", ctl) / path.lstrip("/")
            cg = parent / self.name
            cg.mkdir()  # fails if it exists: never adopt someone else's cgroup
            self._cgroups.append(cg)
            if "cpuset" in ctl.split(","):  # a v1 cpuset takes no task until it has cpus and mems
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (cg / f).write_text((parent / f).read_text())
            procs.append(str(cg / "cgroup.procs"))
        return procs

    def _remove_cgroups(self):
        for cg in reversed(self._cgroups):
            for _ in range(50):  # the kernel takes a moment to empty a cgroup of dead tasks
                try:
                    for d, _subdirs, _files in os.walk(cg, topdown=False):  # depth first
                        os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                print(f"warning: could not remove cgroup {cg}", file=sys.stderr)
        self._cgroups = []

    def start(self, timeout=120):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        # --volatile=overlay rather than --ephemeral: the same throwaway root (rootfs as
        # overlayfs lower, tmpfs upper; several containers share one rootfs) without
        # --ephemeral's copy of the whole tree, which took 6-10 s per boot here.
        cmd = ["systemd-nspawn", "-D", str(self.rootfs), "--volatile=overlay", "--register=no",
               "--keep-unit", "-b", "-M", self.name, "--console=passive"]
        if self.netns:
            cmd.append(f"--network-namespace-path=/run/netns/{self.netns}")
        elif self.private_network:
            cmd.append("--private-network")  # its own ports: several etcds on :2379
        cmd += [f"--bind-ro={host}:{inside}" for host, inside in self.binds_ro.items()]
        try:
            procs = self._make_cgroups()
            with open(self.log_path, "wb") as log:
                self.nspawn = subprocess.Popen(
                    ["sh", "-c", JOIN_CGROUPS, "sh", *procs, "--", *cmd],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # setsid: no terminal signals from our session
                    env={"PATH": INNER_PATH, "LANG": "C.UTF-8"})
            deadline = time.monotonic() + timeout
            self._find_init(deadline)
            self._wait_running(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _find_init(self, deadline):
        """The container's systemd: the child of nspawn once it has exec'd systemd."""
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise self._boot_error(f"systemd-nspawn exited with {self.nspawn.returncode}")
            for pid in _children(self.nspawn.pid):
                if _comm(pid) == "systemd":
                    self.init_pid = pid
                    return
            time.sleep(0.05)
        raise self._boot_error("timed out waiting for the container's init")

    def _wait_running(self, deadline):
        state = ""
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise self._boot_error(f"systemd-nspawn exited with {self.nspawn.returncode}")
            left = max(1, deadline - time.monotonic())
            try:  # fails while the container's systemd has no bus yet: retry
                r = self.run("systemctl is-system-running --wait", check=False, timeout=left)
                state = r.stdout.strip()
            except subprocess.TimeoutExpired:
                break
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        raise self._boot_error(f"not running after boot timeout (state {state!r})")

    def _boot_error(self, what):
        return ContainerError(f"container {self.name}: {what}; last lines of "
                              f"{self.log_path}:\n{_tail(self.log_path)}")

    def enable_resource_control(self):
        """Let the container's systemd apply resource limits (MemoryMax=, TasksMax=,
        CPUQuota=...), as on a real machine. On a cgroup v1 (hybrid) host nspawn
        mounts the controllers read-only inside; the container's cgroups are its
        own (_make_cgroups), so remount them read-write in its mount namespace and
        have its systemd look again (daemon-reexec)."""
        with open(f"/proc/{self.init_pid}/mountinfo") as f:
            points = [line.split()[4] for line in f if " - cgroup " in line]
        for point in points:
            subprocess.run(["nsenter", "-t", str(self.init_pid), "-m", "mount", "-o",
                            "remount,bind,rw", point], check=True)
        self.run("systemctl daemon-reexec")

    def run(self, cmd, *, user=None, check=True, timeout=120, input=None):
        """Run the shell command string cmd inside (as root, or as user); text output captured."""
        if self.init_pid is None:
            raise ContainerError(f"container {self.name} is not started")
        argv = ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i", *INNER_ENV]
        if user is None:
            argv += ["HOME=/root", "USER=root", "LOGNAME=root", "sh", "-c", cmd]
        else:
            argv += ["runuser", "-u", user, "--", "sh", "-c", AS_USER, "sh", cmd]
        # Own session: nsenter forks into the pid namespace, so on timeout we
        # kill the whole process group, not just nsenter.
        p = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env={"PATH": INNER_PATH})
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
        r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        if check and r.returncode:
            raise ContainerError(f"in {self.name}{' as ' + user if user else ''}: {cmd!r} "
                                 f"exited {r.returncode}\n--- stdout:\n{out}--- stderr:\n{err}")
        return r

    def stop(self, timeout=60):
        """Clean shutdown (SIGTERM to nspawn), SIGKILL after timeout; remove our cgroups."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                self.poweroff_hard()
        self._cleanup()

    def poweroff_hard(self):
        """Pull the plug: SIGKILL nspawn and the container's init (kills all inside)."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            # init first: while nspawn lives, init's pid is its child's and cannot be reused.
            for pid in (self.init_pid, self.nspawn.pid):
                if pid is not None:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.nspawn.wait()
        self._cleanup()

    def _cleanup(self):
        self.init_pid = None
        if self.nspawn is not None:  # a killed nspawn leaves its propagation dir behind
            shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.name}", ignore_errors=True)
        self._remove_cgroups()


def unique_name(prefix="lct"):
    """A machine name no other test run on this host uses (cgroup dirs are named by it)."""
    return f"{prefix}-{os.getpid()}-{os.urandom(3).hex()}"


def demo(deb_dir, suite=SUITE):
    """Install the built .deb in a throwaway container and queue a job, as a user would.
    Prints a transcript; returns the exit status."""
    debs = sorted(Path(deb_dir).glob("lclusterd_*_all.deb"))
    if not debs:
        print(f"no lclusterd_*_all.deb in {deb_dir} (build it with `make deb`)", file=sys.stderr)
        return 1
    deb = debs[-1].name

    def step(c, cmd, **kw):
        print(f"$ {cmd}", flush=True)
        t = time.monotonic()
        r = c.run(cmd, check=False, **kw)
        # dpkg redraws "(Reading database ... N%" with \r, which text mode turned into
        # newlines: keep only the last of them, as a terminal would show.
        print(re.sub(r"(?m)^\(Reading database \.\.\. [^\n]*\n(?=\(Reading database)", "",
                     r.stdout + r.stderr), end="", flush=True)
        print(f"# exit {r.returncode}, {time.monotonic() - t:.1f} s", flush=True)
        if r.returncode:
            raise ContainerError(f"step failed: {cmd}")
        return r

    name = unique_name("lcdemo")
    print(f"# booting container {name} (log: {LOG_DIR / (name + '.log')})", flush=True)
    try:
        with Container(name, build_rootfs(suite=suite),
                       binds_ro={str(Path(deb_dir).resolve()): "/mnt/debs"}) as c:
            step(c, f"apt-get install -y /mnt/debs/{deb}", timeout=300)
            out = step(c, "lclusterc addjob 'echo hello from $(hostname)'").stdout
            uuid = out.split()[0] if out.split() else ""
            if not re.fullmatch(r"[0-9a-f-]{36}", uuid):
                raise ContainerError(f"addjob printed no uuid first: {out!r}")
            # Poll rather than block, so a stuck job ends the demo after 60 s.
            deadline, state = time.monotonic() + 60, None
            while time.monotonic() < deadline:
                r = c.run(f"lclusterc checkjob {uuid} --json", check=False)
                try:
                    state = json.loads(r.stdout).get("state")
                except ValueError:
                    state = None
                if state in ("succeeded", "failed", "cancelled", "lost", "warned"):
                    break
                time.sleep(0.5)
            step(c, f"lclusterc checkjob {uuid}")
            step(c, f"journalctl -u lcluster-job@{uuid} --no-pager")
            if state != "succeeded":
                raise ContainerError(f"job {uuid} ended {state!r}, not succeeded")
        print("# demo ok")
        return 0
    except (ContainerError, subprocess.TimeoutExpired) as e:
        print(f"# demo FAILED: {e}", file=sys.stderr)
        return 1


def shell(suite=SUITE):
    """Boot a container and wait, for poking around by hand; Ctrl-C stops it."""
    with Container(unique_name("lcshell"), build_rootfs(suite=suite)) as c:
        print(f"container {c.name} is up; enter it with:\n"
              f"  nsenter -t {c.init_pid} -a env -i {' '.join(INNER_ENV)} TERM=\"$TERM\" "
              f"HOME=/root bash\n"
              f"boot log: {c.log_path}\nCtrl-C (or SIGTERM to {os.getpid()}) stops it.",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            c.nspawn.wait()
        except KeyboardInterrupt:
            pass


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m tests.system.container",
                                 description="lclusterd system-test containers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rootfs", help="build (or find) the cached test rootfs and print its path")
    d = sub.add_parser("demo", help="install the .deb in a container and run a job")
    d.add_argument("--deb-dir", required=True, help="directory holding lclusterd_*_all.deb")
    s = sub.add_parser("shell", help="boot a container and print how to enter it")
    for p in (r, d, s):
        p.add_argument("--suite", choices=SUITES, default=SUITE, help="Debian release (%(default)s)")
    args = ap.parse_args(argv)
    try:
        check_host()
        if args.cmd == "rootfs":
            t = time.monotonic()
            print(build_rootfs(suite=args.suite))
            print(f"# {time.monotonic() - t:.1f} s", file=sys.stderr)
            return 0
        if args.cmd == "demo":
            return demo(args.deb_dir, args.suite)
        shell(args.suite)
        return 0
    except ContainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
