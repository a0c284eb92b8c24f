"""The pure core: the job model, its lifecycle, validation and the node's rules
(reconcile). Placement, dependencies and throttles are in scheduler.py.

Nothing here touches etcd, D-Bus, journald, sockets or the clock: callers
pass in what they observed (and the time), and get back new records or plans.
That keeps every rule testable without I/O.
"""

import dataclasses
import datetime
import hashlib
import hmac
import json
import re
import uuid as uuidlib
from typing import Optional

from lclusterd.inputs import (  # noqa: F401  (core.X as it was: see inputs.py)
    MAX_COMMAND_BYTES, MAX_BATCH, MAX_ARRAY, MIN_PREFIX_LEN, InvalidInput, TooLarge, utf8,
    validate_count, validate_command, validate_ref, _UUID, parse_size, parse_duration, parse_cpus,
    parse_tasks, SIZE_UNITS, DURATION_UNITS, MIN_MEMORY, MAX_MEMORY, MAX_DURATION, MAX_TASKS,
    MAX_ENV, MAX_ENV_BYTES, MAX_PATH, RESERVED_ENV, NAMESPACE_NAME, validate_env, validate_workdir,
    validate_network, string_list, AFTER_OK, AFTER_ANY, AFTER_FAILED, AFTER_MODES, MAX_AFTER,
    MAX_CONSTRAINTS, MAX_RUNNING, _label, validate_constraints, validate_max_running,
)

UNIT_PREFIX = "lcluster-job@"
UNIT_SUFFIX = ".service"


class Forbidden(Exception):
    """The caller may not do this (HTTP 403); the message is one line."""


class IllegalTransition(ValueError):
    """A state change the lifecycle table does not allow."""


class QuotaExceeded(Exception):
    """The caller has as many jobs queued as the node allows (HTTP 429)."""


class Conflict(Exception):
    """A record kept changing under us; the caller may retry (HTTP 409)."""


class Elsewhere(Exception):
    """The job ran on another node, whose output we cannot fetch (HTTP 502)."""


class Busy(Exception):
    """The thing is in use and cannot be changed now, e.g. forget a live node (HTTP 409)."""


# --- lifecycle -------------------------------------------------------------

QUEUED = "queued"
STARTING = "starting"  # assigned to a node (job.node), its unit not confirmed running yet
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
WARNED = "warned"  # being stopped, but its processes outlived the kill timeout
LOST = "lost"  # its node died or was cut off; passed through at once to queued or failed

STATES = (QUEUED, STARTING, RUNNING, SUCCEEDED, FAILED, CANCELLED, WARNED, LOST)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# Every allowed change of state, and why it happens. Anything else is refused.
TRANSITIONS = {
    (QUEUED, STARTING): "the primed node assigned it to a node (the record names it)",
    (QUEUED, CANCELLED): "removejob took it off the queue",
    (STARTING, RUNNING): "its unit started",
    (STARTING, QUEUED): "the node restarted before starting the unit: nothing ran, so requeue",
    (STARTING, FAILED): "systemd refused to start its unit",
    (STARTING, SUCCEEDED): "it finished before 'running' was recorded",
    (STARTING, CANCELLED): "removejob while its unit was being started",
    (RUNNING, SUCCEEDED): "its main process exited with status 0",
    (RUNNING, FAILED): "its main process failed, or its unit vanished",
    (RUNNING, CANCELLED): "removejob stopped it",
    (STARTING, LOST): "its node's lease expired (node failed or cut off), or the node found its unit gone",
    (RUNNING, LOST): "its node's lease expired (node failed or cut off), or the node found its unit gone",
    (LOST, QUEUED): "attempts left: requeued for another node",
    (LOST, FAILED): "no attempts left: failed for good (reason node-lost)",
    # A warned job keeps its node's slot; it leaves warned only when its last
    # process is gone, for the state it was going to (warned_from says which).
    (RUNNING, WARNED): "its unit was being stopped (timeout, fence) and still has processes "
                       "after the kill timeout",
    (CANCELLED, WARNED): "removejob's kill timeout passed and it still has processes",
    (WARNED, CANCELLED): "a removed job's processes finally ended",
    (WARNED, FAILED): "a stopped job's processes finally ended",
    (WARNED, SUCCEEDED): "its main process had exited 0; the rest finally ended",
}

MIN_PRIORITY, MAX_PRIORITY = -100, 100  # addjob --priority: higher runs first
DEFAULT_ATTEMPTS = 3  # runs a job gets in all when its nodes keep dying (addjob --retries)
MAX_ATTEMPTS = 100
NODE_LOST = "node-lost"  # the reason of a job that ran out of attempts


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
    # Who queued it (uid/user above are who it runs as: they differ when
    # root chose --user, or got nobody). None in records of older versions.
    submitter: Optional[str] = None
    submitter_uid: Optional[int] = None
    # What it asked for, with the node's defaults filled in (see job_spec).
    memory: Optional[int] = None  # bytes
    cpus: Optional[float] = None
    tasks: Optional[int] = None
    timeout: Optional[float] = None  # seconds
    env: tuple = ()  # "KEY=VALUE" strings
    workdir: Optional[str] = None
    network: Optional[str] = None  # none, host or ns:NAME; None: the node's default
    max_attempts: int = DEFAULT_ATTEMPTS
    priority: int = 0  # the queue's order: higher first, then oldest submission first
    # One entry per claim by a node: {"node", "started_at", "ended_at", "outcome"};
    # transition() opens and closes them.
    attempts: tuple = ()
    warned_at: Optional[float] = None  # when it became warned (kept once cleared)
    warning: Optional[str] = None  # why it was warned
    warned_from: Optional[str] = None  # the state it had then: what clearing returns to
    # Scheduling (issue 11). after: parent uuids; after_mode: AFTER_OK/ANY/FAILED
    # (None when after is empty). constraints: "KEY=VALUE" labels the node
    # must have. array: the array's id (uuid4) for its members, array_index
    # 0..N-1, max_running: the array's throttle (the same on every member).
    after: tuple = ()
    after_mode: Optional[str] = None
    constraints: tuple = ()
    array: Optional[str] = None
    array_index: Optional[int] = None
    max_running: Optional[int] = None
    # HMAC of what the job does and as whom (see sign): a node runs only what
    # a node of its cluster wrote. None: unsigned (never run where keys are set).
    signature: Optional[str] = None

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
        fields = {k: v for k, v in record.items() if k in names}
        fields["env"] = tuple(fields.get("env") or ())  # a JSON list
        fields["attempts"] = tuple(fields.get("attempts") or ())  # a JSON list
        fields["after"] = tuple(fields.get("after") or ())
        fields["constraints"] = tuple(fields.get("constraints") or ())
        return cls(**fields)

    @property
    def owner_uid(self) -> int:
        """Who may remove it besides root: its submitter."""
        return self.uid if self.submitter_uid is None else self.submitter_uid


