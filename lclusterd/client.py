"""A small synchronous client of lclusterd's HTTP/JSON API (docs/api.md).

Standard library only: lclusterc must work wherever python3 does. Every
failure becomes one ClientError with a one-line message for people; what it
means as an exit status is the CLI's business (cli.py's table).
"""

import contextlib
import http.client
import json
import socket
import ssl
import time
import urllib.parse
import uuid

from lclusterd import tls

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


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket: only connect() differs."""

    def __init__(self, path, timeout=TIMEOUT):
        super().__init__("localhost", timeout=timeout)  # Host: header only
        self.socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


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
        self.server = urllib.parse.urlsplit(server) if server else None
        if self.server and (self.server.scheme not in ("http", "https") or not self.server.hostname):
            raise ClientError(f"--server must be an http://HOST:PORT or https://HOST:PORT URL, "
                              f"not '{server}'", BAD_URL)
        self.token = token
        self.where = server or socket_path
        self.ca = ca
        self.tls = None
        if self.server and self.server.scheme == "https":
            try:
                self.tls = tls.client_context(ca, cert, key)
            except tls.TLSError as e:
                raise ClientError(str(e), UNTRUSTED) from None

    # The one place that knows the transport.
    def _connection(self, timeout):
        if self.tls is not None:
            return http.client.HTTPSConnection(self.server.hostname, self.server.port or 443,
                                               timeout=timeout, context=self.tls)
        if self.server:
            return http.client.HTTPConnection(self.server.hostname, self.server.port or 80,
                                              timeout=timeout)
        return UnixHTTPConnection(self.socket_path, timeout)

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
        except ssl.SSLCertVerificationError as e:  # nothing was sent: not lost
            raise ClientError(tls.describe(e, self.where, self.ca), UNTRUSTED) from None
        except ssl.SSLError as e:
            raise ClientError(tls.describe(e, self.where, self.ca), UNREACHABLE) from None
        except TimeoutError:
            raise ClientError(f"lclusterd at {self.where} did not answer within "
                              f"{timeout:g} s", UNREACHABLE, lost=True) from None
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            # lclusterd.socket accepted, and the daemon died or never started
            raise self._unreachable("it closed the connection without an answer", lost=True) from None
        except (OSError, http.client.HTTPException) as e:
            raise ClientError(f"lost the connection to lclusterd at {self.where}: "
                              f"{e or type(e).__name__}", UNREACHABLE, lost=True) from None

    def _send(self, method, path, body=None, timeout=None, extra_headers=None):
        """(connection, answer) with the answer's headers read; the caller closes."""
        headers = {"Accept": "application/json", **(extra_headers or {})}
        if self.server and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        timeout = timeout or self.timeout
        conn = self._connection(timeout)
        try:
            with self._transport(timeout):
                conn.request(method, path, body=data, headers=headers)
                answer = conn.getresponse()
                if answer.status >= 400:
                    self._refusal(answer, answer.read())
        except BaseException:
            conn.close()
            raise
        return conn, answer

    @staticmethod
    def _refusal(answer, raw):
        try:
            payload = json.loads(raw)
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
            payload = json.loads(raw)
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
        return "/v1/jobs/" + urllib.parse.quote(ref, safe="")

    def _submit(self, body):
        """POST /v1/jobs with an Idempotency-Key, sent once more with the same
        key if the answer was lost: the jobs are queued once either way."""
        key = {"Idempotency-Key": str(uuid.uuid4())}
        try:
            return self._request("POST", "/v1/jobs", body, extra_headers=key)
        except ClientError as e:
            if not e.lost:
                raise
        time.sleep(RETRY_PAUSE)
        return self._request("POST", "/v1/jobs", body, extra_headers=key)

    def add_job(self, command, **spec):
        """spec: user, memory, cpus, tasks, timeout, env, workdir, network,
        max_attempts, priority (docs/api.md); None means 'not asked for'."""
        body = {"command": command, **{k: v for k, v in spec.items() if v is not None}}
        return self._job(self._submit(body))

    def nodes(self):
        return self._field(self._request("GET", "/v1/nodes"), "nodes", list)

    def add_jobs(self, command, count, **spec):
        """count copies of command in one request (core.MAX_BATCH at most); spec as add_job's."""
        body = {"command": command, "count": count, **{k: v for k, v in spec.items() if v is not None}}
        jobs = self._field(self._submit(body), "jobs", list)
        return [self._job({"job": job}) for job in jobs]

    def get_job(self, ref):
        return self._job(self._request("GET", self._job_path(ref)))

    def unit_properties(self, ref):
        return self._field(self._request("GET", self._job_path(ref) + "/unit-properties"),
                           "properties", list)

    def remove_job(self, ref):
        answer = self._request("DELETE", self._job_path(ref), timeout=max(self.timeout, REMOVE_TIMEOUT))
        return self._job(answer)

    @staticmethod
    def _query(path, **params):
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
        conn, answer = self._send("GET", path, timeout=timeout)
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
