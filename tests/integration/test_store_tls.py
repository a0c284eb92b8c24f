"""store.py against an etcd that requires TLS client certificates
(the daemon's etcd_ca / etcd_cert / etcd_key)."""

import subprocess
import time

import pytest

from lclusterd import core
from lclusterd.store import Store, Unavailable
from tests.integration.conftest import ETCD, START_DEADLINE, free_port


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    with open(d / "etcd.log", "wb") as log:
        etcd = subprocess.Popen(
            [ETCD, "--name", "tls", "--data-dir", str(d / "data"),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
             "--listen-metrics-urls", "",
             "--cert-file", str(d / "server.pem"), "--key-file", str(d / "server.key"),
             "--client-cert-auth", "--trusted-ca-file", str(d / "ca.pem")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    tls = {"ca_cert": str(d / "ca.pem"), "cert_cert": str(d / "client.pem"),
           "cert_key": str(d / "client.key")}
    try:
        store = Store([url], "/lcluster-tls", tls=tls)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            try:
                store.ping()
                break
            except Unavailable:
                assert etcd.poll() is None and time.monotonic() < deadline, \
                    (d / "etcd.log").read_text()[-2000:]
                time.sleep(0.1)
        store.close()
        yield url, tls
    finally:
        etcd.terminate()
        etcd.wait(10)


def test_store_with_client_certificate(tls_etcd):
    url, tls = tls_etcd
    store = Store([url], "/lcluster-tls", tls=tls)
    job = core.new_job("true", 0, 0, "root", now=1.0)
    store.submit(job)
    assert store.get(job.uuid)[0] == job
    # The quota (for NoSpace's message) is read from /metrics with the same certificate.
    assert store.space()["quota"] == 2 * 1024 ** 3  # etcd's default
    store.close()


def test_without_client_certificate_etcd_refuses(tls_etcd):
    url, tls = tls_etcd
    store = Store([url], "/lcluster-tls", tls={"ca_cert": tls["ca_cert"]})
    with pytest.raises(Unavailable):
        store.ping()
    store.close()
