"""The cluster harness (the cluster tests' fixture and `make bench`'s 3-node
run): three Debian containers booted with systemd, each in a network
namespace of its own on one bridge, each running one member of a 3-member
etcd cluster and lclusterd installed from the .deb with apt.

The host side is made here and always removed: a bridge, and per node a
network namespace and a veth pair (the host end on the bridge, the other end
eth0 in the namespace). Addresses exist only inside those namespaces.

With tls=True (the cluster suite's: tests/cluster/conftest.py) the nodes'
TCP listeners are HTTPS: a test CA made with openssl signs one certificate
per node for its address, and every node verifies the others' against that
CA (tls_ca) when it fetches a job's output from them. A second CA, which
signed nothing here, is there for the tests of a wrong CA.
"""

import contextlib
import json
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.system import container as ct
from tests.system.conftest import Box

NODES = 3
SUBNET = "10.77.0"  # only inside the test's own namespaces
# Seconds; shorter than the default 10 to keep the tests quick (set 10 to measure the default).
# Not much shorter: a node seen failed may take TTL + an etcd election + poll_interval.
LEASE_TTL = int(os.environ.get("LCLUSTER_TEST_LEASE_TTL", "8"))
SLOTS = 2
PORT = 7800
TOKEN = "test-token-" + os.urandom(12).hex()
TLS_DIR = "/etc/lclusterd/tls"  # in each node: ca.pem, other-ca.pem, node.pem, node.key
CA = f"{TLS_DIR}/ca.pem"
WRONG_CA = f"{TLS_DIR}/other-ca.pem"


def ip(*args):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class Node(Box):
    """One cluster node: its container, namespace, host-side veth, address."""

    def __init__(self, index, tag, rootfs, deb_dir, binds_ro=None, tls=False):
        self.index = index
        self.name = f"n{index}"
        self.addr = f"{SUBNET}.{index}"
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://{self.addr}:{PORT}"
        # lclusterc's options to reach a node over TCP (with --server URL).
        self.ca_option = f"--ca {CA}" if tls else ""
        self.netns = f"lcn{tag}{index}"
        self.veth = f"lcv{tag}{index}"
        self.c = ct.Container(ct.unique_name(f"lccl{index}"), rootfs,
                              binds_ro={str(deb_dir): "/mnt/debs", **(binds_ro or {})},
                              netns=self.netns)

    def journal_lines(self, unit_glob="lcluster-job@*"):
        return self.sh(f"journalctl -o cat --no-pager -u '{unit_glob}'").stdout.splitlines()

    def nodes(self):
        return {n["name"]: n for n in json.loads(self.lc("nodes --json").stdout)}

    def units(self, states="--all"):
        out = self.sh(f"systemctl list-units {states} --plain --no-legend 'lcluster-job@*'").stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def running_units(self):
        """Job units with processes that may run (a fenced one stays loaded, failed)."""
        return self.units("--state=active,activating,deactivating,reloading")

    def primed(self):
        """The name of the node this one's table says is primed, or None."""
        return next((name for name, row in self.nodes().items() if row["state"] == "primed"), None)

    def poweroff(self):
        """Pull the plug (no shutdown: its leases expire, its jobs die with it)."""
        self.c.poweroff_hard()


def etcd_config(node, tag):
    peers = ",".join(f"n{i}=http://{SUBNET}.{i}:2380" for i in range(1, NODES + 1))
    return (f"ETCD_NAME={node.name}\n"
            f"ETCD_DATA_DIR=/var/lib/etcd/lctest\n"
            f"ETCD_LISTEN_PEER_URLS=http://{node.addr}:2380\n"
            f"ETCD_LISTEN_CLIENT_URLS=http://{node.addr}:2379,http://127.0.0.1:2379\n"
            f"ETCD_ADVERTISE_CLIENT_URLS=http://{node.addr}:2379\n"
            f"ETCD_INITIAL_ADVERTISE_PEER_URLS=http://{node.addr}:2380\n"
            f"ETCD_INITIAL_CLUSTER={peers}\n"
            f"ETCD_INITIAL_CLUSTER_STATE=new\n"
            f"ETCD_INITIAL_CLUSTER_TOKEN=lctest-{tag}\n"
            # README's cluster set-up: a member that was cut off (or restarts)
            # asks before it campaigns, so it cannot force an election on a
            # healthy leader when it comes back; heartbeat and election as
            # for a LAN (etcd's defaults, said on purpose).
            f"ETCD_PRE_VOTE=true\n"
            f"ETCD_HEARTBEAT_INTERVAL=100\n"
            f"ETCD_ELECTION_TIMEOUT=1000\n"
            # The package's TLS drop-in is for its single-node default: this
            # cluster's test clients speak plain http on the test's own bridge.
            f"ETCD_CLIENT_CERT_AUTH=false\n"
            f"ETCD_CERT_FILE=\n"
            f"ETCD_KEY_FILE=\n"
            f"ETCD_TRUSTED_CA_FILE=\n"
            f"ETCD_PEER_CLIENT_CERT_AUTH=false\n"
            f"ETCD_PEER_CERT_FILE=\n"
            f"ETCD_PEER_KEY_FILE=\n"
            f"ETCD_PEER_TRUSTED_CA_FILE=\n")


