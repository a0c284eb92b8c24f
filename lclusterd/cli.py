"""lclusterc: queue shell commands on the lclusterd cluster and follow them.

Thin on purpose: parse arguments, refuse what is plainly bad before bothering
the daemon, format answers. Every decision is the daemon's (docs/api.md).
"""

import os
import sys
import time

import click

from lclusterd import __version__

# Start-up is most of what `lclusterc addjob` costs in a shell loop, so this
# module imports only click at the top: core (validation), client (HTTP) and
# the formatting modules are imported by the functions that use them, and
# --help and --version need none of them (test_cli_startup.py guards it).
DEFAULT_SOCKET = "/run/lclusterd/lclusterd.sock"  # = client.DEFAULT_SOCKET
DEFAULT_TOKEN_FILE = "/etc/lclusterd/token"  # = client.DEFAULT_TOKEN_FILE
# core's constants that the options below need before core is imported
# (test_cli_startup.py checks that they equal core's).
STATES = ("queued", "starting", "running", "succeeded", "failed", "cancelled", "warned", "lost")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
MAX_BATCH = 64
MIN_PRIORITY, MAX_PRIORITY = -100, 100
DEFAULT_ATTEMPTS, MAX_ATTEMPTS = 3, 100

# Exit codes: the one table. `lclusterc --help` prints it as it is.
EXIT_TABLE = (
    (0, "ok"),
    (1, "the job failed (addjob --wait: the job's own status), or a bad answer"),
    (2, "bad input or usage (HTTP 400)"),
    (3, "no such job, array or node; ambiguous uuid prefix; a conflict, e.g. forgetting a live "
        "node (HTTP 404, 409)"),
    (4, "permission denied, or over a quota (HTTP 401, 403, 429, the socket's file mode, "
        "the token file, an HTTPS certificate that --ca does not trust)"),
    (5, "daemon unreachable (not running: no socket, refused, closed, no answer)"),
    (6, "etcd or systemd unavailable, or etcd out of space (HTTP 503, 507)"),
    (130, "interrupted (Ctrl-C), or addjob --wait on a job that was cancelled"),
)
(EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_JOB, EXIT_DENIED, EXIT_UNREACHABLE,
 EXIT_ETCD, EXIT_INTERRUPTED) = (code for code, _ in EXIT_TABLE)

# What a ClientError's cause (HTTP status or transport failure: client's
# BAD_URL, DENIED, UNTRUSTED, UNREACHABLE) exits with; anything else (HTTP 500,
# a malformed answer) is EXIT_FAILED.
EXIT_FOR_CAUSE = {
    400: EXIT_USAGE, 413: EXIT_USAGE, 401: EXIT_DENIED, 403: EXIT_DENIED, 429: EXIT_DENIED,
    "bad-url": EXIT_USAGE, 404: EXIT_NO_JOB, 409: EXIT_NO_JOB, 503: EXIT_ETCD, 507: EXIT_ETCD,
    "denied": EXIT_DENIED, "untrusted": EXIT_DENIED, "unreachable": EXIT_UNREACHABLE,
}

POLL_INTERVAL = 0.2  # seconds between get_job calls of addjob --wait and wait
MIN_COMMAND_COLUMN = 7  # list never squeezes COMMAND below its header
NODE_COLUMN = 16  # longer node and user names are cut in list
CHECKJOB_LINES = 5  # lines of output checkjob shows
REASON_COLUMN = 60  # list cuts a queued job's reason to this many characters

# The Go lclusterc's options, still accepted: --addjob=CMD is `addjob CMD`.
OLD_SPELLINGS = {"--addjob": "addjob", "--checkjob": "checkjob", "--removejob": "removejob"}
GLOBAL_OPTIONS_WITH_VALUE = ("--socket", "--server", "--token-file", "--ca", "--cert", "--key")

EPILOG = ("\b\nExit status:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_TABLE)
          + "\n\n\b\nThe old spellings --addjob=CMD, --checkjob=UUID and --removejob=UUID"
          "\nstill work.")


class Failure(click.ClickException):
    """A one-line error for people, `lclusterc: ` in front, and its exit code."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None):
        click.echo(f"lclusterc: {_text(self.format_message())}", err=True)


# click 8.2 (Debian 13) raises this usage error for a bare group: it is the help text.
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _usage_line(error):
    """A click usage error as one line (click prints four: usage, try, blank, error)."""
    where = error.ctx.command_path if error.ctx else "lclusterc"
    return f"lclusterc: {_text(error.format_message())} (see '{where} --help')"


# --- early checks (the daemon checks again) ----------------------------------

def _usage(message):
    """Options that do not go together: a usage error, as click's own."""
    return click.UsageError(message, click.get_current_context())


