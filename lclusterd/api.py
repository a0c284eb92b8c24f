"""HTTP/JSON routes (aiohttp). See docs/api.md for the contract.

Callers on the unix socket are known by its peer credentials (SO_PEERCRED).
Callers over TCP must send the cluster's shared token (Authorization: Bearer
TOKEN, compared in constant time) or get 401; with it they act as root,
since the token file is readable by root only.

Every error is answered as {"error": "one line"} with the status of the one
table below (ERRORS), also aiohttp's own (malformed HTTP, a header too long):
see Connection. Connections are bounded per caller and in all, and idle or
slow ones are closed (Gate, Connection): one user cannot stop the node.
"""

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import os
import pwd
import re
import socket
import struct

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from dbus_next.errors import DBusError

from lclusterd import __version__, core, metrics
from lclusterd.node import Caller
from lclusterd.store import NoSpace as StoreNoSpace
from lclusterd.store import TooLarge as StoreTooLarge
from lclusterd.store import Unavailable as StoreUnavailable
from lclusterd.units import Unavailable as UnitsUnavailable

log = logging.getLogger(__name__)


INTERNAL = "internal error in lclusterd (its journal says more: journalctl -u lclusterd)"

# Which failure becomes which answer: the one table, first match wins.
# message None: the exception's own text (made one line); else this text.
ERRORS = (
    (core.TooLarge, 413, None),  # over a size bound: send less
    (core.InvalidInput, 400, None),  # the request itself is wrong
    (core.Forbidden, 403, None),  # only the submitter or root may do this; not allowed here
    (core.QuotaExceeded, 429, None),  # the caller has as many jobs queued as allowed
    (core.AmbiguousRef, 409, None),  # a prefix names several jobs
    (KeyError, 500, INTERNAL),  # a LookupError, but a bug of ours, not "no such job"
    (IndexError, 500, INTERNAL),
    (LookupError, 404, None),  # no such job, array or node
    (core.Conflict, 409, None),  # a record kept changing under us: retry
    (core.IllegalTransition, 409, None),  # the job moved on meanwhile (it ended, say)
    (core.Busy, 409, None),  # in use: forget of a node that is still live
    (StoreNoSpace, 507, None),  # etcd's quota is full: the message says the admin's fix
    (StoreTooLarge, 413, None),  # etcd finds the request too large
    (StoreUnavailable, 503, None),  # "etcd is unreachable at ...": nothing was written
    (UnitsUnavailable, 503, "systemd is unreachable"),
    (DBusError, 503, "systemd is unreachable"),
    (core.Elsewhere, 502, None),  # the job's output is on a node we cannot reach
)

# command, and what the job asks for (core.job_spec, core.run_as).
SUBMIT_FIELDS = {"command", "count", "commands", "user", "memory", "cpus", "tasks", "timeout", "env",
                 "workdir", "network", "max_attempts", "priority", "after", "after_mode",
                 "constraints", "max_running"}
DRAIN_FIELDS = {"reason"}
MAX_DRAIN_REASON = 200  # characters: it is shown in a column of `lclusterc nodes`
REMOTE = Caller(uid=0, gid=0, user="root")  # who a TCP caller with the token is
MAX_BODY = 2 * core.MAX_COMMAND_BYTES  # JSON escaping can double a command
MAX_DEPTH = 32  # JSON nesting a request may have (ours needs 2)
MAX_MESSAGE = 300  # characters of an error message
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
HIDDEN = "<hidden>"  # an env value shown to whoever is not its submitter or root

# Connections (issue 10 item 6). The limits are the config's
# max_connections and max_connections_per_uid (read at each connection, so a
# reload applies); root is bound only by the total plus ROOT_RESERVE, so the
# admin always gets in.
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_PER_UID = 256
ROOT_RESERVE = 64
HEAD_TIMEOUT = 10.0  # seconds from connecting to a request's whole head
KEEPALIVE = 15.0  # seconds an idle kept-alive connection stays open
BODY_TIMEOUT = 10.0  # seconds to send a request's body
# seconds aiohttp goes on reading a body left unread (413, 408), so that the
# client, done sending, reads the answer rather than a reset (its default: 10)
LINGER = 2.0
REFUSED_LINGER = 2.0  # seconds a refused connection has to read its 503
# ... for this many at a time; past them a refusal closes at once, so that a
# flood of connects holds no more fds than the bounds plus these
MAX_LINGERING = 256
REFUSAL_LOG_EVERY = 60.0  # seconds between journal lines about one refused caller


