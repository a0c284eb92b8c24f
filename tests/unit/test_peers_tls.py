"""A node fetching another node's output over HTTPS (peers.py, issue 12
item 4): verified against tls_ca (else tls_client_ca), and a certificate it
cannot trust is one line saying against which CA. Certificates and the
HTTPS server are test_tls.py's."""

import asyncio

import pytest

from lclusterd import config as configuration, daemon, peers, tls
from tests.unit.test_tls import TOKEN, https, pki  # noqa: F401  (fixtures)

UUID = "0b5e8c1e-3c1f-4a43-9d59-1d1c1f0a2b77"


def fetch(peer, address):
    async def read():
        return [chunk async for chunk in peer.logs("n3", address, UUID)]
    return asyncio.run(read())


def settings(**values):
    return configuration.from_mapping({"node_name": "n2", **values}, exists=lambda path: True)


@pytest.mark.allow_io("socket")
def test_the_cluster_ca_lets_a_node_fetch_and_another_ca_is_one_line(https, pki):  # noqa: F811
    config = settings(tls_ca=str(pki / "ca.pem"))
    trusting = peers.Peers(TOKEN, daemon.peer_context(config), daemon.peer_ca(config))
    with pytest.raises(peers.Unreachable) as e:
        fetch(trusting, https.url)
    assert "answered 404" in str(e.value)  # through the handshake: the fake node has no such job
    wrong = settings(tls_ca=str(pki / "other.pem"), tls_client_ca=str(pki / "ca.pem"),
                     tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    untrusting = peers.Peers(TOKEN, daemon.peer_context(wrong), daemon.peer_ca(wrong))
    with pytest.raises(peers.Unreachable) as e:
        fetch(untrusting, https.url)
    assert str(e.value) == (f"cannot fetch the output of job {UUID} from node n3: its TLS certificate "
                            f"at {https.url} is not trusted by the CA {pki / 'other.pem'}: "
                            "unable to get local issuer certificate")


@pytest.mark.allow_io("socket")
def test_without_a_ca_a_node_trusts_the_systems_cas_and_says_so(https, pki):  # noqa: F811
    config = settings()
    assert daemon.peer_context(config) is None and daemon.peer_ca(config) is None
    with pytest.raises(peers.Unreachable) as e:
        fetch(peers.Peers(TOKEN), https.url)
    assert "not trusted by the system's CAs (set tls_ca in lclusterd.conf)" in str(e.value)


def test_tls_ca_defaults_to_the_client_ca(pki):  # noqa: F811
    config = settings(tls_client_ca=str(pki / "ca.pem"), tls_cert=str(pki / "server.pem"),
                      tls_key=str(pki / "server.key"))
    assert daemon.peer_ca(config) == str(pki / "ca.pem")
    assert daemon.peer_ca(settings(tls_ca="/x.pem", tls_client_ca="/y.pem", tls_cert="/c.pem",
                                   tls_key="/k.pem")) == "/x.pem"
    with pytest.raises(tls.TLSError, match="cannot read the TLS CA /x.pem"):
        daemon.peer_context(settings(tls_ca="/x.pem"))
