"""Unit tests cannot touch the system by accident.

An autouse fixture (after cloud-init's disable_subp_usage) makes every way out
of the process fail with TouchedSystem('unit tests must not touch X'), a
BaseException: code under test that catches Exception (Node.run's retry
loop, a task's error log) cannot swallow it, so the test fails:

    subprocess   subprocess.Popen (and so run/check_output/asyncio's
                 subprocesses), os.system, os.posix_spawn[p], os.fork,
                 os.forkpty
    socket       connect()/connect_ex()/sendto() on any socket but AF_UNIX ones
                 (socketpairs, and a fake daemon on a socket in tmp_path), and
                 AF_UNIX ones under /run or /var/run (the system bus, the real
                 lclusterd's socket)
    etcd         etcd3.client / etcd3.Etcd3Client
    dbus         dbus_next buses (their constructors connect already) and
                 MessageBus.connect

It also drops $NOTIFY_SOCKET and the socket-activation variables, so that
sd_notify() and sd_listen_fds() (C code, out of reach of the patches) see no
service manager.

A test that means to do one of these says so:

    @pytest.mark.allow_io                  # everything
    @pytest.mark.allow_io("subprocess")    # only what it names
"""

import os
import socket
import subprocess

import pytest

KINDS = ("subprocess", "socket", "etcd", "dbus")
SYSTEM_SOCKET_DIRS = ("/run/", "/var/run/")


class TouchedSystem(BaseException):
    """A unit test reached outside the process. Not an Exception, on purpose."""


def _refuse(what):
    def refused(*args, **kwargs):
        raise TouchedSystem(f"unit tests must not touch {what} "
                             "(mark the test with @pytest.mark.allow_io if it must)")
    return refused


def _unix_path_allowed(address):
    if isinstance(address, bytes):
        if address.startswith(b"\0"):
            return True  # abstract namespace: only a test's own socket would be there
        address = os.fsdecode(address)
    if not isinstance(address, str):
        return True
    path = os.path.abspath(address)
    return not any(path.startswith(d) for d in SYSTEM_SOCKET_DIRS)


def _guarded(original, verb):
    def guarded(self, address, *args):
        if self.family != socket.AF_UNIX:
            raise TouchedSystem(f"unit tests must not touch the network ({verb} to {address!r} "
                                 "on a non-unix socket; mark the test with @pytest.mark.allow_io)")
        if not _unix_path_allowed(address):
            raise TouchedSystem(f"unit tests must not touch system sockets ({verb} to {address!r}; "
                                 "mark the test with @pytest.mark.allow_io)")
        return original(self, address, *args)
    return guarded


def _guarded_sendto(original):
    def sendto(self, data, *args):
        # sendto(data, address) or sendto(data, flags, address)
        if args and self.family != socket.AF_UNIX:
            raise TouchedSystem(f"unit tests must not touch the network (sendto {args[-1]!r}; "
                                 "mark the test with @pytest.mark.allow_io)")
        if args and not _unix_path_allowed(args[-1]):
            raise TouchedSystem(f"unit tests must not touch system sockets (sendto {args[-1]!r}; "
                                 "mark the test with @pytest.mark.allow_io)")
        return original(self, data, *args)
    return sendto


def _allowed_kinds(request):
    allowed = set()
    for marker in request.node.iter_markers("allow_io"):
        unknown = set(marker.args) - set(KINDS)
        if unknown:
            raise pytest.UsageError(f"allow_io: unknown kinds {sorted(unknown)}; known: {KINDS}")
        allowed |= set(marker.args) or set(KINDS)
    return allowed


@pytest.fixture(autouse=True)
def no_system_io(request, monkeypatch):
    allowed = _allowed_kinds(request)

    for name in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                 "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)

    if "subprocess" not in allowed:
        # _execute_child is where every Popen forks, whoever holds a reference to Popen.
        monkeypatch.setattr(subprocess.Popen, "_execute_child", _refuse("subprocesses"))
        monkeypatch.setattr(os, "system", _refuse("subprocesses"))
        for name in ("posix_spawn", "posix_spawnp", "fork", "forkpty"):
            if hasattr(os, name):
                monkeypatch.setattr(os, name, _refuse("subprocesses"))

    if "socket" not in allowed:
        monkeypatch.setattr(socket.socket, "connect", _guarded(socket.socket.connect, "connect"))
        monkeypatch.setattr(socket.socket, "connect_ex", _guarded(socket.socket.connect_ex, "connect"))
        monkeypatch.setattr(socket.socket, "sendto", _guarded_sendto(socket.socket.sendto))

    if "etcd" not in allowed:
        import etcd3
        monkeypatch.setattr(etcd3, "client", _refuse("etcd"))
        monkeypatch.setattr(etcd3.Etcd3Client, "__init__", _refuse("etcd"))

    if "dbus" not in allowed:
        import dbus_next.aio
        import dbus_next.message_bus
        # The constructor already connects the socket; connect() says hello.
        monkeypatch.setattr(dbus_next.message_bus.BaseMessageBus, "_setup_socket", _refuse("D-Bus"))
        monkeypatch.setattr(dbus_next.aio.MessageBus, "connect", _refuse("D-Bus"))
    yield
