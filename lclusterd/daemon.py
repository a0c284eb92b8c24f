"""lclusterd, the daemon: the composition root.

Builds every collaborator, adopts the sockets systemd passes (or binds its
own in the foreground), tells systemd where it stands (READY, STATUS,
WATCHDOG, STOPPING) and unwinds in reverse on SIGTERM. Jobs are units of
their own, so stopping or killing the daemon stops no job.
"""

import asyncio
import logging
import os
import signal
import socket
import stat
import sys

import click
from aiohttp import web
from systemd import daemon as sd

from lclusterd import (__version__, api, config as configuration, core, journal, netns, peers,
                       rootfs as rootfs_builder, sandbox)
from lclusterd.node import Node
from lclusterd.store import Store
from lclusterd.units import Units

log = logging.getLogger("lclusterd")

EX_CONFIG = 78  # sysexits' "configuration error": lclusterd.service does not restart on it
REPORT_EVERY = 1  # seconds between looks at STATUS= (and watchdog pets)
# What SIGHUP can change: the limits and networks apply to jobs submitted after it.
RELOADABLE = ("slots", "stop_timeout", "poll_interval", "job_networks", "retention",
              "max_finished_jobs",
              *(f"{kind}_{name}" for name, _, _ in core.LIMITS for kind in ("default", "max")))


class StartupError(Exception):
    pass


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


def status(node):
    if not node.units.connected:
        return "waiting for the system bus (D-Bus)"
    if node.etcd_error:
        return f"waiting for etcd: {node.etcd_error}"
    if node.lease is None:
        return "registering in the cluster"
    return f"running {len(node.mine)} job(s) of {node.config.slots} slot(s); etcd ok"


async def report(node, stopping):
    """STATUS= for `systemctl status` when it changes, and the watchdog: only
    a live event loop pets it."""
    said = None
    while not stopping.is_set():
        now = status(node)
        sd.notify(f"WATCHDOG=1\nSTATUS={now}" if now != said else "WATCHDOG=1")
        said = now
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


async def serve(config, config_path=None):
    sd.notify("STATUS=adopting sockets")
    sockets = listening_sockets(config.socket)
    inherited_tcp = any(s.family != socket.AF_UNIX for s in sockets)
    token = read_token(config.token_file, required=bool(config.listen))
    if inherited_tcp and token is None:
        log.warning("a TCP socket was passed but %s is missing: TCP callers get 401", config.token_file)
    if config.listen:
        sockets.append(tcp_socket(*config.listen))
    store = Store(config.etcd_endpoints, config.prefix,
                  tls={"ca_cert": config.etcd_ca, "cert_cert": config.etcd_cert,
                       "cert_key": config.etcd_key})
    units = Units()
    node = Node(config, store, units, journal.JobLog, peers.Peers(token))
    units.on_change = node.unit_changed

    runner = web.AppRunner(api.make_app(node, token), access_log=None)
    await runner.setup()
    for sock in sockets:
        await web.SockSite(runner, sock).start()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, reload, node, config_path)

    sd.notify("READY=1\nSTATUS=connecting to the system bus and etcd")
    log.info("lclusterd %s serving on %s as node %s", __version__,
             ", ".join(str(s.getsockname()) for s in sockets), config.node_name)
    tasks = [asyncio.create_task(node.run(stopping)), asyncio.create_task(report(node, stopping)),
             asyncio.create_task(node.keep_lease(stopping))]
    try:
        await stopping.wait()
    finally:
        sd.notify("STOPPING=1\nSTATUS=stopping (jobs keep running)")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        units.close()
        store.close()


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE",
              help=f"Config file (default {configuration.DEFAULT_PATH}).")
@click.option("--rootfs", metavar="PATH", help="Run jobs with this directory as their /.")
@click.option("--namespace", metavar="NAME",
              help="Run jobs in the network namespace /run/netns/NAME (made if missing).")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Unix socket to bind when not socket-activated.")
@click.option("--etcd", "etcd_endpoints", metavar="URLS",
              help="etcd endpoints, comma-separated (default http://127.0.0.1:2379).")
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
    except KeyboardInterrupt:
        pass


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
