"""lclusterc's entry point, and `lclusterc addjob` without click.

A submission in a shell loop costs mostly Python's start-up and imports
(issue 13), and click alone costs more than the rest of an addjob. So main()
reads `[global options] addjob [options] [COMMAND]` itself, from the same
tables that cli.py builds its click options from, and runs addjob here; every
other command line (another command, --help, --version, anything it does not
read exactly as click would, a usage error) goes to cli.py's click commands,
which say what is wrong. This path never prints a usage error of its parsing.

This module imports nothing at the top that the standard interpreter has not
loaded already; client (HTTP) and inputs (validation) come when they are used.
"""

import os
import sys
import time

DEFAULT_SOCKET = "/run/lclusterd/lclusterd.sock"  # = client.DEFAULT_SOCKET
DEFAULT_TOKEN_FILE = "/etc/lclusterd/token"  # = client.DEFAULT_TOKEN_FILE
# core's constants that the options need before core is imported
# (test_cli_startup.py checks that they equal core's).
STATES = ("queued", "starting", "running", "succeeded", "failed", "cancelled", "warned", "lost")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
MAX_ARRAY = 1000
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

# The options before the command: (spelling, parameter, environment variable,
# default, metavar, help). cli.py makes the click group's options of them.
GLOBAL_OPTIONS = (
    ("--socket", "socket_path", "LCLUSTER_SOCKET", DEFAULT_SOCKET, "PATH",
     "The daemon's unix socket."),
    ("--server", "server", "LCLUSTER_SERVER", None, "URL",
     "Talk to the daemon at http://HOST:PORT or https://HOST:PORT over TCP instead (with the "
     "token)."),
    ("--token-file", "token_file", "LCLUSTER_TOKEN_FILE", DEFAULT_TOKEN_FILE, "FILE",
     "The cluster's token, for --server."),
    ("--ca", "ca", "LCLUSTER_CA", None, "FILE",
     "For https:// --server: the CA that signed the node's certificate (default: the system's "
     "CAs)."),
    ("--cert", "cert", "LCLUSTER_CERT", None, "FILE",
     "For https:// --server: a client certificate (a node with tls_client_ca)."),
    ("--key", "key", "LCLUSTER_KEY", None, "FILE", "The key of --cert (default: in the --cert file)."),
)

# addjob's options: (spelling, parameter, kind, metavar, help). kind: "flag";
# "text"; "many" (repeatable); or (low, high), an integer in that range (None:
# unbounded). cli.py makes the click command's options of them, in this order.
ADDJOB_OPTIONS = (
    ("--wait", "wait", "flag", None, "Wait for the job to end; exit with its status."),
    ("--retries", "retries", (1, MAX_ATTEMPTS), "N",
     f"Attempts in all when its nodes die (default {DEFAULT_ATTEMPTS})."),
    ("--priority", "priority", (MIN_PRIORITY, MAX_PRIORITY), "N",
     "Higher runs first (default 0; from -100 to 100)."),
    ("--json", "as_json", "flag", None, "Print the whole job record."),
    ("--memory", "memory", "text", "SIZE",
     "Memory limit, e.g. 256M, 2G (OOM-killed past it); placement reserves it."),
    ("--cpus", "cpus", "text", "N", "CPU time limit in CPUs, e.g. 0.5; placement reserves it."),
    ("--tasks", "tasks", "text", "N", "Most processes and threads at once."),
    ("--timeout", "timeout", "text", "TIME", "Stop it after this long, e.g. 90s, 10m, 2h."),
    ("--env", "env", "many", "KEY=VAL", "Set a variable (repeatable)."),
    ("--workdir", "workdir", "text", "DIR", "Working directory (absolute)."),
    ("--network", "network", "text", "NET",
     "none (own loopback, the default), host or ns:NAME, where the node allows it."),
    ("--user", "user", "text", "NAME",
     "Run as this user (root only; root's jobs run as nobody without it)."),
    ("--count", "count", (None, None), "N",
     f"An array of N copies (at most {MAX_ARRAY}); print its id, then their uuids."),
    ("--file", "file_name", "text", "FILE",
     "An array of one job per non-empty line of FILE ('-': stdin), instead of COMMAND."),
    ("--max-running", "max_running", "text", "K",
     "With --count or --file: at most K members run at once."),
    ("--after", "after", "many", "UUID[,UUID]",
     "Run once these jobs have all succeeded (cancelled if one cannot)."),
    ("--after-any", "after_any", "many", "UUID[,UUID]",
     "Run once these jobs have ended, whatever their outcome."),
    ("--after-failed", "after_failed", "many", "UUID[,UUID]",
     "Run once these jobs have failed (cancelled if one succeeds)."),
    ("--constraint", "constraint", "many", "KEY=VALUE",
     "Only on nodes with this label (repeatable; node=NAME pins it to one)."),
)

