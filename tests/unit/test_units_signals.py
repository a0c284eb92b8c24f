"""units.py reads a job unit's end from its PropertiesChanged signals (the
Service interface's, then the Unit interface's, as systemd sends them after
every change), not from a dozen property reads; and reads it for real when
the signals did not say it all. A fake bus records what would be sent."""

import asyncio

from dbus_next import Message, MessageType, Variant

from lclusterd import core, units

UUID = "0b9a4d1e-3c2f-4a5b-8c7d-6e5f4a3b2c1d"
PATH = units.unit_path(core.unit_name(UUID))


class Reply:
    message_type = MessageType.METHOD_RETURN

    def __init__(self, body):
        self.body = body


class FakeBus:
    """Records every call; answers a Get as if the unit were not loaded
    (status() then says None), ListUnitsByPatterns with `listed`, the rest
    with an empty body."""

    def __init__(self, listed=()):
        self.connected, self.sent, self.listed = True, [], list(listed)

    async def call(self, msg):
        self.sent.append(msg.member)
        if msg.member == "Get":
            return Reply([Variant("s", "not-found")])
        if msg.member == "ListUnitsByPatterns":
            return Reply([self.listed])
        return Reply([])

    def disconnect(self):
        self.connected = False


def signal(interface, changed, path=PATH):
    return Message.new_signal(path, units.PROPERTIES, "PropertiesChanged", "sa{sv}as",
                              [interface, changed, []])


def service(code=0, status=0, result="success"):
    return signal(units.SERVICE, {
        "MainPID": Variant("u", 0), "Result": Variant("s", result),
        "ExecMainStartTimestamp": Variant("t", 1_000_000), "ExecMainExitTimestamp":
        Variant("t", 2_000_000 if code else 0), "ExecMainCode": Variant("i", code),
        "ExecMainStatus": Variant("i", status)})


def unit(active, sub, job=0):
    return signal(units.UNIT, {
        "ActiveState": Variant("s", active), "SubState": Variant("s", sub),
        "Job": Variant("(uo)", [job, "/org/freedesktop/systemd1/job/%d" % job if job else "/"]),
        "ActiveExitTimestamp": Variant("t", 0), "FreezerState": Variant("s", "running")})


def watched(bus=None):
    changed = []
    u = units.Units(on_change=changed.append)
    u._bus = bus or FakeBus()
    asyncio.run(u.watch(UUID))
    u._bus.sent.clear()
    return u, changed


def test_an_exit_is_read_from_the_signals_without_a_call():
    u, changed = watched()
    u._on_message(service())
    u._on_message(unit("active", "running"))
    assert changed == []  # it started: nothing to look at
    u._on_message(service(code=core.CLD_EXITED, status=0))
    u._on_message(unit("active", "exited"))
    assert changed == [UUID]
    status = asyncio.run(u.status(UUID))
    assert u._bus.sent == []  # before: 12 Gets for this
    assert status.finished and status.exit_code == core.CLD_EXITED and status.exit_status == 0
    assert status.started_at == 1.0 and status.ended_at == 2.0 and not status.pending


def test_an_exit_not_yet_signalled_is_read():
    u, _ = watched()
    u._on_message(service(code=0))
    u._on_message(unit("active", "exited"))  # (a Unit read before its exit code: not an end)
    assert not u.signalled(UUID).finished
    asyncio.run(u.status(UUID))
    assert u._bus.sent[0] == "Get"


def test_a_unit_signal_alone_says_too_little():
    u, _ = watched()
    u._on_message(unit("active", "exited"))
    assert u.signalled(UUID) is None
    asyncio.run(u.status(UUID))
    assert "Get" in u._bus.sent


def test_a_failure_is_read_for_its_processes_and_oom_check():
    u, _ = watched()
    u._on_message(service(code=core.CLD_EXITED, status=3, result="exit-code"))
    u._on_message(unit("failed", "failed"))
    assert u.signalled(UUID).finished  # but processes may be left: read it all
    asyncio.run(u.status(UUID))
    assert "Get" in u._bus.sent


def test_signals_of_units_not_watched_are_ignored():
    u = units.Units(on_change=lambda _: None)
    u._bus = FakeBus()
    u._on_message(service(code=core.CLD_EXITED))
    u._on_message(unit("active", "exited"))
    assert u.signalled(UUID) is None and u._seen == {}


