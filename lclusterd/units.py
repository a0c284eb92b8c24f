"""systemd over D-Bus (dbus-next): the only module that talks to it.

Starts each job as a transient service, reads its state, stops and unloads
it, and reports changes of lcluster-job units as they happen.
"""

import asyncio
import dataclasses
import logging
import os
from struct import unpack_from

from dbus_next import BusType, Message, MessageFlag, MessageType, Variant
from dbus_next._private.unmarshaller import Unmarshaller
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError, InvalidMessageError
from dbus_next.signature import SignatureTree

from lclusterd import core

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
UNIT_PATH_PREFIX = "/org/freedesktop/systemd1/unit/"
# A service every node has (systemd loads a unit on demand when its object is
# asked for): its introspection tells which service properties systemd knows.
SELF_UNIT = "lclusterd.service"

# dbus-next 0.2.3 breaks with ~200 calls in flight on one connection: at
# most this many messages wait for their answer (a status read is 12 of them).
MAX_IN_FLIGHT = 64
# Seconds a call waits for systemd's answer. Past it the bus is closed (every
# call then fails Unavailable) and Node.run reconnects: a systemd that stops
# answering must not stall the node while its watchdog is petted. (sd-bus's
# own default is 25 s; under a 1,000-job load answers took well under 1 s.)
CALL_TIMEOUT = 15.0

# D-Bus signatures of the properties core.unit_properties() may set.
SIGNATURES = {
    "Description": "s", "ExecStart": "a(sasb)", "RemainAfterExit": "b",
    "Slice": "s", "Environment": "as", "KillSignal": "i", "TimeoutStopUSec": "t",
    "PrivateTmp": "b", "PrivateNetwork": "b", "NoNewPrivileges": "b",
    "ProtectSystem": "s", "ProtectHome": "s", "User": "s", "Group": "s",
    "RootDirectory": "s", "MountAPIVFS": "b", "NetworkNamespacePath": "s",
    "PrivateDevices": "b", "ProtectKernelTunables": "b", "ProtectKernelModules": "b",
    "ProtectKernelLogs": "b", "ProtectControlGroups": "b", "ProtectProc": "s",
    "RestrictSUIDSGID": "b", "LockPersonality": "b", "CapabilityBoundingSet": "t",
    "WorkingDirectory": "s", "MemoryMax": "t", "MemorySwapMax": "t",
    "CPUQuotaPerSecUSec": "t", "TasksMax": "t", "RuntimeMaxUSec": "t",
    "ExecStopPostEx": "a(sasas)",
    "LogRateLimitIntervalUSec": "t", "LogRateLimitBurst": "u",
    # the job sandbox of issue 10 (H6): systemd 252 and 257 take these as such
    "PrivateIPC": "b", "ProtectClock": "b", "ProtectHostname": "b", "RestrictRealtime": "b",
    "RestrictNamespaces": "t", "RestrictAddressFamilies": "(bas)",
    "SystemCallArchitectures": "as", "DynamicUser": "b", "TemporaryFileSystem": "a(ss)",
    "PrivatePIDs": "s",  # systemd 257 (service_has): a string, "yes" or "no", on the bus
}

# What status() reads, per interface. Only these, with one Get each: a GetAll
# of a service unmarshals ~250 properties, which was most of the daemon's CPU
# under load (make bench, py-spy).
# They are sent in this order on one connection and systemd answers them in
# order, but not atomically (it may handle the unit's SIGCHLD, or run its
# start, between two of them): the state comes first, so that what is read
# after it is at least as new (core.UnitStatus.finished relies on that).
STATUS_PROPERTIES = (
    (UNIT, ("LoadState", "ActiveState", "SubState", "Job", "ActiveExitTimestamp")),
    (SERVICE, ("ExecMainStartTimestamp", "ExecMainCode", "ExecMainStatus", "Result",
               "ExecMainExitTimestamp", "ExecStopPost", "ControlGroup")),
)
# What a job unit's PropertiesChanged signals carry of that (systemd sends
# the Service interface's, then the Unit interface's, at once after every
# change: "clients may rely on this order to get atomic behavior", its
# dbus-unit.c). Seen on 252 and 257: LoadState, ExecStopPost (only
# invalidated) and ControlGroup are not among them.
SIGNALLED = frozenset(("ActiveState", "SubState", "Job", "ActiveExitTimestamp",
                       "ExecMainStartTimestamp", "ExecMainCode", "ExecMainStatus", "Result",
                       "ExecMainExitTimestamp"))