# The app's own state; aiohttp >= 3.9 (Debian 13) warns about plain string keys.
_key = getattr(web, "AppKey", lambda name, kind=None: name)
NODE, TOKEN = _key("node", object), _key("token", object)


def make_app(node, token=None):
    """token: the shared secret TCP callers must send (None: TCP refused)."""
    app = web.Application(middlewares=[_errors, _token], client_max_size=MAX_BODY)
    app[NODE] = node
    app[TOKEN] = token
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_post("/v1/nodes/{name}/drain", drain)
    app.router.add_post("/v1/nodes/{name}/resume", resume)
    app.router.add_delete("/v1/nodes/{name}", forget)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{ref}", check)
    app.router.add_get("/v1/jobs/{ref}/logs", logs)
    app.router.add_get("/v1/jobs/{ref}/unit-properties", unit_properties)
    app.router.add_delete("/v1/jobs/{ref}", remove)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", metrics_page)
    from lclusterd import ui  # ui builds on this module's helpers
    ui.add_routes(app)
    return app


def runner(node, token=None):
    """The daemon's web runner: make_app's routes, served by Connection."""
    return Runner(make_app(node, token), Gate(node.config), access_log=None,
                  keepalive_timeout=KEEPALIVE, lingering_time=LINGER)


# --- errors: one line of JSON ----------------------------------------------------

def one_line(message):
    """A message fit for an error answer: one line, control characters (and
    lone surrogates) escaped, at most MAX_MESSAGE characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 1] + "…"


def _error(status, message):
    return web.json_response({"error": one_line(message)}, status=status)


def answer_for(error):
    """(status, message) for an exception, by ERRORS; None if it is not there."""
    for kind, status, message in ERRORS:
        if isinstance(error, kind):
            if message is None:
                return status, (error.args[0] if error.args else str(error)) or type(error).__name__
            detail = str(error) if status != 500 else ""
            return status, f"{message}: {detail}" if detail else message
    return None


@web.middleware
async def _errors(request, handler):
    started = getattr(request.protocol, "request_started", None)
    if started:
        started()  # the head arrived in time (Connection's HEAD_TIMEOUT)
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, e.reason if e.status != 413 else
                          f"request body too large (over {MAX_BODY >> 10} KiB; an array's commands "
                          "count together: fewer a call)")
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:
        found = answer_for(e)
        if found is None or found[0] == 500:
            log.exception("internal error answering %s %s", request.method, one_line(request.path))
        if request.writer is not None and request.writer.output_size > 0:
            # A stream (logs) had begun: no status can be sent now. Cut the
            # connection, so that the client sees an incomplete answer, not an end.
            if found is not None and found[0] != 500:
                log.warning("cut the answer to %s %s: %s", request.method,
                            one_line(request.path), one_line(found[1]))
            raise ConnectionResetError("the answer had begun") from None
        return _error(500, INTERNAL) if found is None or found[0] == 500 else _error(*found)


def _is_unix(request):
    unix = getattr(request.protocol, "unix", None)  # a Connection knows (socket.family is slow)
    if unix is not None:
        return unix
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


def _is_ui(path):
    return path == "/ui" or path.startswith("/ui/")


@web.middleware
async def _token(request, handler):
    """TCP callers need the shared token; unix-socket callers never do. The
    status page (/ui/) checks its own cookie (ui.logged_in)."""
    if not _is_unix(request) and not _is_ui(request.path):
        token = request.app[TOKEN]
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if token is None or scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), token.encode()):
            return _error(401, "unauthorized: a valid token is required over TCP")
    return await handler(request)


def peer_uid(sock):
    """The uid at the other end of a unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def caller_of(request):
    """The peer's uid/gid from the unix socket; a TCP caller (the token was
    checked) is root."""
    if not _is_unix(request):
        return REMOTE
    connection = request.protocol
    if getattr(connection, "caller", None) is not None:  # SO_PEERCRED is fixed at connect
        return connection.caller
    _, uid, gid = peer_uid(request.transport.get_extra_info("socket"))
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    caller = Caller(uid=uid, gid=gid, user=user)
    if isinstance(connection, Connection):
        connection.caller = caller  # the next requests on it need no passwd lookup
    return caller


# --- what a caller may see ---------------------------------------------------------

def shown(job, caller):
    """The job's record for this caller: env values only for its submitter
    and root (issue 10 item 2); others see the keys."""
    record = _record(job)
    if caller.uid != 0 and caller.uid != job.owner_uid:
        record["env"] = [entry.partition("=")[0] + "=" + HIDDEN for entry in job.env]
    return record


