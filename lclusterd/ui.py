"""The read-only status page, /ui/ (issue 12 item 3).

Server-rendered HTML from the node's own verbs (list, nodes, find, output),
plus lclusterd/ui/ui.js (follows a running job's output, refreshes lists) and
ui.css, served from the package: nothing from a CDN, nodes are often offline.

Who may look: over TCP, whoever logged in with the cluster's token once (it
sets an HttpOnly, SameSite=Strict cookie holding an HMAC of the token, not the
token itself; a new token ends every session); on the unix socket, the local
caller as the API knows it. Every text that comes from a job (command, user,
env, reason, output) is escaped: a job cannot put markup on the page.
"""

import hashlib
import hmac
import html
import time
import urllib.parse
from pathlib import Path

from aiohttp import web

from lclusterd import __version__, api, core
from lclusterd.client import describe_waiting

ASSETS = Path(__file__).with_name("ui")  # ui.js, ui.css (setup.py's package_data)
COOKIE = "lclusterd_ui"
SESSION_DAYS = 30  # how long the browser keeps the cookie
LIST_LIMIT = 200  # rows a list page shows by default ...
MAX_LIMIT = 2000  # ... and at most
OUTPUT_TAIL = 2000  # lines of a finished job's output on its page
REFRESH = 5  # seconds between reloads of the list pages (ui.js; paused while reading)
# No inline script or style: the policy forbids them, so an escaping slip
# still could not run anything.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LIVE = (core.QUEUED, core.STARTING, core.RUNNING, core.WARNED)


def add_routes(app):
    r = app.router
    r.add_get("/ui", to_ui)
    r.add_get("/ui/", page(overview))
    r.add_get("/ui/queue", page(queue))
    r.add_get("/ui/running", page(running))
    r.add_get("/ui/history", page(history))
    r.add_get("/ui/jobs/{ref}", page(job_page))
    r.add_get("/ui/jobs/{ref}/output", page(output, html_errors=False))
    r.add_get("/ui/login", login_form)
    r.add_post("/ui/login", login)
    r.add_post("/ui/logout", logout)
    r.add_get("/ui/static/{name}", asset)


async def to_ui(request):
    return _redirect("/ui/")


# --- who may look -------------------------------------------------------------------

def session(token):
    """The cookie's value for this token: an HMAC, so the cookie is not the token."""
    return hmac.new(token.encode(), b"lclusterd ui session v1", hashlib.sha256).hexdigest()


def logged_in(request):
    if api._is_unix(request):
        return True
    token = request.app[api.TOKEN]
    given = request.cookies.get(COOKIE, "")
    return token is not None and hmac.compare_digest(given.encode(), session(token).encode())


def caller(request):
    return api.caller_of(request)  # a TCP caller who logged in holds the token: root


def page(handler, html_errors=True):
    """Guard a page: not logged in, to the login form; the API's errors as
    an HTML page with the API's status (or as text, for the output stream)."""
    async def guarded(request):
        if not logged_in(request):
            if not html_errors:
                raise web.HTTPUnauthorized(text="log in first\n", headers=HEADERS)
            return _redirect("/ui/login?" + urllib.parse.urlencode({"next": request.path_qs}))
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as error:  # noqa: BLE001  the same table as the API
            found = api.answer_for(error)
            if found is None or found[0] == 500:
                raise  # api's middleware logs it and answers 500
            if request.writer is not None and request.writer.output_size > 0:
                raise
            status, message = found
            if not html_errors:
                return web.Response(status=status, text=api.one_line(message) + "\n",
                                    headers=HEADERS)
            return _html(request, "Error", f'<p class="error">{e(api.one_line(message))}</p>',
                         status=status)
    return guarded


def _safe_next(target):
    """Only our own pages: no open redirect through ?next=."""
    if not isinstance(target, str) or not target.startswith("/ui/") or "//" in target \
            or "\\" in target:
        return "/ui/"
    return target


async def login_form(request):
    return _login_page(request, _safe_next(request.query.get("next")))


async def login(request):
    form = await request.post()
    target = _safe_next(form.get("next"))
    token = request.app[api.TOKEN]
    given = form.get("token", "")
    if not isinstance(given, str):
        given = ""
    if token is None:
        return _login_page(request, target, "this node has no token (token_file): "
                                            "the page is not served over TCP", status=403)
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return _login_page(request, target, "wrong token: not logged in", status=401)
    answer = _redirect(target)
    answer.set_cookie(COOKIE, session(token), max_age=SESSION_DAYS * 86400, path="/ui/",
                      httponly=True, samesite="Strict", secure=request.secure)
    return answer


