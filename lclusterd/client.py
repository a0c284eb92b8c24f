"""A small synchronous client of lclusterd's HTTP/JSON API (docs/api.md).

Standard library only: lclusterc must work wherever python3 does. Every
failure becomes one ClientError with a one-line message for people; what it
means as an exit status is the CLI's business (cli.py's table).

Cheap to import, because `lclusterc addjob` in a shell loop is mostly
start-up: a request over the unix socket is written and read on a plain
socket (_socket's, HTTP/1.1, Connection: close), and http.client (which brings email and
ssl), urllib.parse and tls are imported only by what needs them: TCP and
HTTPS (--server), following output (logs), a path with a job's ref in it; the
Idempotency-Key of a submission is made without the uuid module.
"""

import _json  # json's C core: json itself imports re and enum, a third of an addjob's start-up
import _socket  # socket.py's C core: enough for the plain path (socket.py costs an addjob ~13%)
import contextlib
import os
import sys
import time

DEFAULT_SOCKET = "/run/lclusterd/lclusterd.sock"
DEFAULT_TOKEN_FILE = "/etc/lclusterd/token"  # the daemon's token_file
TIMEOUT = 30.0  # seconds per request: the daemon answers at once or not at all
# DELETE of a running job waits for it to stop (the daemon's stop_timeout,
# then SIGKILL), so it gets longer.
REMOVE_TIMEOUT = 120.0
FOLLOW_TIMEOUT = 24 * 3600.0  # logs -f: a silent job is no failure
CHUNK = 64 * 1024  # bytes of output read (and written) at a time
# A submission whose answer was lost (the connection reset or closed, no
# answer in time) is sent once more with the same Idempotency-Key, after this
# pause: the daemon answers a key it has seen with the jobs it queued then.
RETRY_PAUSE = 1.0
STATUS_HINT = "systemctl status lclusterd"

# Causes of a ClientError that are not HTTP statuses (those are ints).
UNREACHABLE = "unreachable"  # no socket, nobody listening, connection lost, timeout
DENIED = "denied"  # the socket itself refused us (file permissions)
BAD_ANSWER = "bad-answer"  # something answered, but not the API we know
BAD_URL = "bad-url"  # --server is not a URL we can use
UNTRUSTED = "untrusted"  # HTTPS: the server's certificate does not verify, or the CA file is unusable


class ClientError(Exception):
    """One failure: `message` is one line for people; `cause` is the HTTP
    status (int) of an error answer, or UNREACHABLE, DENIED or BAD_ANSWER."""

    def __init__(self, message, cause, lost=False):
        super().__init__(message)
        self.message = message
        self.cause = cause
        self.lost = lost  # the request may have reached the daemon, its answer did not reach us