# The Go lclusterc's options, still accepted: --addjob=CMD is `addjob CMD`.
OLD_SPELLINGS = {"--addjob": "addjob", "--checkjob": "checkjob", "--removejob": "removejob"}
GLOBAL_OPTIONS_WITH_VALUE = tuple(option[0] for option in GLOBAL_OPTIONS)


class Failure(Exception):
    """A one-line error for people, `lclusterc: ` in front, and its exit code."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class Usage(Exception):
    """Options of addjob that do not go together: a usage error, said as click says its own."""

    def __init__(self, message, where="lclusterc addjob"):
        super().__init__(message)
        self.message = message
        self.where = where


def failure(error):
    """A client.ClientError as a Failure with its exit code."""
    return Failure(error.message, EXIT_FOR_CAUSE.get(error.cause, EXIT_FAILED))


def _text(value):
    """One printable line: None is '-', control characters are escaped so that a
    job's command cannot drive the terminal."""
    if value is None:
        return "-"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


def say(text, err=False):
    """A line on stdout (or stderr), at once: the user may need it while we wait."""
    stream = sys.stderr if err else sys.stdout
    stream.write(f"{text}\n")
    stream.flush()


def guarded(work):
    """work()'s exit code, with our errors one line on stderr, Ctrl-C 130 and
    `| head` quiet."""
    try:
        code = work()
    except Usage as e:
        say(f"lclusterc: {_text(e.message)} (see '{e.where} --help')", err=True)
        code = EXIT_USAGE
    except Failure as e:
        say(f"lclusterc: {_text(e.message)}", err=True)
        code = e.exit_code
    except KeyboardInterrupt:
        say("", err=True)  # as click does: the ^C stays on a line of its own
        code = EXIT_INTERRUPTED
    except BrokenPipeError:  # `lclusterc list | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_FAILED
    return code if isinstance(code, int) else EXIT_OK


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


# --- reading the command line as click would -------------------------------------

def _integer(text, low, high):
    try:
        number = int(text)  # what click's int and IntRange accept
    except ValueError:
        return None
    if (low is not None and number < low) or (high is not None and number > high):
        return None
    return number


def parse(args):
    """(group's values, addjob's values) of `[global options] addjob [options]
    [COMMAND]`, as click would give them to the commands; None for any other
    command line, and for one that click would refuse or read otherwise."""
    if "_LCLUSTERC_COMPLETE" in os.environ:  # click's own completion
        return None
    args = _rewrite_old_spellings(args)
    given = {name: os.environ.get(envvar) or default  # click ignores an empty variable
             for _, name, envvar, default, _, _ in GLOBAL_OPTIONS}
    names = {option[0]: option[1] for option in GLOBAL_OPTIONS}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        spelling, eq, value = args[i].partition("=")
        if spelling not in names:  # --help, --version, --, a typo
            return None
        if not eq:
            if i + 1 == len(args):
                return None
            i += 1
            value = args[i]
        given[names[spelling]] = value  # the last one counts
        i += 1
    if args[i:i + 1] != ["addjob"]:
        return None
    options = {option[0]: option for option in ADDJOB_OPTIONS}
    values = {name: (() if kind == "many" else False if kind == "flag" else None)
              for _, name, kind, _, _ in ADDJOB_OPTIONS}
    rest, positional = args[i + 1:], []
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            positional += rest
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)  # options may follow COMMAND
            continue
        spelling, eq, value = arg.partition("=")
        if spelling not in options:  # -h, --help, another command's option, a typo
            return None
        _, name, kind, _, _ = options[spelling]
        if kind == "flag":
            if eq:
                return None
            values[name] = True
            continue
        if not eq:
            if not rest:
                return None
            value = rest.pop(0)  # as click: even one that starts with '-'
        if kind == "many":
            values[name] += (value,)
        elif kind == "text":
            values[name] = value
        else:
            values[name] = _integer(value, *kind)
            if values[name] is None:
                return None
    if len(positional) > 1:
        return None
    values["command"] = positional[0] if positional else None
    return given, values