def make_pki(directory, nodes):
    """openssl: a CA and a certificate per node for its address (as README's
    recipe: the extensions Python 3.13 demands), and another CA; {node name:
    {file name in TLS_DIR: its PEM text}}."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=lctest {ca}",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    files = {}
    for n in nodes:
        Path(directory, f"{n.name}.ext").write_text(
            f"subjectAltName=IP:{n.addr}\nauthorityKeyIdentifier=keyid,issuer\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={n.name}",
                "-keyout", f"{n.name}.key", "-out", f"{n.name}.csr")
        openssl("x509", "-req", "-in", f"{n.name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{n.name}.ext", "-out", f"{n.name}.pem")
        files[n.name] = {name: Path(directory, source).read_text() for name, source in
                         (("ca.pem", "ca.pem"), ("other-ca.pem", "other-ca.pem"),
                          ("node.pem", f"{n.name}.pem"), ("node.key", f"{n.name}.key"))}
    return files


def tls_config(node):
    if not node.tls:
        return ""
    return (f"tls_cert = {TLS_DIR}/node.pem\n"
            f"tls_key = {TLS_DIR}/node.key\n"
            f"tls_ca = {CA}\n")


def lclusterd_config(node, slots=SLOTS, extra=""):
    # Its own etcd member first, the others to fail over to.
    order = [node.index] + [i for i in range(1, NODES + 1) if i != node.index]
    endpoints = ",".join(f"http://{SUBNET}.{i}:2379" for i in order)
    return ("[lclusterd]\n"
            f"etcd_endpoints = {endpoints}\n"
            f"node_name = {node.name}\n"
            f"slots = {slots}\n"
            f"lease_ttl = {LEASE_TTL}\n"
            f"listen = 0.0.0.0:{PORT}\n"
            f"address = {node.url}\n"
            + tls_config(node)
            + extra)  # a node's own lines: cpus, memory, labels, placement ...


def _network_up(nodes, bridge, undo):
    ip("link", "add", bridge, "type", "bridge")
    undo.callback(ip, "link", "del", bridge)
    ip("link", "set", bridge, "up")
    for n in nodes:
        ip("netns", "add", n.netns)
        undo.callback(ip, "netns", "del", n.netns)
        ip("link", "add", n.veth, "type", "veth", "peer", "name", "eth0", "netns", n.netns)
        undo.callback(_del_link, n.veth)  # gone with the namespace, unless moved
        ip("link", "set", n.veth, "master", bridge, "up")
        ip("-n", n.netns, "addr", "add", f"{n.addr}/24", "dev", "eth0")
        ip("-n", n.netns, "link", "set", "eth0", "up")
        ip("-n", n.netns, "link", "set", "lo", "up")


def _del_link(name):
    with contextlib.suppress(RuntimeError):
        ip("link", "del", name)


def _setup_node(node, tag, slots, extra, resource_control, pki):
    node.c.start(timeout=300)
    if resource_control:  # before the daemon starts: it finds what it can enforce at start-up
        node.c.enable_resource_control()
    node.sh("cat > /etc/default/etcd", input=etcd_config(node, tag))
    node.sh("systemctl restart --no-block etcd")  # it waits for a quorum: start all, then wait
    node.sh("apt-get install -y --no-install-recommends /mnt/debs/lclusterd_*_all.deb", timeout=600)
    node.sh("umask 077 && cat > /etc/lclusterd/token", input=TOKEN + "\n")
    node.sh(f"mkdir -p {TLS_DIR}")
    for name, text in pki.get(node.name, {}).items():
        node.sh(f"umask {'077' if name.endswith('.key') else '022'} && cat > {TLS_DIR}/{name}", input=text)
    node.sh("cat > /etc/lclusterd/lclusterd.conf", input=lclusterd_config(node, slots, extra))


def wait_for(what, check, timeout, interval=0.3):
    """Poll check() until it returns something true; its value, or AssertionError."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except ct.ContainerError as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last})")


@contextlib.contextmanager
def booted(rootfs, deb_dir, binds_ro=None, slots=SLOTS, node_config=None, resource_control=False,
           tls=False):
    """The three nodes, registered; on the way out (failures too) the
    containers, namespaces, veths and bridge are removed.

    node_config: {node name: lines for its lclusterd.conf} (cpus = 2,
    memory = 1G, labels = rack=a ...). resource_control: make the cgroup
    controllers writable first (a cgroup v1 host's nspawn mounts them
    read-only), so that nodes enforce and accept --memory and --cpus.
    tls: HTTPS between the nodes and for lclusterc --server (the module
    docstring)."""
    tag = os.urandom(2).hex()
    nodes = [Node(i, tag, rootfs, Path(deb_dir).resolve(), binds_ro, tls) for i in range(1, NODES + 1)]
    with contextlib.ExitStack() as undo:
        pki = {}
        if tls:
            pki = make_pki(undo.enter_context(tempfile.TemporaryDirectory(prefix="lcpki")), nodes)
        _network_up(nodes, f"lcb{tag}", undo)
        for n in nodes:
            undo.callback(n.c.stop)  # before the namespaces go (ExitStack unwinds in reverse)
        with ThreadPoolExecutor(NODES) as pool:
            for f in [pool.submit(_setup_node, n, tag, slots, (node_config or {}).get(n.name, ""),
                                  resource_control, pki) for n in nodes]:
                f.result()
        wait_for("a healthy 3-member etcd", lambda: nodes[0].sh(
            "etcdctl endpoint health --cluster 2>&1", check=False).stdout.count("is healthy") == NODES, 120)
        for n in nodes:
            n.sh("systemctl restart lclusterd.socket lclusterd.service")
        wait_for("three registered nodes", lambda: len(
            [s for s in nodes[0].nodes().values() if s["state"] != "failed"]) == NODES, 60)
        yield nodes
