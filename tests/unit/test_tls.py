"""lclusterd/tls.py and HTTPS end to end (issue 12 item 4): certificates made
by openssl in tmp_path; the api served over HTTPS on 127.0.0.1; lclusterc
--server https://... --ca FILE against it."""

import asyncio
import socket
import ssl
import subprocess
import threading

import pytest
from aiohttp import web

from lclusterd import api, cli, tls
from lclusterd.client import Client, ClientError, UNTRUSTED

from tests.unit.test_api import FakeNode

TOKEN = "k" * 32


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def make_cert(d, name, ca):
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", f"{name}.pem", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    with pytest.MonkeyPatch.context() as mp:  # the autouse guard is function-scoped: not here yet
        mp.delenv("OPENSSL_CONF", raising=False)
        make_ca(d, "ca")
        make_ca(d, "other")
        make_cert(d, "server", "ca")
        make_cert(d, "client", "ca")
        make_cert(d, "stranger", "other")
    return d


# --- the server context: one line naming the file ---------------------------------

def test_a_good_pair_makes_a_server_context(pki):
    context = tls.server_context(pki / "server.pem", pki / "server.key")
    assert context.verify_mode == ssl.CERT_NONE
    context = tls.server_context(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    assert context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("cert, key, client_ca, words", [
    ("missing.pem", "server.key", None, "cannot read the TLS certificate {d}/missing.pem"),
    ("server.pem", "missing.key", None, "cannot read the TLS key {d}/missing.key"),
    ("server.pem", "client.key", None, "the TLS key {d}/client.key does not match the certificate "
                                      "{d}/server.pem"),
    ("server.key", "server.key", None, "the TLS certificate {d}/server.key is not a PEM certificate"),
    ("server.pem", "server.pem", None, "the TLS key {d}/server.pem is not a usable PEM private key"),
    ("server.pem", "server.key", "missing.pem", "cannot read the TLS client CA {d}/missing.pem"),
    ("server.pem", "server.key", "ca.key", "the TLS client CA {d}/ca.key is not a PEM certificate"),
])
def test_a_bad_file_is_one_line_naming_it(pki, cert, key, client_ca, words):
    with pytest.raises(tls.TLSError) as e:
        tls.server_context(pki / cert, pki / key, client_ca and pki / client_ca)
    assert str(e.value).startswith(words.format(d=pki)), str(e.value)
    assert "\n" not in str(e.value)


def test_an_unreadable_key_names_the_file(pki, tmp_path):
    key = tmp_path / "server.key"
    key.mkdir()  # unreadable even to root (the tests run as root here)
    with pytest.raises(tls.TLSError, match=f"cannot read the TLS key {key}: Is a directory"):
        tls.server_context(pki / "server.pem", key)


# --- HTTPS end to end -----------------------------------------------------------------

class HTTPS:
    """api.make_app served over HTTPS on 127.0.0.1, in a thread."""

    def __init__(self, context):
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(context, started), daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.url = f"https://localhost:{self.port}"

    def _serve(self, context, started):
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(api.make_app(FakeNode(), TOKEN))
        self.loop.run_until_complete(self.runner.setup())
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.loop.run_until_complete(web.SockSite(self.runner, sock, ssl_context=context).start())
        started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def https(pki):
    s = HTTPS(tls.server_context(pki / "server.pem", pki / "server.key"))
    yield s
    s.stop()


@pytest.fixture
def mutual(pki):
    s = HTTPS(tls.server_context(pki / "server.pem", pki / "server.key", pki / "ca.pem"))
    yield s
    s.stop()


@pytest.mark.allow_io("socket")
def test_the_right_ca_verifies(https, pki):
    assert Client(server=https.url, token=TOKEN, ca=pki / "ca.pem").nodes() == []


@pytest.mark.allow_io("socket")
def test_a_wrong_ca_fails_with_one_clear_line(https, pki):
    with pytest.raises(ClientError) as e:
        Client(server=https.url, token=TOKEN, ca=pki / "other.pem").nodes()
    assert e.value.cause == UNTRUSTED and not e.value.lost
    assert e.value.message.startswith(f"the TLS certificate of {https.url} is not trusted by the CA "
                                      f"{pki}/other.pem"), e.value.message
    assert "\n" not in e.value.message


@pytest.mark.allow_io("socket")
def test_lclusterc_with_ca_and_with_lcluster_ca(https, pki, tmp_path, monkeypatch, capsys):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    base = ["--server", https.url, "--token-file", str(token)]
    assert cli.lclusterc.main([*base, "--ca", str(pki / "ca.pem"), "nodes"],
                              standalone_mode=False) == 0
    monkeypatch.setenv("LCLUSTER_CA", str(pki / "other.pem"))
    assert cli.lclusterc.main([*base, "nodes"], standalone_mode=False) == cli.EXIT_DENIED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not trusted by the CA" in err and "Traceback" not in err
    monkeypatch.setenv("LCLUSTER_CA", str(tmp_path / "nothing.pem"))
    assert cli.lclusterc.main([*base, "nodes"], standalone_mode=False) == cli.EXIT_DENIED
    assert f"cannot read the TLS CA {tmp_path}/nothing.pem" in capsys.readouterr().err


@pytest.mark.allow_io("socket")
def test_client_certificates_when_the_node_asks(mutual, pki):
    ca = pki / "ca.pem"
    assert Client(server=mutual.url, token=TOKEN, ca=ca, cert=pki / "client.pem",
                  key=pki / "client.key").nodes() == []
    for cert in (None, "stranger"):  # none, or one the node's CA did not sign
        client = Client(server=mutual.url, token=TOKEN, ca=ca, cert=cert and pki / f"{cert}.pem",
                        key=cert and pki / f"{cert}.key")
        with pytest.raises(ClientError) as e:
            client.nodes()
        assert "\n" not in e.value.message


@pytest.mark.allow_io("socket")
def test_plain_http_to_an_https_listener_is_one_line(https):
    with pytest.raises(ClientError) as e:
        Client(server=https.url.replace("https", "http"), token=TOKEN).nodes()
    assert "\n" not in e.value.message


# --- what peers.py needs: aiohttp with tls.client_context, the node's own pair -----------

async def _peer_get(url, context):
    import aiohttp
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/nodes", ssl=context,
                               headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
            return answer.status


@pytest.mark.allow_io("socket")
def test_a_node_fetches_from_another_over_https_with_its_own_certificate(mutual, pki):
    import aiohttp
    # Nodes verify each other against tls_client_ca and present their tls_cert/tls_key.
    context = tls.client_context(pki / "ca.pem", pki / "server.pem", pki / "server.key")
    assert asyncio.run(_peer_get(mutual.url, context)) == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        asyncio.run(_peer_get(mutual.url, tls.client_context(pki / "other.pem")))
