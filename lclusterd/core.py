"""The pure core: the job model, its lifecycle, validation and scheduling rules.

Nothing here touches etcd, D-Bus, journald, sockets or the clock: callers
pass in what they observed (and the time), and get back new records or plans.
That keeps every rule testable without I/O.
"""

import dataclasses
import re
import uuid as uuidlib
from typing import Optional

MAX_COMMAND_BYTES = 64 * 1024
MIN_PREFIX_LEN = 4
UNIT_PREFIX = "lcluster-job@"
UNIT_SUFFIX = ".service"


class InvalidInput(ValueError):
    """The user gave something we refuse; the message is one line for them."""


class IllegalTransition(ValueError):
    """A state change the lifecycle table does not allow."""


# --- lifecycle -------------------------------------------------------------

QUEUED = "queued"
STARTING = "starting"  # claimed by a node, its unit not started yet
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

STATES = (QUEUED, STARTING, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# Every allowed change of state, and why it happens. Anything else is refused.
TRANSITIONS = {
    (QUEUED, STARTING): "a node claimed the job from the queue",
    (QUEUED, CANCELLED): "removejob took it off the queue",
    (STARTING, RUNNING): "its unit started",
    (STARTING, QUEUED): "the node restarted before starting the unit: nothing ran, so requeue",
    (STARTING, FAILED): "systemd refused to start its unit",
    (STARTING, SUCCEEDED): "it finished before 'running' was recorded",
    (STARTING, CANCELLED): "removejob while its unit was being started",
    (RUNNING, SUCCEEDED): "its main process exited with status 0",
    (RUNNING, FAILED): "its main process failed, or its unit vanished",
    (RUNNING, CANCELLED): "removejob stopped it",
}


@dataclasses.dataclass(frozen=True)
class Job:
    uuid: str
    command: str
    uid: int
    gid: int
    user: str
    submitted_at: float
    state: str = QUEUED
    node: Optional[str] = None
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    exit_status: Optional[int] = None
    result: Optional[str] = None
    reason: Optional[str] = None

    @property
    def unit(self) -> str:
        return unit_name(self.uuid)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["unit"] = self.unit
        return record

    @classmethod
    def from_dict(cls, record: dict) -> "Job":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def transition(job: Job, state: str, **changes) -> Job:
    """The job in its new state, or IllegalTransition."""
    if (job.state, state) not in TRANSITIONS:
        raise IllegalTransition(f"job {job.uuid} cannot go from {job.state} to {state}")
    return dataclasses.replace(job, state=state, **changes)


def new_job(command: str, uid: int, gid: int, user: str, now: float) -> Job:
    return Job(uuid=str(uuidlib.uuid4()), command=validate_command(command),
               uid=uid, gid=gid, user=user, submitted_at=now)


# --- validation ------------------------------------------------------------

def validate_command(command) -> str:
    if not isinstance(command, str):
        raise InvalidInput("command must be a string")
    if not command.strip():
        raise InvalidInput("command is empty")
    if "\0" in command:
        raise InvalidInput("command contains a NUL byte")
    try:
        size = len(command.encode("utf-8"))
    except UnicodeEncodeError:  # undecodable bytes in argv arrive as surrogates
        raise InvalidInput("command is not valid UTF-8") from None
    if size > MAX_COMMAND_BYTES:
        raise InvalidInput(f"command is longer than {MAX_COMMAND_BYTES} bytes")
    return command


_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PREFIX = re.compile(r"^[0-9a-f-]+$")


def validate_ref(ref) -> str:
    """A full uuid or a prefix of one, lower-cased; InvalidInput otherwise."""
    ref = ref.strip().lower() if isinstance(ref, str) else ""
    if not _PREFIX.match(ref) or len(ref) > 36:
        raise InvalidInput(f"'{ref}' is not a job uuid")
    if len(ref) < MIN_PREFIX_LEN:
        raise InvalidInput(f"job uuid prefix '{ref}' is too short (at least {MIN_PREFIX_LEN} characters)")
    if len(ref) == 36 and not _UUID.match(ref):
        raise InvalidInput(f"'{ref}' is not a job uuid")
    return ref


def is_full_uuid(ref: str) -> bool:
    return bool(_UUID.match(ref))


def pick_by_prefix(ref: str, uuids) -> str:
    """The one uuid that ref names; LookupError if none, InvalidInput-like
    AmbiguousRef if several."""
    matches = sorted(u for u in uuids if u.startswith(ref))
    if not matches:
        raise LookupError(f"no job matches '{ref}'")
    if len(matches) > 1:
        raise AmbiguousRef(f"'{ref}' matches {len(matches)} jobs: give more of the uuid")
    return matches[0]


class AmbiguousRef(LookupError):
    pass


# --- units -----------------------------------------------------------------

def unit_name(job_uuid: str) -> str:
    return f"{UNIT_PREFIX}{job_uuid}{UNIT_SUFFIX}"


def uuid_of_unit(name: str) -> Optional[str]:
    if name.startswith(UNIT_PREFIX) and name.endswith(UNIT_SUFFIX):
        candidate = name[len(UNIT_PREFIX):-len(UNIT_SUFFIX)]
        if _UUID.match(candidate):
            return candidate
    return None


@dataclasses.dataclass(frozen=True)
class UnitStatus:
    """What systemd says about a job's unit (see units.py)."""
    active_state: str  # active, activating, deactivating, inactive, failed
    sub_state: str  # running, exited, failed, dead, ...
    result: str  # systemd's Result: success, exit-code, signal, timeout, oom-kill, ...
    exit_code: int  # ExecMainCode: 0 none yet, 1 exited, 2 killed, 3 dumped core
    exit_status: int  # ExecMainStatus: the exit status, or the signal number
    started_at: Optional[float] = None
    ended_at: Optional[float] = None

    @property
    def finished(self) -> bool:
        # With RemainAfterExit=yes a finished job's unit stays "active (exited)"
        # or "failed" until we have recorded it and unloaded it.
        return (self.active_state == "failed"
                or (self.active_state == "active" and self.sub_state == "exited")
                or self.active_state == "inactive")


CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


def outcome(status: UnitStatus):
    """(state, exit_status, reason) for a finished unit."""
    if status.exit_code == CLD_EXITED:
        exit_status = status.exit_status
        reason = f"exited with status {exit_status}"
    elif status.exit_code in (CLD_KILLED, CLD_DUMPED):
        exit_status = 128 + status.exit_status
        reason = f"killed by signal {status.exit_status}"
    else:
        exit_status = None
        reason = f"its unit did not run (systemd result: {status.result})"
    if status.result not in ("success", "exit-code", "signal", "core-dump"):
        reason = f"{reason} ({status.result})"
    ok = status.result == "success" and exit_status == 0
    return (SUCCEEDED if ok else FAILED), exit_status, reason


def finish(job: Job, status: UnitStatus, now: float) -> Job:
    state, exit_status, reason = outcome(status)
    return transition(job, state, exit_status=exit_status, result=status.result,
                      reason=reason, started_at=job.started_at or status.started_at,
                      ended_at=status.ended_at or now)


# --- scheduling and reconciliation -------------------------------------------

def free_slots(slots: int, busy: int) -> int:
    return max(0, slots - busy)


# What the node must do to bring etcd and systemd into agreement.
RECORD_RUNNING = "record-running"  # unit runs, record says starting
RECORD_END = "record-end"  # unit finished, record still live: record its outcome
RELEASE_UNIT = "release-unit"  # record terminal, unit still loaded: stop/unload it
REQUEUE = "requeue"  # claimed but never started (node restarted in between)
RECORD_VANISHED = "record-vanished"  # running, but its unit is gone (reboot?)


def reconcile(jobs, units, in_flight=frozenset()):
    """Plan for one node. jobs: {uuid: Job} of records that are live on this
    node, or whose unit is still loaded; units: {uuid: UnitStatus} of this
    node's lcluster-job units; in_flight: uuids this process is starting now.
    Returns [(action, uuid)], in a stable order."""
    plan = []
    for job_uuid in sorted(set(jobs) | set(units)):
        job, unit = jobs.get(job_uuid), units.get(job_uuid)
        if job is None or job_uuid in in_flight:
            continue  # not ours to judge (unknown record, or being started now)
        if unit is None:
            if job.state == STARTING:
                plan.append((REQUEUE, job_uuid))
            elif job.state == RUNNING:
                plan.append((RECORD_VANISHED, job_uuid))
        elif job.terminal:
            plan.append((RELEASE_UNIT, job_uuid))
        elif unit.finished:
            plan.append((RECORD_END, job_uuid))
        elif job.state == STARTING and unit.active_state == "active":
            plan.append((RECORD_RUNNING, job_uuid))
    return plan


# --- the unit a job runs in ----------------------------------------------------

JOB_SLICE = "lcluster.slice"

# The sandbox every job gets (the isolation issue widens it). Each line says why.
SANDBOX = (
    ("PrivateTmp", True),  # its own /tmp, removed with the unit
    ("PrivateNetwork", True),  # its own network namespace with only loopback
    ("NoNewPrivileges", True),  # setuid binaries cannot raise its privileges
    ("ProtectSystem", "strict"),  # the host's / read-only
    ("ProtectHome", "yes"),  # no /home, /root, /run/user
)


def unit_properties(job: Job, stop_timeout: float, rootfs: Optional[str] = None,
                    namespace: Optional[str] = None):
    """The systemd properties of a job's transient service, as (name, value).
    rootfs: the job's / (else the host's, read-only); namespace: a named
    network namespace to join (else a private one)."""
    props = [
        ("Description", f"lcluster job {job.uuid}"),
        ("ExecStart", [("/bin/sh", ["/bin/sh", "-c", job.command], False)]),
        # Keep the unit, and with it the exit status, after the job exits,
        # until the daemon has recorded it (even across a daemon restart).
        ("RemainAfterExit", True),
        ("Slice", JOB_SLICE),
        ("Environment", [f"LCLUSTER_JOB_ID={job.uuid}"]),
        ("KillSignal", 15),  # SIGTERM first ...
        ("TimeoutStopUSec", int(stop_timeout * 1_000_000)),  # ... SIGKILL after this
        *SANDBOX,
    ]
    if rootfs:
        props += [("RootDirectory", rootfs), ("MountAPIVFS", True)]  # its own /proc, /dev
    if namespace:
        props = [p for p in props if p[0] != "PrivateNetwork"]
        props.append(("NetworkNamespacePath", f"/run/netns/{namespace}"))
    if job.uid != 0:
        props += [("User", str(job.uid)), ("Group", str(job.gid))]
    return props