def _record(job):
    """job.to_dict() without dataclasses.asdict's deep copy (a third of a
    submission's time): the answer is only read and serialized."""
    names = _FIELDS.get(type(job))
    if names is None:
        names = _FIELDS[type(job)] = tuple(f.name for f in dataclasses.fields(job))
    record = {name: getattr(job, name) for name in names}
    record["unit"] = job.unit
    return record


_FIELDS = {}


def shown_properties(properties, job, caller):
    """unit-properties for this caller: Environment= as shown() does."""
    if caller.uid == 0 or caller.uid == job.owner_uid:
        return properties
    return [[name, [entry.partition("=")[0] + "=" + HIDDEN for entry in value]]
            if name == "Environment" and isinstance(value, (list, tuple)) else [name, value]
            for name, value in properties]


# --- requests ---------------------------------------------------------------------

def _finite(text):
    number = float(text)
    if not math.isfinite(number):  # nan, inf: no time, no count
        raise ValueError(text)
    return number


def _depth(value, limit):
    """Refuse JSON nested deeper than limit (json.loads itself goes to 1,000s)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            raise core.InvalidInput(f"request body is nested deeper than {limit} levels")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


async def _body(request, allowed):
    try:
        async with asyncio.timeout(BODY_TIMEOUT):  # no task a request, as wait_for makes
            raw = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason=f"the request body took longer than {BODY_TIMEOUT:g} s") \
            from None
    except (RequestPayloadError, HttpProcessingError, ValueError):  # garbage under gzip/deflate
        request.content.feed_eof()  # nothing more to read: aiohttp must not linger on it
        raise core.InvalidInput("request body cannot be read (its Content-Encoding does not "
                                "decode)") from None
    try:
        body = json.loads(raw, parse_constant=_no_constant)  # NaN, Infinity: not JSON
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise core.InvalidInput("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise core.InvalidInput("request body must be a JSON object")
    _depth(body, MAX_DEPTH)
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise core.InvalidInput(f"unknown field(s): {', '.join(map(str, unknown))}")
    return body


def _encodable(body):
    """Refuse at submission what could never be sent on to etcd or systemd
    (issue 10 item 7): lone surrogates, keys with newlines. An array's size
    (count, and whether its records fit one etcd transaction) the node checks
    (verbs.submit)."""
    _commands(body)
    if body.get("env") is not None:
        core.validate_env(body["env"])
    if body.get("workdir") is not None:
        core.validate_workdir(body["workdir"])
    if body.get("network") is not None:
        core.validate_network(body["network"])
    if isinstance(body.get("user"), str):
        core.utf8(body["user"], "user")
    if body.get("max_running") is not None and body.get("count") is None and "commands" not in body:
        raise core.InvalidInput("max_running throttles an array: it needs count or commands")


def _commands(body):
    """The submission's commands: [command], or the array's from commands
    (addjob --file: one job per line); exactly one of the two."""
    if "commands" in body:
        if "command" in body or body.get("count") is not None:
            raise core.InvalidInput("commands makes an array of its own: not with command or count")
        commands = body["commands"]
        if not isinstance(commands, list) or not commands:
            raise core.InvalidInput("commands must be a non-empty list of commands")
        return [core.validate_command(c) for c in commands]
    if "command" not in body:
        raise core.InvalidInput("missing field: command")
    return [core.validate_command(body["command"])]


def _idempotency_key(request):
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise core.InvalidInput("Idempotency-Key must be 1 to 128 letters, digits or _.:-")
    return key


async def submit(request):
    body = await _body(request, SUBMIT_FIELDS)
    _encodable(body)
    key = _idempotency_key(request)
    uuids_only = _uuids_only(request)
    caller = caller_of(request)
    count = body.pop("count", None)  # an array of count copies, all queued or none
    commands = body.pop("commands", None)  # an array of one job per command
    array = {} if commands is None else {"commands": commands}
    made = await request.app[NODE].submit(body.pop("command", None), caller, body, count,
                                          idempotency_key=key, **array)
    if count is not None or commands is not None:
        array_id, jobs = made
        if uuids_only:
            return web.json_response({"array": array_id, "uuids": [j.uuid for j in jobs]}, status=201)
        return web.json_response({"array": array_id, "jobs": [shown(j, caller) for j in jobs]},
                                 status=201)
    return web.json_response({"job": shown(made, caller)}, status=201)


def _uuids_only(request):
    """?answer=uuids: an array is answered with its members' uuids, not
    their records (what addjob prints; 1,000 records are ~800 KB to make,
    send and parse). A query parameter, not a body field: a node of an
    older version ignores it and answers with the records."""
    if not request.query_string:  # (parsing the query costs a submission 3 %)
        return False
    answer = request.query.get("answer")
    if answer not in (None, "uuids"):
        raise core.InvalidInput("answer must be 'uuids' (or not given: the jobs' records)")
    return answer == "uuids"


async def _waiting(node, jobs):
    """{uuid: why it waits} for the queued ones among jobs (node.waiting)."""
    queued = [job for job in jobs if job.state == core.QUEUED]
    return await node.waiting(queued) if queued else {}


async def _shown_with_waiting(node, jobs, caller):
    waiting = await _waiting(node, jobs)
    rows = []
    for job in jobs:
        row = shown(job, caller)
        if job.uuid in waiting:
            row["waiting"] = waiting[job.uuid]
        rows.append(row)
    return rows


def _counts(jobs):
    """Members by state, the states they are in only, in core.STATES order."""
    counts = {state: 0 for state in core.STATES}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    return {state: n for state, n in counts.items() if n}


async def check(request):
    node, caller = request.app[NODE], caller_of(request)
    ref = request.match_info["ref"]
    try:
        job = await node.find(ref)
    except LookupError as missing:
        # KeyError, IndexError: bugs (ERRORS); an ambiguous prefix stays one.
        if isinstance(missing, (KeyError, IndexError, core.AmbiguousRef)):
            raise
        try:
            array = await node.find_array(ref)  # not a job: an array's id?
        except (KeyError, IndexError):
            raise
        except LookupError:
            raise missing from None  # neither: the job's "no job matches"
        jobs = list(array["jobs"])
        return web.json_response({"array": array["id"], "max_running": array.get("max_running"),
                                  "counts": _counts(jobs),
                                  "jobs": await _shown_with_waiting(node, jobs, caller)})
    return web.json_response({"job": (await _shown_with_waiting(node, [job], caller))[0]})


async def unit_properties(request):
    node = request.app[NODE]
    job = await node.find(request.match_info["ref"])
    properties = shown_properties(node.unit_properties(job), job, caller_of(request))
    return web.json_response({"properties": properties})


async def remove(request):
    caller = caller_of(request)
    removed = await request.app[NODE].remove(request.match_info["ref"], caller)
    if isinstance(removed, dict):  # an array: every live member cancelled
        return web.json_response({"array": removed["id"], "cancelled": list(removed["cancelled"]),
                                  "jobs": [shown(j, caller) for j in removed["jobs"]]})
    return web.json_response({"job": shown(removed, caller)})


def _number(request, name, kind=_finite, default=None):
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        raise core.InvalidInput(f"{name} must be a number") from None


async def list_jobs(request):
    limit = _number(request, "limit", int, 50)
    state = request.query.get("state")
    if state is not None and state not in core.STATES:
        raise core.InvalidInput(f"unknown state '{state}' (one of {', '.join(core.STATES)})")
    jobs = await request.app[NODE].list(
        limit=max(0, limit), state=state, node=request.query.get("node"),
        user=request.query.get("user"), since=_number(request, "since"),
        until=_number(request, "until"))
    return web.json_response({"jobs": await _shown_with_waiting(request.app[NODE], jobs,
                                                                caller_of(request))})


async def logs(request):
    """The job's output as text/plain, streamed chunk by chunk: each chunk is
    written (and drained to the client) before the next is read."""
    tail = _number(request, "tail", int)
    if tail is not None and tail < 0:
        raise core.InvalidInput("tail must be 0 or more")
    since = _number(request, "since")
    follow = request.query.get("follow", "0") not in ("0", "false", "")
    node = request.app[NODE]
    job = await node.find(request.match_info["ref"])
    return await stream(request, node.output(job, caller_of(request), follow, tail, since))


async def stream(request, chunks, headers=None):
    """Answer with chunks (an async generator of bytes) as text/plain."""
    async with contextlib.aclosing(chunks):
        first = await anext(chunks, b"")  # errors (403, 502) before the answer starts
        answer = web.StreamResponse(headers={**(headers or {}),
                                             "Content-Type": "text/plain; charset=utf-8"})
        await answer.prepare(request)
        await answer.write(first)
        async for chunk in chunks:
            await answer.write(chunk)
    await answer.write_eof()
    return answer


async def health(request):
    node = request.app[NODE]
    try:
        await node.ping()
    except StoreUnavailable as e:
        return _error(*answer_for(e))
    return web.json_response({"node": node.config.node_name, "version": __version__, "etcd": "ok"})


async def nodes(request):
    return web.json_response({"nodes": await request.app[NODE].nodes()})


def _root_only(request, what):
    """Drain, resume, forget: root on the socket, or the token over TCP
    (caller_of makes that root). The node checks again (K6)."""
    caller = caller_of(request)
    if caller.uid != 0:
        raise core.Forbidden(f"permission denied: only root may {what} a node")
    return caller


async def _node_row(node, name):
    """The node's row of `nodes` after a change ({"name"} if it is gone)."""
    return next((row for row in await node.nodes() if row.get("name") == name), {"name": name})