def main(argv=None):
    """The `lclusterc` entry point: addjob here, anything else through click."""
    args = sys.argv[1:] if argv is None else list(argv)
    parsed = parse(args)
    if parsed is None:
        from lclusterd import cli
        sys.exit(cli.run(args))
    given, values = parsed
    sys.exit(guarded(lambda: addjob(make_client(**given), **values)))


# --- addjob ------------------------------------------------------------------------

def make_client(socket_path, server, token_file, ca, cert, key):
    """The client of the global options (the token read only for --server)."""
    from lclusterd.client import Client, ClientError, read_token
    try:
        token = read_token(token_file) if server else None
        return Client(socket_path, server=server, token=token, ca=ca, cert=cert, key=key)
    except ClientError as e:
        raise failure(e) from None


def checked(check, value):
    """inputs' validation (the daemon checks again), as a Failure."""
    from lclusterd import inputs
    try:
        return check(value)
    except inputs.InvalidInput as e:
        raise Failure(str(e), EXIT_USAGE) from None


def echo_json(value):
    import json
    say(json.dumps(value, indent=2))


def say_if_unsuccessful(job):
    if job["state"] != "succeeded":
        say(f"lclusterc: job {job['uuid']} {job['state']}: {_text(job.get('reason'))}", err=True)


def wait_exit_code(job):
    """addjob --wait exits like `systemd-run --wait`: 0 if the job succeeded,
    its exit status if it failed with one (1 if none). A cancelled job gives
    130, the shell's "interrupted": it did not finish, somebody stopped it."""
    if job["state"] == "succeeded":
        return EXIT_OK
    if job["state"] == "cancelled":
        return EXIT_INTERRUPTED
    status = job.get("exit_status")
    return status if type(status) is int and 0 < status < 256 else EXIT_FAILED


def addjob(client, command, wait, retries, priority, as_json, memory, cpus, tasks, timeout, env,
           workdir, network, user, count, file_name, max_running, after, after_any, after_failed,
           constraint):
    """`lclusterc addjob` once its command line is read; returns the exit code."""
    from lclusterd.client import ClientError
    try:
        return _addjob(client, command, wait, retries, priority, as_json, memory, cpus, tasks,
                       timeout, env, workdir, network, user, count, file_name, max_running, after,
                       after_any, after_failed, constraint)
    except ClientError as e:
        raise failure(e) from None


def _addjob(client, command, wait, retries, priority, as_json, memory, cpus, tasks, timeout, env,
            workdir, network, user, count, file_name, max_running, after, after_any, after_failed,
            constraint):
    if (command is None) == (file_name is None):
        raise Usage("give COMMAND or --file FILE (one of them)")
    if file_name is not None and count is not None:
        raise Usage("--file makes one job per line: not with --count")
    if wait and (count is not None or file_name is not None):
        raise Usage(f"--wait takes one job, not {'--count' if count is not None else '--file'} "
                    "(lclusterc wait ARRAY waits for an array)")
    from lclusterd import inputs
    if max_running is not None:
        if count is None and file_name is None:
            raise Usage("--max-running throttles an array: give --count or --file")
        max_running = checked(inputs.validate_max_running, max_running)
    checks = {"memory": inputs.parse_size, "cpus": inputs.parse_cpus, "tasks": inputs.parse_tasks,
              "timeout": inputs.parse_duration, "workdir": inputs.validate_workdir,
              "network": inputs.validate_network}
    given = {"memory": memory, "cpus": cpus, "tasks": tasks, "timeout": timeout,
             "workdir": workdir, "network": network}
    for name, value in given.items():
        if value is not None:
            checked(checks[name], value)  # the daemon parses the text again
    if env:
        checked(inputs.validate_env, list(env))
    parents, mode = _after(after, after_any, after_failed)
    constraints = list(checked(inputs.validate_constraints, list(constraint))) if constraint else None
    spec = dict(env=list(env) or None, user=user, max_attempts=retries, priority=priority,
                after=parents, after_mode=mode, constraints=constraints, **given)
    if file_name is not None:
        return _addjob_array(client, as_json, dict(spec, max_running=max_running),
                             commands=_read_file(file_name))
    command = checked(inputs.validate_command, command)
    if count is not None:
        return _addjob_array(client, as_json, dict(spec, max_running=max_running), command,
                             count=count)
    job = client.add_job(command, **spec)
    if not as_json:
        say(job["uuid"])  # at once, even with --wait: the user may need it
    if wait:
        try:
            while job["state"] not in TERMINAL:
                time.sleep(POLL_INTERVAL)
                job = client.get_job(job["uuid"])
        except KeyboardInterrupt:
            raise Failure(f"stopped waiting; the job goes on (lclusterc removejob {job['uuid']} stops it)",
                          EXIT_INTERRUPTED) from None
        if not as_json:
            say_if_unsuccessful(job)
    if as_json:
        echo_json(job)
    return wait_exit_code(job) if wait else EXIT_OK


