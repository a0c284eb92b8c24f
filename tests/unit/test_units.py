"""The pure parts of units.py, and its bounded calls against a fake bus (no
real D-Bus: the bus object is a stand-in that answers, or never does)."""

import asyncio
import dataclasses
import os

import pytest
from dbus_next import MessageType, Variant

from lclusterd import core, units

UUID = "0b9a4d1e-3c2f-4a5b-8c7d-6e5f4a3b2c1d"


# --- what a status read turns into -------------------------------------------

def status(active, sub, code=0, started_at=None, pending=False, result="success"):
    return core.UnitStatus(active, sub, result, code, 0, started_at=started_at, pending=pending)


@pytest.mark.parametrize("unit,finished", [
    # Under load systemd runs its start jobs last: a unit just started reads
    # "inactive" with its start pending and no ExecMain* values. Before the
    # fix this was "finished" and recorded failed "its unit did not run".
    (status("inactive", "dead", pending=True), False),
    # The state was read before the start ran, the rest after: torn, not an end.
    (status("inactive", "dead", started_at=100.0), False),
    (status("active", "exited", code=0), False),  # an exit that was not read yet
    (status("active", "exited", code=core.CLD_EXITED), True),
    (status("inactive", "dead", code=core.CLD_KILLED, started_at=100.0), True),
    (status("inactive", "dead"), True),  # never started, nothing pending: cancelled
    (status("failed", "failed", result="resources"), True),  # failed before its exec
])
def test_finished_only_with_a_real_end(unit, finished):
    assert unit.finished is finished


def test_a_pending_start_is_never_recorded_as_an_end():
    running = core.Job(uuid=UUID, command="true", uid=1000, gid=1000, user="alice",
                       submitted_at=1.0, state=core.RUNNING, node="n1")
    plan = core.reconcile({UUID: running}, {UUID: status("inactive", "dead", pending=True)},
                          node="n1", now=2.0, stop_timeout=10)
    assert plan == []


def test_job_pending():
    assert units._job_pending([0, "/"]) is False
    assert units._job_pending([42, "/org/freedesktop/systemd1/job/42"]) is True


# --- OOM kills ------------------------------------------------------------------

def stop_post(code, exit_status):
    return Variant("a(sasbttttuii)", [["/bin/sh", ["/bin/sh", "-c", "x"], True, 1, 1, 2, 2, 7,
                                       code, exit_status]])


@pytest.mark.parametrize("code,exit_status,kills", [
    (core.CLD_EXITED, 0, 0),
    (core.CLD_EXITED, core.OOM_SEEN + 1, 1),
    (core.CLD_EXITED, core.OOM_SEEN + 3, 3),
    (core.CLD_EXITED, 255, core.OOM_KILLS_MAX),
    (core.CLD_EXITED, 2, 0),  # a shell error, not a count
    (core.CLD_KILLED, core.OOM_SEEN + 1, 0),  # killed by a signal: no count
])
def test_oom_seen_reads_the_checks_count(code, exit_status, kills):
    assert units._oom_seen(stop_post(code, exit_status)) == kills


def test_oom_seen_without_a_check():
    assert units._oom_seen(None) == 0
    assert units._oom_seen(Variant("a(sasbttttuii)", [])) == 0


def test_a_child_oom_killed_while_the_job_exited_0_is_an_oom_kill():
    # addjob --memory 64M 'python3 -c "b=bytearray(512*2**20)" || true; sleep 1'
    survived = core.UnitStatus("active", "exited", "success", core.CLD_EXITED, 0, oom_kills=1)
    assert core.outcome(survived) == (core.FAILED, 0,
                                      "exited with status 0 (oom-kill: 1 OOM kill in its memory cgroup)")
    assert core.result_of(survived) == "oom-kill"
    many = dataclasses.replace(survived, exit_code=core.CLD_KILLED, exit_status=9, oom_kills=7)
    assert core.outcome(many)[2] == "killed by signal 9 (oom-kill: 7 OOM kills in its memory cgroup)"
    capped = dataclasses.replace(survived, oom_kills=core.OOM_KILLS_MAX)
    assert f"{core.OOM_KILLS_MAX} or more OOM kills" in core.outcome(capped)[2]
    clean = dataclasses.replace(survived, oom_kills=0)
    assert core.outcome(clean) == (core.SUCCEEDED, 0, "exited with status 0")