def transition(job: Job, state: str, now: Optional[float] = None, **changes) -> Job:
    """The job in its new state, or IllegalTransition. Claiming (-> starting)
    opens an attempt on the claiming node; leaving starting/running closes it
    with the new state as its outcome (now: when; default the job's times)."""
    if (job.state, state) not in TRANSITIONS:
        raise IllegalTransition(f"job {job.uuid} cannot go from {job.state} to {state}")
    attempts = list(job.attempts)
    if state == STARTING:
        attempts.append({"node": changes.get("node"), "started_at": now,
                         "ended_at": None, "outcome": None})
    elif job.state in (STARTING, RUNNING, WARNED) and state not in (RUNNING, WARNED) and attempts:
        end = changes.get("ended_at") or now
        attempts[-1] = {**attempts[-1], "ended_at": end, "outcome": state}
    elif state == RUNNING and attempts and changes.get("started_at"):
        attempts[-1] = {**attempts[-1], "started_at": changes["started_at"]}
    return dataclasses.replace(job, state=state, attempts=tuple(attempts), **changes)


def new_job(command: str, uid: int, gid: int, user: str, now: float, **spec) -> Job:
    """spec: what job_spec() returned, and submitter/submitter_uid."""
    return Job(uuid=str(uuidlib.uuid4()), command=validate_command(command),
               uid=uid, gid=gid, user=user, submitted_at=now, **spec)


def new_jobs(commands, uid: int, gid: int, user: str, now: float, key: Optional[bytes] = None,
             array: Optional[str] = None, **spec) -> list:
    """One job per command, all alike but for their uuid (and command);
    array: their array's id, each member its array_index. Signed with key
    (None: unsigned) as sign() signs, but from one template: the signed
    fields they share are encoded once and no job is made twice
    (dataclasses.replace and the encoding per member were 3/4 of an array's
    making)."""
    template = Job(uuid="", command="", uid=uid, gid=gid, user=user, submitted_at=now,
                   array=array, array_index=None if array is None else 0, **spec)
    fields = dict(vars(template))
    pieces = None if key is None else _signed_pieces(template) if array else _shared_pieces(template)
    jobs, command_pieces = [], {}  # --count: one command, encoded once
    for index, command in enumerate(commands):
        changes = {"uuid": str(uuidlib.uuid4()), "command": validate_command(command)}
        if array is not None:
            changes["array_index"] = index
        if pieces is not None:
            if command not in command_pieces:
                command_pieces[command] = _signed_piece("command", command)
            # a uuid4 and an int are their own JSON
            own = {"uuid": f'["uuid","{changes["uuid"]}"]', "command": command_pieces[command]}
            if array is not None:
                own["array_index"] = f'["array_index",{index}]'
            changes["signature"] = _mac(key, _joined({**pieces, **own}))
        jobs.append(Job(**{**fields, **changes}))
    return jobs


def lose(job: Job, node: str, now: float) -> Job:
    """A starting/running job whose node is gone: requeued while it has
    attempts left, else failed for good with the reason node-lost. One record
    change: lost is where it passes through, written with its attempt."""
    lost = transition(job, LOST, now=now)
    if len(lost.attempts) < job.max_attempts:
        return transition(lost, QUEUED, node=None, started_at=None,
                          reason=f"node {node} was lost; requeued (attempt "
                                 f"{len(lost.attempts) + 1} of {job.max_attempts})")
    return transition(lost, FAILED, ended_at=now, reason=NODE_LOST)


# --- the cluster: nodes, the prime, failures ---------------------------------

READY, PRIMED, FAILED_NODE = "ready", "primed", "failed"  # node states (lclusterc nodes)
# Drained by lclusterc drain: no new placements; draining while its jobs still run.
DRAINING, DRAINED = "draining", "drained"


def lost_jobs(jobs, live_nodes):
    """uuids of starting/running jobs whose node holds no lease any more.
    jobs: iterable of Job; live_nodes: names of nodes with a lease."""
    return sorted(j.uuid for j in jobs
                  if j.state in (STARTING, RUNNING) and j.node and j.node not in live_nodes)


def failed_nodes(members, live_nodes, recorded):
    """Names of nodes that registered once (members) but hold no lease now and
    are not yet recorded as failed: to record."""
    return sorted(set(members) - set(live_nodes) - set(recorded))