def _checked(check, value):
    """core's validation (the daemon checks again), as a Failure."""
    from lclusterd import core
    try:
        return check(value)
    except core.InvalidInput as e:
        raise Failure(str(e), EXIT_USAGE) from None


def _rewrite_old_spellings(args):
    """`[global options] --addjob=CMD [more]` -> `[global options] addjob [more] -- CMD`.

    Only before the subcommand, so a command text that happens to read
    '--addjob=x' after `addjob --` stays untouched. The `--` keeps a value
    that starts with '-' from being read as an option.
    """
    args = list(args)
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in OLD_SPELLINGS:
            rest = args[i + 1:]
            if not eq:
                if not rest:  # no value: let click say what is missing
                    return args[:i] + [OLD_SPELLINGS[name]]
                value, rest = rest[0], rest[1:]
            return args[:i] + [OLD_SPELLINGS[name]] + rest + ["--", value]
        if args[i] == "--" or not args[i].startswith("-"):
            break  # a subcommand: what follows is its own
        i += 2 if args[i] in GLOBAL_OPTIONS_WITH_VALUE else 1
    return args


# --- formatting ----------------------------------------------------------------

def _text(value):
    """One printable line: None is '-', control characters are escaped so that a
    job's command cannot drive the terminal."""
    if value is None:
        return "-"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def _local_time(epoch, fmt=None):
    if not isinstance(epoch, (int, float)):
        return None
    import datetime
    moment = datetime.datetime.fromtimestamp(epoch).astimezone()
    return moment.strftime(fmt) if fmt else moment.isoformat(timespec="seconds")


def _span(seconds):
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _duration(job):
    started, ended = job.get("started_at"), job.get("ended_at")
    if not isinstance(started, (int, float)):
        return None
    if isinstance(ended, (int, float)) and job.get("state") != "warned":
        return _span(ended - started)
    return _span(time.time() - started) + " so far"


def _describe(job, output=None):
    """checkjob's human output: aligned `key: value` lines, then the last
    lines of output if given."""
    import shlex
    warned = job.get("warned_at")
    rows = (
        ("uuid", job.get("uuid")),
        ("state", job.get("state")),
    ) + _scheduling_rows(job) + (  # why a queued job waits: next to its state
        ("command", job.get("command")),
        ("user", f"{_text(job.get('user'))} ({_text(job.get('uid'))}/{_text(job.get('gid'))})"),
        ("node", job.get("node")),
        ("unit", job.get("unit")),
        ("submitted", _local_time(job.get("submitted_at"))),
        ("started", _local_time(job.get("started_at"))),
        # A warned job has not ended: its processes live on. Its ended_at
        # (removejob's time) is when its stop began; else its warning's time.
        (("stop began", _local_time(job.get("ended_at") or warned)) if job.get("state") == "warned"
         else ("ended", _local_time(job.get("ended_at")))),
        ("duration", _duration(job)),
        ("exit status", job.get("exit_status")),
        ("result", job.get("result")),
        ("reason", job.get("reason")),
        ("submitter", job.get("submitter")),
        ("limits", _limits(job)),
        ("network", job.get("network") or "the node's default"),
        ("workdir", job.get("workdir")),
        ("env", " ".join(shlex.quote(e) for e in job.get("env") or ()) or None),
        ("attempts", _attempts(job.get("attempts"))),
    ) + ((("warned", f"{_local_time(warned)}: {_text(job.get('warning'))}"),) if warned else ())
    width = max(len(key) for key, _ in rows) + 1
    lines = [f"{key + ':':<{width}} {_text(value)}" for key, value in rows]
    if output:
        lines.append(f"{'output:':<{width}} last {len(output)} line(s); all of it: "
                     f"lclusterc logs {_text(job.get('uuid'))}")
        lines += ["  " + _text(line) for line in output]
    return "\n".join(lines)


# list's columns before COMMAND, and the order in which a narrow terminal drops
# them (0: never): COMMAND gets the room that is left, at least its header's.
COLUMNS = (
    ("UUID", 0, lambda j: _text(j.get("uuid"))[:8]),
    ("STATE", 0, lambda j: _text(j.get("state"))),
    ("EXIT", 4, lambda j: _text(j.get("exit_status"))),
    ("USER", 3, lambda j: _text(j.get("user"))[:NODE_COLUMN]),
    ("NODE", 2, lambda j: _text(j.get("node"))[:NODE_COLUMN]),
    ("SUBMITTED", 1, lambda j: _text(_local_time(j.get("submitted_at"), "%Y-%m-%d %H:%M"))),
    # only when some job waits in the queue (list of finished jobs: none)
    ("REASON", 5, lambda j: _cut(_text(_reason(j.get("waiting"))) if j.get("waiting") else "",
                                 REASON_COLUMN)),
)