def _read_file(name):
    """addjob --file: one command per non-empty line of FILE, or of stdin
    for '-'. Empty or unreadable: a Failure (exit 2), nothing sent."""
    from lclusterd import inputs
    where = "stdin" if name == "-" else name
    try:
        if name == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(name, "rb") as f:
                data = f.read()
    except OSError as e:
        raise Failure(f"cannot read {where}: {e.strerror or e}", EXIT_USAGE) from None
    # Undecodable bytes stay as surrogates, so that inputs says which line is not UTF-8.
    lines = data.decode("utf-8", "surrogateescape").splitlines()
    commands = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            commands.append(inputs.validate_command(line))
        except inputs.InvalidInput as e:
            raise Failure(f"{where} line {number}: {e}", EXIT_USAGE) from None
    if not commands:
        raise Failure(f"{where} has no commands (one job per non-empty line)", EXIT_USAGE)
    if len(commands) > inputs.MAX_ARRAY:
        raise Failure(f"{where} has {len(commands)} commands; an array holds at most "
                      f"{inputs.MAX_ARRAY} (split it into several files)", EXIT_USAGE)
    return commands


def _after(after, after_any, after_failed):
    """(parents, mode) of --after / --after-any / --after-failed (one of them)."""
    from lclusterd import inputs
    given = [(value, mode) for value, mode in ((after, inputs.AFTER_OK), (after_any, inputs.AFTER_ANY),
                                               (after_failed, inputs.AFTER_FAILED)) if value]
    if not given:
        return None, None
    if len(given) > 1:
        raise Usage("give one of --after, --after-any and --after-failed")
    value, mode = given[0]
    option = {inputs.AFTER_OK: "--after", inputs.AFTER_ANY: "--after-any",
              inputs.AFTER_FAILED: "--after-failed"}[mode]
    parents = []
    # A job's uuid, a unique prefix of one, or an array's id (all its
    # members): the daemon resolves them and refuses one it does not know.
    for ref in (part.strip() for text in value for part in text.split(",")):
        if not ref:
            continue
        try:
            ref = inputs.validate_ref(ref)
        except inputs.InvalidInput as e:
            raise Failure(f"{option}: {e}", EXIT_USAGE) from None
        if ref not in parents:
            parents.append(ref)
    if not parents:
        raise Failure(f"{option} needs a job uuid", EXIT_USAGE)
    if len(parents) > inputs.MAX_AFTER:
        raise Failure(f"{option}: at most {inputs.MAX_AFTER} parent jobs", EXIT_USAGE)
    return parents, mode


def _addjob_array(client, as_json, spec, command=None, count=None, commands=None):
    """--count or --file: one array, queued all or none; prints its id on
    the first line, then the members' uuids."""
    from lclusterd import inputs
    if count is not None:
        try:
            inputs.validate_count(count)
        except inputs.InvalidInput as e:
            raise Failure(f"--count {count}: {e}", EXIT_USAGE) from None
    answer = client.add_array(command, count=count, commands=commands, records=as_json, **spec)
    if as_json:
        echo_json(answer)
    else:
        say("\n".join([answer["array"], *answer["uuids"]]))
    return EXIT_OK