# Where cgroup v1 mounts the memory controller (OomWatch).
MEMORY_V1 = "/sys/fs/cgroup/memory"

# Errors that mean "no such unit (any more)".
GONE = ("org.freedesktop.systemd1.NoSuchUnit", "org.freedesktop.systemd1.LoadFailed",
        "org.freedesktop.DBus.Error.UnknownObject")


class Unavailable(Exception):
    """The system bus or systemd cannot be reached."""


class Refused(Exception):
    """systemd refused to start a unit (bad properties, a name in use, ...)."""


def unit_path(name):
    """systemd's object path of a unit (sd_bus_path_encode)."""
    return UNIT_PATH_PREFIX + "".join(
        c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in name)


_JOB_PATH_PREFIX = unit_path(core.UNIT_PREFIX)


class _Unmarshaller(Unmarshaller):
    """dbus-next's reader of messages, but a job unit's PropertiesChanged
    signal keeps only SIGNALLED: systemd's carry ~40 properties each, ~10
    signals a job, and dbus-next's pure-Python reading of all of them was
    two thirds of the daemon's own thread (make bench, cProfile). The
    others (answers, the bus's own signals) are read as dbus-next reads them."""

    def _unmarshall(self):
        self.offset = 0
        self.read(16, prefetch=True)
        buf = self.buf
        if buf[0] not in (ord("l"), ord("B")) or buf[3] != 1:
            raise InvalidMessageError("not a D-Bus message of protocol version 1")
        self.endian = buf[0]
        e = "<" if buf[0] == ord("l") else ">"
        body_len, serial, header_len = unpack_from(e + "III", buf, 4)
        body_at = 16 + header_len + (-header_len & 7)
        self.read(body_at + body_len, prefetch=True)  # the whole message (offset is 0)
        fields = _header_fields(buf, e, 16, 16 + header_len)
        if fields is None:  # a field of a type we do not read: as dbus-next does
            return super()._unmarshall()
        path, member, signature = fields.get(1), fields.get(3), fields.get(8, "")
        message_type = MessageType(buf[1])
        tree = SignatureTree._get(signature)
        if (message_type == MessageType.SIGNAL and member == "PropertiesChanged"
                and signature == "sa{sv}as" and path and path.startswith(_JOB_PATH_PREFIX)):
            body = _properties_changed(buf, e, body_at, SIGNALLED, self._value)
        else:
            self.offset = body_at
            body = [self.read_argument(t) for t in tree.types] if body_len else []
        self.offset = body_at + body_len
        self.message = Message(
            destination=fields.get(6), path=path, interface=fields.get(2), member=member,
            message_type=message_type, flags=MessageFlag(buf[2]), error_name=fields.get(4),
            reply_serial=fields.get(5), sender=fields.get(7), unix_fds=self.unix_fds,
            signature=tree, body=body, serial=serial)

    def _value(self, at, sig):
        """Variant(sig, the value at offset at), read as dbus-next reads it."""
        self.offset = at
        tree = SignatureTree._get(sig)
        return Variant(tree, self.read_argument(tree.types[0]))


class _Bus(MessageBus):
    def _create_unmarshaller(self):
        return _Unmarshaller(self._stream, self._sock if self._negotiate_unix_fd else None)


# D-Bus basic types: (struct format, size = alignment)
_FIXED = {"y": ("B", 1), "b": ("I", 4), "n": ("h", 2), "q": ("H", 2), "i": ("i", 4),
          "u": ("I", 4), "h": ("I", 4), "x": ("q", 8), "t": ("Q", 8), "d": ("d", 8)}
