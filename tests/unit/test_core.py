"""lclusterd/core.py: the job model, its lifecycle, validation and planning."""

import dataclasses
import itertools
import uuid as uuidlib

import pytest

from lclusterd import core
from lclusterd.core import (CANCELLED, FAILED, QUEUED, RUNNING, STARTING, STATES, SUCCEEDED,
                            TERMINAL, TRANSITIONS, WARNED)

UUID = "0b5e8c1e-3c1f-4a43-9d59-1d1c1f0a2b77"


def job(state=QUEUED, uid=1000, gid=1000, job_uuid=UUID, **changes):
    return core.Job(uuid=job_uuid, command="echo hello", uid=uid, gid=gid, user="alice",
                    submitted_at=1764431000.12, state=state, **changes)


def unit(active="inactive", sub="dead", result="success", code=core.CLD_EXITED, status=0,
         started_at=None, ended_at=None):
    return core.UnitStatus(active_state=active, sub_state=sub, result=result, exit_code=code,
                           exit_status=status, started_at=started_at, ended_at=ended_at)


# --- lifecycle -------------------------------------------------------------

ALL_PAIRS = list(itertools.product(STATES, STATES))
ILLEGAL = [pair for pair in ALL_PAIRS if pair not in TRANSITIONS]


def test_table_only_names_known_states():
    assert {s for pair in TRANSITIONS for s in pair} <= set(STATES)
    assert TERMINAL == {SUCCEEDED, FAILED, CANCELLED}
    # 64 pairs, 19 allowed: the generated list of illegal ones is the rest.
    assert len(ALL_PAIRS) == 64 and len(TRANSITIONS) == 19 and len(ILLEGAL) == 45


@pytest.mark.parametrize("old,new", sorted(TRANSITIONS))
def test_allowed_transition(old, new):
    before = job(old)
    after = core.transition(before, new, node="node1", reason="because")
    assert after.state == new
    assert after.node == "node1" and after.reason == "because"
    assert after.uuid == before.uuid and after.command == before.command
    assert before.state == old  # records are immutable: a new one is returned


@pytest.mark.parametrize("old,new", ILLEGAL)
def test_illegal_transition(old, new):
    with pytest.raises(core.IllegalTransition) as e:
        core.transition(job(old), new)
    assert f"from {old} to {new}" in str(e.value) and UUID in str(e.value)


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_have_no_way_out_but_a_removal_that_did_not_stop(state):
    # The one way out: a removed (cancelled) job whose processes outlived the kill timeout.
    ways_out = [new for (old, new) in TRANSITIONS if old == state]
    assert ways_out == ([WARNED] if state == CANCELLED else [])
    assert job(state).terminal
    for new in set(STATES) - set(ways_out):
        with pytest.raises(core.IllegalTransition):
            core.transition(job(state), new)


@pytest.mark.parametrize("state", [QUEUED, STARTING, RUNNING, WARNED])
def test_live_states_are_not_terminal(state):
    assert not job(state).terminal


def test_transition_rejects_unknown_fields():
    with pytest.raises(TypeError):
        core.transition(job(QUEUED), STARTING, colour="blue")


def test_new_job():
    j = core.new_job("echo hi", 1000, 1001, "alice", now=12.5)
    assert uuidlib.UUID(j.uuid).version == 4 and core.is_full_uuid(j.uuid)
    assert (j.command, j.uid, j.gid, j.user, j.submitted_at, j.state) == \
        ("echo hi", 1000, 1001, "alice", 12.5, QUEUED)
    assert j.node is j.started_at is j.ended_at is j.exit_status is j.result is j.reason is None
    assert core.new_job("true", 0, 0, "root", 0).uuid != j.uuid
    with pytest.raises(core.InvalidInput):
        core.new_job("  ", 1000, 1000, "alice", now=0)


# --- validation ------------------------------------------------------------

@pytest.mark.parametrize("command", ["true", "echo hello world", " sleep 1 ", "a\nb", "é"])
def test_command_accepted_unchanged(command):
    assert core.validate_command(command) == command


@pytest.mark.parametrize("command,message", [
    ("", "command is empty"),
    ("   \t\n ", "command is empty"),
    ("echo a\0b", "NUL"),
    ("x" * 65537, "longer than 65536 bytes"),
    ("é" * 32769, "longer than 65536 bytes"),  # 32769 characters, 65538 bytes
    ("€" * 21846, "longer than 65536 bytes"),  # 3 bytes each: 65538
])
def test_command_refused(command, message):
    with pytest.raises(core.InvalidInput) as e:
        core.validate_command(command)
    assert message in str(e.value)


@pytest.mark.parametrize("count,ok", [(1, True), (1000, True), (1001, False), (0, False),
                                      (-1, False), (2.0, False), ("3", False), (True, False)])
def test_array_count(count, ok):
    if ok:
        assert core.validate_count(count) == count
    else:
        with pytest.raises(core.InvalidInput):
            core.validate_count(count)


def test_command_size_limit_is_in_bytes():
    assert core.MAX_COMMAND_BYTES == 65536
    assert core.validate_command("x" * 65536) == "x" * 65536
    assert core.validate_command("é" * 32768) == "é" * 32768  # 65536 bytes exactly
    assert core.validate_command("x" + "€" * 21845) == "x" + "€" * 21845  # 1 + 65535 bytes
    with pytest.raises(core.InvalidInput):
        core.validate_command("xx" + "€" * 21845)  # 65537 bytes in 21847 characters