# --- what systemd would rewrite ----------------------------------------------------

@pytest.mark.parametrize("text,sent", [
    ('X=shell; echo "${X} $$"', 'X=shell; echo "$${X} $$$$"'),
    ("kill -9 $$", "kill -9 $$$$"),
    ("$X", "$$X"),
    ("echo %n %% \\n", "echo %n %% \\n"),  # no specifiers over D-Bus: untouched
    ("", ""),
])
def test_exec_arg_escapes_every_dollar(text, sent):
    assert core.exec_arg(text) == sent


def unescape(text):
    """What systemd's exec-time substitution makes of an argument with no
    variable references left: each $$ becomes $."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        else:
            assert text[i] != "$", f"a lone $ at {i} would be substituted: {text!r}"
            out.append(text[i])
            i += 1
    return "".join(out)


def test_the_command_reaches_sh_as_written():
    cmd = 'X=shell; echo "${X} $$ $1 ${X:-d}" %n %% \\\\ \'$HOME\''
    job = core.Job(uuid=UUID, command=cmd, uid=1000, gid=1000, user="alice", submitted_at=1.0)
    props = dict(core.unit_properties(job, 10))
    ((path, argv, _),) = props["ExecStart"]
    assert (path, argv[:2]) == ("/bin/sh", ["/bin/sh", "-c"])
    assert unescape(argv[2]) == cmd


def test_the_oom_check_reaches_sh_as_written():
    script = unescape(core.OOM_CHECK)
    assert "${l#*:memory:}" in script and "exit $((100 + v))" in script


# --- every call bounded -----------------------------------------------------------

class Reply:
    message_type = MessageType.METHOD_RETURN

    def __init__(self, body):
        self.body = body


class FakeBus:
    """Answers each call with its member's name after delay seconds (None: never)."""

    def __init__(self, delay=0.0):
        self.delay, self.connected, self.sent = delay, True, []

    async def call(self, msg):
        self.sent.append((msg.member, msg.body))
        if self.delay is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay)
        return Reply([msg.member])

    def disconnect(self):
        self.connected = False


def with_bus(bus):
    u = units.Units()
    u._bus = bus
    return u


def test_a_call_that_gets_no_answer_closes_the_bus(monkeypatch):
    monkeypatch.setattr(units, "CALL_TIMEOUT", 0.05)
    bus = FakeBus(delay=None)
    u = with_bus(bus)
    with pytest.raises(units.Unavailable, match="did not answer within"):
        asyncio.run(asyncio.wait_for(u.stop(UUID), 5))  # (before: waited for ever)
    assert not u.connected and not bus.connected  # Node.run reconnects
    with pytest.raises(units.Unavailable):
        asyncio.run(u.stop(UUID))


def test_calls_are_sent_in_order_and_bounded_in_flight(monkeypatch):
    monkeypatch.setattr(units, "MAX_IN_FLIGHT", 4)
    bus = FakeBus(delay=0.01)
    u = with_bus(bus)
    peak = 0

    async def main():
        nonlocal peak

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, u._in_flight)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        members = [f"M{i}" for i in range(4)]
        from dbus_next import Message
        results = await asyncio.gather(*(u._calls([Message(destination="org.example.D", path="/p", member=m)
                                                   for m in members]) for _ in range(5)))
        watcher.cancel()
        return results

    results = asyncio.run(main())
    assert all(r == [[m] for m in ("M0", "M1", "M2", "M3")] for r in results)
    assert [m for m, _ in bus.sent[:4]] == ["M0", "M1", "M2", "M3"]
    assert 0 < peak <= 4 and u._in_flight == 0


