"""lclusterd, the daemon: the composition root.

Builds every collaborator, adopts the sockets systemd passes (or binds its
own in the foreground), tells systemd where it stands (READY, STATUS,
WATCHDOG, STOPPING) and unwinds in reverse on SIGTERM. Jobs are units of
their own, so stopping or killing the daemon stops no job.
"""

import asyncio
import logging
import os
import resource
import signal
import socket
import stat
import sys

import click
from aiohttp import web
from systemd import daemon as sd

from lclusterd import (__version__, api, config as configuration, core, journal, netns, peers,
                       rootfs as rootfs_builder, sandbox, store as etcd)
from lclusterd import tls as https
from lclusterd.node import Node
from lclusterd.store import Store
from lclusterd.units import Unavailable as UnitsUnavailable, Units

log = logging.getLogger("lclusterd")

EX_CONFIG = 78  # sysexits' "configuration error": lclusterd.service does not restart on it
EX_CRASHED = 1  # a task of ours died: Restart=on-failure starts us again
REPORT_EVERY = 1  # seconds between looks at STATUS= (and watchdog pets)
# What SIGHUP can change: the limits and networks apply to jobs submitted after it.
# Keep units/lclusterd.conf's header in step.
RELOADABLE = ("slots", "stop_timeout", "poll_interval", "job_networks", "retention",
              "max_finished_jobs", "max_queued_per_user", "job_tmp_size", "max_connections",
              "max_connections_per_uid",  # api reads these at each connection
              *(f"{kind}_{name}" for name, _, _ in core.LIMITS for kind in ("default", "max")))
# The loops that must go round for the watchdog to be petted (Node.progress).
LOOPS = {"runner": "the node's loop", "placer": "the placer", "heartbeat": "the heartbeat"}
# Fault injection for tests/system/test_daemon.py only: "crash:TASK" or
# "stall:TASK" (TASK of serve's supervised tasks) in the service's environment.
FAULT_ENV = "LCLUSTERD_TEST_FAULT"
# gRPC's Python waits for a watch's next answer in slices of this many
# seconds (its _common.MAXIMUM_WAIT_TIMEOUT, 0.1: grpc issue 19464, so that
# a blocked main thread still takes signals; ours never waits on gRPC).
# An answer or a cancel wakes the wait at once: the slices only cost wakeups,
# 10 a second per watch thread, a quarter of an idle node's CPU (6 watches
# on the primed node; tests/bench).
GRPC_WAIT_SLICE = 1.0


class StartupError(Exception):
    pass


class TaskEnded(Exception):
    """A long-lived task ended while the daemon was not stopping."""

    def __init__(self, name, error):
        super().__init__(f"task {name} ended: {error!r}" if error else f"task {name} returned")
        self.name, self.error = name, error


async def supervise(coroutines, stopping):
    """Run {name: coroutine} until stopping is set. A task that ends before
    then, by an exception or by returning, ends them all: TaskEnded, so the
    daemon exits non-zero and systemd (Restart=on-failure) starts it afresh
    rather than living on with a dead heartbeat or scheduler."""
    tasks = {asyncio.create_task(coro, name=name): name for name, coro in coroutines.items()}
    stop = asyncio.create_task(stopping.wait())
    try:
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop and not stopping.is_set():
                error = None if task.cancelled() else task.exception()
                raise TaskEnded(tasks[task], error) from error
    finally:
        # Stopping first: a loop whose cancellation Python 3.11's wait_for
        # swallowed (it came as its wait ended) still sees it and returns.
        stopping.set()
        stop.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(stop, *tasks, return_exceptions=True)


def inject_fault(coroutines, fault):
    """Replace one task by one that crashes after a second or that hangs:
    what supervision and the watchdog are there for."""
    kind, _, name = fault.partition(":")
    if kind not in ("crash", "stall") or name not in coroutines:
        for coro in coroutines.values():
            coro.close()
        raise StartupError(f"{FAULT_ENV}={fault}: want crash:TASK or stall:TASK, "
                           f"TASK one of {', '.join(coroutines)}")
    log.warning("%s=%s: the %s task will %s (a test)", FAULT_ENV, fault, name, kind)
    coroutines[name].close()

    async def crash():
        await asyncio.sleep(1)
        raise RuntimeError(f"crash injected by {FAULT_ENV}")
    coroutines[name] = crash() if kind == "crash" else asyncio.Event().wait()
    return coroutines