def node_rows(members, live, failed, prime, drains=None, loads=None):
    """The table of `lclusterc nodes`: members {name: registration}, live
    {name: registration} (with a lease), failed {name: failure record},
    prime: the primed node's name or None, drains {name: drain record}
    (store.drains()), loads {name: scheduler.Load} (what its assigned jobs
    reserve). A member without a lease is failed (failed_at: when that was
    recorded, None until it is); a drained one is draining while jobs still
    run there, then drained. state: failed, else drained/draining, else
    primed/ready (prime says whether it holds the prime whatever its state)."""
    drains = drains or {}
    rows = []
    for name in sorted(set(members) | set(live)):
        alive = name in live
        info = live[name] if alive else members[name]
        load = (loads or {}).get(name)
        # with loads, the assigned keys count (a node absent there runs nothing);
        # else what the node last registered
        count = (load.jobs if load is not None else 0) if loads is not None else info.get("running", 0)
        running = count if alive else 0
        drain = drains.get(name)
        if not alive:
            state = FAILED_NODE
        elif drain is not None:
            state = DRAINING if running else DRAINED
        else:
            state = PRIMED if name == prime else READY
        rows.append({"name": name, "address": info.get("address"), "state": state,
                     "prime": alive and name == prime,
                     "slots": info.get("slots"),
                     "running": running,
                     "free": info.get("free") if alive else 0,
                     "failed_at": None if alive else (failed.get(name) or {}).get("at"),
                     # the limits it can enforce (None: a node too old to say)
                     "enforces": info.get("enforces"),
                     # capacity (None: a node too old to say) and what is reserved of it
                     "cpus": info.get("cpus"), "memory": info.get("memory"),
                     "labels": info.get("labels") or {},
                     "reserved_cpus": load.cpus if load is not None else 0.0,
                     "reserved_memory": load.memory if load is not None else 0,
                     "drain_reason": drain.get("reason") if drain is not None else None})
    return rows


def with_warned(rows, warned):
    """node_rows with each node's warned jobs: warned is {uuid: node name}."""
    return [{**row, "warned": sorted(u for u, name in warned.items() if name == row["name"])}
            for row in rows]


# --- validation ------------------------------------------------------------

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


# --- what a job asks for: limits, environment, working directory, network, user

def show_size(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return str(size)


def human_size(size) -> str:
    """A size rounded for people: 8.0G, 3.1G, 512.0M (show_size is exact, for
    values given back as the user may write them)."""
    for unit in ("T", "G", "M", "K"):
        if size >= SIZE_UNITS[unit]:
            return f"{size / SIZE_UNITS[unit]:.1f}{unit}"
    return f"{int(size)}B"


def show_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds % DURATION_UNITS[unit] == 0:
            return f"{int(seconds // DURATION_UNITS[unit])}{unit}"
    return f"{seconds:g}s"


# The limits a job may ask for. The node's config has default_<name> (what a
# job gets when it asks for nothing) and max_<name> (a request over it is
# refused at submission) for each; None means none.
LIMITS = (
    # name, parse, show
    ("memory", parse_size, show_size),  # MemoryMax: the kernel OOM-kills past it
    ("cpus", parse_cpus, "{:g}".format),  # CPUQuota: CPU time per second, in CPUs
    ("tasks", parse_tasks, str),  # TasksMax: processes and threads; fork fails past it
    ("timeout", parse_duration, show_duration),  # RuntimeMaxSec: stopped past it
)

_USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.I)

# What a job's network may be. 'none' is always allowed (it is what every job
# gets unless the node says otherwise); the others only where the node's
# config lists them in job_networks ('host', 'ns:NAME' or 'ns:*').
NETWORKS = {
    "none": "its own network namespace with only loopback",
    "host": "the node's own network",
    "ns:NAME": "the named network namespace /run/netns/NAME",
}


def network_allowed(network: str, allowed) -> bool:
    """allowed: the node's job_networks ('host', 'ns:NAME', 'ns:*')."""
    return (network == "none" or network in allowed
            or (network.startswith("ns:") and "ns:*" in allowed))


def job_spec(request: dict, policy) -> dict:
    """The Job fields for what a submission asks (memory, cpus, tasks,
    timeout, env, workdir, network, max_attempts, priority), parsed, with
    policy's defaults filled in and checked against its maxima and allowed
    networks. policy: the node's
    Config (default_<limit>, max_<limit>, job_networks). InvalidInput for a
    malformed value, Forbidden for one the node does not allow."""
    spec = {}
    for name, parse, show in LIMITS:
        value = request.get(name)
        value = parse(value) if value is not None else getattr(policy, f"default_{name}")
        ceiling = getattr(policy, f"max_{name}")
        if value is not None and ceiling is not None and value > ceiling:
            raise InvalidInput(f"{name} {show(value)} is over this node's maximum of {show(ceiling)}")
        spec[name] = value
    if request.get("env") is not None:
        spec["env"] = validate_env(request["env"])
    if request.get("workdir") is not None:
        spec["workdir"] = validate_workdir(request["workdir"])
    if request.get("network") is not None:
        network = validate_network(request["network"])
        if not network_allowed(network, policy.job_networks):
            raise Forbidden(f"network {network} is not allowed on this node "
                            f"(its config's job_networks: {', '.join(policy.job_networks) or 'none'})")
        spec["network"] = network
    if request.get("max_attempts") is not None:
        spec["max_attempts"] = validate_attempts(request["max_attempts"])
    if request.get("priority") is not None:
        spec["priority"] = validate_priority(request["priority"])
    after = validate_after(request.get("after"))
    mode = request.get("after_mode")
    if mode is not None and mode not in AFTER_MODES:
        raise InvalidInput(f"after_mode must be one of {', '.join(AFTER_MODES)}, not '{str(mode)[:40]}'")
    if mode is not None and not after:
        raise InvalidInput("after_mode needs after (the parent jobs)")
    if after:
        spec["after"], spec["after_mode"] = after, mode or AFTER_OK
    if request.get("constraints") is not None:
        spec["constraints"] = validate_constraints(request["constraints"])
    if request.get("max_running") is not None:
        # the node keeps it only for arrays (count or commands): it throttles members
        spec["max_running"] = validate_max_running(request["max_running"])
    return spec