_ALIGN = {**{t: n for t, (_, n) in _FIXED.items()}, "s": 4, "o": 4, "g": 1, "a": 4, "v": 1,
          "(": 8, "{": 8}


def _header_fields(buf, e, at, end):
    """{code: value} of a message's header fields (a(yv) from at to end),
    or None if one has a signature other than s, o, g or u."""
    fields = {}
    while at < end:
        at += -at & 7
        code, sig_len = buf[at], buf[at + 1]
        sig = bytes(buf[at + 2:at + 2 + sig_len])
        at += 3 + sig_len
        if sig in (b"s", b"o"):
            fields[code], at = _read_string(buf, e, at)
        elif sig == b"g":
            n = buf[at]
            fields[code] = buf[at + 1:at + 1 + n].decode()
            at += 2 + n
        elif sig == b"u":
            at += -at & 3
            (fields[code],) = unpack_from(e + "I", buf, at)
            at += 4
        else:
            return None
    return fields


def _skip(buf, e, at, sig, i):
    """The offset past a value of the complete type at sig[i:] that starts
    at (or after its padding from) at; and the index past that type in sig."""
    t = sig[i]
    at += -at & (_ALIGN[t] - 1)
    if t in _FIXED:
        return at + _FIXED[t][1], i + 1
    if t in "so":
        return at + 5 + unpack_from(e + "I", buf, at)[0], i + 1
    if t == "g":
        return at + 2 + buf[at], i + 1
    if t == "v":
        n = buf[at]
        inner = bytes(buf[at + 1:at + 1 + n]).decode()
        return _skip(buf, e, at + 2 + n, inner, 0)[0], i + 1
    if t == "a":
        (n,) = unpack_from(e + "I", buf, at)
        at += 4
        at += -at & (_ALIGN[sig[i + 1]] - 1)  # (the padding to the first element is not in n)
        return at + n, _end_of_type(sig, i + 1)
    # a struct or dict entry: its fields in turn
    close = ")" if t == "(" else "}"
    i += 1
    while sig[i] != close:
        at, i = _skip(buf, e, at, sig, i)
    return at, i + 1


def _end_of_type(sig, i):
    """The index past the complete type at sig[i:]."""
    while sig[i] == "a":
        i += 1
    if sig[i] not in "({":
        return i + 1
    depth = 0
    while True:
        depth += (sig[i] in "({") - (sig[i] in ")}")
        i += 1
        if depth == 0:
            return i


def _read_string(buf, e, at):
    at += -at & 3
    (n,) = unpack_from(e + "I", buf, at)
    return buf[at + 4:at + 4 + n].decode(), at + 5 + n


def _properties_changed(buf, e, at, wanted, value):
    """The body (interface, {name: Variant}, invalidated) of a
    PropertiesChanged signal starting at at, with only the wanted
    properties in its dict, each read by value(offset, signature)."""
    interface, at = _read_string(buf, e, at)
    at += -at & 3
    (n,) = unpack_from(e + "I", buf, at)
    at += 4
    at += -at & 7
    end = at + n
    changed = {}
    while at < end:
        at += -at & 7
        name, at = _read_string(buf, e, at)
        sig_len = buf[at]
        sig = bytes(buf[at + 1:at + 1 + sig_len]).decode()
        value_at = at + 2 + sig_len
        at = _skip(buf, e, value_at, sig, 0)[0]
        if name in wanted:
            changed[name] = value(value_at, sig)
    at += -at & 3
    (n,) = unpack_from(e + "I", buf, at)
    at += 4
    invalidated, end = [], at + n
    while at < end:
        name, at = _read_string(buf, e, at)
        invalidated.append(name)
    return [interface, changed, invalidated]


def _variant(value):
    """dbus-next wants a struct as a list, not a tuple."""
    if isinstance(value, (list, tuple)):
        return [_variant(v) for v in value]
    return value