@pytest.mark.parametrize("command", [None, 42, b"echo hi", ["echo", "hi"], {"command": "x"}])
def test_command_must_be_a_string(command):
    with pytest.raises(core.InvalidInput, match="command must be a string"):
        core.validate_command(command)


def test_invalid_input_is_a_value_error():
    assert issubclass(core.InvalidInput, ValueError)
    assert issubclass(core.IllegalTransition, ValueError)


@pytest.mark.parametrize("ref,expected", [
    (UUID, UUID),
    (UUID.upper(), UUID),
    (f"  {UUID}\n", UUID),
    ("0b5e", "0b5e"),
    ("0B5E8C", "0b5e8c"),
    ("0b5e8c1e-3c", "0b5e8c1e-3c"),
    (UUID[:35], UUID[:35]),
])
def test_ref_accepted(ref, expected):
    assert core.validate_ref(ref) == expected


@pytest.mark.parametrize("ref,message", [
    ("0b5", "too short"),
    ("", "is not a job uuid"),
    ("   ", "is not a job uuid"),
    ("0b5g", "is not a job uuid"),
    ("0b5e 8c", "is not a job uuid"),
    ("../../etc", "is not a job uuid"),
    ("0b5e*", "is not a job uuid"),
    ("-" * 36, "is not a job uuid"),
    ("0" * 36, "is not a job uuid"),  # 36 hex digits, no dashes
    (UUID.replace("-", "") + "0000", "is not a job uuid"),
    (UUID[:8] + UUID[9:] + "-", "is not a job uuid"),  # 36 characters, dash misplaced
    (UUID + "0", "is not a job uuid"),  # 37 characters
    (None, "is not a job uuid"),
    (1234, "is not a job uuid"),
])
def test_ref_refused(ref, message):
    if isinstance(ref, str) and len(ref.strip()) == 36:
        assert not core.is_full_uuid(ref.strip().lower())
    with pytest.raises(core.InvalidInput) as e:
        core.validate_ref(ref)
    assert message in str(e.value)


def test_is_full_uuid():
    assert core.is_full_uuid(UUID)
    assert not core.is_full_uuid(UUID[:35])
    assert not core.is_full_uuid(UUID.upper())  # refs are lowered before this is asked


OTHERS = ["0b5e0000-0000-4000-8000-000000000000", "ffff0000-0000-4000-8000-000000000000", UUID]


def test_pick_by_prefix_one():
    assert core.pick_by_prefix("0b5e8", OTHERS) == UUID
    assert core.pick_by_prefix("ffff", OTHERS) == OTHERS[1]
    assert core.pick_by_prefix(UUID, OTHERS) == UUID
    assert core.pick_by_prefix("0b5e8", iter(OTHERS)) == UUID  # any iterable


def test_pick_by_prefix_none():
    with pytest.raises(LookupError) as e:
        core.pick_by_prefix("abcd", OTHERS)
    assert type(e.value) is LookupError and "no job matches 'abcd'" in str(e.value)
    with pytest.raises(LookupError):
        core.pick_by_prefix("abcd", [])


def test_pick_by_prefix_several():
    with pytest.raises(core.AmbiguousRef) as e:
        core.pick_by_prefix("0b5e", OTHERS)
    assert "matches 2 jobs" in str(e.value)
    assert isinstance(e.value, LookupError)  # callers that only catch LookupError still do


# --- units -----------------------------------------------------------------

def test_unit_name_round_trip():
    name = core.unit_name(UUID)
    assert name == f"lcluster-job@{UUID}.service" == job().unit
    assert core.uuid_of_unit(name) == UUID


@pytest.mark.parametrize("name", [
    f"lcluster-job@{UUID}.scope",
    f"lcluster-job-{UUID}.service",
    f"other@{UUID}.service",
    "lcluster-job@.service",
    "lcluster-job@0b5e8c1e.service",
    f"lcluster-job@{UUID.upper()}.service",
    f"lcluster-job@{UUID}x.service",
    "lcluster.slice",
    "",
])
def test_uuid_of_unit_rejects(name):
    assert core.uuid_of_unit(name) is None


@pytest.mark.parametrize("active,sub,finished", [
    ("active", "running", False),
    ("active", "exited", True),  # RemainAfterExit=yes after the job ended
    ("activating", "start", False),
    ("deactivating", "stop-sigterm", False),
    ("deactivating", "stop-sigkill", False),
    ("reloading", "reload", False),
    ("inactive", "dead", True),
    ("failed", "failed", True),
])
def test_unit_status_finished(active, sub, finished):
    assert unit(active, sub).finished is finished


def test_outcome_exit_0():
    assert core.outcome(unit("active", "exited", "success", core.CLD_EXITED, 0)) == \
        (SUCCEEDED, 0, "exited with status 0")


def test_outcome_exit_3():
    assert core.outcome(unit("failed", "failed", "exit-code", core.CLD_EXITED, 3)) == \
        (FAILED, 3, "exited with status 3")


@pytest.mark.parametrize("code", [core.CLD_KILLED, core.CLD_DUMPED])
def test_outcome_killed_by_signal_9(code):
    result = "signal" if code == core.CLD_KILLED else "core-dump"
    assert core.outcome(unit("failed", "failed", result, code, 9)) == \
        (FAILED, 137, "killed by signal 9")


def test_outcome_timeout():
    state, exit_status, reason = core.outcome(unit("failed", "failed", "timeout", core.CLD_KILLED, 9))
    assert (state, exit_status) == (FAILED, 137)
    assert reason == "killed by signal 9 (timeout)"