async def logout(request):
    answer = _redirect("/ui/login")
    answer.del_cookie(COOKIE, path="/ui/")
    return answer


def _login_page(request, target, error=None, status=200):
    body = (f'<form class="login" method="post" action="/ui/login">'
            f'<input type="hidden" name="next" value="{e(target)}">'
            f'<label>Cluster token <input type="password" name="token" autocomplete="current-password"'
            f' autofocus required></label> <button type="submit">Log in</button></form>'
            f'<p class="hint">The token is in /etc/lclusterd/token on any node (root only).</p>')
    if error:
        body = f'<p class="error" id="login-error">{e(error)}</p>' + body
    return _html(request, "Log in", body, status=status, menu=False)


# --- pages ------------------------------------------------------------------------

async def overview(request):
    node = request.app[api.NODE]
    rows = await node.nodes()
    jobs = await node.list(limit=None)
    counts = {state: 0 for state in core.STATES}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    states = "".join(f'<a class="count state-{e(s)}" href="{_history_link(s)}">'
                     f'<b>{n}</b> {e(s)}</a>' for s, n in counts.items())
    body = (f'<h2>Nodes</h2>{_nodes_table(rows)}'
            f'<h2>Jobs</h2><p class="counts">{states}</p>')
    return _html(request, "Cluster", body, refresh=True)


def _history_link(state):
    if state == core.QUEUED:
        return "/ui/queue"
    if state in (core.STARTING, core.RUNNING, core.WARNED):
        return "/ui/running"
    return "/ui/history?" + urllib.parse.urlencode({"state": state})


def _nodes_table(rows):
    if not rows:
        return '<p class="empty">No node has registered.</p>'
    head = "<tr><th>node</th><th>state</th><th>address</th><th>cpus</th><th>memory</th>" \
           "<th>labels</th><th>slots</th><th>running</th><th>free</th><th>use</th>" \
           "<th>warned jobs</th><th>failed at</th><th>drain reason</th></tr>"
    lines = []
    for row in rows:
        slots, running = row.get("slots") or 0, row.get("running") or 0
        use = f"{100 * running // slots}%" if slots else ""
        warned = " ".join(_job_link(u) for u in row.get("warned") or ())
        labels = row.get("labels") if isinstance(row.get("labels"), dict) else {}
        labels = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "node")
        lines.append(f'<tr class="node-{e(row.get("state"))}"><td>{e(row.get("name"))}</td>'
                     f'<td>{e(row.get("state"))}</td><td>{e(row.get("address") or "")}</td>'
                     f'<td>{e(_reserved(row.get("reserved_cpus"), row.get("cpus"), _cpus))}</td>'
                     f'<td>{e(_reserved(row.get("reserved_memory"), row.get("memory"), _size))}</td>'
                     f'<td>{e(labels)}</td>'
                     f'<td>{e(slots)}</td><td>{e(running)}</td><td>{e(row.get("free") or 0)}</td>'
                     f'<td><meter min="0" max="{e(slots or 1)}" value="{e(running)}"></meter> {use}</td>'
                     f'<td>{warned}</td><td>{e(_when(row.get("failed_at")))}</td>'
                     f'<td>{e(row.get("drain_reason") or "")}</td></tr>')
    return f'<table class="nodes">{head}{"".join(lines)}</table>'


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cpus(value):
    return f"{value:g}"


def _size(size):
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}{unit}"
    return str(int(size))


def _reserved(reserved, capacity, show):
    """'1.5 of 4 reserved', as placement counts it; '' when the node does not say."""
    if not _number(capacity):
        return ""
    return f"{show(reserved if _number(reserved) else 0)} of {show(capacity)} reserved"


async def queue(request):
    """The queue in queue order, with why each job waits (node.waiting: the
    scheduler's own reasons, as `lclusterc list` shows them)."""
    node = request.app[api.NODE]
    jobs = sorted(await node.list(limit=None, state=core.QUEUED), key=core.queue_rank)
    limit = _limit(request)
    shown = jobs[:limit]
    waiting = await node.waiting(shown) if shown else {}
    reasons = [describe_waiting(waiting.get(job.uuid)) or "" for job in shown]
    table = _jobs_table(shown, request, extra=("waiting because", reasons))
    more = f'<p class="more">{len(jobs) - limit} more not shown.</p>' if len(jobs) > limit else ""
    return _html(request, f"Queue ({len(jobs)})", table + more, refresh=True)


