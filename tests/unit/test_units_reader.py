"""units._Unmarshaller reads a job unit's PropertiesChanged signal keeping
only the properties units.py uses (systemd's carry ~40, and reading all of
them in pure Python was most of the daemon's CPU), and every other message
as dbus-next itself reads it. Messages are marshalled by dbus-next."""

import io

from dbus_next import Message, MessageType, Variant
from dbus_next._private.unmarshaller import Unmarshaller

from lclusterd import core, units

UUID = "0b9a4d1e-3c2f-4a5b-8c7d-6e5f4a3b2c1d"
PATH = units.unit_path(core.unit_name(UUID))

# What systemd's Unit and Service signals carry, by type: every kind of value to skip.
SERVICE_PROPS = {
    "Type": Variant("s", "simple"), "Restart": Variant("s", "no"),
    "MainPID": Variant("u", 4242), "ExecMainStartTimestamp": Variant("t", 1_700_000_000_123_456),
    "ExecMainExitTimestamp": Variant("t", 0), "ExecMainCode": Variant("i", 1),
    "ExecMainStatus": Variant("i", -3), "Result": Variant("s", "success"),
    "NRestarts": Variant("u", 0), "StatusErrno": Variant("i", 0),
    "ExecStart": Variant("a(sasbttttuii)", [["/bin/true", ["true", "x y"], False, 1, 2, 3, 4, 99, 1, 0]]),
    "ExecStopPostEx": Variant("a(sasasttttuii)", []),
    "Environment": Variant("as", ["A=1", "B=ü"]), "InvocationID": Variant("ay", b"\x01\x02\x03"),
    "Nested": Variant("v", Variant("(sd)", ["pi", 3.14])), "Flag": Variant("b", True),
    "Small": Variant("y", 7), "Short": Variant("n", -2), "UShort": Variant("q", 2),
    "Big": Variant("x", -1 << 40), "Map": Variant("a{sv}", {"k": Variant("s", "v"), "n": Variant("u", 1)}),
    "Sig": Variant("g", "a{sv}"), "Obj": Variant("o", "/org/x"), "FD": Variant("h", 0),
}
UNIT_PROPS = {
    "ActiveState": Variant("s", "active"), "SubState": Variant("s", "exited"),
    "Job": Variant("(uo)", [0, "/"]), "ActiveExitTimestamp": Variant("t", 0),
    "Conditions": Variant("a(sbbsi)", [["ConditionPathExists", False, False, "/x", 1]]),
    "InactiveExitTimestamp": Variant("t", 5), "Following": Variant("s", ""),
    "Names": Variant("as", [core.unit_name(UUID)]),
}


def wire(msg):
    return msg._marshall()


def read(reader_class, data):
    reader = reader_class(io.BytesIO(data))
    assert reader.unmarshall() is not None
    return reader.message


def signal(interface, props, path=PATH, invalidated=("ExecStopPost",)):
    return Message(message_type=MessageType.SIGNAL, path=path, sender=":1.1",
                   interface=units.PROPERTIES, member="PropertiesChanged",
                   signature="sa{sv}as", body=[interface, props, list(invalidated)], serial=9)


def test_a_job_units_signal_keeps_only_what_units_reads():
    for interface, props in ((units.SERVICE, SERVICE_PROPS), (units.UNIT, UNIT_PROPS)):
        msg = read(units._Unmarshaller, wire(signal(interface, props)))
        full = read(Unmarshaller, wire(signal(interface, props)))
        assert msg.body[0] == interface and msg.body[2] == ["ExecStopPost"]
        kept = {k: v.value for k, v in msg.body[1].items()}
        assert kept == {k: v.value for k, v in full.body[1].items() if k in units.SIGNALLED}
        assert kept and set(kept) < set(props)
        assert (msg.path, msg.member, msg.interface, msg.serial, msg.message_type) == (
            full.path, full.member, full.interface, full.serial, full.message_type)


def test_other_messages_read_as_dbus_next_reads_them():
    others = [
        signal(units.UNIT, UNIT_PROPS, path="/org/freedesktop/systemd1/unit/dbus_2eservice"),
        Message(message_type=MessageType.METHOD_RETURN, reply_serial=3, destination=":1.5",
                sender=":1.1", signature="a(ssssssouso)", serial=10,
                body=[[[core.unit_name(UUID), "d", "loaded", "active", "running", "", "/o", 0, "", "/"]]]),
        Message(message_type=MessageType.ERROR, reply_serial=4, error_name=units.GONE[0],
                signature="s", body=["no such unit"], serial=11),
        Message(message_type=MessageType.SIGNAL, path="/org/freedesktop/DBus", interface="org.freedesktop.DBus",
                member="NameAcquired", signature="s", body=[":1.5"], serial=12),
        Message(message_type=MessageType.METHOD_RETURN, reply_serial=5, serial=13),
    ]
    for m in others:
        mine, theirs = read(units._Unmarshaller, wire(m)), read(Unmarshaller, wire(m))
        for field in ("path", "interface", "member", "error_name", "reply_serial", "destination",
                      "sender", "signature", "serial", "message_type", "flags"):
            assert getattr(mine, field) == getattr(theirs, field), field
        assert repr(mine.body) == repr(theirs.body)


def test_messages_one_after_another_and_in_pieces():
    """The bus's reader is fed what the socket has: a message may come in
    parts (dbus-next then reads it again from its start once more came)."""
    data = wire(signal(units.UNIT, UNIT_PROPS)) + wire(signal(units.SERVICE, SERVICE_PROPS))

    class Trickle(io.BytesIO):
        def read(self, n=-1):
            return super().read(min(n, 7))

    stream = Trickle(data)
    got = []
    reader = units._Unmarshaller(stream)
    while len(got) < 2:
        if reader.unmarshall() is None:
            continue  # wait for more, as dbus-next's reader does
        got.append(reader.message)
        reader = units._Unmarshaller(stream)
    assert [m.body[0] for m in got] == [units.UNIT, units.SERVICE]
    assert got[0].body[1]["SubState"].value == "exited"
    assert got[1].body[1]["ExecMainStatus"].value == -3
