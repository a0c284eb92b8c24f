"""Other nodes' APIs (aiohttp's client): the only module that calls them.

A node serves the output of the jobs it ran (its journal); asked for the
output of a job that ran elsewhere, it fetches it from that node over TCP
with the cluster's token and passes it on chunk by chunk, so it holds one
chunk at a time whatever the size (aiohttp stops reading the socket while
its buffer is full, and each chunk is written to our caller before the next
is read).
"""

import ssl
import urllib.parse

import aiohttp

CHUNK = 64 * 1024  # bytes passed on at a time
CONNECT_TIMEOUT = 5.0  # seconds to reach the other node
FIRST_ANSWER = 30.0  # seconds for its headers (follow=1 waits longer for lines, not for these)


class Unreachable(Exception):
    """The other node cannot give us the output; the message says why."""


class Peers:
    def __init__(self, token, ssl_context=None, ca=None):
        self.token = token  # the cluster's shared token, or None (TCP is off here)
        self.ssl = ssl_context  # tls.client_context(...) for https:// addresses; None: the default
        self.ca = ca  # the CA file in ssl_context (None: the system's CAs), for messages

    async def logs(self, node, address, job_uuid, **query):
        """The output of job_uuid from node at address, as bytes chunks."""
        if not self.token:
            raise Unreachable(f"job {job_uuid} ran on node {node}; this node has no token "
                              "(token_file) to fetch its output: ask that node")
        if not address:
            raise Unreachable(f"job {job_uuid} ran on node {node}, which has no address "
                              "(its 'listen' or 'address' setting): ask that node")
        params = {k: str(v) for k, v in query.items() if v is not None}
        url = f"{address.rstrip('/')}/v1/jobs/{job_uuid}/logs?{urllib.parse.urlencode(params)}"
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT,
                                        sock_read=None if query.get("follow") else FIRST_ANSWER)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(url, headers={"Authorization": f"Bearer {self.token}"},
                                   **({"ssl": self.ssl} if self.ssl is not None else {})) as answer:
                    if answer.status != 200:
                        raise Unreachable(f"node {node} answered {answer.status}: "
                                          f"{await _error(answer)}")
                    async for chunk in answer.content.iter_chunked(CHUNK):
                        yield chunk
        except aiohttp.ClientConnectorCertificateError as e:
            raise Unreachable(f"cannot fetch the output of job {job_uuid} from node {node}: "
                              f"{self._untrusted(address, e.certificate_error)}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise Unreachable(f"cannot fetch the output of job {job_uuid} from node {node} at "
                              f"{address}: {e or type(e).__name__}") from None

    def _untrusted(self, address, error):
        why = error.verify_message if isinstance(error, ssl.SSLCertVerificationError) else None
        why = why or getattr(error, "reason", None) or str(error)
        trust = f"the CA {self.ca}" if self.ca else "the system's CAs (set tls_ca in lclusterd.conf)"
        return f"its TLS certificate at {address} is not trusted by {trust}: {why}"


async def _error(answer):
    try:
        return " ".join(str((await answer.json(content_type=None))["error"]).split())
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        return answer.reason