def test_outcome_oom_kill():
    state, exit_status, reason = core.outcome(unit("failed", "failed", "oom-kill", core.CLD_KILLED, 9))
    assert (state, exit_status) == (FAILED, 137)
    assert "oom-kill" in reason and "signal 9" in reason


def test_outcome_oom_kill_even_with_status_0_fails():
    # The OOM killer took a child; the main process still exited 0.
    state, exit_status, reason = core.outcome(unit("failed", "failed", "oom-kill", core.CLD_EXITED, 0))
    assert (state, exit_status) == (FAILED, 0) and "oom-kill" in reason


def test_outcome_unit_that_never_ran():
    state, exit_status, reason = core.outcome(unit("failed", "failed", "resources", 0, 0))
    assert (state, exit_status) == (FAILED, None)
    assert "did not run" in reason and "resources" in reason


def test_finish_running_job():
    running = job(RUNNING, node="node1", started_at=100.0)
    done = core.finish(running, unit("active", "exited", "success", core.CLD_EXITED, 0,
                                     started_at=99.0, ended_at=101.0), now=200.0)
    assert (done.state, done.exit_status, done.result, done.reason) == \
        (SUCCEEDED, 0, "success", "exited with status 0")
    assert (done.started_at, done.ended_at, done.node) == (100.0, 101.0, "node1")


def test_finish_takes_start_from_unit_and_end_from_clock():
    starting = job(STARTING, node="node1")
    done = core.finish(starting, unit("failed", "failed", "exit-code", core.CLD_EXITED, 3,
                                      started_at=99.0), now=200.0)
    assert (done.state, done.exit_status, done.result) == (FAILED, 3, "exit-code")
    assert (done.started_at, done.ended_at) == (99.0, 200.0)


def test_finish_killed():
    done = core.finish(job(RUNNING), unit("failed", "failed", "signal", core.CLD_KILLED, 9), now=5.0)
    assert (done.state, done.exit_status, done.reason) == (FAILED, 137, "killed by signal 9")


def test_finish_refuses_a_finished_job():
    with pytest.raises(core.IllegalTransition):
        core.finish(job(CANCELLED), unit(), now=1.0)
    with pytest.raises(core.IllegalTransition):
        core.finish(job(QUEUED), unit(), now=1.0)


# --- reconciliation ----------------------------------------------------------

U1, U2, U3 = (f"{n}0000000-0000-4000-8000-000000000000" for n in "123")
ACTIVE = unit("active", "running", "success", 0, 0)
EXITED = unit("active", "exited", "success", core.CLD_EXITED, 0)


@pytest.mark.parametrize("state,status,plan", [
    (STARTING, None, [(core.START_UNIT, U1)]),  # assigned to us: start its unit
    (RUNNING, None, [(core.RECORD_VANISHED, U1)]),
    (SUCCEEDED, EXITED, [(core.RELEASE_UNIT, U1)]),
    (FAILED, unit("failed", "failed", "exit-code", core.CLD_EXITED, 1), [(core.RELEASE_UNIT, U1)]),
    (CANCELLED, ACTIVE, [(core.RELEASE_UNIT, U1)]),  # cancelled but still running: stop it
    (RUNNING, EXITED, [(core.RECORD_END, U1)]),
    (RUNNING, unit("failed", "failed", "exit-code", core.CLD_EXITED, 2), [(core.RECORD_END, U1)]),
    (STARTING, EXITED, [(core.RECORD_END, U1)]),  # finished before 'running' was recorded
    (STARTING, ACTIVE, [(core.RECORD_RUNNING, U1)]),
    (STARTING, unit("activating", "start", "success", 0, 0), []),  # not up yet: wait
    (RUNNING, ACTIVE, []),
    (SUCCEEDED, None, []),  # terminal and released: nothing left to do
    (QUEUED, None, []),
])
def test_reconcile_case(state, status, plan):
    units = {} if status is None else {U1: status}
    assert core.reconcile({U1: job(state, job_uuid=U1)}, units) == plan


@pytest.mark.parametrize("state,status", [(STARTING, None), (STARTING, ACTIVE), (RUNNING, EXITED)])
def test_reconcile_skips_in_flight(state, status):
    units = {} if status is None else {U1: status}
    assert core.reconcile({U1: job(state, job_uuid=U1)}, units, in_flight={U1}) == []


def test_reconcile_skips_unknown_record():
    assert core.reconcile({}, {U1: EXITED, U2: ACTIVE}) == []


def test_reconcile_whole_node_in_stable_order():
    jobs = {U3: job(STARTING, job_uuid=U3), U1: job(RUNNING, job_uuid=U1),
            U2: job(SUCCEEDED, job_uuid=U2)}
    units = {U2: EXITED, U1: EXITED, "ffff0000-0000-4000-8000-000000000000": ACTIVE}
    plan = [(core.RECORD_END, U1), (core.RELEASE_UNIT, U2), (core.START_UNIT, U3)]
    assert core.reconcile(jobs, units) == plan
    assert core.reconcile(dict(reversed(jobs.items())), dict(reversed(units.items()))) == plan


def test_free_slots():
    assert core.free_slots(4, 1) == 3
    assert core.free_slots(4, 4) == 0
    assert core.free_slots(2, 5) == 0


# --- the unit a job runs in ----------------------------------------------------

def props(j, **kwargs):
    return dict(core.unit_properties(j, 10, **kwargs))