def stalled(progress, now, limit, started):
    """{name: seconds} of the LOOPS that have not gone round for more than
    limit seconds (a loop not yet started counts from started)."""
    ages = {name: now - progress.get(name, started) for name in LOOPS}
    return {name: age for name, age in ages.items() if age > limit}


def stall_limit(config, watchdog_usec):
    """How long a loop may go without a round before we stop petting the
    watchdog: half its period, but never less than a few of the loops' own
    waits (a slow etcd or a big sweep is not a hang)."""
    period = int(watchdog_usec) / 1e6 if str(watchdog_usec or "").isdigit() else 0
    return max(period / 2, 4 * config.poll_interval, config.lease_ttl)


def raise_fd_limit():
    """Soft RLIMIT_NOFILE up to the hard one (LimitNOFILE= in the unit): every
    API connection is a descriptor, and 1024 is a flood's worth."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listening_sockets(path):
    """The sockets systemd passed us, or our own unix socket at path."""
    fds = sd.listen_fds()
    if fds:
        return [socket.socket(fileno=fd) for fd in fds]
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise StartupError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
            raise StartupError(f"another lclusterd is already listening on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left behind by a daemon that died
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)  # anyone may connect: callers are told apart by SO_PEERCRED
    sock.listen(128)
    return [sock]


def read_token(path, required):
    """The shared token from a root-only file; None if absent and not required."""
    try:
        info = os.stat(path)
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        if required:
            raise StartupError(f"TCP listening needs a token file: {path} does not exist "
                               "(create it: head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE)")
        return None
    except OSError as e:
        raise StartupError(f"cannot read the token file {path}: {e.strerror}")
    if info.st_uid != 0 or info.st_mode & 0o077:
        raise StartupError(f"the token file {path} must belong to root and be readable by root only")
    if len(token) < 16:
        raise StartupError(f"the token in {path} is too short (at least 16 characters)")
    return token


def peer_ca(config):
    """The CA the other nodes' certificates are verified against (None: the system's)."""
    return config.tls_ca or config.tls_client_ca


def peer_context(config):
    """TLS for fetching the other nodes' output (peers.py) over https://
    (None: aiohttp's default, the system's CAs); our own certificate goes
    with it, for nodes that ask for one (tls_client_ca)."""
    if not (config.tls_cert or peer_ca(config)):
        return None
    return https.client_context(peer_ca(config), config.tls_cert, config.tls_key)


def tcp_socket(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}")
    sock.listen(128)
    return sock


def status(node, warnings=(), stuck=None):
    if stuck:
        said = "; ".join(f"{LOOPS[name]} has made no progress for {age:.0f} s"
                         for name, age in stuck.items())
        return f"{said} (watchdog not petted)"
    waits = []  # both, when both are away: neither hides the other
    if not node.units.connected:
        waits.append("waiting for the system bus (D-Bus)")
    if node.etcd_error:
        waits.append(f"waiting for etcd: {node.etcd_error}")
    if waits:
        state = "; ".join(waits)
    elif node.lease is None:
        state = "registering in the cluster"
    else:
        state = f"running {len(node.mine)} job(s) of {node.config.slots} slot(s); etcd ok"
        if getattr(node, "primed", False):
            state += "; primed: placing the cluster's jobs"
    return "; ".join((state, *warnings))


async def report(node, stopping, warnings, limit):
    """STATUS= for `systemctl status` when it changes, and the watchdog:
    petted only while the node's loop, the placer and the heartbeat all go round
    (Node.progress), so a hung or dead loop gets the daemon restarted."""
    loop = asyncio.get_running_loop()
    said, was_stuck, started = None, set(), loop.time()
    while not stopping.is_set():
        stuck = stalled(node.progress, loop.time(), limit, started)
        now = status(node, warnings, stuck)
        if set(stuck) - was_stuck:
            log.error("%s", now)
        was_stuck = set(stuck)
        message = [] if stuck else ["WATCHDOG=1"]
        if now != said:
            message.append(f"STATUS={now}")
        if message:
            sd.notify("\n".join(message))
        said = now
        try:
            await asyncio.wait_for(stopping.wait(), REPORT_EVERY)
        except asyncio.TimeoutError:
            pass


def open_etcd_probe(config, tls):
    """Settings for a store that connects to the same etcd as we do but with
    no client certificate: plain text, and for https the CA alone."""
    yield "without TLS", [e.replace("https://", "http://", 1) for e in config.etcd_endpoints], None
    if tls.get("ca_cert"):
        yield "with TLS but no client certificate", list(config.etcd_endpoints), \
            {"ca_cert": tls["ca_cert"]}


async def check_etcd_open(node, tls, warnings, store_class=Store):
    """Issue 10: warn when the etcd we use takes writes from anyone who can
    connect (no client certificate, no password). Tried once we are
    registered (so etcd answers us): a 1-second lock key under our prefix,
    which expires by itself."""
    config, loop = node.config, asyncio.get_running_loop()
    while node.lease is None:
        await asyncio.sleep(REPORT_EVERY)
    for how, endpoints, probe_tls in open_etcd_probe(config, tls):
        probe = store_class(endpoints, config.prefix, tls=probe_tls)
        try:
            await loop.run_in_executor(None, probe.lock, "unauthenticated-write-probe",
                                       config.node_name, 1)
        except Exception:  # refused, unreachable, or not speaking this: not open that way
            continue
        finally:
            probe.close()
        warning = (f"etcd at {', '.join(endpoints)} accepts writes from anyone {how}: "
                   "every local user can change job records (README: Security model)")
        log.warning("%s", warning)
        warnings.append(warning)
        return


async def watch(node, stopping, cancels):
    """Wire etcd's watches to the node's wake-ups once etcd answers (a watch
    cannot start before); until then, and whenever a watch misses
    something, the loops' poll_interval is the backstop. cancels: filled
    with what stops them."""
    loop = asyncio.get_running_loop()
    while not stopping.is_set():
        try:
            cancels.extend(await loop.run_in_executor(None, node.watches, loop))
            return
        except Exception as e:  # noqa: BLE001  etcd away (or refusing): try again
            log.debug("watches not started yet: %s", e)
        try:
            await asyncio.wait_for(stopping.wait(), REPORT_EVERY)
        except asyncio.TimeoutError:
            pass


def reload(node, config_path):
    """SIGHUP: re-read the settings that can change while running."""
    try:
        fresh = configuration.load(config_path)
    except configuration.ConfigError as e:
        log.error("reload refused, keeping the old settings: %s", e)
        return
    for name in RELOADABLE:
        setattr(node.config, name, getattr(fresh, name))
    log.info("reloaded %s; other settings take a restart", ", ".join(RELOADABLE))
    node.next_prune = 0.0  # apply a new retention now
    node.wake()


def quieter_grpc_waits(common=None):
    """Fewer wakeups of threads waiting on gRPC (GRPC_WAIT_SLICE)."""
    if common is None:
        import grpc._common as common
    if getattr(common, "MAXIMUM_WAIT_TIMEOUT", None) is not None:
        common.MAXIMUM_WAIT_TIMEOUT = max(common.MAXIMUM_WAIT_TIMEOUT, GRPC_WAIT_SLICE)


def signing_key(token):
    """The key job records are signed with (contract C3), or None without a token."""
    return core.signing_key(token) if token is not None else None


async def serve(config, config_path=None):
    warnings = []  # said in STATUS= after the state, and once in the journal
    quieter_grpc_waits()
    fds = raise_fd_limit()
    sd.notify("STATUS=adopting sockets")
    sockets = listening_sockets(config.socket)
    inherited_tcp = any(s.family != socket.AF_UNIX for s in sockets)
    token = read_token(config.token_file, required=bool(config.listen))
    if inherited_tcp and token is None:
        log.warning("a TCP socket was passed but %s is missing: TCP callers get 401", config.token_file)
    if token is None:
        warnings.append(f"no token file {config.token_file}: job records are not signed")
        log.warning("%s; anyone who can write to etcd can have jobs run here", warnings[-1])
    if config.listen:
        sockets.append(tcp_socket(*config.listen))
    enforced = sandbox.node_enforces()
    said = sandbox.describe_enforced(enforced)
    log.info("this node %s", said)
    if enforced != frozenset(sandbox.CONTROLLERS):
        warnings.append(f"this node {said}: such jobs are refused")
    try:  # HTTPS on TCP (issue 12 item 4): a bad file is exit 78 with one line naming it
        server_tls = (https.server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
                      if config.tls_cert else None)
        peer_tls = peer_context(config)
    except https.TLSError as e:
        raise StartupError(str(e)) from None
    tls = {"ca_cert": config.etcd_ca, "cert_cert": config.etcd_cert, "cert_key": config.etcd_key}
    store = Store(config.etcd_endpoints, config.prefix, tls=tls)
    units = Units()
    node = Node(config, store, units, journal.JobLog, peers.Peers(token, peer_tls, peer_ca(config)),
                signing_key=signing_key(token), enforceable=enforced)
    units.on_change = node.unit_changed

    runner = api.runner(node, token)  # bounded connections, JSON errors (H3 stub; H7 owns this file)
    await runner.setup()
    for sock in sockets:
        await web.SockSite(runner, sock, ssl_context=None if sock.family == socket.AF_UNIX
                           else server_tls).start()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload, node, config_path)

    sd.notify("READY=1\nSTATUS=connecting to the system bus and etcd")
    log.info("lclusterd %s serving on %s as node %s (up to %d file descriptors)", __version__,
             ", ".join(str(s.getsockname()) for s in sockets), config.node_name, fds)
    await ask_systemd(node, warnings)  # before the loops: no job starts without the answer
    probe = asyncio.create_task(check_etcd_open(node, tls, warnings))
    limit = stall_limit(config, os.environ.get("WATCHDOG_USEC"))
    cancels = []  # etcd's watches: they wake the loops (from their threads)
    watching = asyncio.create_task(watch(node, stopping, cancels))
    try:
        tasks = {"runner": node.run(stopping), "placer": node.place(stopping),
                 "heartbeat": node.keep_lease(stopping),
                 "reporter": report(node, stopping, warnings, limit)}
        if os.environ.get(FAULT_ENV):
            tasks = inject_fault(tasks, os.environ[FAULT_ENV])
        await supervise(tasks, stopping)
    finally:
        sd.notify("STOPPING=1\nSTATUS=stopping (jobs keep running)")
        probe.cancel()
        watching.cancel()
        await asyncio.gather(probe, watching, return_exceptions=True)
        # (A cancel joins its watch's thread: not on the loop.)
        await asyncio.get_running_loop().run_in_executor(None, lambda: [c() for c in cancels])
        await runner.cleanup()
        node.close()  # the heartbeat's per-endpoint stores and threads
        units.close()
        store.close()


async def ask_systemd(node, warnings):
    """What the node's systemd offers jobs beyond Debian 12's: PrivatePIDs=
    (257 on), asked of systemd once, before any job starts. Without an answer
    (no system bus yet) jobs run without it until the next restart, and
    STATUS= says so."""
    try:
        if not node.units.connected:
            await node.units.connect()
        node.runner.private_pids = await node.units.service_has("PrivatePIDs")
    except UnitsUnavailable as e:
        warnings.append(f"jobs run without PrivatePIDs= until a restart: cannot ask systemd ({e})")
        log.warning("%s", warnings[-1])
        return
    log.info("jobs %s", "get PrivatePIDs= (their own PID namespace)" if node.runner.private_pids
             else "share the node's PID namespace (this systemd has no PrivatePIDs=)")


def name_taken(error, config_path):
    """One line for store.NameTaken: who holds our name, and what to do."""
    return (f"node name {error.name} is held by a live node on another machine, at "
            f"{error.address or 'an unknown address'}: set another node_name in "
            f"{config_path or configuration.DEFAULT_PATH}")


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE",
              help=f"Config file (default {configuration.DEFAULT_PATH}).")
@click.option("--rootfs", metavar="PATH", help="Run jobs with this directory as their /.")
@click.option("--namespace", metavar="NAME",
              help="Run jobs in the network namespace /run/netns/NAME (made if missing).")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Unix socket to bind when not socket-activated.")
@click.option("--etcd", "etcd_endpoints", metavar="URLS",
              help="etcd endpoints, comma-separated (default: the local etcd).")
@click.version_option(__version__, prog_name="lclusterd")
@click.pass_context
def main(ctx, config_path, rootfs, namespace, socket_path, etcd_endpoints):
    """The lclusterd daemon: runs queued jobs as systemd units on this node.

    Normally started by lclusterd.socket on first use; run by hand it binds
    its own socket and stays in the foreground. The commands below are
    helpers for the admin; they start no daemon.
    """
    if ctx.invoked_subcommand is not None:
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        config = configuration.load(config_path, rootfs=rootfs, namespace=namespace,
                                    socket=socket_path, etcd_endpoints=etcd_endpoints)
        sandbox.check(config)
        asyncio.run(serve(config, config_path))
    except (configuration.ConfigError, sandbox.SandboxError, StartupError) as e:
        sd.notify(f"STATUS=refused to start: {e}")
        click.echo(f"lclusterd: {e}", err=True)
        sys.exit(EX_CONFIG)
    except TaskEnded as e:
        if isinstance(e.error, etcd.NameTaken):  # contract C2: restarting would not help
            said = name_taken(e.error, config_path)
            sd.notify(f"STATUS=refused to start: {said}")
            click.echo(f"lclusterd: {said}", err=True)
            sys.exit(EX_CONFIG)
        sd.notify(f"STATUS=failed: {e}")
        log.critical("%s; exiting for systemd to restart us", e, exc_info=e.error)
        sys.exit(EX_CRASHED)
    except KeyboardInterrupt:
        pass


@main.command("check-config")
@click.option("--config", "config_path", metavar="FILE",
              help=f"Config file (default {configuration.DEFAULT_PATH}).")
@click.pass_context
def check_config(ctx, config_path):
    """Check the config file: silent and 0 when the daemon would take it,
    else one line and exit 78. lclusterd.service's ExecReload= runs it
    before SIGHUP, so `systemctl reload` fails visibly on a bad file."""
    config_path = config_path or ctx.parent.params.get("config_path")
    try:
        config = configuration.load(config_path)
        if config.rootfs:
            sandbox.check_rootfs(config.rootfs)
        if config.namespace and not core.NAMESPACE_NAME.match(config.namespace):
            raise sandbox.SandboxError(f"'{config.namespace}' is not a valid network namespace name")
        if config.tls_cert:  # the same contexts serve() builds: a bad file fails here too
            https.server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
        peer_context(config)
    except (configuration.ConfigError, sandbox.SandboxError, https.TLSError) as e:
        where = config_path or configuration.DEFAULT_PATH
        click.echo(f"lclusterd: {e}" if where in str(e) else f"lclusterd: {where}: {e}", err=True)
        sys.exit(EX_CONFIG)


@main.command()
@click.argument("path", default=rootfs_builder.DEFAULT_PATH)
@click.option("--suite", default=rootfs_builder.DEFAULT_SUITE, show_default=True,
              help="Debian release to install.")
@click.option("--include", metavar="PKGS", default="",
              help="Extra packages, comma-separated (e.g. python3,curl).")
@click.option("--mirror", metavar="URL", help="Debian mirror (default: debootstrap's).")
def mkrootfs(path, suite, include, mirror):
    """Build a minimal Debian root filesystem for jobs at PATH
    (default /var/lib/lclusterd/rootfs) with debootstrap."""
    packages = tuple(p.strip() for p in include.split(",") if p.strip())
    try:
        built = rootfs_builder.build(path, suite, packages, mirror)
    except (rootfs_builder.RootfsError, OSError) as e:
        click.echo(f"lclusterd: {e}", err=True)
        sys.exit(1)
    click.echo(f"rootfs ready at {built}. To run jobs in it, set\n"
               f"    rootfs = {built}\n"
               f"in {configuration.DEFAULT_PATH} (or start lclusterd --rootfs={built}),\n"
               f"then: systemctl restart lclusterd")


@main.command()
def namespaces():
    """List this machine's network namespaces (those under /run/netns)."""
    for name in netns.names():
        click.echo(name)