def _dumps(value):
    """value (dicts, lists, tuples, str, int, float, bool, None) as JSON, as
    json.dumps writes it (ASCII, lone surrogates escaped) but without blanks."""
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float) and value - value == 0:  # not NaN nor infinite: JSON has no such
        return float.__repr__(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_dumps, value)) + "]"
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return "{" + ",".join(f"{_dumps(k)}:{_dumps(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"{value!r:.40} is not JSON")


class _Decoder:
    """What _json's scanner reads of a json.JSONDecoder: json.loads' defaults."""
    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int, parse_constant = float, int, float


_scan = _json.make_scanner(_Decoder)
_BLANKS = " \t\n\r"  # JSON's whitespace


def _loads(raw):
    """The JSON value of bytes (UTF-8) or str, as json.loads; ValueError if
    it is not one JSON value."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw  # UnicodeDecodeError: a ValueError
    start = len(text) - len(text.lstrip(_BLANKS))
    try:
        value, end = _scan(text, start)
    except StopIteration:  # nothing JSON where a value starts
        raise ValueError("not JSON") from None
    if text[end:].strip(_BLANKS):
        raise ValueError("not JSON: more after the value")
    return value


def unix_connect(path, timeout, kind=_socket.socket):
    """A stream socket connected to the unix socket path; kind: its class
    (http.client needs socket.socket's makefile)."""
    sock = kind(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _unix_http_connection():
    import http.client

    class UnixHTTPConnection(http.client.HTTPConnection):
        """HTTP over a unix stream socket: only connect() differs."""

        def __init__(self, path, timeout=TIMEOUT):
            super().__init__("localhost", timeout=timeout)  # Host: header only
            self.socket_path = path

        def connect(self):
            import socket
            self.sock = unix_connect(self.socket_path, self.timeout, socket.socket)
    return UnixHTTPConnection


def __getattr__(name):
    # UnixHTTPConnection is made (and http.client imported) on first use.
    if name == "UnixHTTPConnection":
        globals()[name] = _unix_http_connection()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BadHTTP(Exception):
    """An answer on the unix socket that is not the HTTP we sent for."""


MAX_HEAD = 64 * 1024  # bytes of status line and headers we read before giving up


class PlainAnswer:
    """The answer to one request on a plain socket: status, reason, read().

    The request said Connection: close, so the body ends where the daemon
    closes, or at its Content-Length; a chunked body is decoded."""

    def __init__(self, sock):
        self.sock = sock
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(CHUNK)
            if not more:
                if not data:  # as http.client's RemoteDisconnected
                    raise ConnectionResetError("closed without an answer")
                raise BadHTTP("the answer ended in its headers")
            data += more
            if len(data) > MAX_HEAD:
                raise BadHTTP("an answer with too long headers")
        head, _, self.rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, reason = (lines[0].split(" ", 2) + ["", ""])[:3]
        if not version.startswith("HTTP/1.") or not (status.isdigit() and len(status) == 3):
            raise BadHTTP(f"not an HTTP answer: {lines[0][:60]!r}")
        self.status, self.reason = int(status), reason.strip()
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def read(self):
        parts = [self.rest]
        length = self.headers.get("content-length", "")
        want = int(length) if length.isdigit() else None
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            want = None
        have = len(self.rest)
        while want is None or have < want:
            more = self.sock.recv(CHUNK)
            if not more:
                break
            parts.append(more)
            have += len(more)
        data = b"".join(parts)
        if want is not None:
            if have < want:
                raise BadHTTP(f"the answer ended after {have} of its {want} bytes")
            return data[:want]
        return _dechunk(data) if "chunked" in self.headers.get("transfer-encoding", "").lower() else data


def _dechunk(data):
    body = []
    while True:
        size, sep, data = data.partition(b"\r\n")
        try:
            n = int(size.split(b";")[0], 16)
        except ValueError:
            raise BadHTTP("a malformed chunk in the answer") from None
        if not sep or len(data) < n:
            raise BadHTTP("the answer ended in a chunk")
        if n == 0:
            return b"".join(body)
        body.append(data[:n])
        data = data[n + 2:]


def _http_errors():
    """What a transport failure may be besides OSError: http.client's errors
    once it is imported, and ours."""
    http_client = sys.modules.get("http.client")
    return (BadHTTP,) + ((http_client.HTTPException,) if http_client else ())


def _random_uuid():
    """str(uuid.uuid4()) without the uuid module, which imports platform and
    costs an addjob as much as Python's own start-up."""
    h = bytearray(os.urandom(16))
    h[6] = h[6] & 0x0F | 0x40  # version 4
    h[8] = h[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = h.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def describe_waiting(waiting):
    """A queued job's "waiting" (docs/api.md) as one line for people, the
    way lclusterc list, checkjob and the status page say it:
    'priority (3 of 10 ahead)', 'resources: no node has 8.0G free; ...'.
    None if there is nothing to say."""
    if not isinstance(waiting, dict) or not isinstance(waiting.get("kind"), str):
        return None
    kind, text = waiting["kind"], waiting.get("text")
    if not isinstance(text, str) or not text or text == kind:
        return kind
    return f"{kind} ({text})" if kind == "priority" else f"{kind}: {text}"


def read_token(path):
    """The shared token for --server, from a file; ClientError if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except PermissionError:
        raise ClientError(f"permission denied reading the token file {path} (it is root's)", DENIED) from None
    except OSError as e:
        raise ClientError(f"cannot read the token file {path}: {e.strerror}", DENIED) from None


class Client:
    def __init__(self, socket_path=DEFAULT_SOCKET, timeout=TIMEOUT, server=None, token=None,
                 ca=None, cert=None, key=None):
        """server: an http://HOST:PORT or https://HOST:PORT URL to use instead
        of the unix socket, with token (the cluster's shared secret). HTTPS
        verifies the server against the CA file ca (else the system's CAs);
        cert/key: a client certificate, for a node with tls_client_ca."""
        self.socket_path = socket_path
        self.timeout = timeout
        self.server = None
        if server:
            import urllib.parse
            self.server = urllib.parse.urlsplit(server)
        if self.server and (self.server.scheme not in ("http", "https") or not self.server.hostname):
            raise ClientError(f"--server must be an http://HOST:PORT or https://HOST:PORT URL, "
                              f"not '{server}'", BAD_URL)
        self.token = token
        self.where = server or socket_path
        self.ca = ca
        self.tls = None
        if self.server and self.server.scheme == "https":
            from lclusterd import tls
            try:
                self.tls = tls.client_context(ca, cert, key)
            except tls.TLSError as e:
                raise ClientError(str(e), UNTRUSTED) from None

    # The one place that knows the transport (with _send's plain socket).
    def _connection(self, timeout):
        import http.client
        if self.tls is not None:
            return http.client.HTTPSConnection(self.server.hostname, self.server.port or 443,
                                               timeout=timeout, context=self.tls)
        if self.server:
            return http.client.HTTPConnection(self.server.hostname, self.server.port or 80,
                                              timeout=timeout)
        return __getattr__("UnixHTTPConnection")(self.socket_path, timeout)

    def _unreachable(self, why, lost=False):
        if self.server:
            return ClientError(f"lclusterd is not reachable at {self.where} ({why})", UNREACHABLE, lost)
        # Over the socket, whatever the way it failed, the daemon is not
        # running (lclusterd.socket may have failed to start it): say where to look.
        start = "" if lost else "; start it with sudo systemctl start lclusterd.socket"
        return ClientError(f"lclusterd is not running ({why}; see {STATUS_HINT}{start})",
                           UNREACHABLE, lost)

    @contextlib.contextmanager
    def _transport(self, timeout):
        """Transport failures as ClientErrors."""
        try:
            yield
        except FileNotFoundError:
            raise self._unreachable(f"no socket {self.socket_path}") from None
        except ConnectionRefusedError:
            raise self._unreachable(f"nothing listens on {self.where}") from None
        except PermissionError:
            raise ClientError(f"permission denied on the socket {self.socket_path}", DENIED) from None
        except TimeoutError:
            raise ClientError(f"lclusterd at {self.where} did not answer within "
                              f"{timeout:g} s", UNREACHABLE, lost=True) from None
        except (ConnectionResetError, BrokenPipeError):  # also http.client's RemoteDisconnected
            # lclusterd.socket accepted, and the daemon died or never started
            raise self._unreachable("it closed the connection without an answer", lost=True) from None
        except (OSError, *_http_errors()) as e:
            ssl = sys.modules.get("ssl")  # imported by http.client: HTTPS may have failed
            if ssl and isinstance(e, ssl.SSLError):
                from lclusterd import tls
                cause = UNTRUSTED if isinstance(e, ssl.SSLCertVerificationError) else UNREACHABLE
                raise ClientError(tls.describe(e, self.where, self.ca), cause) from None  # not lost
            raise ClientError(f"lost the connection to lclusterd at {self.where}: "
                              f"{e or type(e).__name__}", UNREACHABLE, lost=True) from None

    def _send(self, method, path, body=None, timeout=None, extra_headers=None, stream=False):
        """(connection, answer) with the answer's headers read; the caller
        closes. Over the unix socket, unless the answer is a stream to follow,
        the request goes on a plain socket (see PlainAnswer)."""
        headers = {"Accept": "application/json", **(extra_headers or {})}
        if self.server and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = _dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        timeout = timeout or self.timeout
        plain = not self.server and not stream
        conn = None
        try:
            with self._transport(timeout):
                if plain:
                    conn = unix_connect(self.socket_path, timeout)
                    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close",
                            *(f"{k}: {v}" for k, v in headers.items())]
                    if data is not None:
                        head.append(f"Content-Length: {len(data)}")
                    conn.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + (data or b""))
                    answer = PlainAnswer(conn)
                else:
                    conn = self._connection(timeout)
                    conn.request(method, path, body=data, headers=headers)
                    answer = conn.getresponse()
                if answer.status >= 400:
                    self._refusal(answer, answer.read())
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return conn, answer

    @staticmethod
    def _refusal(answer, raw):
        try:
            payload = _loads(raw)
        except ValueError:  # also UnicodeDecodeError
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, str) or not error.strip():
            error = f"lclusterd answered HTTP {answer.status} {answer.reason}"
        raise ClientError(" ".join(error.split()), answer.status)  # one line, always

    def _request(self, method, path, body=None, timeout=None, extra_headers=None):
        conn, answer = self._send(method, path, body, timeout, extra_headers)
        try:
            with self._transport(timeout or self.timeout):
                raw = answer.read()
        finally:
            conn.close()
        try:
            payload = _loads(raw)
        except ValueError:  # also UnicodeDecodeError
            payload = None
        if not isinstance(payload, dict):
            raise ClientError(f"malformed answer from lclusterd (HTTP {answer.status}): "
                              "not a JSON object", BAD_ANSWER)
        return payload

    @staticmethod
    def _field(payload, key, kind):
        value = payload.get(key)
        if not isinstance(value, kind):
            raise ClientError(f"malformed answer from lclusterd: no '{key}' in it", BAD_ANSWER)
        return value

    def _job(self, payload):
        # The CLI relies on these two; everything else it shows as given.
        job = self._field(payload, "job", dict)
        if not isinstance(job.get("uuid"), str) or not isinstance(job.get("state"), str):
            raise ClientError("malformed answer from lclusterd: a job without uuid or state", BAD_ANSWER)
        return job

    @staticmethod
    def _job_path(ref):
        import urllib.parse
        return "/v1/jobs/" + urllib.parse.quote(ref, safe="")

    def _submit(self, body, path="/v1/jobs"):
        """POST /v1/jobs with an Idempotency-Key, sent once more with the same
        key if the answer was lost: the jobs are queued once either way."""
        key = {"Idempotency-Key": _random_uuid()}
        try:
            return self._request("POST", path, body, extra_headers=key)
        except ClientError as e:
            if not e.lost:
                raise
        time.sleep(RETRY_PAUSE)
        return self._request("POST", path, body, extra_headers=key)

    @staticmethod
    def _spec(spec):
        """The body's optional fields: None is "not asked for"; after and
        constraints may be given as a list or tuple (or one comma-separated
        string, as core reads it)."""
        body = {}
        for name, value in spec.items():
            if value is None:
                continue
            body[name] = list(value) if isinstance(value, tuple) else value
        return body

    def add_job(self, command, **spec):
        """spec: user, memory, cpus, tasks, timeout, env, workdir, network,
        max_attempts, priority, after, after_mode, constraints (docs/api.md);
        None means 'not asked for'."""
        return self._job(self._submit({"command": command, **self._spec(spec)}))

    def nodes(self):
        return self._field(self._request("GET", "/v1/nodes"), "nodes", list)

    def add_array(self, command=None, count=None, commands=None, records=True, **spec):
        """An array in one request, all queued or none: count copies of
        command, or one job per entry of commands (addjob --file).
        spec as add_job's, plus max_running (members running at once).
        Returns {"array": id, "jobs": [JOB, ...]} in member order; with
        records=False {"array": id, "uuids": [UUID, ...]} (a smaller answer)."""
        if (commands is None) == (count is None):
            raise ValueError("add_array takes count (with command) or commands")
        body = ({"command": command, "count": count} if commands is None
                else {"commands": list(commands)})
        answer = self._submit({**body, **self._spec(spec)},
                              "/v1/jobs" if records else "/v1/jobs?answer=uuids")
        array = self._field(answer, "array", str)
        if not records and "jobs" not in answer:
            uuids = self._field(answer, "uuids", list)
            if not all(isinstance(u, str) for u in uuids):
                raise ClientError("malformed answer from lclusterd: a uuid that is not a string",
                                  BAD_ANSWER)
            return {"array": array, "uuids": uuids}
        jobs = [self._job({"job": job}) for job in self._field(answer, "jobs", list)]
        if not records:  # a node of an older version answers with the records
            return {"array": array, "uuids": [job["uuid"] for job in jobs]}
        return {"array": array, "jobs": jobs}

    def add_jobs(self, command, count, **spec):
        """count copies of command in one request (an array; core.MAX_ARRAY
        at most); spec as add_array's. Returns their records."""
        answer = self._submit({"command": command, "count": count, **self._spec(spec)})
        return [self._job({"job": job}) for job in self._field(answer, "jobs", list)]

    def lookup(self, ref):
        """GET /v1/jobs/{ref} as it answers: {"job": JOB} for a job (a queued
        one with "waiting"), or {"array": id, "counts": {state: n},
        "max_running": K, "jobs": [JOB, ...]} for an array's id."""
        answer = self._request("GET", self._job_path(ref))
        if "array" in answer:
            return self._array(answer)
        return {"job": self._job(answer)}

    def _array(self, answer):
        self._field(answer, "array", str)
        self._field(answer, "jobs", list)
        answer["jobs"] = [self._job({"job": job}) for job in answer["jobs"]]
        return answer

    def get_job(self, ref):
        answer = self.lookup(ref)
        if "array" in answer:
            raise ClientError(f"{answer['array']} is an array of {len(answer['jobs'])} jobs, "
                              "not a job", 400)
        return answer["job"]

    def get_array(self, ref):
        """An array by its id: {"array", "counts", "max_running", "jobs"}."""
        answer = self.lookup(ref)
        if "array" not in answer:
            raise ClientError(f"{answer['job']['uuid']} is a job, not an array", 400)
        return answer

    def unit_properties(self, ref):
        return self._field(self._request("GET", self._job_path(ref) + "/unit-properties"),
                           "properties", list)

    def remove_job(self, ref):
        """Take a job off the queue or stop it; returns its record after
        removal. For an array's id: every live member is cancelled, and the
        answer is {"array": id, "cancelled": [uuids], "jobs": [JOB, ...]}
        (tell them apart by "jobs": a job's record has "array" too)."""
        answer = self._request("DELETE", self._job_path(ref), timeout=max(self.timeout, REMOVE_TIMEOUT))
        if "array" in answer:
            self._field(answer, "cancelled", list)
            return self._array(answer)
        return self._job(answer)

    # -- nodes: root only (root on the socket, or the token over TCP) ------------

    @staticmethod
    def _node_path(name):
        import urllib.parse
        return "/v1/nodes/" + urllib.parse.quote(name, safe="")

    def drain(self, name, reason=None):
        """No new jobs on node name; its running ones finish. Returns its row."""
        body = {"reason": reason} if reason is not None else {}
        return self._field(self._request("POST", self._node_path(name) + "/drain", body),
                           "node", dict)

    def resume(self, name):
        """Undo drain: the node takes jobs again. Returns its row."""
        return self._field(self._request("POST", self._node_path(name) + "/resume", {}),
                           "node", dict)

    def forget(self, name):
        """Drop a failed node from the table (a live one: ClientError 409)."""
        self._request("DELETE", self._node_path(name))

    @staticmethod
    def _query(path, **params):
        import urllib.parse
        query = {k: v for k, v in params.items() if v is not None}
        return path + ("?" + urllib.parse.urlencode(query) if query else "")

    def list_jobs(self, limit=None, state=None, node=None, user=None, since=None, until=None):
        path = self._query("/v1/jobs", limit=limit, state=state, node=node, user=user,
                           since=since, until=until)
        return self._field(self._request("GET", path), "jobs", list)

    def logs(self, ref, follow=False, tail=None, since=None):
        """The job's output, as bytes chunks as they come. Following has no
        timeout: the job may be silent for as long as it likes."""
        path = self._query(self._job_path(ref) + "/logs", follow=1 if follow else None,
                           tail=tail, since=since)
        timeout = FOLLOW_TIMEOUT if follow else self.timeout
        conn, answer = self._send("GET", path, timeout=timeout, stream=True)
        try:
            with self._transport(timeout):
                while True:
                    chunk = answer.read1(CHUNK)
                    if not chunk:
                        return
                    yield chunk
        finally:
            conn.close()

    def health(self):
        return self._request("GET", "/v1/health")