def test_unit_properties_default_sandbox():
    p = props(job(uid=1000))
    assert p["PrivateNetwork"] is True and p["PrivateTmp"] is False  # a bounded tmpfs instead
    assert p["NoNewPrivileges"] is True
    assert p["ProtectSystem"] == "strict" and p["ProtectHome"] == "yes"
    assert p["ExecStart"] == [("/bin/sh", ["/bin/sh", "-c", "echo hello"], False)]
    assert p["RemainAfterExit"] is True and p["Slice"] == "lcluster.slice"
    assert p["Environment"] == [f"LCLUSTER_JOB_ID={UUID}"]
    assert p["KillSignal"] == 15 and p["TimeoutStopUSec"] == 10_000_000
    assert p["Description"] == f"lcluster job {UUID}"
    assert "RootDirectory" not in p and "NetworkNamespacePath" not in p


def test_unit_properties_names_are_unique():
    names = [name for name, _ in core.unit_properties(job(), 1, rootfs="/r", namespace="n")]
    assert len(names) == len(set(names))


def test_unit_properties_stop_timeout_in_microseconds():
    assert dict(core.unit_properties(job(), 2.5))["TimeoutStopUSec"] == 2_500_000


def test_unit_properties_root_runs_as_root():
    p = props(job(uid=0, gid=0))
    assert "User" not in p and "Group" not in p


def test_unit_properties_user_runs_as_user():
    p = props(job(uid=1000, gid=1001))
    assert (p["User"], p["Group"]) == ("1000", "1001")


def test_unit_properties_rootfs():
    p = props(job(), rootfs="/var/lib/lclusterd/rootfs")
    assert p["RootDirectory"] == "/var/lib/lclusterd/rootfs" and p["MountAPIVFS"] is True
    assert p["PrivateNetwork"] is True


def test_unit_properties_namespace_replaces_private_network():
    p = props(job(), namespace="lcluster")
    assert "PrivateNetwork" not in p
    assert p["NetworkNamespacePath"] == "/run/netns/lcluster"


# --- records -------------------------------------------------------------------

def test_job_dict_round_trip():
    full = job(FAILED, node="node1", started_at=1.5, ended_at=2.5, exit_status=137,
               result="signal", reason="killed by signal 9")
    record = full.to_dict()
    assert record["unit"] == f"lcluster-job@{UUID}.service"
    assert record["state"] == "failed" and record["exit_status"] == 137
    assert set(record) == {f.name for f in dataclasses.fields(core.Job)} | {"unit"}
    assert core.Job.from_dict(record) == full
    assert core.Job.from_dict(job().to_dict()) == job()


def test_job_to_dict_matches_the_api_documentation():
    assert set(job().to_dict()) == {"uuid", "command", "state", "uid", "gid", "user", "node",
                                    "unit", "submitted_at", "started_at", "ended_at",
                                    "exit_status", "result", "reason", "submitter",
                                    "submitter_uid", "memory", "cpus", "tasks", "timeout",
                                    "env", "workdir", "network", "max_attempts", "attempts",
                                    "priority", "warned_at", "warning", "warned_from",
                                    "signature", "after", "after_mode", "constraints", "array",
                                    "array_index", "max_running"}


def test_job_from_dict_ignores_unknown_keys():
    record = dict(job(RUNNING).to_dict(), colour="blue", labels={"team": "a"})
    assert core.Job.from_dict(record) == job(RUNNING)


def test_job_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        job().state = RUNNING


# --- warned jobs ---------------------------------------------------------------

def stopping(processes, stopped_at=100.0, active="deactivating", sub="stop-sigterm"):
    return dataclasses.replace(unit(active, sub, "success", 0, 0), processes=processes,
                               stopped_at=stopped_at)


@pytest.mark.parametrize("status,now,expected", [
    (stopping(2), 100.0 + 10 + core.KILL_GRACE + 0.1, True),  # past stop_timeout + grace
    (stopping(2), 100.0 + 10 + core.KILL_GRACE - 0.1, False),  # systemd may still kill it
    (stopping(0), 1000.0, False),  # nothing left: it stopped
    (stopping(1, active="failed", sub="failed"), 1000.0, True),  # systemd gave up on it
    (stopping(1, active="inactive", sub="dead"), 1000.0, True),  # reset, but its cgroup is not empty
    (stopping(1, stopped_at=None), 1000.0, False),  # never stopped
    (dataclasses.replace(ACTIVE, processes=0), 1000.0, False),  # running is not stuck
])
def test_stuck(status, now, expected):
    assert core.stuck(status, now, stop_timeout=10) is expected


def test_a_unit_with_processes_left_has_not_finished():
    assert not stopping(1, active="failed", sub="failed").finished
    assert stopping(0, active="failed", sub="failed").finished


def test_warn_records_time_reason_and_where_it_came_from():
    removed = job(CANCELLED, node="n1", reason="removed by alice", ended_at=5.0)
    warned = core.warn(removed, 20.0, "still has processes")
    assert (warned.state, warned.warned_at, warned.warning, warned.warned_from) == (
        WARNED, 20.0, "still has processes", CANCELLED)
    assert not warned.terminal


def test_clear_a_removed_job_returns_to_cancelled():
    warned = core.warn(job(CANCELLED, reason="removed by alice", ended_at=5.0), 20.0, "stuck")
    cleared = core.clear(warned, None, 60.0)
    assert (cleared.state, cleared.ended_at, cleared.reason) == (CANCELLED, 60.0, "removed by alice")
    assert cleared.warned_at == 20.0 and cleared.warning == "stuck"  # the history stays