def _drain_reason(body):
    reason = body.get("reason")
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise core.InvalidInput("reason must be a string")
    reason = " ".join(core.utf8(reason, "reason").split())  # one line, as `nodes` shows it
    if len(reason) > MAX_DRAIN_REASON:
        raise core.InvalidInput(f"reason is longer than {MAX_DRAIN_REASON} characters")
    return reason or None


async def drain(request):
    """No new placements on the node; its running jobs finish (draining,
    then drained)."""
    caller = _root_only(request, "drain")
    # The body is optional: `{}`, `{"reason": "..."}` or nothing at all.
    body = await _body(request, DRAIN_FIELDS) if request.can_read_body else {}
    name, node = request.match_info["name"], request.app[NODE]
    await node.drain(name, _drain_reason(body), caller)
    return web.json_response({"node": await _node_row(node, name)})


async def resume(request):
    caller = _root_only(request, "resume")
    name, node = request.match_info["name"], request.app[NODE]
    await node.resume(name, caller)
    return web.json_response({"node": await _node_row(node, name)})


async def forget(request):
    """Drop a failed node from the table (a live one: 409, core.Busy)."""
    caller = _root_only(request, "forget")
    name = request.match_info["name"]
    await request.app[NODE].forget(name, caller)
    return web.json_response({"forgotten": name})


