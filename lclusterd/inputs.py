"""The checks of what a user submits that `lclusterc addjob` runs before it
sends anything (the daemon runs them again): pure, and light to import.

quick.py (the addjob path) imports this instead of core: core's own imports
(dataclasses, typing, hashlib, uuid, datetime) cost about as much as the rest
of a submission (issue 13). So this module imports nothing at the top: its
patterns are compiled when first used (re, with the enum it imports, is a
fifth of an `addjob COMMAND`'s start-up, which needs none of them); core
imports everything here back, and core.X stays what it was.
"""


class _Pattern:
    """A regular expression compiled on its first match or fullmatch."""

    def __init__(self, pattern):
        self.pattern = pattern
        self._compiled = None

    def __getattr__(self, name):  # match, fullmatch, ...: the compiled pattern's
        if self._compiled is None:
            import re
            self._compiled = re.compile(self.pattern)
        return getattr(self._compiled, name)


MAX_COMMAND_BYTES = 64 * 1024
# What shares one etcd transaction with a compare per job (a group commit):
# at most 64 (etcd's default --max-txn-ops is 128).
MAX_BATCH = 64
# An array's members share one transaction guarded by its one new key
# (store.submit_many): 1,000 `true` jobs are about 1.1 MB of etcd's 1.5 MiB.
# Whether an array's records fit one transaction the daemon finds from their
# sizes (verbs.py); a too-big array is refused there, as TooLarge.
MAX_ARRAY = 1000
MIN_PREFIX_LEN = 4


class InvalidInput(ValueError):
    """The user gave something we refuse; the message is one line for them."""


class TooLarge(InvalidInput):
    """The request is over a size bound (HTTP 413); the message says which."""