def test_clear_a_stopped_running_job_takes_the_units_outcome():
    warned = core.warn(job(RUNNING), 20.0, "stuck")
    timed_out = unit("failed", "failed", "timeout", core.CLD_KILLED, 9, ended_at=50.0)
    cleared = core.clear(warned, timed_out, 60.0)
    assert cleared.state == FAILED and cleared.exit_status == 137 and "timeout" in cleared.reason
    gone = core.clear(warned, None, 60.0)
    assert gone.state == FAILED and gone.ended_at == 60.0 and "40 s after" in gone.reason
    given_up = core.clear(warned, unit("failed", "failed", "timeout", 0, 0), 60.0)
    assert (given_up.state, given_up.result, given_up.exit_status) == (FAILED, "timeout", None)
    assert given_up.reason == "stopped (timeout); its processes ended 40 s after it was warned"


def test_settle():
    assert core.settle(job(SUCCEEDED), EXITED, 1.0) is None
    assert core.settle(job(RUNNING), EXITED, 1.0).state == SUCCEEDED
    warned = core.warn(job(CANCELLED), 2.0, "stuck")
    assert core.settle(warned, EXITED, 3.0).state == CANCELLED


STUCK = stopping(3, stopped_at=0.0, active="inactive", sub="dead")


@pytest.mark.parametrize("state,status,plan", [
    (RUNNING, STUCK, [(core.WARN, U1)]),  # a timeout or a fence that did not stop it
    (CANCELLED, STUCK, [(core.WARN, U1)]),  # a removal that did not stop it
    (SUCCEEDED, STUCK, [(core.RELEASE_UNIT, U1)]),  # not a stop of ours: just release
    (RUNNING, stopping(3, stopped_at=999.0), []),  # still within the kill timeout
])
def test_reconcile_warns_stuck_units(state, status, plan):
    assert core.reconcile({U1: job(state, job_uuid=U1)}, {U1: status}, now=1000.0,
                          stop_timeout=10) == plan


@pytest.mark.parametrize("status,plan", [
    (STUCK, []),  # still stuck: watch it
    (None, [(core.CLEAR, U1)]),  # its unit is gone with its processes
    (unit("failed", "failed", "timeout", core.CLD_KILLED, 9), [(core.CLEAR, U1)]),
])
def test_reconcile_clears_warned_jobs_once_they_stop(status, plan):
    warned = core.warn(job(CANCELLED, job_uuid=U1), 1.0, "stuck")
    units = {} if status is None else {U1: status}
    assert core.reconcile({U1: warned}, units, now=1000.0, stop_timeout=10) == plan


def test_no_stuck_check_without_a_clock():
    assert core.reconcile({U1: job(RUNNING, job_uuid=U1)}, {U1: STUCK}) == []


def test_job_output_is_not_rate_limited_away():
    props = dict(core.unit_properties(job(), stop_timeout=10))
    assert props["LogRateLimitIntervalUSec"] > 0  # 0 would mean journald's default limit
    assert props["LogRateLimitBurst"] >= 100_000


# --- history -----------------------------------------------------------------------

def record(n, state, submitted, ended=None, node="n1", user="alice"):
    return core.Job(uuid=f"{n:08d}-0000-4000-8000-000000000000", command=f"job {n}", uid=1000,
                    gid=1000, user=user, submitted_at=submitted, state=state, node=node,
                    ended_at=ended)


HISTORY = [
    record(1, SUCCEEDED, 10.0, 20.0), record(2, FAILED, 11.0, 40.0, node="n2"),
    record(3, RUNNING, 12.0), record(4, QUEUED, 30.0, node=None), record(5, WARNED, 5.0),
    record(6, CANCELLED, 50.0, 51.0, user="bob"),
]


def numbers(jobs):
    return [int(j.uuid[:8]) for j in jobs]


def test_select_puts_live_jobs_first_then_the_latest_finished():
    assert numbers(core.select(HISTORY)) == [5, 3, 4, 6, 2, 1]
    assert numbers(core.select(HISTORY, limit=4)) == [5, 3, 4, 6]


@pytest.mark.parametrize("filters,expected", [
    ({"state": WARNED}, [5]),
    ({"node": "n2"}, [2]),
    ({"user": "bob"}, [6]),
    ({"since": 11.0}, [3, 4, 6, 2]),
    ({"until": 11.0}, [5, 2, 1]),
    ({"since": 11.0, "until": 30.0, "user": "alice"}, [3, 4, 2]),
    ({"state": SUCCEEDED, "node": "n2"}, []),
])
def test_select_filters(filters, expected):
    assert numbers(core.select(HISTORY, **filters)) == expected


def test_select_by_user_is_who_queued_it_or_whom_it_runs_as():
    queued_by_root = dataclasses.replace(record(7, QUEUED, 60.0, node=None, user="nobody"),
                                         submitter="root")
    assert numbers(core.select(HISTORY + [queued_by_root], user="root")) == [7]
    assert numbers(core.select(HISTORY + [queued_by_root], user="nobody")) == [7]


def test_expired_by_age_and_by_count_never_live_ones():
    assert set(numbers_of(core.expired(HISTORY, now=100.0, retention=70, max_finished=10))) == {1}
    assert set(numbers_of(core.expired(HISTORY, now=100.0, retention=1000, max_finished=1))) == {1, 2}
    everything = core.expired(HISTORY, now=1e9, retention=1, max_finished=0)
    assert set(numbers_of(everything)) == {1, 2, 6}  # running, queued, warned stay


def numbers_of(uuids):
    return [int(u[:8]) for u in uuids]


def test_durations_take_weeks_too():
    assert core.parse_duration("1w") == 604800 and core.parse_duration("2d") == 172800