async def running(request):
    node = request.app[api.NODE]
    jobs = [j for j in await node.list(limit=None)
            if j.state in (core.STARTING, core.RUNNING, core.WARNED)]
    limit = _limit(request)
    return _html(request, f"Running ({len(jobs)})", _jobs_table(jobs[:limit], request), refresh=True)


def _limit(request):
    try:
        limit = int(request.query.get("limit", LIST_LIMIT))
    except ValueError:
        raise core.InvalidInput("limit must be a number") from None
    return max(1, min(limit, MAX_LIMIT))


async def history(request):
    node = request.app[api.NODE]
    q = request.query
    state = q.get("state") or None
    if state is not None and state not in core.STATES:
        raise core.InvalidInput(f"unknown state '{state}' (one of {', '.join(core.STATES)})")
    now = time.time()
    since = core.parse_when(q["since"], now) if q.get("since") else None
    until = core.parse_when(q["until"], now) if q.get("until") else None
    limit = _limit(request)
    jobs = await node.list(limit=None, state=state, node=q.get("node") or None,
                           user=q.get("user") or None, since=since, until=until)
    ended = [j for j in jobs if j.terminal or state is not None]
    options = "".join(f'<option value="{e(s)}"{" selected" if s == state else ""}>{e(s)}</option>'
                      for s in ("", *core.STATES))
    form = (f'<form class="filters" method="get" action="/ui/history">'
            f'<label>state <select name="state">{options}</select></label> '
            f'<label>user <input name="user" value="{e(q.get("user", ""))}" size="10"></label> '
            f'<label>node <input name="node" value="{e(q.get("node", ""))}" size="10"></label> '
            f'<label>since <input name="since" value="{e(q.get("since", ""))}" size="12" '
            f'placeholder="6h, 2026-11-28"></label> '
            f'<label>until <input name="until" value="{e(q.get("until", ""))}" size="12"></label> '
            f'<label>rows <input name="limit" value="{limit}" size="5"></label> '
            f'<button type="submit">Filter</button></form>')
    more = f'<p class="more">{len(ended) - limit} more not shown.</p>' if len(ended) > limit else ""
    return _html(request, f"History ({len(ended)})", form + _jobs_table(ended[:limit], request) + more)


async def job_page(request):
    node = request.app[api.NODE]
    job = await node.find(request.match_info["ref"])
    record = api.shown(job, caller(request))
    if job.state == core.QUEUED:  # why it waits, as the queue page says it
        why = (await node.waiting([job])).get(job.uuid)
        if why:  # right under its state
            at = list(record).index("state") + 1
            items = list(record.items())
            record = dict(items[:at] + [
                ("position", f"{why.get('ahead', 0) + 1} of {why.get('total', '?')} in the queue"),
                ("waiting", describe_waiting(why))] + items[at:])
    fields = "".join(f"<tr><th>{e(k)}</th><td>{_value(k, v)}</td></tr>" for k, v in record.items()
                     if v not in (None, (), [], ""))
    url = f"/ui/jobs/{urllib.parse.quote(job.uuid)}/output"
    if job.state in LIVE:  # ui.js streams it (follow=1) into the <pre>
        text, follow = "", f' data-follow="{e(url)}?follow=1"'
    else:
        text, follow = await _output_text(node, job, request), ""
    body = (f'<table class="record">{fields}</table>'
            f'<h2>Output <a class="raw" href="{e(url)}">as text</a></h2>'
            f'<pre id="output" class="output"{follow}>{e(text)}</pre>'
            f'<p id="output-state" class="hint"></p>')
    return _html(request, f"Job {job.uuid}", body)


async def _output_text(node, job, request):
    chunks = node.output(job, caller(request), False, OUTPUT_TAIL, None)
    parts = []
    async for chunk in chunks:
        parts.append(chunk)
    return b"".join(parts).decode("utf-8", "replace")


async def output(request):
    """The job's output as text/plain (never HTML: nosniff), streamed; follow=1
    goes on while the job runs."""
    node = request.app[api.NODE]
    job = await node.find(request.match_info["ref"])
    follow = request.query.get("follow", "0") not in ("0", "false", "")
    return await api.stream(request, node.output(job, caller(request), follow, None, None), HEADERS)