def test_a_bus_that_went_away_mid_call_is_unavailable():
    class Gone(FakeBus):
        async def call(self, msg):
            return None  # what dbus-next answers when its connection closed

    u = with_bus(Gone())
    with pytest.raises(units.Unavailable, match="lost the system bus"):
        asyncio.run(u.stop(UUID))
    assert not u.connected


# --- journal.py: a job's output put back together ---------------------------------

class FakeReader:
    """Entries as (MESSAGE, _LINE_BREAK or None), read like journal.Reader."""

    def __init__(self, entries):
        self.entries, self.i = entries, -1

    def _next(self):
        self.i += 1
        return self.i < len(self.entries)

    def _get(self, field):
        message, how = self.entries[self.i]
        value = {"MESSAGE": message, "_LINE_BREAK": how}[field]
        if value is None:
            raise KeyError(field)
        return value

    def _get_realtime(self):
        return 1_000_000 + self.i

    def _get_monotonic(self):
        return self.i


def output_of(entries):
    from lclusterd import journal
    log = journal.JobLog("lcluster-job@x.service")
    log._reader = FakeReader(entries)
    try:
        return log._read()
    finally:
        log._thread.shutdown(wait=False)


def test_pieces_split_at_line_max_are_rejoined():
    # 100 KiB in one line: journald's LineMax (48 KiB) cuts it in three.
    line = b"x" * 102400
    pieces = [(line[:49152], b"line-max"), (line[49152:98304], b"line-max"), (line[98304:], None)]
    assert output_of(pieces + [(b"next", None)]) == line + b"\n" + b"next\n"


def test_line_breaks_are_put_back():
    assert output_of([(b"c", b"nul"), (b"d", None)]) == b"c\0d\n"
    assert output_of([(b"a", None), (b"no newline", b"eof")]) == b"a\nno newline"
    # `tr ...; echo`: the line, then the shell's lone newline (an empty line journald drops)
    assert output_of([(b"xxxxx", b"pid-change"), (b"next", None)]) == b"xxxxx\nnext\n"
    assert output_of([(b"odd", b"some-new-kind")]) == b"odd\n"


# --- cgroup v1 OOM notifications ------------------------------------------------------

def test_parse_oom_kills():
    assert units.parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n") == 2
    assert units.parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n") == 0  # kernel < 4.13


def test_oom_watch_counts_kills_as_the_kernel_signals_them(tmp_path):
    # A stand-in for a v1 memory cgroup: the same files, an eventfd we signal ourselves.
    cg = "/lcluster.slice/lcluster-job@x.service"
    d = tmp_path / cg.lstrip("/")
    d.mkdir(parents=True)
    (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    (d / "cgroup.event_control").write_text("")
    watch = units.OomWatch(root=str(tmp_path))

    async def main():
        watch.add(UUID, cg)
        efd, ofd, _ = watch._fds[UUID]
        efd_text, ofd_text = (d / "cgroup.event_control").read_text().split()
        assert (int(efd_text), int(ofd_text)) == (efd, ofd)  # registered as cgroup-v1/memory.rst says
        assert watch.kills(UUID) == 0
        os.eventfd_write(efd, 1)  # an OOM, its kill not counted yet
        await asyncio.sleep(0.01)
        assert watch.kills(UUID) == 1
        (d / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
        assert watch.kills(UUID) == 3  # the kernel's count, read again
        watch.add(UUID, cg)  # once per job
        watch.forget(UUID)
        assert watch.kills(UUID) == 0 and UUID not in watch._fds
        watch.add("other", "/no/such/cgroup")  # cgroup v2, or no memory limit: nothing to watch
        assert watch.kills("other") == 0

    asyncio.run(main())