class Units:
    def __init__(self, on_change=None):
        self.on_change = on_change  # called with a job uuid when its unit changes
        self._bus = None
        self._watched = set()  # uuids whose unit has a match rule on this connection
        # uuid: {name: value} of SIGNALLED as the unit's last signals (or
        # status read) said, while it is watched; "Unit": a Unit signal came.
        self._seen = {}
        # uuids of memory-limited jobs whose cgroup start() found not made
        # yet: the status read when the unit runs adds their OomWatch.
        self._oom_later = set()
        self._in_flight = 0  # messages sent and not answered yet
        self._room = asyncio.Condition()
        self.oom = OomWatch()

    async def connect(self):
        try:
            bus = await asyncio.wait_for(_Bus(bus_type=BusType.SYSTEM).connect(),
                                         CALL_TIMEOUT)
        except asyncio.TimeoutError:
            raise Unavailable(f"the system bus did not answer within {CALL_TIMEOUT:.0f} s")
        except (OSError, EOFError) as e:
            raise Unavailable(f"cannot reach the system bus: {e}")
        bus.add_message_handler(self._on_message)
        self._bus = bus
        self._watched = set()  # match rules live as long as their connection
        self._seen = {}  # and what they brought: read afresh (the sweep)
        # Without Subscribe systemd sends no PropertiesChanged for units.
        await self._manager("Subscribe", "", [])

    def close(self):
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    @property
    def connected(self):
        return self._bus is not None and self._bus.connected

    def _on_message(self, msg):
        if (msg.message_type == MessageType.SIGNAL and msg.member == "PropertiesChanged"
                and msg.path and msg.path.startswith(_JOB_PATH_PREFIX)):
            job_uuid = _uuid_of_path(msg.path)
            seen = self._seen.get(job_uuid)
            if seen is None:
                return None  # not watched (any more): a signal sent before its rule went
            interface, changed = msg.body[0], msg.body[1]
            seen.update((name, v.value) for name, v in changed.items() if name in SIGNALLED)
            if interface == UNIT:
                seen["Unit"] = True
                if self.on_change and (_may_have_ended(msg.body, seen) or self._runs_unwatched(job_uuid)):
                    self.on_change(job_uuid)
        return None  # never consume: dbus-next routes the message on

    def _runs_unwatched(self, job_uuid):
        """Whether the job's unit now runs with its OomWatch still to add (a
        status read adds it): once."""
        if job_uuid in self._oom_later and self._seen[job_uuid].get("ActiveState") == "active":
            self._oom_later.discard(job_uuid)
            return True
        return False

    def signalled(self, job_uuid):
        """core.UnitStatus as the unit's signals said, or None if they did
        not say it all (no Service and Unit signal since it was watched)."""
        v = self._seen.get(job_uuid)
        if v is None or "Unit" not in v or not SIGNALLED <= v.keys():
            return None
        return _status(v, 0, self.oom.kills(job_uuid), stop_post=None)

    async def _call(self, destination, path, interface, member, signature, body):
        (answer,) = await self._calls([Message(
            destination=destination, path=path, interface=interface,
            member=member, signature=signature, body=body)])
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def _calls(self, messages):
        """Send messages in this order, all before the first answer; each
        answer's body or its DBusError, in order. Every wait is bounded by
        CALL_TIMEOUT: then the bus is closed and Unavailable raised."""
        if not self.connected:
            raise Unavailable("not connected to the system bus")
        n = len(messages)
        async with self._room:
            await self._room.wait_for(lambda: self._in_flight + n <= MAX_IN_FLIGHT)
            self._in_flight += n
        bus = self._bus
        try:
            if bus is not self._bus or not bus.connected:
                raise Unavailable("lost the system bus")
            # Tasks run in the order made, and each sends at once: in order.
            calls = [asyncio.ensure_future(bus.call(m)) for m in messages]
            try:
                done, _ = await asyncio.wait(calls, timeout=CALL_TIMEOUT)
            except BaseException:
                for c in calls:
                    c.cancel()
                raise
            if len(done) < n:
                for c in calls:
                    c.cancel()
                self._lose(bus)
                raise Unavailable(f"systemd did not answer within {CALL_TIMEOUT:.0f} s; "
                                  "reconnecting to the system bus")
            answers = []
            for c in calls:
                try:
                    reply = c.result()
                except (OSError, EOFError) as e:
                    self._lose(bus)
                    raise Unavailable(f"lost the system bus: {e}")
                if reply is None:  # dbus-next answers None when the bus went away
                    self._lose(bus)
                    raise Unavailable("lost the system bus")
                if reply.message_type == MessageType.ERROR:
                    answers.append(DBusError(reply.error_name,
                                             reply.body[0] if reply.body else "", reply))
                else:
                    answers.append(reply.body)
            return answers
        finally:
            async with self._room:
                self._in_flight -= n
                self._room.notify_all()

    def _lose(self, bus):
        """Close bus if it is still ours (Node.run then reconnects)."""
        if bus is self._bus:
            self.close()

    def _match_rule(self, job_uuid):
        # One rule per job unit: its Unit and its Service interface's changes
        # (a rule for all units would also bring every other unit's, as each
        # job changes the dependency lists of ~8 others; unmarshalling those
        # was most of the daemon's CPU: make bench).
        # (dbus-daemon allows 512 rules per connection: far above `slots`.)
        return Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                       interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                       body=[f"type='signal',sender='{SYSTEMD}',interface='{PROPERTIES}',"
                             f"member='PropertiesChanged',"
                             f"path='{unit_path(core.unit_name(job_uuid))}'"])

    async def watch(self, job_uuid):
        """Have systemd's changes of this job's unit reported to on_change."""
        messages = self._watching(job_uuid)
        if messages:
            try:
                (answer,) = await self._calls(messages)
                if isinstance(answer, BaseException):
                    raise answer
            except BaseException:
                self._forget(job_uuid)
                raise

    def _watching(self, job_uuid):
        """[the message that adds its rule] if it is not watched yet, else []."""
        if job_uuid in self._watched:
            return []
        self._watched.add(job_uuid)
        self._seen.setdefault(job_uuid, {})
        return [self._match_rule(job_uuid)]

    async def unwatch(self, job_uuid):
        messages = self._unwatching(job_uuid)
        if messages:
            await self._calls(messages)

    def _unwatching(self, job_uuid):
        """[the message that removes its rule] if it is watched, else []."""
        self.oom.forget(job_uuid)
        self._oom_later.discard(job_uuid)
        if job_uuid not in self._watched:
            return []
        self._forget(job_uuid)
        remove = self._match_rule(job_uuid)
        remove.member = "RemoveMatch"
        return [remove]

    def _forget(self, job_uuid):
        self._watched.discard(job_uuid)
        self._seen.pop(job_uuid, None)

    async def _manager(self, member, signature, body):
        return await self._call(SYSTEMD, MANAGER_PATH, MANAGER, member, signature, body)

    async def service_has(self, property_name):
        """Whether this systemd's services have property_name (PrivatePIDs
        came with 257): asked of systemd itself, from the introspection of
        a service's object, never guessed from its version."""
        try:
            (xml,) = await self._call(SYSTEMD, unit_path(SELF_UNIT), INTROSPECTABLE,
                                      "Introspect", "", [])
        except DBusError as e:
            raise Unavailable(f"systemd did not say what {SELF_UNIT} has: {e.text}") from None
        service = xml.partition(f'<interface name="{SERVICE}">')[2].partition("</interface>")[0]
        return f'<property name="{property_name}"' in service

    # -- what the node uses ---------------------------------------------------

    async def start(self, job, properties):
        """Start the job's transient service with properties (name, value)
        from core.unit_properties; Refused if systemd says no."""
        props = [[name, Variant(SIGNATURES[name], _variant(value))] for name, value in properties]
        # Its rule first: its first changes must not be missed (dbus-daemon
        # takes the rule before it passes the start on: one round trip).
        messages = self._watching(job.uuid)
        messages.append(Message(destination=SYSTEMD, path=MANAGER_PATH, interface=MANAGER,
                                member="StartTransientUnit", signature="ssa(sv)a(sa(sv))",
                                body=[job.unit, "fail", props, []]))
        try:
            *watched, started = await self._calls(messages)
        except BaseException:
            self._forget(job.uuid)
            raise
        if watched and isinstance(watched[0], BaseException):
            # (Never seen: the sweep's reads then tell how it ends.)
            log.warning("job %s: no signals of its unit: %s", job.uuid, watched[0])
            self._forget(job.uuid)
        if isinstance(started, DBusError):
            await self.unwatch(job.uuid)
            raise Refused(started.text) from None
        if job.memory is not None:
            # Its cgroup exists once systemd ran the start (else a status read adds it when the unit runs).
            try:
                (cg,) = await self._call(SYSTEMD, unit_path(job.unit), PROPERTIES, "Get", "ss",
                                         [SERVICE, "ControlGroup"])
            except DBusError:
                return  # gone already: its status says how it ended
            if cg.value:
                self.oom.add(job.uuid, cg.value)
            else:
                self._oom_later.add(job.uuid)

    async def status(self, job_uuid):
        """core.UnitStatus of the job's unit, or None if it is not loaded.
        A unit whose signals said it exited (active, exited, with an exit
        code) is not read again: nothing but our stop changes it then."""
        signalled = self.signalled(job_uuid)
        if signalled is not None and signalled.active_state == "active" and signalled.finished:
            return signalled
        path = unit_path(core.unit_name(job_uuid))
        wanted = [(iface, name) for iface, names in STATUS_PROPERTIES for name in names]
        # All at once, in order: one round trip's wait, not twelve. Any error
        # of a unit that is not loaded means only that.
        answers = await self._calls([Message(
            destination=SYSTEMD, path=path, interface=PROPERTIES, member="Get",
            signature="ss", body=[iface, name]) for iface, name in wanted])
        load_state = answers[0]
        if (isinstance(load_state, DBusError) and load_state.type in GONE
                or not isinstance(load_state, BaseException) and load_state[0].value != "loaded"):
            return None
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        p = {name: answer[0] for (_, name), answer in zip(wanted, answers)}
        v = {name: variant.value for name, variant in p.items()}
        active = v["ActiveState"]
        if active == "active" and v["SubState"] == "running" and v["ControlGroup"]:
            self.oom.add(job_uuid, v["ControlGroup"])  # (once per job)
        try:
            # Once it is no longer active, are processes left that systemd could not kill?
            processes = 0 if active == "active" else len((await self._manager(
                "GetUnitProcesses", "s", [core.unit_name(job_uuid)]))[0])
        except DBusError as e:
            if e.type in GONE:
                return None
            raise
        if job_uuid in self._seen:  # as new as a signal (the next one overwrites it)
            self._seen[job_uuid].update((name, v[name]) for name in SIGNALLED)
            self._seen[job_uuid]["Unit"] = True
        return _status(v, processes, self.oom.kills(job_uuid), p["ExecStopPost"])

    async def list(self):
        """{uuid: UnitStatus} of every lcluster-job unit loaded here. A unit
        the list says is running, as its signals said, is not read again."""
        (units,) = await self._manager("ListUnitsByPatterns", "asas",
                                       [[], [core.unit_name("*")]])
        found = {}
        for name, _, _, active, sub, _, _, job_id, *_ in units:
            job_uuid = core.uuid_of_unit(name)
            if not job_uuid:
                continue
            await self.watch(job_uuid)  # e.g. found after a restart
            signalled = self.signalled(job_uuid)
            if (active, sub) == ("active", "running") and signalled is not None and (
                    signalled.active_state, signalled.sub_state) == (active, sub):
                found[job_uuid] = dataclasses.replace(signalled, pending=job_id != 0)
                continue
            status = await self.status(job_uuid)
            if status is not None:
                found[job_uuid] = status
            else:
                await self.unwatch(job_uuid)
        return found

    async def stop(self, job_uuid):
        """Ask systemd to stop the unit (SIGTERM, SIGKILL after its timeout)."""
        try:
            await self._manager("StopUnit", "ss", [core.unit_name(job_uuid), "replace"])
        except DBusError as e:
            if e.type not in GONE:
                raise

    async def kill(self, job_uuid):
        """SIGKILL every process of the unit now (fencing: no grace period)."""
        try:
            await self._manager("KillUnit", "ssi", [core.unit_name(job_uuid), "all", 9])
        except DBusError:
            pass  # gone, or nothing left running in it: the stop that follows settles it

    async def release(self, job_uuid, status=None):
        """Unload a finished unit whose outcome is recorded: a stopped unit is
        garbage-collected, a failed one needs its failure reset first.
        status: the unit's status if the caller just read it. Its rule goes
        first, in the same round trip: the stop's changes are not wanted."""
        status = status or await self.status(job_uuid)
        messages = self._unwatching(job_uuid)
        if status is not None:
            member, signature, body = (("ResetFailedUnit", "s", [core.unit_name(job_uuid)])
                                       if status.active_state == "failed" else
                                       ("StopUnit", "ss", [core.unit_name(job_uuid), "replace"]))
            messages.append(Message(destination=SYSTEMD, path=MANAGER_PATH, interface=MANAGER,
                                    member=member, signature=signature, body=body))
        answers = await self._calls(messages) if messages else []
        if status is not None:
            error = answers[-1]
            if isinstance(error, DBusError) and error.type not in GONE:
                raise error

    async def stop_and_wait(self, job_uuid, timeout):
        """Stop the unit and wait until it is gone (or timeout seconds pass)."""
        await self.stop(job_uuid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            status = await self.status(job_uuid)
            if status is None:
                await self.unwatch(job_uuid)
                return True
            if status.active_state in ("inactive", "failed"):
                await self.release(job_uuid)
            await asyncio.sleep(0.1)
        return False


class OomWatch:
    """OOM kills in job units' memory cgroups on cgroup v1, as they happen.

    systemd 252 sees none there, and core.OOM_CHECK runs only when a unit
    stops: a job whose main process exited 0 after the OOM killer took a
    child stays "active (exited)", and systemd has by then removed its empty
    cgroup with the kernel's count. So while the job runs, the kernel
    signals an eventfd per OOM (memory.oom_control through
    cgroup.event_control, cgroup-v1/memory.rst) and the count is read then;
    the eventfd is also signalled once when the cgroup is removed.
    (cgroup v2 needs none of this: systemd's OOMPolicy= acts there.)"""

    def __init__(self, root=MEMORY_V1):
        self.root = root
        self._fds = {}  # uuid: (eventfd, memory.oom_control fd, cgroup dir), or None: nothing to watch
        self._kills = {}  # uuid: OOM kills seen: the kernel's count, or the OOM events if more
        self._events = {}  # uuid: OOM events signalled so far

    def add(self, job_uuid, control_group):
        if job_uuid in self._fds:
            return
        self._fds[job_uuid] = None
        path = self.root + control_group
        try:
            ofd = os.open(path + "/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no v1 memory cgroup of its own (cgroup v2, or no memory limit)
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                with open(path + "/cgroup.event_control", "w") as f:
                    f.write(f"{efd} {ofd}")
            except OSError:
                os.close(efd)
                raise
        except OSError as e:
            os.close(ofd)
            log.warning("cannot watch %s for OOM kills: %s", path, e)
            return
        self._fds[job_uuid] = (efd, ofd, path)
        asyncio.get_running_loop().add_reader(efd, self._signalled, job_uuid)
        self._count(job_uuid)  # kills before we looked

    def kills(self, job_uuid):
        if self._fds.get(job_uuid):
            self._count(job_uuid)
        return self._kills.get(job_uuid, 0)

    def forget(self, job_uuid):
        self._close(job_uuid)
        self._fds.pop(job_uuid, None)
        self._kills.pop(job_uuid, None)
        self._events.pop(job_uuid, None)

    def _signalled(self, job_uuid):
        if not self._fds.get(job_uuid):
            return
        efd, _, path = self._fds[job_uuid]
        try:
            events = os.eventfd_read(efd)
        except BlockingIOError:
            return
        gone = not self._count(job_uuid)
        # One event per OOM (each one a kill), and one when the cgroup is
        # removed; the count may not be read any more by then.
        self._events[job_uuid] = self._events.get(job_uuid, 0) + events - gone
        self._kills[job_uuid] = max(self._kills.get(job_uuid, 0), self._events[job_uuid])
        if gone:
            self._close(job_uuid)

    def _count(self, job_uuid):
        """Read the kernel's count into _kills; False if the cgroup is gone."""
        _, ofd, _ = self._fds[job_uuid]
        try:
            text = os.pread(ofd, 4096, 0).decode()
        except OSError:
            return False
        self._kills[job_uuid] = max(self._kills.get(job_uuid, 0), parse_oom_kills(text))
        return True

    def _close(self, job_uuid):
        fds = self._fds.get(job_uuid)
        if fds:
            efd, ofd, _ = fds
            try:
                asyncio.get_running_loop().remove_reader(efd)
            except RuntimeError:
                pass  # no loop running any more
            os.close(efd)
            os.close(ofd)
            self._fds[job_uuid] = None


def parse_oom_kills(text):
    """The "oom_kill N" line of a memory.oom_control (or memory.events)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def _may_have_ended(body, seen):
    """Whether a unit's PropertiesChanged (interface, changed, invalidated) may
    tell that it ended: only an ActiveState of its Unit interface does. The
    others (it loaded, it started) would each cost the node a status read for
    nothing; the sweep catches anything missed. seen: what its signals said
    so far, this one's included."""
    interface, changed = body[0], body[1]
    if interface != UNIT or "ActiveState" not in changed:
        return interface == UNIT and "ActiveState" in body[2]  # invalidated: look
    state = changed["ActiveState"].value
    sub = changed["SubState"].value if "SubState" in changed else None
    if state == "inactive" and _job_pending(seen.get("Job")):
        # A job of systemd's is on its way (every unit's first signal: loaded,
        # its start queued), which cost a status read of 12 Gets a job; the
        # signal of that job's end (Job back to 0) says what it came to.
        return False
    return state in ("inactive", "failed", "deactivating") or (state == "active" and sub != "running")


def _uuid_of_path(path):
    # unit_path() escapes '-' as _2d; the uuid's hex digits come through as is.
    tail = path[len(_JOB_PATH_PREFIX):]
    if not tail.endswith("_2eservice"):
        return None
    candidate = tail[:-len("_2eservice")].replace("_2d", "-")
    return candidate if core.uuid_of_unit(core.unit_name(candidate)) else None


def _oom_seen(exec_stop_post):
    """The OOM kills core.OOM_CHECK, the job's ExecStopPost, found (its exit
    status less OOM_SEEN), else 0. Each entry is (path, argv, ignore, start,
    start_mono, exit, exit_mono, pid, code, status)."""
    entries = exec_stop_post.value if exec_stop_post is not None else []
    return max([e[9] - core.OOM_SEEN for e in entries
                if e[8] == core.CLD_EXITED and core.OOM_SEEN < e[9] <= core.OOM_SEEN + core.OOM_KILLS_MAX]
               or [0])


def _status(v, processes, oom_kills, stop_post):
    """core.UnitStatus of a unit's property values v (SIGNALLED at least)."""
    return core.UnitStatus(
        active_state=v["ActiveState"], sub_state=v["SubState"],
        result=v["Result"], exit_code=v["ExecMainCode"], exit_status=v["ExecMainStatus"],
        started_at=_seconds(v["ExecMainStartTimestamp"]),
        ended_at=_seconds(v["ExecMainExitTimestamp"]),
        stopped_at=_seconds(v["ActiveExitTimestamp"]), processes=processes,
        pending=_job_pending(v["Job"]), oom_kills=max(_oom_seen(stop_post), oom_kills))


def _job_pending(job):
    """The unit's Job property (id, path): id 0 means no job queued."""
    return bool(job and job[0])


def _seconds(usec):
    return usec / 1_000_000 if usec else None