async def asset(request):
    name = request.match_info["name"]
    kinds = {"ui.js": "text/javascript", "ui.css": "text/css"}
    if name not in kinds:  # only these two: no path from the request reaches the disk
        raise web.HTTPNotFound()
    headers = {**HEADERS, "Content-Type": f"{kinds[name]}; charset=utf-8",
               "Cache-Control": "max-age=3600"}
    return web.Response(body=(ASSETS / name).read_bytes(), headers=headers)


# --- HTML ---------------------------------------------------------------------------

def e(value):
    """Escaped for HTML text and attribute values: always use it."""
    return html.escape("" if value is None else str(value), quote=True)


def _when(t):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _value(key, value):
    if key in ("submitted_at", "started_at", "ended_at", "warned_at") and isinstance(value, (int, float)):
        return e(_when(value))
    if key == "command":
        return f"<code>{e(value)}</code>"
    if key == "attempts" and isinstance(value, (list, tuple)):
        return "<br>".join(e(f"{a.get('node')}: {_when(a.get('started_at'))} – "
                             f"{_when(a.get('ended_at')) or '…'} {a.get('outcome') or ''}".strip())
                           if isinstance(a, dict) else e(a) for a in value)
    if isinstance(value, (list, tuple)):
        return "<br>".join(e(v) for v in value)
    return e(value)


def _job_link(job_uuid):
    return f'<a href="/ui/jobs/{e(urllib.parse.quote(job_uuid))}">{e(job_uuid[:8])}</a>'


def _took(job):
    if job.started_at is None:
        return ""
    seconds = (job.ended_at or time.time()) - job.started_at
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _jobs_table(jobs, request, extra=None):
    if not jobs:
        return '<p class="empty">No job.</p>'
    head = "<tr><th>job</th><th>state</th><th>user</th><th>node</th><th>submitted</th>" \
           "<th>took</th><th>exit</th><th>command</th>" + (f"<th>{e(extra[0])}</th>" if extra else "") \
           + "</tr>"
    lines = []
    for i, job in enumerate(jobs):
        reason = job.reason or job.warning or ""
        cell = f"<td>{e(extra[1][i])}</td>" if extra else ""
        lines.append(f'<tr class="state-{e(job.state)}"><td>{_job_link(job.uuid)}</td>'
                     f'<td>{e(job.state)}</td><td>{e(job.submitter or job.user)}</td>'
                     f'<td>{e(job.node or "")}</td><td>{e(_when(job.submitted_at))}</td>'
                     f'<td>{e(_took(job))}</td>'
                     f'<td>{e("" if job.exit_status is None else job.exit_status)}</td>'
                     f'<td class="command" title="{e(reason)}"><code>{e(job.command)}</code></td>'
                     f'{cell}</tr>')
    return f'<table class="jobs">{head}{"".join(lines)}</table>'


def _html(request, title, body, status=200, menu=True, refresh=False):
    name = getattr(request.app[api.NODE].config, "node_name", "")
    links = (("/ui/", "Cluster"), ("/ui/queue", "Queue"), ("/ui/running", "Running"),
             ("/ui/history", "History"))
    nav = ""
    if menu:
        here = ' class="here"'
        nav = "<nav>" + "".join(f'<a href="{h}"{here if request.path == h else ""}>{t}</a>'
                                for h, t in links)
        if not api._is_unix(request):
            nav += '<form method="post" action="/ui/logout"><button type="submit">Log out</button></form>'
        nav += "</nav>"
    data = f' data-refresh="{REFRESH}"' if refresh else ""
    text = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)} · lclusterd</title>'
            f'<link rel="stylesheet" href="/ui/static/ui.css">'
            f'<script src="/ui/static/ui.js" defer></script></head>'
            f'<body{data}><header><h1>lclusterd <small>{e(name)}</small></h1>{nav}</header>'
            f'<main><h2 class="title">{e(title)}</h2>{body}</main>'
            f'<footer>lclusterd {e(__version__)} · read-only</footer></body></html>')
    return web.Response(status=status, text=text, content_type="text/html", charset="utf-8",
                        headers=HEADERS)


def _redirect(target):
    return web.Response(status=303, headers={**HEADERS, "Location": target})