def test_parse_when():
    assert core.parse_when("2d", now=1_000_000.0) == 1_000_000.0 - 172800
    assert core.parse_when("2026-11-28T14:00:00+00:00", now=0) == 1795874400.0
    local = core.parse_when("2026-11-28 14:00", now=0)
    assert abs(local - 1795874400.0) <= 14 * 3600  # local time, whatever the zone
    with pytest.raises(core.InvalidInput, match="not a time"):
        core.parse_when("yesterday", now=0)


def test_with_warned_counts_each_nodes_warned_jobs():
    rows = [{"name": "n1"}, {"name": "n2"}]
    assert core.with_warned(rows, {U2: "n1", U1: "n1"}) == [
        {"name": "n1", "warned": [U1, U2]}, {"name": "n2", "warned": []}]


# --- record signing (contract C3) ----------------------------------------------

KEY = core.signing_key("a-cluster-token-of-some-length")


def test_signing_key_is_derived_from_the_token_not_the_token():
    assert core.signing_key("tok-123456789012345\n") == core.signing_key("tok-123456789012345")
    assert core.signing_key("tok-123456789012345") != core.signing_key("tok-123456789012346")
    assert len(KEY) == 32 and b"a-cluster-token" not in KEY
    for empty in ("", " \n", None):
        with pytest.raises(ValueError, match="token is empty"):
            core.signing_key(empty)


def test_a_signed_record_verifies_also_after_a_round_trip():
    j = core.sign(job(env=("A=1", "B=\udc80"), memory=1 << 20, cpus=0.5, timeout=600.0,
                      network="none", submitter="alice", submitter_uid=1000), KEY)
    assert len(j.signature) == 64 and core.verify(j, KEY)
    assert core.verify(core.Job.from_dict(j.to_dict()), KEY)
    assert core.verify(dataclasses.replace(j, timeout=600), KEY)  # one number, int or float
    assert not core.verify(j, core.signing_key("another-cluster-token"))


def test_the_node_may_change_the_lifecycle_fields_of_a_signed_record():
    j = core.sign(job(), KEY)
    claimed = core.transition(j, STARTING, now=2.0, node="n1")
    running = core.transition(claimed, RUNNING, started_at=3.0)
    assert core.verify(running, KEY) and core.verify(core.transition(running, FAILED, now=4.0), KEY)


@pytest.mark.parametrize("change", [
    {"uid": 0}, {"gid": 0}, {"user": "root"}, {"command": "cat /etc/shadow"},
    {"env": ("LD_PRELOAD=/tmp/x.so",)}, {"memory": None}, {"cpus": 2.0}, {"tasks": 10**6},
    {"timeout": None}, {"workdir": "/root"}, {"network": "host"}, {"submitter": "bob"},
    {"submitter_uid": 0}, {"uuid": "1b5e8c1e-3c1f-4a43-9d59-1d1c1f0a2b77"}, {"uid": True},
])
def test_a_record_changed_where_it_matters_does_not_verify(change):
    j = core.sign(job(memory=1 << 20, cpus=1.0, tasks=64, timeout=60.0, workdir="/srv",
                      network="none", submitter="alice", submitter_uid=1000, uid=1, gid=1), KEY)
    assert not core.verify(dataclasses.replace(j, **change), KEY)


@pytest.mark.parametrize("signature", [None, "", "0" * 64, "é" * 64, 12, ["x"]])
def test_unsigned_or_garbled_signatures_do_not_verify(signature):
    assert not core.verify(dataclasses.replace(job(), signature=signature), KEY)


def test_a_record_no_node_would_write_does_not_verify_and_does_not_raise():
    j = core.sign(job(), KEY)
    assert not core.verify(dataclasses.replace(j, cpus="fast"), KEY)
    assert not core.verify(dataclasses.replace(j, env=(object(),)), KEY)


# --- the sandbox: issue 10 items 3, 4, 5 ---------------------------------------

def as_user(j, user):
    return dataclasses.replace(j, user=user)


def test_every_job_gets_namespaces_and_address_families_restricted():
    for j in (job(), as_user(job(uid=0, gid=0), "root"), as_user(job(uid=65534, gid=65534), "nobody")):
        p = props(j)
        assert p["RestrictNamespaces"] == 0  # none allowed: no user namespace either
        assert p["RestrictAddressFamilies"] == (True, ["AF_UNIX", "AF_INET", "AF_INET6"])
        assert p["SystemCallArchitectures"] == ["native"]
        assert p["PrivateIPC"] is True and p["RestrictRealtime"] is True
        assert p["ProtectClock"] is True and p["ProtectHostname"] is True


def test_tmp_var_tmp_and_dev_shm_are_bounded_tmpfs_of_the_job():
    p = props(job(), tmp_size=64 << 20)
    assert p["PrivateTmp"] is False  # it would take precedence over the tmpfs
    options = "size=67108864,mode=1777,nosuid,nodev"
    assert p["TemporaryFileSystem"] == [("/dev/shm", options + ",noexec"), ("/tmp", options),
                                        ("/var/tmp", options)]
    assert dict(props(job()))["TemporaryFileSystem"][1] == (
        "/tmp", f"size={core.DEFAULT_JOB_TMP_SIZE},mode=1777,nosuid,nodev")