# --- metrics (issue 12 item 2) ---------------------------------------------------

async def metrics_snapshot(node):
    """What /metrics shows: the node's own counters (Node.counters), and
    gauges read off its records; the primed node also shows the cluster's:
    every job by state, and each node's capacity and reservations."""
    jobs = await node.list(limit=None)
    primed = bool(node.primed)
    config = node.config
    # The capacity placement counts with (config cpus, memory: K3), else the machine's.
    cpus = getattr(config, "cpus", None) or float(os.cpu_count() or 1)
    memory = getattr(config, "memory", None) or _memory_bytes()
    rows = None
    if primed:
        try:
            rows = await node.nodes()
        except StoreNoSpace:
            rows = None  # nodes() says NOSPACE; the scrape goes on without the nodes' gauges
    return metrics.snapshot(config.node_name, jobs, node.counters, slots=config.slots,
                            cpus=float(cpus), memory_bytes=int(memory), primed=primed,
                            cluster_jobs=jobs if primed else None, cluster_nodes=rows)


def _memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


async def metrics_page(request):
    """Prometheus text format; over TCP the token (_token) guards it like any route."""
    snapshot = await metrics_snapshot(request.app[NODE])
    body = metrics.render(snapshot)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


# --- connections: bounded, timed, JSON even for aiohttp's own errors ---------------------

class Gate:
    """Open connections by peer (a unix caller's uid, a TCP peer's address),
    within the config's bounds."""

    def __init__(self, config):
        self.config = config
        self.open = collections.Counter()
        self.total = 0
        self.lingering = 0  # refused connections given REFUSED_LINGER to read their 503
        self._told = {}  # peer: loop time of the last journal line about refusing it

    def admit(self, peer):
        """None if peer may open one more connection (counted), else why not."""
        most = getattr(self.config, "max_connections", DEFAULT_MAX_CONNECTIONS)
        per_peer = getattr(self.config, "max_connections_per_uid", DEFAULT_MAX_PER_UID)
        if peer == 0:
            if self.total >= most + ROOT_RESERVE:
                return f"lclusterd has {self.total} connections open, its most; try again later"
        elif self.total >= most:
            return f"lclusterd has {self.total} connections open, its most; try again later"
        elif self.open[peer] >= per_peer:
            who = f"uid {peer}" if isinstance(peer, int) else f"{peer[1] if isinstance(peer, tuple) else peer}"
            return (f"too many connections from {who} ({per_peer} open at most); "
                    "close some and try again")
        self.open[peer] += 1
        self.total += 1
        return None

    def release(self, peer):
        self.open[peer] -= 1
        if self.open[peer] <= 0:
            del self.open[peer]
        self.total -= 1

    def tell(self, peer, why, now):
        """One journal line per refused peer a minute, not one per connection."""
        if now - self._told.get(peer, -REFUSAL_LOG_EVERY) >= REFUSAL_LOG_EVERY:
            if len(self._told) > 1000:  # many TCP peers: forget the old ones
                self._told = {p: t for p, t in self._told.items() if now - t < REFUSAL_LOG_EVERY}
            self._told[peer] = now
            log.warning("refusing connections: %s", why)