def utf8(text: str, what: str) -> str:
    """text, if it can be sent on as UTF-8 (to etcd, over D-Bus): a lone
    surrogate (from undecodable bytes, or a JSON \\udc80 escape) cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid UTF-8") from None
    return text


def validate_count(count) -> int:
    """How many members one array (count copies, or commands) may have."""
    if type(count) is not int or count < 1:
        raise InvalidInput("count must be a whole number of at least 1")
    if count > MAX_ARRAY:
        raise InvalidInput(f"an array holds at most {MAX_ARRAY} jobs; queue more as several arrays")
    return count


def validate_command(command) -> str:
    if not isinstance(command, str):
        raise InvalidInput("command must be a string")
    if not command.strip():
        raise InvalidInput("command is empty")
    if "\0" in command:
        raise InvalidInput("command contains a NUL byte")
    # undecodable bytes in argv arrive as surrogates
    if len(utf8(command, "command").encode("utf-8")) > MAX_COMMAND_BYTES:
        raise InvalidInput(f"command is longer than {MAX_COMMAND_BYTES} bytes")
    return command


_UUID = _Pattern(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PREFIX = _Pattern(r"^[0-9a-f-]+$")


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


# --- what a job asks for: limits, environment, working directory, network

SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = _Pattern(r"(?i)^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$")
_DURATION = _Pattern(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
MIN_MEMORY = 1024 ** 2  # less and not even /bin/sh starts
MAX_MEMORY = 1024 ** 5  # 1P: beyond any machine, and well inside systemd's uint64
MAX_DURATION = 366 * 86400 * 100  # a century, in seconds
MAX_TASKS = 4 * 1024 ** 2  # the kernel's highest pid_max


def parse_size(value) -> int:
    """Bytes from 268435456, '256M', '1.5G' (K/M/G/T are powers of 1024)."""
    match = _SIZE.match(str(value).strip()) if not isinstance(value, bool) else None
    if not match:
        raise InvalidInput(f"'{str(value)[:40]}' is not a size (e.g. 512M, 2G)")
    size = float(match.group(1)) * SIZE_UNITS[match.group(2).upper()]  # inf for 400 digits
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise InvalidInput(f"memory {str(value)[:40]} is out of range (1M to 1P)")
    return int(size)


def parse_duration(value) -> float:
    """Seconds from 90, '90s', '10m', '2h', '1d', '1w'."""
    match = _DURATION.match(str(value).strip()) if not isinstance(value, bool) else None
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_DURATION:
        raise InvalidInput(f"'{str(value)[:40]}' is not a duration (e.g. 30s, 10m, 2h; at most 100 years)")
    return seconds


def parse_cpus(value) -> float:
    try:
        cpus = float(value) if not isinstance(value, bool) else 0.0
    except (TypeError, ValueError, OverflowError):  # OverflowError: a 400-digit int
        cpus = 0.0
    if not 0.01 <= cpus <= 1024:  # also refuses nan
        raise InvalidInput(f"'{str(value)[:40]}' is not a number of CPUs (e.g. 0.5, 2)")
    return cpus


def parse_tasks(value) -> int:
    try:
        tasks = int(str(value).strip()) if not isinstance(value, bool) else 0
    except ValueError:
        tasks = 0
    if not 1 <= tasks <= MAX_TASKS:
        raise InvalidInput(f"'{str(value)[:40]}' is not a number of tasks (1 to {MAX_TASKS})")
    return tasks


MAX_ENV = 64  # variables per job
MAX_ENV_BYTES = 32 * 1024
MAX_PATH = 4096
_ENV_KEY = _Pattern(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV = ("LCLUSTER_JOB_ID", "LCLUSTER_ARRAY_ID", "LCLUSTER_ARRAY_INDEX")  # set by lclusterd
NAMESPACE_NAME = _Pattern(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def validate_env(env) -> tuple:
    if not isinstance(env, (list, tuple)) or not all(isinstance(e, str) for e in env):
        raise InvalidInput("env must be a list of KEY=VALUE strings")
    if len(env) > MAX_ENV:
        raise InvalidInput(f"at most {MAX_ENV} environment variables")
    for entry in env:
        key, eq, value = entry.partition("=")
        if not eq or not _ENV_KEY.fullmatch(key):  # fullmatch: 'KEY\n' is no key
            raise InvalidInput(f"'{entry[:60]}' is not KEY=VALUE (KEY: letters, digits, _)")
        if key in RESERVED_ENV:
            raise InvalidInput(f"{key} is set by lclusterd")
        if "\0" in value or "\n" in value:
            raise InvalidInput(f"the value of {key} contains a NUL or newline")
        utf8(value, f"the value of {key}")
    if sum(len(e.encode("utf-8")) for e in env) > MAX_ENV_BYTES:
        raise InvalidInput(f"environment is longer than {MAX_ENV_BYTES} bytes")
    return tuple(env)


def validate_workdir(workdir) -> str:
    if (not isinstance(workdir, str) or not workdir.startswith("/") or "\0" in workdir
            or "\n" in workdir or len(workdir) > MAX_PATH
            or any(part in (".", "..") for part in workdir.split("/"))):
        raise InvalidInput(f"workdir must be an absolute path without . or .. ('{str(workdir)[:200]}')")
    return utf8(workdir, "workdir")


def validate_network(network) -> str:
    if network in ("none", "host"):
        return network
    if isinstance(network, str) and network.startswith("ns:") and NAMESPACE_NAME.fullmatch(network[3:]):
        return network
    raise InvalidInput(f"network must be none, host or ns:NAME, not '{str(network)[:80]}'")


# --- dependencies, constraints, arrays ------------------------------------------

# addjob --after (Slurm's afterok), --after-any (afterany), --after-failed (afternotok).
AFTER_OK, AFTER_ANY, AFTER_FAILED = "ok", "any", "failed"
AFTER_MODES = (AFTER_OK, AFTER_ANY, AFTER_FAILED)
# Parents per job (each is a dependents key submit writes, and a job's
# record lists them): --after ARRAY_ID names a whole array of the largest size.
MAX_AFTER = MAX_ARRAY
MAX_CONSTRAINTS = 32
MAX_RUNNING = 10 ** 6
_LABEL_KEY = _Pattern(r"[A-Za-z0-9_.-]{1,63}")
# No ',' (labels are listed comma-separated), no '=' and no blanks in a value.
_LABEL_VALUE = _Pattern(r"[A-Za-z0-9_.:/+@-]{1,255}")


def string_list(value, wrong: str) -> list:
    """A list of strings from a list or a comma-separated string ([] for
    None); InvalidInput(wrong) for anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InvalidInput(wrong)
    return list(value)


def _label(entry: str, what: str):
    """(key, value) of one "KEY=VALUE"; InvalidInput naming what it is."""
    key, eq, value = entry.partition("=")
    key, value = key.strip(), value.strip()  # "rack = a" is rack=a
    if not eq or not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
        raise InvalidInput(f"{what} '{entry.strip()[:60]}' is not KEY=VALUE (KEY: letters, digits, "
                           "_ . -; VALUE: no blanks, commas or =)")
    return key, value


def validate_constraints(value) -> tuple:
    """"KEY=VALUE" labels a node must have, from a list or a comma-separated
    string; repeats dropped. Two values for one key could never be met: refused."""
    wanted = {}
    for entry in string_list(value, "constraints must be a list of KEY=VALUE strings"):
        key, label = _label(entry, "constraint")
        if wanted.get(key, label) != label:
            raise InvalidInput(f"constraints ask {key}={wanted[key]} and {key}={label}: no node has both")
        wanted[key] = label
    if len(wanted) > MAX_CONSTRAINTS:
        raise InvalidInput(f"at most {MAX_CONSTRAINTS} constraints")
    return tuple(f"{k}={v}" for k, v in wanted.items())


def validate_max_running(value) -> int | None:
    """An array's throttle: members running at once, at least 1; None: no throttle."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RUNNING:
        raise InvalidInput(f"max_running must be a whole number from 1 to {MAX_RUNNING}")
    return value