def test_a_job_for_nobody_gets_a_dynamic_user_of_its_own():
    a = as_user(job(uid=65534, gid=65534), "nobody")
    b = as_user(job(uid=65534, gid=65534, job_uuid="1b5e8c1e-3c1f-4a43-9d59-1d1c1f0a2b77"), "nobody")
    pa, pb = props(a), props(b)
    assert pa["DynamicUser"] is True and "Group" not in pa
    assert pa["User"] == "lcj-0b5e8c1e3c1f4a439d591d1c1f0" and pb["User"] != pa["User"]
    assert len(pa["User"]) <= 31  # systemd's longest user name
    assert pa["CapabilityBoundingSet"] == 0
    # systemd gives a dynamic user its PrivateTmp=; /dev/shm is still ours
    assert "PrivateTmp" not in pa and [m for m, _ in pa["TemporaryFileSystem"]] == ["/dev/shm"]
    for j in (job(), as_user(job(uid=0, gid=0), "root")):
        assert "DynamicUser" not in props(j) and core.dynamic_user(j) is None


def test_every_new_sandbox_property_has_a_dbus_signature():
    from lclusterd import units
    jobs = (job(memory=1 << 20, cpus=1.0, tasks=5, timeout=5.0, workdir="/srv"),
            as_user(job(uid=65534, gid=65534), "nobody"), as_user(job(uid=0, gid=0), "root"))
    names = {n for j in jobs for n, _ in core.unit_properties(j, 1, rootfs="/r", namespace="n")}
    assert names <= set(units.SIGNATURES), names - set(units.SIGNATURES)


def test_run_as_refuses_a_user_name_with_a_trailing_newline():
    # `$` in a regex also matches before a final newline: "alice\n" passed match().
    with pytest.raises(core.InvalidInput):
        core.run_as(0, "root", "alice\n")
    assert core.run_as(0, "root", "alice") == "alice"


# --- issue 11: dependencies, constraints, arrays in the record ---------------------

P1, P2 = "3f2a1b2c-0000-4000-8000-000000000001", "3f2a1b2c-0000-4000-8000-000000000002"
ARRAY = "a1b2c3d4-0000-4000-8000-00000000000a"


def test_a_record_of_an_older_version_loads_with_the_new_fields_at_their_defaults():
    record = {k: v for k, v in job(RUNNING).to_dict().items()
              if k not in ("after", "after_mode", "constraints", "array", "array_index", "max_running")}
    j = core.Job.from_dict(record)
    assert (j.after, j.after_mode, j.constraints, j.array, j.array_index, j.max_running) == (
        (), None, (), None, None, None)


def test_the_new_fields_round_trip_through_json_lists():
    j = job(after=(P1, P2), after_mode=core.AFTER_ANY, constraints=("gpu=1",), array=ARRAY,
            array_index=3, max_running=2)
    record = j.to_dict()
    record["after"], record["constraints"] = list(j.after), list(j.constraints)  # as JSON has them
    assert core.Job.from_dict(record) == j


def test_a_signature_made_before_the_new_fields_still_verifies():
    # Signed by the code of before issue 11 (git 8397ac1) with KEY.
    old = job(memory=1 << 20, cpus=0.5, env=("A=1",), submitter="alice", submitter_uid=1000,
              signature="0d9d9236ebcdb13c8b4e6e7fef47405a3320a2bb4401634fd0acfc0741f2d005")
    assert core.verify(old, KEY)
    assert core.verify(core.Job.from_dict(old.to_dict()), KEY)


@pytest.mark.parametrize("change", [
    {"after": (P2,)}, {"after": ()}, {"after_mode": core.AFTER_ANY}, {"constraints": ()},
    {"constraints": ("gpu=2",)}, {"array": None}, {"array_index": 0}, {"array_index": None},
    {"max_running": 5}, {"max_running": None},
])
def test_the_new_fields_are_signed_when_set(change):
    j = core.sign(job(after=(P1,), after_mode=core.AFTER_OK, constraints=("gpu=1",), array=ARRAY,
                      array_index=1, max_running=2), KEY)
    assert core.verify(j, KEY) and core.verify(core.Job.from_dict(j.to_dict()), KEY)
    assert not core.verify(dataclasses.replace(j, **change), KEY)


@pytest.mark.parametrize("change", [{"after": (P1,)}, {"constraints": ("gpu=1",)},
                                    {"array": ARRAY, "array_index": 0}, {"max_running": 1}])
def test_setting_a_new_field_on_a_record_signed_without_it_does_not_verify(change):
    assert not core.verify(dataclasses.replace(core.sign(job(), KEY), **change), KEY)


def test_array_members_learn_their_array_and_index():
    env = props(job(array=ARRAY, array_index=0, env=("A=1",)))["Environment"]
    assert env == [f"LCLUSTER_JOB_ID={UUID}", f"LCLUSTER_ARRAY_ID={ARRAY}", "LCLUSTER_ARRAY_INDEX=0",
                   "A=1"]
    assert props(job())["Environment"] == [f"LCLUSTER_JOB_ID={UUID}"]


@pytest.mark.parametrize("name", ["LCLUSTER_ARRAY_ID", "LCLUSTER_ARRAY_INDEX"])
def test_a_job_cannot_set_the_array_variables(name):
    with pytest.raises(core.InvalidInput, match="set by lclusterd"):
        core.validate_env([f"{name}=7"])


def test_the_exception_tree_has_conflict_elsewhere_and_busy():
    for error in (core.Conflict, core.Elsewhere, core.Busy):
        assert issubclass(error, Exception) and not issubclass(error, core.InvalidInput)