def _cut(text, width):
    return text if len(text) <= width else text[:width - 1] + "…"


def _limits(job):
    from lclusterd import core
    shown = []
    for name, _, show in core.LIMITS:
        value = job.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            shown.append(f"{name} {show(value)}")
    return ", ".join(shown) or "none"


def _property(name, value):
    """One unit property as systemd's unit-file syntax would have it."""
    import shlex
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif name.startswith("Exec"):  # [(path, argv, flags)]
        text = "; ".join(" ".join(shlex.quote(a) for a in argv) for _, argv, _ in value)
    elif isinstance(value, list):
        text = " ".join(shlex.quote(str(v)) for v in value)
    else:
        text = str(value)
    return f"{name}={_text(text)}"


def _reason(waiting):
    """Why a queued job waits, one printable line (client.describe_waiting)."""
    from lclusterd.client import describe_waiting
    reason = describe_waiting(waiting)
    return None if reason is None else _text(reason)


def _scheduling_rows(job):
    """checkjob's rows for what only some jobs have: its place in the queue
    and why it waits, its parents, constraints and array."""
    rows = []
    waiting = job.get("waiting")
    if isinstance(waiting, dict):
        ahead, total = waiting.get("ahead"), waiting.get("total")
        if isinstance(ahead, int) and isinstance(total, int):
            rows.append(("position", f"{ahead + 1} of {total} in the queue ({ahead} ahead)"))
        rows.append(("waiting", _reason(waiting)))
    after = job.get("after")
    if after:
        mode = {"ok": "all succeed", "any": "all end", "failed": "one fails"}.get(
            job.get("after_mode") or "ok", job.get("after_mode"))
        rows.append(("after", f"{', '.join(map(_text, after))} (runs once {mode})"))
    if job.get("constraints"):
        rows.append(("constraints", ", ".join(map(_text, job["constraints"]))))
    if job.get("array"):
        throttle = job.get("max_running")
        rows.append(("array", f"{_text(job['array'])} index {_text(job.get('array_index'))}"
                     + (f", at most {_text(throttle)} running" if throttle else "")))
    return tuple(rows)


