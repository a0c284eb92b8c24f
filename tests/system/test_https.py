"""HTTPS on the TCP listener (issue 12 item 4), on the installed package:
certificates made with openssl in the container, the daemon configured with
tls_cert/tls_key, lclusterc verifying with --ca or $LCLUSTER_CA."""

import time

CONF = "/etc/lclusterd/lclusterd.conf"
TLS = "/etc/lclusterd/tls"
# A CA that signs the node's certificate, and another CA that does not; the
# extensions README's recipe gives, which Python 3.13 (Debian 13) demands.
PKI = rf"""
set -e
mkdir -p {TLS} && cd {TLS}
for ca in ca other; do
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=$ca \
    -addext keyUsage=critical,keyCertSign,cRLSign -keyout $ca.key -out $ca.pem 2>/dev/null
done
for n in node other; do
  openssl req -newkey rsa:2048 -nodes -subj /CN=$n -keyout $n-cert.key -out $n.csr 2>/dev/null
done
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nauthorityKeyIdentifier=keyid,issuer\n' > ext
printf 'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >> ext
openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext \
  -out node.pem 2>/dev/null
chmod 600 *.key
"""


def _restart_with(box, lines):
    box.sh(f"cp /root/lclusterd.conf.orig {CONF} && printf '{lines}' >> {CONF}")
    box.sh("systemctl reset-failed lclusterd; systemctl restart lclusterd", check=False)


def test_https_listener_verifies_with_the_ca_and_refuses_a_bad_key(box):
    box.lc("list")
    box.sh(PKI)
    box.sh(f"cp {CONF} /root/lclusterd.conf.orig")
    try:
        _restart_with(box, f"listen = 127.0.0.1:7800\\ntls_cert = {TLS}/node.pem\\n"
                           f"tls_key = {TLS}/node-cert.key\\n")
        ok = box.sh(f"lclusterc --server https://127.0.0.1:7800 --ca {TLS}/ca.pem nodes", check=False)
        assert ok.returncode == 0, ok.stderr
        assert box.c.name in ok.stdout

        wrong = box.sh(f"LCLUSTER_CA={TLS}/other.pem lclusterc --server https://127.0.0.1:7800 nodes",
                       check=False)
        assert wrong.returncode == 4
        assert wrong.stderr.count("\n") == 1 and "not trusted" in wrong.stderr, wrong.stderr

        _restart_with(box, f"listen = 127.0.0.1:7800\\ntls_cert = {TLS}/node.pem\\n"
                           f"tls_key = {TLS}/other-cert.key\\n")
        deadline = time.monotonic() + 20
        while box.sh("systemctl show -p ExecMainStatus --value lclusterd").stdout.strip() != "78":
            assert time.monotonic() < deadline, "a mismatched key did not refuse the start with 78"
            time.sleep(0.5)
        said = box.sh("journalctl -u lclusterd -n 20 -o cat --no-pager").stdout
        assert "other-cert.key" in said and "does not match" in said
        check = box.sh("lclusterd check-config", check=False)
        assert check.returncode == 78 and check.stderr.count("\n") == 1
    finally:
        box.sh(f"cp /root/lclusterd.conf.orig {CONF}; systemctl reset-failed lclusterd; "
               "systemctl restart lclusterd", check=False)