def test_reconcile_starts_the_unit_of_a_job_assigned_here_only():
    assigned = {U1: job(STARTING, job_uuid=U1, node="n1"), U2: job(STARTING, job_uuid=U2, node="n2")}
    assert core.reconcile(assigned, {}, node="n1") == [(core.START_UNIT, U1)]
    assert core.reconcile(assigned, {}, in_flight={U1}, node="n1") == []
    # once its unit is up the record says running
    assert core.reconcile(assigned, {U1: ACTIVE}, node="n1") == [(core.RECORD_RUNNING, U1)]


def test_a_job_assigned_here_holds_a_slot_before_its_unit_starts():
    jobs = {U1: job(STARTING, job_uuid=U1, node="n1"), U2: job(STARTING, job_uuid=U2, node="n2")}
    assert core.slot_holders(jobs, {}, set(), "n1") == {U1}


# --- lclusterc nodes: capacity, reservations, drains ---------------------------------

class _Load:  # what scheduler.Load has, without importing it here
    def __init__(self, cpus, memory, jobs):
        self.cpus, self.memory, self.jobs = cpus, memory, jobs


def test_node_rows_show_capacity_reservations_and_drains():
    reg = {n: {"name": n, "address": f"http://{n}:7800", "slots": 4, "cpus": 4.0, "memory": 8 << 30,
               "labels": {"node": n}, "running": 1, "free": 3} for n in "abcd"}
    live = {n: reg[n] for n in "abc"}
    drains = {"a": {"reason": "disk swap", "at": 5.0, "by": "root"},
              "b": {"reason": "", "at": 6.0, "by": "root"}, "d": {"reason": "dead", "at": 1.0, "by": "root"}}
    loads = {"a": _Load(2.0, 1 << 30, 2), "c": _Load(0.5, 0, 1)}
    rows = core.node_rows(reg, live, {}, "b", drains=drains, loads=loads)
    assert [(r["name"], r["state"], r["prime"], r["running"], r["drain_reason"]) for r in rows] == [
        ("a", core.DRAINING, False, 2, "disk swap"), ("b", core.DRAINED, True, 0, ""),
        ("c", core.READY, False, 1, None), ("d", core.FAILED_NODE, False, 0, "dead")]
    assert [(r["reserved_cpus"], r["reserved_memory"]) for r in rows] == [
        (2.0, 1 << 30), (0.0, 0), (0.5, 0), (0.0, 0)]
    assert rows[0]["cpus"] == 4.0 and rows[0]["memory"] == 8 << 30 and rows[0]["labels"] == {"node": "a"}


def test_node_rows_of_old_callers_and_old_registrations():
    reg = {"a": {"name": "a", "slots": 2, "running": 1, "free": 1}}
    [row] = core.node_rows(reg, reg, {}, "a")
    assert (row["state"], row["running"], row["cpus"], row["memory"], row["labels"]) == (
        core.PRIMED, 1, None, None, {})
    assert (row["reserved_cpus"], row["reserved_memory"], row["drain_reason"]) == (0.0, 0, None)


# --- making many jobs at once (issue 13 item 2) --------------------------------------

def test_a_signature_made_by_sign_before_new_jobs_still_verifies():
    # Signed by the code before new_jobs (git 2dac1c6) with KEY.
    old = dataclasses.replace(
        job(env=("A=1",), cpus=2, timeout=60, submitter="alice", submitter_uid=1000, after=(P1,),
            after_mode="ok", constraints=("gpu=1",), array=ARRAY, array_index=12, max_running=3,
            signature="dff979e1e6b524f256cfeb7211d93306103e341762aa6461b5fd714524c0b5db"),
        command='echo "é" \udc80 \\n')
    assert core.verify(old, KEY)


@pytest.mark.parametrize("array", [None, ARRAY])
def test_new_jobs_are_what_new_job_and_sign_make(array):
    commands = ["true", 'echo "é" \u2603 \\n', "true", "sleep 1"]
    spec = dict(env=("A=1", "B=\u2603"), memory=1 << 20, cpus=1, timeout=600, network="none",
                submitter="alice", submitter_uid=1000, after=(P1, P2), after_mode="ok",
                constraints=("gpu=1",), max_running=2 if array else None)
    made = core.new_jobs(commands if array else commands[:1], 1000, 1000, "alice", 5.0, KEY,
                         array=array, **spec)
    assert [j.command for j in made] == (commands if array else commands[:1])
    assert len({j.uuid for j in made}) == len(made)
    for index, member in enumerate(made):
        alike = core.new_job(member.command, 1000, 1000, "alice", 5.0, **spec, array=array,
                             array_index=None if array is None else index)
        assert core.sign(dataclasses.replace(alike, uuid=member.uuid), KEY) == member
        assert core.verify(core.Job.from_dict(member.to_dict()), KEY)
    assert core.new_jobs(["true"], 1000, 1000, "alice", 5.0)[0].signature is None  # no key


def test_new_jobs_check_each_command():
    with pytest.raises(core.InvalidInput, match="empty"):
        core.new_jobs(["true", " "], 1000, 1000, "alice", 5.0, KEY, array=ARRAY)


def test_single_jobs_alike_share_signed_pieces_but_never_across_types():
    one = core.new_jobs(["true"], 1, 1, "alice", 5.0, KEY)[0]
    again = core.new_jobs(["true"], 1, 1, "alice", 6.0, KEY)[0]
    other = core.new_jobs(["true"], True, 1, "alice", 5.0, KEY)[0]  # equal to 1, signed apart
    for made in (one, again, other):
        assert core.sign(dataclasses.replace(made, signature=None), KEY) == made
    assert core.verify(one, KEY) and not core.verify(dataclasses.replace(other, uid=1), KEY)