def _raw_answer(status, reason, message):
    body = json.dumps({"error": one_line(message)}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class Connection(RequestHandler):
    """aiohttp's connection handler, with: a bound per peer and in all (over
    it: 503 and closed), a deadline for the first request's head (idle and
    slowloris connections; aiohttp's keepalive_timeout covers the later
    ones), and aiohttp's own errors (malformed HTTP, a line too long) as one
    JSON line, logged as one line."""

    caller = None  # who the unix peer is, once caller_of looked
    unix = None  # whether the peer is on the unix socket, once connected

    def connection_made(self, transport):
        sock = transport.get_extra_info("socket")
        self.unix = sock is not None and sock.family == socket.AF_UNIX
        self.peer = self._peer(sock)
        self.refused = self.gate.admit(self.peer)
        loop = asyncio.get_running_loop()
        if self.refused:
            self.gate.tell(self.peer, self.refused, loop.time())
            self.transport = transport
            transport.write(_raw_answer(503, "Service Unavailable", self.refused))
            if self.gate.lingering < MAX_LINGERING:
                # Let the client send its request and read the answer, then close.
                self.gate.lingering += 1
                self._closer = loop.call_later(REFUSED_LINGER, transport.close)
            else:
                transport.close()  # the answer still goes out first
            return
        self._head = loop.call_later(HEAD_TIMEOUT, self._head_late)
        super().connection_made(transport)

    @staticmethod
    def _peer(sock):
        if sock is not None and sock.family == socket.AF_UNIX:
            try:
                return peer_uid(sock)[1]
            except OSError:
                return "unknown"
        try:
            return ("tcp", sock.getpeername()[0])
        except (OSError, AttributeError, IndexError):
            return ("tcp", "unknown")

    def request_started(self):
        if self._head is not None:
            self._head.cancel()
            self._head = None

    def _head_late(self):
        self._head = None
        self.force_close()  # no whole request within HEAD_TIMEOUT of connecting

    def data_received(self, data):
        if self.refused:
            if self.transport is not None:
                self.transport.close()
            return
        super().data_received(data)

    def connection_lost(self, exc):
        if self.refused:
            if self._closer is not None:
                self._closer.cancel()
                self._closer = None
                self.gate.lingering -= 1
            self.transport = None
            return
        self.request_started()
        self.gate.release(self.peer)
        super().connection_lost(exc)

    def handle_error(self, request, status=500, exc=None, message=None):
        if request.writer.output_size > 0:  # the answer has begun: only closing is left
            raise ConnectionError("cannot answer an error after the answer began")
        if status >= 500:
            log.error("internal error serving a connection: %s", one_line(exc or message),
                      exc_info=exc)
            message = INTERNAL
        else:  # the request itself is broken: one line, no traceback
            message = one_line(getattr(exc, "message", None) or message or exc
                               or "malformed HTTP request")
            log.info("malformed HTTP request: %s", message)
        answer = web.json_response({"error": message}, status=status)
        answer.force_close()
        return answer


class Server(web.Server):
    def __call__(self):
        connection = Connection(self, loop=self._loop, **self._kwargs)
        connection.gate, connection.refused, connection._head = self.gate, None, None
        connection._closer = None
        return connection


class Runner(web.AppRunner):
    """An AppRunner whose connections are Connection (bounded by gate)."""

    def __init__(self, app, gate, **kwargs):
        super().__init__(app, **kwargs)
        self.gate = gate

    async def _make_server(self):
        server = await super()._make_server()
        server.__class__ = Server  # aiohttp builds it; only __call__ differs
        server.gate = self.gate
        return server
