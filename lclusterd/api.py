"""HTTP/JSON routes (aiohttp). See docs/api.md for the contract.

Callers on the unix socket are known by its peer credentials (SO_PEERCRED).
Callers over TCP must send the cluster's shared token (Authorization: Bearer
TOKEN, compared in constant time) or get 401; with it they act as root,
since the token file is readable by root only.
Errors are answered as {"error": "one line"} with the status of the table below.
"""

import contextlib
import hmac
import json
import pwd
import socket
import struct

from aiohttp import web

from lclusterd import __version__, core
from lclusterd.node import Caller, Conflict, Elsewhere, PermissionDenied
from lclusterd.store import Unavailable as StoreUnavailable

# Which failure becomes which answer.
STATUS_OF = (
    (core.InvalidInput, 400),  # the request itself is wrong
    (core.Forbidden, 403),  # only the submitter or root may do this; not allowed here
    (core.AmbiguousRef, 409),  # a prefix names several jobs
    (LookupError, 404),  # no such job
    (Conflict, 409),  # a record kept changing under us: retry
    (StoreUnavailable, 503),  # etcd is down: nothing was written
    (Elsewhere, 502),  # the job's output is on a node we cannot reach
)

# command, and what the job asks for (core.job_spec, core.run_as).
SUBMIT_FIELDS = {"command", "count", "user", "memory", "cpus", "tasks", "timeout", "env", "workdir",
                 "network", "max_attempts", "priority"}
REMOTE = Caller(uid=0, gid=0, user="root")  # who a TCP caller with the token is
MAX_BODY = 2 * core.MAX_COMMAND_BYTES  # JSON escaping can double a command


def make_app(node, token=None):
    """token: the shared secret TCP callers must send (None: TCP refused)."""
    app = web.Application(middlewares=[_errors, _token], client_max_size=MAX_BODY)
    app["node"] = node
    app["token"] = token
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{ref}", check)
    app.router.add_get("/v1/jobs/{ref}/logs", logs)
    app.router.add_get("/v1/jobs/{ref}/unit-properties", unit_properties)
    app.router.add_delete("/v1/jobs/{ref}", remove)
    app.router.add_get("/v1/health", health)
    return app


def _error(status, message):
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _errors(request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, e.reason if e.status != 413 else "request body too large")
        raise
    except Exception as e:
        for kind, status in STATUS_OF:
            if isinstance(e, kind):
                return _error(status, e.args[0] if e.args else str(e))
        raise


def _is_unix(request):
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def _token(request, handler):
    """TCP callers need the shared token; unix-socket callers never do."""
    if not _is_unix(request):
        token = request.app["token"]
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if token is None or scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), token.encode()):
            return _error(401, "unauthorized: a valid token is required over TCP")
    return await handler(request)


def caller_of(request):
    """The peer's uid/gid from the unix socket; a TCP caller (the token was
    checked) is root."""
    if not _is_unix(request):
        return REMOTE
    sock = request.transport.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, gid = struct.unpack("3i", creds)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return Caller(uid=uid, gid=gid, user=user)


async def _body(request, allowed):
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise core.InvalidInput("request body is not valid JSON")
    if not isinstance(body, dict):
        raise core.InvalidInput("request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise core.InvalidInput(f"unknown field(s): {', '.join(unknown)}")
    return body


async def submit(request):
    body = await _body(request, SUBMIT_FIELDS)
    if "command" not in body:
        raise core.InvalidInput("missing field: command")
    count = body.pop("count", None)  # a batch: count copies, all queued or none
    job = await request.app["node"].submit(body.pop("command"), caller_of(request), body, count)
    if count is not None:
        return web.json_response({"jobs": [j.to_dict() for j in job]}, status=201)
    return web.json_response({"job": job.to_dict()}, status=201)


async def check(request):
    job = await request.app["node"].find(request.match_info["ref"])
    return web.json_response({"job": job.to_dict()})


async def unit_properties(request):
    node = request.app["node"]
    job = await node.find(request.match_info["ref"])
    return web.json_response({"properties": node.unit_properties(job)})


async def remove(request):
    job = await request.app["node"].remove(request.match_info["ref"], caller_of(request))
    return web.json_response({"job": job.to_dict()})


def _number(request, name, kind=float, default=None):
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
    jobs = await request.app["node"].list(
        limit=max(0, limit), state=state, node=request.query.get("node"),
        user=request.query.get("user"), since=_number(request, "since"),
        until=_number(request, "until"))
    return web.json_response({"jobs": [job.to_dict() for job in jobs]})


async def logs(request):
    """The job's output as text/plain, streamed chunk by chunk: each chunk is
    written (and drained to the client) before the next is read."""
    tail = _number(request, "tail", int)
    if tail is not None and tail < 0:
        raise core.InvalidInput("tail must be 0 or more")
    follow = request.query.get("follow", "0") not in ("0", "false", "")
    node = request.app["node"]
    job = await node.find(request.match_info["ref"])
    chunks = node.output(job, caller_of(request), follow, tail, _number(request, "since"))
    async with contextlib.aclosing(chunks):
        first = await anext(chunks, b"")  # errors (403, 502) before the answer starts
        answer = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await answer.prepare(request)
        await answer.write(first)
        async for chunk in chunks:
            await answer.write(chunk)
    await answer.write_eof()
    return answer


async def health(request):
    node = request.app["node"]
    try:
        await node.ping()
    except StoreUnavailable as e:
        return _error(503, str(e))
    return web.json_response({"node": node.config.node_name, "version": __version__, "etcd": "ok"})


async def nodes(request):
    return web.json_response({"nodes": await request.app["node"].nodes()})