def test_release_drops_the_rule_before_the_stop_in_one_round_trip():
    u, changed = watched()
    u._on_message(service(code=core.CLD_EXITED))
    u._on_message(unit("active", "exited"))
    status = asyncio.run(u.status(UUID))
    asyncio.run(u.release(UUID, status))
    assert u._bus.sent == ["RemoveMatch", "StopUnit"]
    # The stop's own changes (sent before the rule went) are not looked at.
    changed.clear()
    u._on_message(service(code=core.CLD_EXITED))
    u._on_message(unit("inactive", "dead"))
    assert changed == [] and u.signalled(UUID) is None


def test_the_sweep_reads_only_units_not_running_as_signalled():
    row = [core.unit_name(UUID), "", "loaded", "active", "running", "", PATH, 0, "", "/"]
    u, _ = watched(FakeBus(listed=[row]))
    u._on_message(service())
    u._on_message(unit("active", "running"))
    found = asyncio.run(u.list())
    assert u._bus.sent == ["ListUnitsByPatterns"]
    assert found[UUID].active_state == "active" and found[UUID].sub_state == "running"
    # The list says it exited, the signals missed it: read for real.
    u._bus.listed = [row[:3] + ["active", "exited"] + row[5:]]
    u._bus.sent.clear()
    assert asyncio.run(u.list()) == {}  # (the fake's Get says not loaded)
    assert u._bus.sent[:2] == ["ListUnitsByPatterns", "Get"]


def test_start_sends_its_rule_and_the_start_in_one_round_trip():
    bus = FakeBus()
    u = units.Units()
    u._bus = bus
    job = core.Job(uuid=UUID, command="true", uid=0, gid=0, user="root", submitted_at=1.0)
    asyncio.run(u.start(job, [("Description", "x")]))
    assert bus.sent == ["AddMatch", "StartTransientUnit"]
    assert UUID in u._watched


def test_a_unit_not_watched_is_unwatched_without_a_call():
    """(Before: asyncio.wait of no calls raised ValueError, and removejob of
    a running job answered 500: stop_and_wait unwatches the unit it saw go.)"""
    bus = FakeBus()
    u = units.Units()
    u._bus = bus
    assert asyncio.run(u.stop_and_wait(UUID, 1.0)) is True  # (the fake's Get: not loaded)
    asyncio.run(u.unwatch(UUID))
    assert "RemoveMatch" not in bus.sent


def test_a_unit_loaded_with_its_start_queued_has_not_ended():
    """Every job's first Unit signal: loaded, inactive, its start job queued
    (systemd may have forked it already: ExecMainStartTimestamp is set in the
    Service signal before it). Before, each cost a status read (12 Gets).
    The end of systemd's job (Job back to 0) is looked at."""
    u, changed = watched()
    u._on_message(service())
    u._on_message(unit("inactive", "dead", job=7))
    assert changed == []
    u._on_message(unit("active", "running", job=7))
    u._on_message(unit("active", "running"))
    assert changed == []
    u._on_message(unit("inactive", "dead", job=8))  # a stop queued from outside
    assert changed == []
    u._on_message(unit("inactive", "dead", job=0))  # ... and done
    assert changed == [UUID]
    # A start job that went without starting it (cancelled) too.
    v, changed = watched()
    v._on_message(unit("inactive", "dead", job=7))
    v._on_message(unit("inactive", "dead", job=0))
    assert changed == [UUID]


def test_a_memory_job_whose_cgroup_start_did_not_find_is_read_once_it_runs():
    """On Debian 13 StartTransientUnit may answer before systemd made the
    unit's cgroup: its OomWatch (cgroup v1) is added by a status read once the
    unit runs. (The first signal's status read used to do it by chance; with
    it gone, a child's OOM kill went unseen: test_command on trixie.)"""
    class NoCgroupYet(FakeBus):
        async def call(self, msg):
            if msg.member == "Get":
                self.sent.append(msg.member)
                return Reply([Variant("s", "")])
            return await super().call(msg)
    changed = []
    u = units.Units(on_change=changed.append)
    u._bus = NoCgroupYet()
    job = core.Job(uuid=UUID, command="true", uid=0, gid=0, user="root", submitted_at=1.0,
                   memory=64 << 20)
    asyncio.run(u.start(job, [("Description", "x")]))
    u._on_message(service())
    u._on_message(unit("inactive", "dead", job=7))
    assert changed == []
    u._on_message(unit("active", "running"))
    assert changed == [UUID]
    u._on_message(unit("active", "running"))
    assert changed == [UUID]  # once