def _describe_array(answer):
    """checkjob ARRAY: the array, its members by state, then one line each."""
    jobs = answer.get("jobs") or []
    counts = answer.get("counts") or {}
    by_state = ", ".join(f"{_text(n)} {_text(state)}" for state, n in counts.items() if n) or "none"
    throttle = answer.get("max_running")
    lines = [f"array:       {_text(answer.get('array'))}",
             f"jobs:        {len(jobs)}",
             f"states:      {by_state}",
             f"max running: {_text(throttle) if throttle else 'no limit'}"]
    rows = [("INDEX", "UUID", "STATE", "NODE", "REASON")]
    for job in jobs:
        rows.append((_text(job.get("array_index")), _text(job.get("uuid")), _text(job.get("state")),
                     _text(job.get("node")), _text(_reason(job.get("waiting")) or job.get("reason"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _attempts(attempts):
    """checkjob's attempts: `node (outcome), ...`."""
    if not isinstance(attempts, list) or not attempts:
        return None
    return ", ".join(f"{_text(a.get('node'))} ({_text(a.get('outcome') or 'now')})"
                     for a in attempts if isinstance(a, dict))


def _size(size):
    """Bytes as nodes shows them: 3.1G, 512M."""
    if not isinstance(size, (int, float)) or isinstance(size, bool):
        return None
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}{unit}"
    return f"{int(size)}"


def _number(value):
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _used(reserved, capacity, show):
    """'reserved/capacity' (what placement counts), or what of it is known."""
    if show(capacity) is None:
        return show(reserved)
    return f"{show(reserved) or '0'}/{show(capacity)}"


def _nodes_table(nodes):
    """nodes' human output. CPUS, MEMORY and JOBS are reserved/capacity (a
    job reserves its --cpus, --memory and one slot); REASON is a drain's."""
    rows = [("NAME", "STATE", "ADDRESS", "CPUS", "MEMORY", "JOBS", "LABELS", "WARNED", "ENFORCES",
             "FAILED AT", "REASON")]
    for n in nodes:
        enforces = n.get("enforces")  # the limits it can enforce (older nodes do not say)
        enforces = (",".join(map(str, enforces)) or "none") if isinstance(enforces, list) else None
        labels = n.get("labels")
        labels = (",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "node") or None
                  if isinstance(labels, dict) else None)
        jobs = f"{_text(n.get('running'))}/{_text(n.get('slots'))}"
        rows.append(tuple(_text(v) for v in (
            n.get("name"), n.get("state"), n.get("address"),
            _used(n.get("reserved_cpus"), n.get("cpus"), _number),
            _used(n.get("reserved_memory"), n.get("memory"), _size), jobs, labels,
            len(n.get("warned") or ()), enforces, _local_time(n.get("failed_at")),
            n.get("drain_reason"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)).rstrip() for row in rows)


def _table(jobs, width):
    """list's human output, at most width characters a line."""
    waits = any(isinstance(job.get("waiting"), dict) for job in jobs)
    columns = [(name, [name] + [cell(job) for job in jobs], drop) for name, drop, cell in COLUMNS
               if name != "REASON" or waits]
    commands = ["COMMAND"] + [_text(job.get("command")) for job in jobs]

    def used(cols):
        return sum(max(map(len, cells)) + 2 for _, cells, _ in cols)
    for rank in (1, 2, 3, 4, 5):  # drop columns until COMMAND has room
        if width - used(columns) >= MIN_COMMAND_COLUMN:
            break
        columns = [c for c in columns if c[2] != rank]
    widths = [max(map(len, cells)) for _, cells, _ in columns]
    room = max(width - used(columns), MIN_COMMAND_COLUMN)
    lines = []
    for i, command in enumerate(commands):
        command = command if len(command) <= room else command[:room - 1] + "…"
        lines.append("".join(f"{cells[i]:<{w}}  " for (_, cells, _), w in zip(columns, widths))
                     + command)
    return "\n".join(lines)


def _echo_json(value):
    import json
    click.echo(json.dumps(value, indent=2))


def _say_if_unsuccessful(job):
    if job["state"] != "succeeded":
        click.echo(f"lclusterc: job {job['uuid']} {job['state']}: {_text(job.get('reason'))}", err=True)


def _wait_exit_code(job):
    """addjob --wait exits like `systemd-run --wait`: 0 if the job succeeded,
    its exit status if it failed with one (1 if none). A cancelled job gives
    130, the shell's "interrupted": it did not finish, somebody stopped it."""
    if job["state"] == "succeeded":
        return EXIT_OK
    if job["state"] == "cancelled":
        return EXIT_INTERRUPTED
    status = job.get("exit_status")
    return status if type(status) is int and 0 < status < 256 else EXIT_FAILED


# --- commands --------------------------------------------------------------------

class _Group(click.Group):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, _rewrite_old_spellings(args))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, with every error one line on stderr (usage errors:
        exit 2), Ctrl-C 130, and `| head` quiet; standalone_mode=False
        returns the exit code instead of exiting."""
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NO_ARGS_IS_HELP as e:  # click >= 8.2: bare `lclusterc` prints its help
            e.show()
            code = e.exit_code
        except click.UsageError as e:
            click.echo(_usage_line(e), err=True)
            code = e.exit_code
        except click.ClickException as e:  # our Failures
            e.show()
            code = e.exit_code
        except (click.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            code = EXIT_INTERRUPTED
        except BrokenPipeError:  # `lclusterc list | head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = EXIT_FAILED
        code = code if isinstance(code, int) else EXIT_OK
        if not standalone_mode:
            return code
        sys.exit(code)

    def invoke(self, ctx):
        # The one place where a client failure becomes a message and an exit code.
        from lclusterd.client import ClientError
        try:
            return super().invoke(ctx)
        except ClientError as e:
            raise Failure(e.message, EXIT_FOR_CAUSE.get(e.cause, EXIT_FAILED)) from None


@click.group(cls=_Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", metavar="PATH", envvar="LCLUSTER_SOCKET",
              default=DEFAULT_SOCKET, show_default=True, show_envvar=True,
              help="The daemon's unix socket.")
@click.option("--server", metavar="URL", envvar="LCLUSTER_SERVER", show_envvar=True,
              help="Talk to the daemon at http://HOST:PORT or https://HOST:PORT over TCP "
                   "instead (with the token).")
@click.option("--token-file", metavar="FILE", envvar="LCLUSTER_TOKEN_FILE", show_envvar=True,
              default=DEFAULT_TOKEN_FILE, show_default=True, help="The cluster's token, for --server.")
@click.option("--ca", metavar="FILE", envvar="LCLUSTER_CA", show_envvar=True,
              help="For https:// --server: the CA that signed the node's certificate "
                   "(default: the system's CAs).")
@click.option("--cert", metavar="FILE", envvar="LCLUSTER_CERT", show_envvar=True,
              help="For https:// --server: a client certificate (a node with tls_client_ca).")
@click.option("--key", metavar="FILE", envvar="LCLUSTER_KEY", show_envvar=True,
              help="The key of --cert (default: in the --cert file).")
@click.version_option(__version__, "--version", prog_name="lclusterc")
@click.pass_context
def lclusterc(ctx, socket_path, server, token_file, ca, cert, key):
    """Queue shell commands on the lclusterd cluster, and follow them.

    REF is a job's uuid or a unique prefix of it (at least 4 hex digits).
    """
    from lclusterd.client import Client, ClientError, read_token
    try:
        token = read_token(token_file) if server else None
        ctx.obj = Client(socket_path, server=server, token=token, ca=ca, cert=cert, key=key)
    except ClientError as e:
        raise Failure(e.message, EXIT_FOR_CAUSE.get(e.cause, EXIT_FAILED)) from None


def _read_file(name):
    """addjob --file: one command per non-empty line of FILE, or of stdin
    for '-'. Empty or unreadable: a Failure (exit 2), nothing sent."""
    from lclusterd import core
    where = "stdin" if name == "-" else name
    try:
        if name == "-":
            data = click.get_binary_stream("stdin").read()
        else:
            with open(name, "rb") as f:
                data = f.read()
    except OSError as e:
        raise Failure(f"cannot read {where}: {e.strerror or e}", EXIT_USAGE) from None
    # Undecodable bytes stay as surrogates, so that core says which line is not UTF-8.
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    commands = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            commands.append(core.validate_command(line))
        except core.InvalidInput as e:
            raise Failure(f"{where} line {number}: {e}", EXIT_USAGE) from None
    if not commands:
        raise Failure(f"{where} has no commands (one job per non-empty line)", EXIT_USAGE)
    if len(commands) > core.MAX_BATCH:
        raise Failure(f"{where} has {len(commands)} commands; an array holds at most "
                      f"{core.MAX_BATCH}", EXIT_USAGE)
    return commands


def _after(after, after_any, after_failed):
    """(parents, mode) of --after / --after-any / --after-failed (one of them)."""
    from lclusterd import core
    given = [(value, mode) for value, mode in ((after, core.AFTER_OK), (after_any, core.AFTER_ANY),
                                               (after_failed, core.AFTER_FAILED)) if value]
    if not given:
        return None, None
    if len(given) > 1:
        raise _usage("give one of --after, --after-any and --after-failed")
    value, mode = given[0]
    option = {core.AFTER_OK: "--after", core.AFTER_ANY: "--after-any",
              core.AFTER_FAILED: "--after-failed"}[mode]
    parents = []
    # A job's uuid, a unique prefix of one, or an array's id (all its
    # members): the daemon resolves them and refuses one it does not know.
    for ref in (part.strip() for text in value for part in text.split(",")):
        if not ref:
            continue
        try:
            ref = core.validate_ref(ref)
        except core.InvalidInput as e:
            raise Failure(f"{option}: {e}", EXIT_USAGE) from None
        if ref not in parents:
            parents.append(ref)
    if not parents:
        raise Failure(f"{option} needs a job uuid", EXIT_USAGE)
    if len(parents) > core.MAX_AFTER:
        raise Failure(f"{option}: at most {core.MAX_AFTER} parent jobs", EXIT_USAGE)
    return parents, mode


def _addjob_array(client, as_json, spec, command=None, count=None, commands=None):
    """--count or --file: one array, queued all or none; prints its id on
    the first line, then the members' uuids."""
    from lclusterd import core
    if count is not None:
        if count > core.MAX_BATCH:  # what `--count 1000` did before arrays: say what to do now
            raise Failure(f"--count {count}: an array holds at most {core.MAX_BATCH} jobs (one "
                          "etcd transaction); queue more as several arrays", EXIT_USAGE)
        _checked(lambda c: core.validate_count(count, c), command)  # 0, -1, too large
    answer = client.add_array(command, count=count, commands=commands, **spec)
    if as_json:
        _echo_json(answer)
    else:
        click.echo("\n".join([answer["array"], *(job["uuid"] for job in answer["jobs"])]))


@lclusterc.command()
@click.argument("command", required=False)
@click.option("--wait", is_flag=True, help="Wait for the job to end; exit with its status.")
@click.option("--retries", type=click.IntRange(1, MAX_ATTEMPTS), metavar="N",
              help=f"Attempts in all when its nodes die (default {DEFAULT_ATTEMPTS}).")
@click.option("--priority", type=click.IntRange(MIN_PRIORITY, MAX_PRIORITY), metavar="N",
              help="Higher runs first (default 0; from -100 to 100).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole job record.")
@click.option("--memory", metavar="SIZE", help="Memory limit, e.g. 256M, 2G (OOM-killed past it); "
              "placement reserves it.")
@click.option("--cpus", metavar="N", help="CPU time limit in CPUs, e.g. 0.5; placement reserves it.")
@click.option("--tasks", metavar="N", help="Most processes and threads at once.")
@click.option("--timeout", metavar="TIME", help="Stop it after this long, e.g. 90s, 10m, 2h.")
@click.option("--env", metavar="KEY=VAL", multiple=True, help="Set a variable (repeatable).")
@click.option("--workdir", metavar="DIR", help="Working directory (absolute).")
@click.option("--network", metavar="NET",
              help="none (own loopback, the default), host or ns:NAME, where the node allows it.")
@click.option("--user", metavar="NAME",
              help="Run as this user (root only; root's jobs run as nobody without it).")
@click.option("--count", type=int, metavar="N",
              help=f"An array of N copies (at most {MAX_BATCH}); print its id, then their uuids.")
@click.option("--file", "file_name", metavar="FILE",
              help="An array of one job per non-empty line of FILE ('-': stdin), instead of COMMAND.")
@click.option("--max-running", metavar="K", help="With --count or --file: at most K members "
              "run at once.")
@click.option("--after", "after", metavar="UUID[,UUID]", multiple=True,
              help="Run once these jobs have all succeeded (cancelled if one cannot).")
@click.option("--after-any", metavar="UUID[,UUID]", multiple=True,
              help="Run once these jobs have ended, whatever their outcome.")
@click.option("--after-failed", metavar="UUID[,UUID]", multiple=True,
              help="Run once these jobs have failed (cancelled if one succeeds).")
@click.option("--constraint", metavar="KEY=VALUE", multiple=True,
              help="Only on nodes with this label (repeatable; node=NAME pins it to one).")
@click.pass_obj
def addjob(client, command, wait, retries, priority, as_json, memory, cpus, tasks, timeout, env,
           workdir, network, user, count, file_name, max_running, after, after_any, after_failed,
           constraint):
    """Queue COMMAND (run by /bin/sh -c) and print the job's uuid. With
    --count or --file, an array: its id on the first line, then its
    members' uuids."""
    from lclusterd import core
    if (command is None) == (file_name is None):
        raise _usage("give COMMAND or --file FILE (one of them)")
    if file_name is not None and count is not None:
        raise _usage("--file makes one job per line: not with --count")
    if wait and (count is not None or file_name is not None):
        raise _usage(f"--wait takes one job, not {'--count' if count is not None else '--file'} "
                     "(lclusterc wait ARRAY waits for an array)")
    if max_running is not None:
        if count is None and file_name is None:
            raise _usage("--max-running throttles an array: give --count or --file")
        max_running = _checked(core.validate_max_running, max_running)
    checks = {"memory": core.parse_size, "cpus": core.parse_cpus, "tasks": core.parse_tasks,
              "timeout": core.parse_duration, "workdir": core.validate_workdir,
              "network": core.validate_network}
    given = {"memory": memory, "cpus": cpus, "tasks": tasks, "timeout": timeout,
             "workdir": workdir, "network": network}
    for name, value in given.items():
        if value is not None:
            _checked(checks[name], value)  # the daemon parses the text again
    if env:
        _checked(core.validate_env, list(env))
    parents, mode = _after(after, after_any, after_failed)
    constraints = list(_checked(core.validate_constraints, list(constraint))) if constraint else None
    spec = dict(env=list(env) or None, user=user, max_attempts=retries, priority=priority,
                after=parents, after_mode=mode, constraints=constraints, **given)
    if file_name is not None:
        _addjob_array(client, as_json, dict(spec, max_running=max_running),
                      commands=_read_file(file_name))
        return
    command = _checked(core.validate_command, command)
    if count is not None:
        _addjob_array(client, as_json, dict(spec, max_running=max_running), command, count=count)
        return
    job = client.add_job(command, **spec)
    if not as_json:
        click.echo(job["uuid"])  # at once, even with --wait: the user may need it
    if wait:
        try:
            while job["state"] not in TERMINAL:
                time.sleep(POLL_INTERVAL)
                job = client.get_job(job["uuid"])
        except KeyboardInterrupt:
            raise Failure(f"stopped waiting; the job goes on (lclusterc removejob {job['uuid']} stops it)",
                          EXIT_INTERRUPTED) from None
        if not as_json:
            _say_if_unsuccessful(job)
    if as_json:
        _echo_json(job)
    if wait:
        click.get_current_context().exit(_wait_exit_code(job))


@lclusterc.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the whole job (or array) record.")
@click.option("--unit-properties", "properties", is_flag=True,
              help="Print the systemd properties of the job's unit (its sandbox and limits).")
@click.pass_obj
def checkjob(client, ref, as_json, properties):
    """Show a job: state, exit status, node, times, user, limits; for a
    queued one, its place in the queue and why it waits. REF may be an
    array's id: its members, counted by state."""
    from lclusterd import core
    from lclusterd.client import ClientError
    if properties:
        props = client.unit_properties(_checked(core.validate_ref, ref))
        if as_json:
            _echo_json(props)
        else:
            click.echo("\n".join(_property(name, value) for name, value in props))
        return
    answer = client.lookup(_checked(core.validate_ref, ref))
    if "array" in answer:
        if as_json:
            _echo_json(answer)
        else:
            click.echo(_describe_array(answer))
        return
    job = answer["job"]
    if as_json:
        _echo_json(job)
        return
    output = None
    if job.get("node"):
        try:
            tail = b"".join(client.logs(job["uuid"], tail=CHECKJOB_LINES))
            output = tail.decode("utf-8", "replace").splitlines()
        except ClientError:
            pass  # not the caller's job, or its node is away: the record alone
    click.echo(_describe(job, output))


@lclusterc.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the whole job record after removal.")
@click.pass_obj
def removejob(client, ref, as_json):
    """Take a queued job off the queue, or stop a running one. REF may be
    an array's id: every live member is cancelled."""
    from lclusterd import core
    job = client.remove_job(_checked(core.validate_ref, ref))
    if "jobs" in job:  # an array's answer (a job's record has "array" too: its id or null)
        _removed_array(job, as_json)
        return
    if as_json:
        _echo_json(job)
    else:
        click.echo(f"{_text(job['state'])} {job['uuid']}")
    if job["state"] == "warned":
        raise Failure(f"job {job['uuid']} did not stop: {_text(job.get('warning'))}; it is "
                      "watched and leaves 'warned' once its processes are gone", EXIT_FAILED)


def _removed_array(answer, as_json):
    """removejob ARRAY: a line per member it cancelled (as for one job)."""
    jobs = {job["uuid"]: job for job in answer["jobs"]}
    if as_json:
        _echo_json(answer)
    else:
        for uuid in answer["cancelled"]:
            click.echo(f"{_text((jobs.get(uuid) or {}).get('state', 'cancelled'))} {_text(uuid)}")
        if not answer["cancelled"]:
            click.echo(f"lclusterc: array {_text(answer['array'])} has no live job to cancel",
                       err=True)
    warned = [job["uuid"] for job in answer["jobs"] if job["state"] == "warned"]
    if warned:
        raise Failure(f"{len(warned)} job(s) of array {_text(answer['array'])} did not stop "
                      f"({', '.join(warned[:3])}{'…' if len(warned) > 3 else ''}); they are "
                      "watched and leave 'warned' once their processes are gone", EXIT_FAILED)


def _when(text):
    from lclusterd import core
    return None if text is None else _checked(lambda t: core.parse_when(t, time.time()), text)


@lclusterc.command("list")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Show at most N jobs.", metavar="N")
@click.option("--state", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--node", metavar="NAME", help="Only jobs of this node.")
@click.option("--user", metavar="NAME", help="Only jobs of this user.")
@click.option("--since", metavar="WHEN", help="Only jobs submitted since WHEN: an age "
              "(30m, 6h, 2d) or a date ('2026-11-28', '2026-11-28 14:00').")
@click.option("--until", metavar="WHEN", help="Only jobs submitted until WHEN (as --since).")
@click.option("--json", "as_json", is_flag=True, help="Print the job records.")
@click.pass_obj
def list_jobs(client, limit, state, node, user, since, until, as_json):
    """List jobs: live ones first (warned, running, starting, queued; newest
    first), then finished ones, latest ended first. Finished jobs are kept
    for the cluster's retention period (7 days by default)."""
    jobs = client.list_jobs(limit=limit, state=state, node=node, user=user,
                            since=_when(since), until=_when(until))
    if as_json:
        _echo_json(jobs)
    else:
        import shutil
        click.echo(_table(jobs, shutil.get_terminal_size().columns))


@lclusterc.command()
@click.argument("ref")
@click.option("-f", "--follow", is_flag=True,
              help="Go on while the job runs; exit with its status (as addjob --wait).")
@click.option("--tail", type=click.IntRange(min=0), metavar="N", help="Only the last N lines.")
@click.option("--since", metavar="WHEN", help="Only lines since WHEN: an age (30m, 6h, 2d) "
              "or a date ('2026-11-28 14:00').")
@click.pass_obj
def logs(client, ref, follow, tail, since):
    """Print a job's output (its stdout and stderr, from the journal of the
    node that ran it). Only its submitter or root may read it."""
    from lclusterd import core
    ref = _checked(core.validate_ref, ref)
    out = click.get_binary_stream("stdout")
    printed = False
    try:
        for chunk in client.logs(ref, follow=follow, tail=tail, since=_when(since)):
            out.write(chunk)
            out.flush()
            printed = printed or bool(chunk)
    except KeyboardInterrupt:
        raise Failure("stopped following; the job goes on", EXIT_INTERRUPTED) from None
    if not printed and not follow:
        job = client.get_job(ref)
        if not job.get("node"):  # no node ever took it: no output, and no error either
            when = "has not started yet" if job["state"] not in TERMINAL else "never ran"
            click.echo(f"lclusterc: job {job['uuid']} {when} ({_text(job['state'])}): no output",
                       err=True)
    if follow:
        job = client.get_job(ref)
        if job["state"] not in TERMINAL:
            raise Failure(f"the output of job {job['uuid']} ended while it is {job['state']}",
                          EXIT_FAILED)
        _say_if_unsuccessful(job)
        click.get_current_context().exit(_wait_exit_code(job))


@lclusterc.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.pass_obj
def wait(client, refs):
    """Wait until the jobs have ended; print each one's state. REF may be an
    array's id: all its members. Exit 0 only if all of them succeeded, else 1."""
    from lclusterd import core
    wanted = list(dict.fromkeys(_checked(core.validate_ref, ref) for ref in refs))
    pending, ended = list(wanted), {}
    try:
        while pending:
            for ref in list(pending):
                answer = client.lookup(ref)
                jobs = answer["jobs"] if "array" in answer else [answer["job"]]
                if all(job["state"] in TERMINAL for job in jobs):
                    ended[ref] = jobs
                    pending.remove(ref)
            if pending:
                time.sleep(POLL_INTERVAL)
    except KeyboardInterrupt:
        raise Failure("stopped waiting; the jobs go on", EXIT_INTERRUPTED) from None
    shown = {}
    for ref in wanted:  # in the order given; an array's members in their order
        for job in ended[ref]:
            if job["uuid"] not in shown:
                shown[job["uuid"]] = job
                click.echo(f"{_text(job['state'])} {job['uuid']}")
                _say_if_unsuccessful(job)
    failed = any(job["state"] != "succeeded" for job in shown.values())
    click.get_current_context().exit(EXIT_FAILED if failed else EXIT_OK)


@lclusterc.command()
@click.option("--json", "as_json", is_flag=True, help="Print the node records.")
@click.option("--forget", metavar="NODE", help="Drop a failed node from the table (root only).")
@click.pass_obj
def nodes(client, as_json, forget):
    """List the cluster's nodes: primed (places the cluster's jobs), ready,
    draining, drained or failed, with what they offer and have reserved."""
    if forget is not None:
        client.forget(_node_name(forget))
        click.echo(f"forgot {_text(forget)}")
        return
    found = client.nodes()
    if as_json:
        _echo_json(found)
    else:
        click.echo(_nodes_table(found))


def _node_name(name):
    # The daemon says whether there is such a node; this only keeps a name
    # that could never be one (blank, a path) from being sent at all.
    if not name.strip() or "/" in name or not name.isprintable():
        raise Failure(f"'{_text(name)}' is not a node name", EXIT_USAGE)
    return name


def _node_changed(row, name):
    reason = row.get("drain_reason")
    click.echo(f"{_text(row.get('state') or '-')} {_text(row.get('name') or name)}"
               + (f" ({_text(reason)})" if reason else ""))


@lclusterc.command()
@click.argument("node")
@click.option("--reason", metavar="TEXT", help="Why, as `lclusterc nodes` shows it.")
@click.pass_obj
def drain(client, node, reason):
    """Place no new jobs on NODE; its running jobs finish (draining, then
    drained). Root only."""
    _node_changed(client.drain(_node_name(node), reason), node)


@lclusterc.command()
@click.argument("node")
@click.pass_obj
def resume(client, node):
    """Let a drained NODE take jobs again. Root only."""
    _node_changed(client.resume(_node_name(node)), node)


def main(argv=None):
    """The `lclusterc` entry point (see _Group.main: every error is one line)."""
    sys.exit(lclusterc.main(args=argv, prog_name="lclusterc", standalone_mode=False))


if __name__ == "__main__":
    main()