NOBODY = "nobody"


def run_as(caller_uid: int, caller_user: str, requested) -> Optional[str]:
    """The user a job runs as: None for the caller itself, else a name to look
    up. Root may choose anyone; a root job without --user runs as nobody, so
    that a job runs as root only when root asked for it by name (and a job
    for nobody runs as a dynamic user of its own: see dynamic_user)."""
    if requested is None:
        return NOBODY if caller_uid == 0 else None
    if not isinstance(requested, str) or not _USER_NAME.fullmatch(requested):
        raise InvalidInput(f"'{requested}' is not a user name")
    if caller_uid != 0:
        if requested == caller_user:
            return None
        raise Forbidden("permission denied: only root may run jobs as another user")
    return requested
def validate_priority(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidInput(f"priority must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}")
    return value


def queue_rank(job: Job) -> str:
    """The job's place in the queue as a string that sorts in queue order:
    higher priority first, then earlier submission, then uuid."""
    return f"{MAX_PRIORITY - job.priority:03d}-{int(job.submitted_at * 1e9):020d}-{job.uuid}"


def validate_attempts(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ATTEMPTS:
        raise InvalidInput(f"retries must be a whole number from 1 to {MAX_ATTEMPTS} (attempts in all)")
    return value


# --- dependencies, constraints, arrays ------------------------------------------

def validate_after(value) -> tuple:
    """Parent uuids from a list or a comma-separated string: full uuids
    (lower-cased, repeats dropped, order kept); () for None or empty."""
    parents = []
    for ref in string_list(value, "after must be a list of job uuids"):
        ref = ref.strip().lower()
        if not _UUID.match(ref):
            raise InvalidInput(f"after: '{ref[:40]}' is not a full job uuid")
        if ref not in parents:
            parents.append(ref)
    if len(parents) > MAX_AFTER:
        raise InvalidInput(f"after: at most {MAX_AFTER} parent jobs")
    return tuple(parents)


def parse_labels(text) -> dict:
    """A node's labels from "rack=a,ssd=yes" (config labels =); {} for empty."""
    labels = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        key, value = _label(entry, "label")
        if key in labels:
            raise InvalidInput(f"label {key} is given twice")
        labels[key] = value
    return labels


def node_labels(name: str, labels: dict) -> dict:
    """What a node registers as its labels: its config's, and node=<its name>
    always (so --constraint node=n2 pins a job to n2)."""
    return {**labels, "node": name}


# --- history -----------------------------------------------------------------

LIVE_ORDER = (WARNED, RUNNING, STARTING, QUEUED)  # how `list` shows live jobs, first


def select(jobs, state=None, node=None, user=None, since=None, until=None, limit=None):
    """The jobs a listing shows: those matching every filter given (user: who
    queued it or whom it runs as; since and until bound the submission
    time), live ones first (in LIVE_ORDER, newest
    first), then finished ones, latest ended first; at most limit."""
    def wanted(job):
        return ((state is None or job.state == state) and (node is None or job.node == node)
                and (user is None or user in (job.submitter, job.user))
                and (since is None or job.submitted_at >= since)
                and (until is None or job.submitted_at <= until))

    def order(job):
        if job.terminal:
            return (len(LIVE_ORDER), -(job.ended_at or job.submitted_at))
        return (LIVE_ORDER.index(job.state), -job.submitted_at)
    chosen = sorted((j for j in jobs if wanted(j)), key=order)
    return chosen if limit is None else chosen[:limit]


def finished_at(job):
    """When a finished record counts as finished (the history's order): its
    end, or its submission if it has none."""
    return job.ended_at or job.submitted_at


def expired(jobs, now, retention, max_finished):
    """uuids of finished records to delete: those that ended more than
    retention seconds ago, and all but the max_finished latest. Live records
    (warned ones too) are never deleted."""
    finished = sorted((finished_at(j), j.uuid) for j in jobs if j.terminal)
    return expired_among(finished, len(finished), now, retention, max_finished)


def expired_among(oldest, total, now, retention, max_finished):
    """expired()'s rule given only the oldest of the total finished records,
    as [(finished_at, uuid)] oldest first (ties by uuid): the uuids of those
    to delete among them. The doomed are always the oldest, so once one of
    `oldest` is kept, every later record is kept too (history.py reads the
    history from its oldest end, a batch at a time, and stops there)."""
    over = total - max_finished
    return [u for i, (at, u) in enumerate(oldest) if i < over or now - at > retention]


# --- times as people write them -------------------------------------------------

def parse_when(text, now: float) -> float:
    """A moment as seconds since the epoch: an age before now ('2d', '6h',
    as parse_duration reads it) or an ISO date or time ('2026-11-28',
    '2026-11-28 14:00', local time unless it says its zone)."""
    try:
        return now - parse_duration(text)
    except InvalidInput:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise InvalidInput(f"'{text}' is not a time: give an age (2d, 6h, 30m) or a date "
                           "(2026-11-28, '2026-11-28 14:00')") from None
    return (moment if moment.tzinfo else moment.astimezone()).timestamp()


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
    oom_killed: bool = False  # OOM_CHECK saw the kernel OOM-kill in its cgroup
    stopped_at: Optional[float] = None  # when it left "active" (a stop began, or it ended)
    processes: int = 0  # processes left in its cgroup, counted once it is no longer active
    pending: bool = False  # a job of systemd's is queued for it (a start not yet run)
    oom_kills: int = 0  # the kernel's count of OOM kills in its memory cgroup (0: none or unknown)

    @property
    def finished(self) -> bool:
        # With RemainAfterExit=yes a finished job's unit stays "active (exited)"
        # or "failed" until we have recorded it and unloaded it. Processes left
        # behind (systemd gave up killing them) mean it has not finished.
        # A unit is read with several calls (units.py), not atomically: only a
        # main process with an exit code has ended. Under load systemd runs
        # its queue of start jobs last, so a unit just started can read
        # "inactive" with its start still pending (the ExecMain* values all
        # zero): that is not an end, and neither is an "inactive" read whose
        # main process started after the state was read.
        if self.processes:
            return False
        if self.active_state == "failed":
            return True  # also without an exit code: its start failed in systemd
        if self.active_state == "active" and self.sub_state == "exited":
            return self.exit_code != 0
        if self.active_state == "inactive":
            # Never started and nothing pending: its start was cancelled.
            return self.exit_code != 0 or (not self.pending and self.started_at is None)
        return False

    @property
    def oom(self) -> bool:
        return self.oom_killed or self.oom_kills > 0


CLD_EXITED, CLD_KILLED, CLD_DUMPED = 1, 2, 3


def result_of(status: UnitStatus) -> str:
    """systemd's Result, or oom-kill where the kernel OOM-killed in the unit
    but systemd did not say so (cgroup v1; or the job survived the kill:
    on cgroup v2 systemd's OOMPolicy=stop would have ended it oom-kill)."""
    if status.oom and status.result in ("success", "exit-code", "signal", "core-dump"):
        return "oom-kill"
    return status.result


def outcome(status: UnitStatus):
    """(state, exit_status, reason) for a finished unit."""
    result = result_of(status)
    if status.exit_code == CLD_EXITED:
        exit_status = status.exit_status
        reason = f"exited with status {exit_status}"
    elif status.exit_code in (CLD_KILLED, CLD_DUMPED):
        exit_status = 128 + status.exit_status
        reason = f"killed by signal {status.exit_status}"
    else:
        exit_status = None
        reason = f"its unit did not run (systemd result: {result})"
    if result == "oom-kill" and status.oom_kills:
        kills = "1 OOM kill" if status.oom_kills == 1 else f"{status.oom_kills} OOM kills"
        if status.oom_kills >= OOM_KILLS_MAX:
            kills = f"{OOM_KILLS_MAX} or more OOM kills"
        reason = f"{reason} (oom-kill: {kills} in its memory cgroup)"
    elif result not in ("success", "exit-code", "signal", "core-dump"):
        reason = f"{reason} ({result})"  # which limit it hit: timeout, oom-kill, ...
    ok = result == "success" and exit_status == 0
    return (SUCCEEDED if ok else FAILED), exit_status, reason


def finish(job: Job, status: UnitStatus, now: float) -> Job:
    state, exit_status, reason = outcome(status)
    return transition(job, state, exit_status=exit_status, result=result_of(status),
                      reason=reason, started_at=job.started_at or status.started_at,
                      ended_at=status.ended_at or now)


# --- warned jobs ---------------------------------------------------------------

# Seconds after stop_timeout (SIGTERM's grace, then SIGKILL) within which a
# job's processes must be gone; past it the job is warned.
KILL_GRACE = 5.0
WARNABLE = (RUNNING, CANCELLED)  # the states a stop starts from (timeout/fence, removejob)


def stuck(status: UnitStatus, now: float, stop_timeout: float) -> bool:
    """The unit left "active" more than stop_timeout + KILL_GRACE ago and
    still has processes: systemd could not kill them (frozen, or blocked in
    uninterruptible sleep)."""
    return (status.active_state != "active" and status.processes > 0
            and status.stopped_at is not None
            and now - status.stopped_at > stop_timeout + KILL_GRACE)


def warn(job: Job, now: float, why: str) -> Job:
    return transition(job, WARNED, warned_at=now, warning=why, warned_from=job.state)


def clear(job: Job, status: Optional[UnitStatus], now: float) -> Job:
    """A warned job whose processes are gone (status None: its unit too),
    in the state it was going to."""
    if job.warned_from == CANCELLED:
        return transition(job, CANCELLED, ended_at=now)
    if status is not None and status.exit_code:
        return finish(job, status, now)
    # systemd gave up on it before its main process died: no exit status.
    result = status.result if status is not None else None
    return transition(job, FAILED, ended_at=now, result=result,
                      reason=f"stopped{f' ({result})' if result else ''}; its processes ended "
                             f"{now - job.warned_at:.0f} s after it was warned")


def settle(job: Job, status: UnitStatus, now: float) -> Optional[Job]:
    """The record once its unit has finished; None: nothing to change."""
    if job.terminal:
        return None
    if job.state == WARNED:
        return clear(job, status, now)
    return finish(job, status, now)


# --- scheduling and reconciliation -------------------------------------------

def free_slots(slots: int, busy: int) -> int:
    return max(0, slots - busy)


def slot_holders(jobs, units, settled, node):
    """uuids that hold one of node's slots after a sweep: its live records
    (not those requeued or taken by another node meanwhile: their units
    here are being stopped, and count only while loaded) and its loaded
    units, less those the sweep settled."""
    live = {u for u, job in jobs.items() if not job.terminal and job.node == node}
    return (live | set(units)) - set(settled)


# What the node must do to bring etcd and systemd into agreement.
RECORD_RUNNING = "record-running"  # unit runs, record says starting
RECORD_END = "record-end"  # unit finished, record still live: record its outcome
RELEASE_UNIT = "release-unit"  # record terminal, unit still loaded: stop/unload it
START_UNIT = "start-unit"  # assigned to this node (starting), no unit yet: start it
RECORD_VANISHED = "record-vanished"  # running, but its unit is gone (reboot, fencing): lose it
RELEASE_ORPHAN = "release-orphan"  # a unit whose record is gone (deleted): stop and release it
WARN = "warn"  # its unit would not stop: record it warned (it keeps its slot)
CLEAR = "clear"  # a warned job's processes are gone: record its final state


def reconcile(jobs, units, in_flight=frozenset(), node=None, now=None, stop_timeout=None,
              gone=frozenset()):
    """Plan for one node. jobs: {uuid: Job} of records that are live on this
    node, or whose unit is still loaded; units: {uuid: UnitStatus} of this
    node's lcluster-job units; in_flight: uuids this process is starting now;
    node: this node's name (a unit whose record names another node, or none,
    was taken from us while we were failed or cut off: fence it);
    now and stop_timeout: to tell stuck units (none without them);
    gone: uuids whose record was looked for and is not there (deleted by
    hand or by another tool): their units hold a slot for nothing.
    Returns [(action, uuid)], in a stable order."""
    plan = []
    for job_uuid in sorted(set(jobs) | set(units)):
        job, unit = jobs.get(job_uuid), units.get(job_uuid)
        if job_uuid in in_flight:
            continue  # being started now: judged once its start is recorded
        if job is None:
            if unit is not None and job_uuid in gone:
                plan.append((RELEASE_ORPHAN, job_uuid))
            continue  # else not ours to judge (a record not read)
        ours = node is None or job.node == node
        if job.state == WARNED:
            if unit is None or unit.finished:
                plan.append((CLEAR, job_uuid))
        elif (unit is not None and ours and job.state in WARNABLE and now is not None
                and stuck(unit, now, stop_timeout)):
            plan.append((WARN, job_uuid))
        elif not ours and not job.terminal:
            if unit is not None:  # another node's job now (or queued again): fence ours
                plan.append((RELEASE_UNIT, job_uuid))
        elif unit is None:
            if job.state == STARTING:
                plan.append((START_UNIT, job_uuid))
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

# The sandbox every job gets, whatever it asks. Each line says why.
SANDBOX = (
    ("NoNewPrivileges", True),  # setuid binaries cannot raise its privileges
    ("ProtectSystem", "strict"),  # the whole file system read-only but /dev, /proc, /sys, its /tmp
    ("ProtectHome", "yes"),  # no /home, /root, /run/user
    ("PrivateDevices", True),  # a /dev with only null, zero, random, tty...: no disks
    ("PrivateIPC", True),  # SysV IPC and POSIX queues of its own, gone with its last process
    ("ProtectKernelTunables", True),  # /proc/sys, /sys read-only
    ("ProtectKernelModules", True),  # no module loading
    ("ProtectKernelLogs", True),  # no kernel log (/dev/kmsg, syslog(2))
    ("ProtectControlGroups", True),  # /sys/fs/cgroup read-only: cannot lift its limits
    ("ProtectClock", True),  # cannot set the node's clock
    ("ProtectHostname", True),  # cannot rename the node
    ("ProtectProc", "invisible"),  # other users' processes are not in its /proc
    ("RestrictSUIDSGID", True),  # cannot make setuid/setgid files
    ("LockPersonality", True),  # cannot change its execution domain
    ("RestrictRealtime", True),  # no realtime scheduling: it cannot starve the node
    ("RestrictNamespaces", 0),  # no namespace of its own making (user namespaces included)
    # Sockets: local and IP only (no raw packets, netlink, bluetooth, ...).
    ("RestrictAddressFamilies", (True, ["AF_UNIX", "AF_INET", "AF_INET6"])),
    ("SystemCallArchitectures", ["native"]),  # no 32-bit syscall ABI to slip past filters
)

# Each job's /tmp, /var/tmp and /dev/shm are tmpfs of their own of this many
# bytes (config job_tmp_size sets it), gone with the job; their pages count
# against the job's memory limit too. (/dev/shm would otherwise be the
# host's: shared by every job and kept after them.)
DEFAULT_JOB_TMP_SIZE = 256 << 20


def dynamic_user(job: Job) -> Optional[str]:
    """The user a job for nobody runs as: a dynamic user of its own (systemd
    allocates its uid while the job runs), so that no two such jobs share a
    uid (they could read each other's /proc/PID/environ and kill each
    other). The name is unique per job and valid for systemd (31 chars at most)."""
    return f"lcj-{job.uuid.replace('-', '')[:27]}" if job.user == NOBODY else None


def exec_arg(text: str) -> str:
    """An ExecStart=/ExecStopPost= argument as systemd must get it to pass it
    on unchanged: at exec time systemd substitutes ${NAME} and $NAME with the
    unit's environment and $$ with $, also in transient units set over D-Bus
    (seen: `echo "${X} $$"` printed " $"). $$ is its escape for one $; '%'
    specifiers are not expanded over D-Bus."""
    return text.replace("$", "$$")


# systemd 252 reads the kernel's count of OOM kills only on cgroup v2, where
# it makes Result=oom-kill. On cgroup v1 (hybrid hosts) this failure-ignoring
# ExecStopPost reads the count from the job's memory cgroup while it still
# exists (memory.oom_control on v1, memory.events on v2), and exits
# OOM_SEEN + the count (at most OOM_KILLS_MAX) if the kernel OOM-killed in
# it; units.py reads that exit status back (UnitStatus.oom_kills). It runs in
# the job's sandbox (a privileged one would be chrooted into a rootfs without
# its /proc), with shell builtins only; the job can fake nothing but its own
# OOM. It runs when the unit stops: for a job that fails (most OOM-killed
# jobs do) before it is recorded; a job whose main process exited 0 after the
# OOM killer took a child stays "active (exited)" with its empty cgroup
# already released by systemd: units.OomWatch counts those as they happen.
OOM_SEEN = 100
OOM_KILLS_MAX = 155  # OOM_SEEN + this = 255, the highest exit status
OOM_CHECK = exec_arg(
    "cg=; v2=; while read -r l; do case $l in *:memory:*) cg=memory${l#*:memory:};; "
    "0::*) v2=${l#0::};; esac; done </proc/self/cgroup; "
    "if [ -n \"$cg\" ]; then f=/sys/fs/cgroup/$cg/memory.oom_control; "
    "elif [ -n \"$v2\" ]; then f=/sys/fs/cgroup$v2/memory.events; else exit 0; fi; "
    "while read -r k v; do [ \"$k\" = oom_kill ] && [ \"$v\" -gt 0 ] && "
    "{ [ \"$v\" -lt %d ] || v=%d; exit $((%d + v)); }; done 2>/dev/null <\"$f\"; exit 0"
    % (OOM_KILLS_MAX, OOM_KILLS_MAX, OOM_SEEN))


# journald's default rate limit (10,000 lines per 30 s, scaled by free space)
# drops a chatty job's lines without a trace: a job's output is its result, so
# allow a million lines a second (journald's size limits still bound its space).
# (An interval of 0 would not do: systemd 252 reads it as "journald's default".)
JOB_LOG_RATE_LIMIT = (
    ("LogRateLimitIntervalUSec", 1_000_000),
    ("LogRateLimitBurst", 1_000_000),
)


def array_env(job: Job) -> list:
    """An array member learns which one it is (Slurm's SLURM_ARRAY_TASK_ID)."""
    if job.array is None:
        return []
    return [f"LCLUSTER_ARRAY_ID={job.array}", f"LCLUSTER_ARRAY_INDEX={job.array_index}"]


# With PrivatePIDs= (systemd 257 on) the process systemd starts is PID 1 of
# the job's own PID namespace, and the kernel gives PID 1 only the signals it
# has a handler for, even SIGKILL when sent from inside: a job's shell there
# would ignore `kill -9 $$`, or a TERM it sends itself. So a shell runs first
# as the namespace's init and the job's `sh -c CMD` runs as its child, in the
# foreground (an async list would ignore SIGINT and SIGQUIT), with `exit $?`
# after it (dash would otherwise exec it as the last simple command, making it
# PID 1 again). The init's own stderr is /dev/null: it would add "Killed" to
# the job's output when its command dies of a signal; the job's shell gets
# the original stderr back in the subshell it is exec'd from, without the
# spare fd 3. Until it has started the job's shell the init takes SIGTERM
# as a shell would (exit 143): a removejob in that moment would otherwise be
# lost on it, and the job run until the SIGKILL after stop_timeout; then it
# goes back to ignoring it (the job's shell gets systemd's SIGTERM itself,
# and its exit status stays the init's). A shell rather than tini:
# /bin/sh is in every rootfs a job may run in (sandbox.check_rootfs), tini is
# not. The job's $0, $#, environment, output and exit status stay those of
# `sh -c CMD`; one difference shows: a command
# killed by signal n makes the init exit 128+n, as a shell's $? says it, so
# the record reads "exited with status 137" where it read "killed by signal 9".
# When the init exits the kernel kills what is left in the namespace: a
# job's background processes end with its shell.
PID_INIT = ('trap "exit 143" TERM; exec 3>&2 2>/dev/null; trap - TERM; '
            '(exec /bin/sh -c "$1" 2>&3 3>&-); exit $?')


def job_exec_start(command: str, private_pids: bool = False) -> list:
    """ExecStart= of a job's unit: `/bin/sh -c COMMAND`, under PID_INIT in
    its own PID namespace."""
    if private_pids:
        argv = ["/bin/sh", "-c", exec_arg(PID_INIT), "/bin/sh", exec_arg(command)]
    else:
        argv = ["/bin/sh", "-c", exec_arg(command)]
    return [("/bin/sh", argv, False)]


def unit_properties(job: Job, stop_timeout: float, rootfs: Optional[str] = None,
                    namespace: Optional[str] = None, tmp_size: int = DEFAULT_JOB_TMP_SIZE,
                    private_pids: bool = False):
    """The systemd properties of a job's transient service, as (name, value).
    rootfs: the job's / (else the host's, read-only); namespace: the node's
    network namespace for jobs that ask for none (else a private one);
    tmp_size: bytes of each of its private /tmp, /var/tmp and /dev/shm;
    private_pids: the node's systemd has PrivatePIDs= (units.service_has)."""
    dynamic = dynamic_user(job)
    props = [
        ("Description", f"lcluster job {job.uuid}"),
        ("ExecStart", job_exec_start(job.command, private_pids)),
        # Keep the unit, and with it the exit status, after the job exits,
        # until the daemon has recorded it (even across a daemon restart).
        ("RemainAfterExit", True),
        ("Slice", JOB_SLICE),
        ("Environment", [f"LCLUSTER_JOB_ID={job.uuid}", *array_env(job), *job.env]),
        ("KillSignal", 15),  # SIGTERM first ...
        ("TimeoutStopUSec", int(stop_timeout * 1_000_000)),  # ... SIGKILL after this
        *JOB_LOG_RATE_LIMIT,
        *SANDBOX,
    ]
    tmpfs = f"size={int(tmp_size)},mode=1777,nosuid,nodev"
    if dynamic:
        # DynamicUser= always gives /tmp and /var/tmp of systemd's PrivateTmp=
        # (which takes precedence over a tmpfs there): only /dev/shm is ours.
        props += [("DynamicUser", True), ("User", dynamic),
                  ("TemporaryFileSystem", [("/dev/shm", tmpfs + ",noexec")])]
    else:
        props += [("PrivateTmp", False),  # the tmpfs below instead: bounded
                  ("TemporaryFileSystem", [("/dev/shm", tmpfs + ",noexec"), ("/tmp", tmpfs),
                                           ("/var/tmp", tmpfs)])]
    if private_pids:
        props.append(("PrivatePIDs", "yes"))  # it sees only its own processes (systemd 257)
    network = job.network or (f"ns:{namespace}" if namespace else "none")
    if network == "none":
        props.append(("PrivateNetwork", True))  # its own namespace with only loopback
    elif network.startswith("ns:"):
        props.append(("NetworkNamespacePath", f"/run/netns/{network[3:]}"))
    if rootfs:
        props += [("RootDirectory", rootfs), ("MountAPIVFS", True)]  # its own /proc, /dev
    if job.workdir:
        props.append(("WorkingDirectory", job.workdir))
    if job.uid != 0:
        if not dynamic:
            props += [("User", str(job.uid)), ("Group", str(job.gid))]
        props.append(("CapabilityBoundingSet", 0))  # no capability, even through a setuid binary
    if job.memory is not None:
        props += [("MemoryMax", job.memory), ("MemorySwapMax", 0),  # no swapping past it
                  ("ExecStopPostEx", [("/bin/sh", ["/bin/sh", "-c", OOM_CHECK],
                                       ["ignore-failure"])])]
    if job.cpus is not None:
        props.append(("CPUQuotaPerSecUSec", int(job.cpus * 1_000_000)))
    if job.tasks is not None:
        # PID_INIT is one of the unit's tasks, not one of the job's.
        props.append(("TasksMax", job.tasks + (1 if private_pids else 0)))
    if job.timeout is not None:
        props.append(("RuntimeMaxUSec", int(job.timeout * 1_000_000)))  # then Result=timeout
    return props


# --- record signing (contract C3) ----------------------------------------------
#
# etcd may be writable by others than the daemons (a default etcd has no
# authentication). Every node signs the fields of a job that decide what runs
# and as whom with a key derived from the cluster's token, and runs only a
# record whose signature verifies: whoever writes etcd without the token can
# delete or stall jobs, never make a node run anything.

SIGNING_CONTEXT = b"lclusterd record signing v1"
# Fixed at submission: what runs, as whom, with which limits, for whom. The
# fields a node changes later (state, node, times, attempts) are not signed.
SIGNED_FIELDS = ("uuid", "command", "uid", "gid", "user", "env", "memory", "cpus", "tasks",
                 "timeout", "workdir", "network", "submitter", "submitter_uid")
# Signed too, but only when set (not their default): records written before
# these fields existed keep their signatures. Setting or clearing one changes
# the signed bytes either way, so neither can be done without the key.
SIGNED_IF_SET = ("after", "after_mode", "constraints", "array", "array_index", "max_running")


def signing_key(token: str) -> bytes:
    """The key records are signed with, derived from the cluster token (the
    token itself never becomes a record's MAC key). Surrounding blanks (a
    token file's newline) do not count."""
    token = (token or "").strip()
    if not token:
        raise ValueError("the cluster token is empty: records cannot be signed")
    return hmac.new(token.encode(), SIGNING_CONTEXT, hashlib.sha256).digest()


def _signed_bytes(job: Job) -> bytes:
    return _joined(_signed_pieces(job))


def _signed_pieces(job: Job) -> dict:
    """{name: its [name, value] in JSON} of each field signed, in order."""
    names = list(SIGNED_FIELDS) + [name for name in SIGNED_IF_SET if getattr(job, name) not in (None, ())]
    return {name: _signed_piece(name, getattr(job, name)) for name in names}


_OWN = ("uuid", "command", "array_index")  # the signed fields jobs made alike differ in
_SHARED = {}  # (field, type, value) of the others -> their _signed_pieces
MAX_SHARED = 256


def _shared_pieces(template: Job) -> dict:
    """_signed_pieces(template), remembered for the next single submission
    alike (a user's repeat theirs: the encoding was a sixth of one's CPU).
    The type is in the key: 1 and True are equal but sign differently."""
    known = tuple((name, type(value), value) for name in SIGNED_FIELDS + SIGNED_IF_SET
                  if name not in _OWN for value in (getattr(template, name),))
    try:
        pieces = _SHARED.get(known)
    except TypeError:  # an unhashable value: no node makes one
        return _signed_pieces(template)
    if pieces is None:
        if len(_SHARED) >= MAX_SHARED:
            _SHARED.clear()
        pieces = _SHARED[known] = _signed_pieces(template)
    return pieces


def _signed_piece(name, value) -> str:
    if name in ("cpus", "timeout") and value is not None:
        value = repr(float(value))  # 600 and 600.0 are one timeout
    elif name in ("env", "after", "constraints"):
        value = list(value)
    return _SIGNED_JSON.encode([name, value])


# JSON with ASCII escapes: a canonical form even for lone surrogates. One
# encoder: json.dumps with options makes one a call.
_SIGNED_JSON = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))


def _joined(pieces: dict) -> bytes:
    """The signed bytes: the JSON list of the pieces (json.dumps of the
    whole list gives the same bytes, which records of older nodes hold)."""
    return ("[" + ",".join(pieces.values()) + "]").encode("ascii")


def _mac(key: bytes, signed: bytes) -> str:
    return hmac.new(key, signed, hashlib.sha256).hexdigest()


def sign(job: Job, key: bytes) -> Job:
    """The job with its signature set (HMAC-SHA256, hex)."""
    return dataclasses.replace(job, signature=_mac(key, _signed_bytes(job)))


def verify(job: Job, key: bytes) -> bool:
    """True when the record's signed fields are what a holder of key signed."""
    if not isinstance(job.signature, str) or not job.signature.isascii():
        return False
    try:
        expected = _mac(key, _signed_bytes(job))
    except (TypeError, ValueError):  # a field no node writes (cpus "x", ...)
        return False
    return hmac.compare_digest(job.signature, expected)


# The reason of a job whose record does not verify (contract C3).
UNSIGNED = "record signature does not verify: not written by a node of this cluster"
