"""lclusterc: queue shell commands on the lclusterd cluster and follow them.

Thin on purpose: parse arguments, refuse what is plainly bad before bothering
the daemon, format answers. Every decision is the daemon's (docs/api.md).
"""

import sys
import time

import click

from lclusterd import __version__, quick
from lclusterd.quick import (  # noqa: F401  (main, the entry point, and the exit codes: cli's too)
    EXIT_DENIED, EXIT_ETCD, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_NO_JOB, EXIT_OK, EXIT_TABLE,
    EXIT_UNREACHABLE, EXIT_USAGE, STATES, TERMINAL, Failure, _rewrite_old_spellings, _text,
    checked, echo_json, main, say_if_unsuccessful, wait_exit_code)

# Start-up is most of what `lclusterc addjob` costs in a shell loop: quick.py
# runs addjob without this module (and click); the other commands come here.
# This module imports only click and quick at the top: core (validation),
# client (HTTP) and the formatting modules are imported by the functions that
# use them, and --help and --version need none of them (test_cli_startup.py
# guards it).
MIN_COMMAND_COLUMN = 7  # list never squeezes COMMAND below its header
NODE_COLUMN = 16  # longer node and user names are cut in list
CHECKJOB_LINES = 5  # lines of output checkjob shows
REASON_COLUMN = 60  # list cuts a queued job's reason to this many characters

EPILOG = ("\b\nExit status:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_TABLE)
          + "\n\n\b\nThe old spellings --addjob=CMD, --checkjob=UUID and --removejob=UUID"
          "\nstill work.")


# click 8.2 (Debian 13) raises this usage error for a bare group: it is the help text.
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _usage_line(error):
    """A click usage error as one line (click prints four: usage, try, blank, error)."""
    where = error.ctx.command_path if error.ctx else "lclusterc"
    return f"lclusterc: {_text(error.format_message())} (see '{where} --help')"


# --- formatting ----------------------------------------------------------------

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


# --- commands --------------------------------------------------------------------

class _Group(click.Group):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, _rewrite_old_spellings(args))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's main, with every error one line on stderr (usage errors:
        exit 2), Ctrl-C 130, and `| head` quiet; standalone_mode=False
        returns the exit code instead of exiting."""
        def work():
            try:
                return super(_Group, self).main(args, prog_name, complete_var,
                                                standalone_mode=False, **extra)
            except NO_ARGS_IS_HELP as e:  # click >= 8.2: bare `lclusterc` prints its help
                e.show()
                return e.exit_code
            except click.UsageError as e:
                click.echo(_usage_line(e), err=True)
                return e.exit_code
            except click.Abort:  # click's Ctrl-C
                return EXIT_INTERRUPTED
        code = quick.guarded(work)
        if not standalone_mode:
            return code
        sys.exit(code)

    def invoke(self, ctx):
        # The one place where a client failure becomes a message and an exit code.
        from lclusterd.client import ClientError
        try:
            return super().invoke(ctx)
        except ClientError as e:
            raise quick.failure(e) from None


# The options of quick.py's tables, in their order: quick.py reads them without click.

def _global_options(function):
    for spelling, name, envvar, default, metavar, help in reversed(quick.GLOBAL_OPTIONS):
        function = click.option(spelling, name, metavar=metavar, envvar=envvar, show_envvar=True,
                                default=default, show_default=default is not None,
                                help=help)(function)
    return function


def _addjob_options(function):
    for spelling, name, kind, metavar, help in reversed(quick.ADDJOB_OPTIONS):
        if kind == "flag":
            extra = {"is_flag": True}
        elif kind == "text":
            extra = {}
        elif kind == "many":
            extra = {"multiple": True}
        else:
            extra = {"type": int if kind == (None, None) else click.IntRange(*kind)}
        function = click.option(spelling, name, metavar=metavar, help=help, **extra)(function)
    return function


@click.group(cls=_Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@_global_options
@click.version_option(__version__, "--version", prog_name="lclusterc")
@click.pass_context
def lclusterc(ctx, **given):
    """Queue shell commands on the lclusterd cluster, and follow them.

    REF is a job's uuid or a unique prefix of it (at least 4 hex digits).
    """
    ctx.obj = quick.make_client(**given)


def run(args):
    """The click commands on the command line args; returns the exit code."""
    return lclusterc.main(args=args, prog_name="lclusterc", standalone_mode=False)


@lclusterc.command()
@click.argument("command", required=False)
@_addjob_options
@click.pass_obj
def addjob(client, **values):
    """Queue COMMAND (run by /bin/sh -c) and print the job's uuid. With
    --count or --file, an array: its id on the first line, then its
    members' uuids."""
    click.get_current_context().exit(quick.addjob(client, **values))


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
        props = client.unit_properties(checked(core.validate_ref, ref))
        if as_json:
            echo_json(props)
        else:
            click.echo("\n".join(_property(name, value) for name, value in props))
        return
    answer = client.lookup(checked(core.validate_ref, ref))
    if "array" in answer:
        if as_json:
            echo_json(answer)
        else:
            click.echo(_describe_array(answer))
        return
    job = answer["job"]
    if as_json:
        echo_json(job)
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
    job = client.remove_job(checked(core.validate_ref, ref))
    if "jobs" in job:  # an array's answer (a job's record has "array" too: its id or null)
        _removed_array(job, as_json)
        return
    if as_json:
        echo_json(job)
    else:
        click.echo(f"{_text(job['state'])} {job['uuid']}")
    if job["state"] == "warned":
        raise Failure(f"job {job['uuid']} did not stop: {_text(job.get('warning'))}; it is "
                      "watched and leaves 'warned' once its processes are gone", EXIT_FAILED)


def _removed_array(answer, as_json):
    """removejob ARRAY: a line per member it cancelled (as for one job)."""
    jobs = {job["uuid"]: job for job in answer["jobs"]}
    if as_json:
        echo_json(answer)
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
    return None if text is None else checked(lambda t: core.parse_when(t, time.time()), text)


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
        echo_json(jobs)
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
    ref = checked(core.validate_ref, ref)
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
        say_if_unsuccessful(job)
        click.get_current_context().exit(wait_exit_code(job))


@lclusterc.command()
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.pass_obj
def wait(client, refs):
    """Wait until the jobs have ended; print each one's state. REF may be an
    array's id: all its members. Exit 0 only if all of them succeeded, else 1."""
    from lclusterd import core
    wanted = list(dict.fromkeys(checked(core.validate_ref, ref) for ref in refs))
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
                time.sleep(quick.POLL_INTERVAL)
    except KeyboardInterrupt:
        raise Failure("stopped waiting; the jobs go on", EXIT_INTERRUPTED) from None
    shown = {}
    for ref in wanted:  # in the order given; an array's members in their order
        for job in ended[ref]:
            if job["uuid"] not in shown:
                shown[job["uuid"]] = job
                click.echo(f"{_text(job['state'])} {job['uuid']}")
                say_if_unsuccessful(job)
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
        echo_json(found)
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


if __name__ == "__main__":
    main()
