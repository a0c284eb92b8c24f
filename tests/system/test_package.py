"""The built package itself: what lintian says of it, and what it holds."""

import subprocess
import time

from tests.system import container as ct


def deb(deb_dir):
    return str(next(deb_dir.glob("lclusterd_*_all.deb")))


def test_lintian_reports_no_errors(deb_dir):
    r = subprocess.run(["lintian", "--fail-on", "error", deb(deb_dir)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\nE: " not in "\n" + r.stdout


def test_package_holds_commands_units_and_conffile(deb_dir):
    files = subprocess.run(["dpkg-deb", "-c", deb(deb_dir)], capture_output=True, text=True,
                           check=True).stdout
    for path in ("./usr/bin/lclusterd", "./usr/bin/lclusterc",
                 "./lib/systemd/system/lclusterd.socket", "./lib/systemd/system/lclusterd.service",
                 "./lib/systemd/system/lcluster.slice", "./etc/lclusterd/lclusterd.conf"):
        assert path in files, path
    control = subprocess.run(["dpkg-deb", "-I", deb(deb_dir), "conffiles"], capture_output=True,
                             text=True, check=True).stdout
    assert "/etc/lclusterd/lclusterd.conf" in control


def test_package_holds_fence_and_etcd_lockdown(deb_dir):
    files = subprocess.run(["dpkg-deb", "-c", deb(deb_dir)], capture_output=True, text=True,
                           check=True).stdout
    for path in ("./lib/systemd/system/lclusterd-fence.service",
                 "./lib/systemd/system/etcd.service.d/lclusterd-tls.conf",
                 "./usr/libexec/lclusterd/etcd-certs",
                 "/lclusterd/fence.py"):
        assert path in files, path
    depends = subprocess.run(["dpkg-deb", "-f", deb(deb_dir), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    assert "openssl" in depends


# ---- on the installed package (one booted container for the tests below) ----

ETCD_CERTS = "/etc/lclusterd/etcd"
ETCDCTL = "/usr/bin/etcdctl --dial-timeout=2s --command-timeout=3s"


def test_upgrade_keeps_the_daemon_running_and_its_jobs(box):
    """Issue 9 item 4: a newer version of the package, installed while a job
    runs, leaves the new daemon running and the job's unit untouched."""
    uuid = box.lc("addjob 'while :; do date +%s.%N; sleep 0.2; done'").stdout.strip()
    box.wait_state(uuid, ("running",))
    unit = f"lcluster-job@{uuid}.service"
    before = box.sh(f"systemctl show -p InvocationID --value {unit}").stdout.strip()
    old_pid = box.sh("systemctl show -p MainPID --value lclusterd.service").stdout.strip()
    assert box.sh("systemctl is-active lclusterd.service").stdout.strip() == "active"
    # The same tree with a bumped version, repacked as dpkg-buildpackage would
    # have built it (its preinst/postinst are the ones that run on upgrade).
    box.sh("rm -rf /tmp/up && dpkg-deb -R /mnt/debs/lclusterd_*_all.deb /tmp/up && "
           "sed -i 's/^Version: .*/&+up1/' /tmp/up/DEBIAN/control && "
           "dpkg-deb -b /tmp/up /tmp/lclusterd_up_all.deb >/dev/null")
    box.sh("apt-get install -y /tmp/lclusterd_up_all.deb", timeout=300)
    assert box.sh("dpkg-query -W -f='${Version}' lclusterd").stdout.endswith("+up1")
    after_upgrade = float(box.sh("date +%s.%N").stdout)
    # The daemon runs, and it is the new one.
    assert box.sh("systemctl is-active lclusterd.service").stdout.strip() == "active"
    assert box.sh("systemctl show -p MainPID --value lclusterd.service").stdout.strip() \
        not in ("0", old_pid)
    assert box.sh("systemctl is-active lclusterd-fence.service").stdout.strip() == "active"
    # The job's unit was never stopped or restarted, and it still prints.
    time.sleep(1.0)
    assert box.unit_state(unit) == ["loaded", "active"]
    assert box.sh(f"systemctl show -p InvocationID --value {unit}").stdout.strip() == before
    stamps = [float(x) for x in box.sh(f"journalctl -u {unit} -o cat --no-pager").stdout.split()
              if x.replace(".", "", 1).isdigit()]
    assert stamps and stamps[-1] > after_upgrade
    # Its record is still running on this node.
    job = box.job(uuid)
    assert job["state"] == "running", job
    assert job["node"] == box.sh("hostname").stdout.strip(), job
    box.lc(f"removejob {uuid}")


def test_local_users_cannot_reach_etcd(box):
    """Issue 10 item 1: the package's local etcd takes only root's client
    certificate; a local user can neither read nor write lcluster's keys,
    while lclusterd works."""
    uuid = box.lc("addjob --wait 'true'", user="alice").stdout.split()[0]
    assert box.job(uuid)["state"] == "succeeded"
    # root, with the package's client certificate, sees the keys
    certs = (f"--cacert={ETCD_CERTS}/ca.pem --cert={ETCD_CERTS}/client.pem "
             f"--key={ETCD_CERTS}/client.key")
    keys = box.sh(f"{ETCDCTL} --endpoints=https://127.0.0.1:2379 {certs} get --prefix --keys-only "
                  "/lcluster/jobs/").stdout
    assert uuid in keys
    # alice: plain http, TLS without a certificate, TLS skipping verification
    for how in ("--endpoints=http://127.0.0.1:2379",
                f"--endpoints=https://127.0.0.1:2379 --cacert={ETCD_CERTS}/ca.pem",
                "--endpoints=https://127.0.0.1:2379 --insecure-skip-tls-verify"):
        for op in ("get --prefix /lcluster", f"put /lcluster/jobs/{uuid} x"):
            r = box.sh(f"{ETCDCTL} {how} {op}", user="alice", check=False)
            assert r.returncode != 0 and uuid not in r.stdout, (how, op, r.stdout)
        # nor with root's files, which she cannot read
        r = box.sh(f"{ETCDCTL} {how} {certs} get --prefix /lcluster", user="alice", check=False)
        assert r.returncode != 0 and uuid not in r.stdout, (how, r.stdout)
    # nor through etcd's peer port (raft messages, leases, the member list)
    probe = ("import ssl, urllib.request\n"
             "ctx = ssl.create_default_context(cafile='/etc/lclusterd/etcd/ca.pem')\n"
             "for url in ('http://127.0.0.1:2380/members', 'https://127.0.0.1:2380/members'):\n"
             "    try:\n"
             "        print(urllib.request.urlopen(url, timeout=3, context=ctx"
             " if url.startswith('https') else None).read())\n"
             "    except Exception as e:\n"
             "        print('refused', type(e).__name__)\n")
    out = box.sh("python3 -", user="alice", input=probe).stdout.splitlines()
    assert len(out) == 2 and all(line.startswith("refused") for line in out), out
    assert box.sh(f"{ETCDCTL} --endpoints=https://127.0.0.1:2379 {certs} get /lcluster/jobs/{uuid}"
                  ).stdout.count("\n") == 2  # her put did not land: the record is intact
    assert box.job(uuid)["state"] == "succeeded"
    # The credentials: root only (etcd reads its own key through its group).
    modes = box.sh(f"stat -c '%n %U %G %a' {ETCD_CERTS}/ca.key {ETCD_CERTS}/client.key "
                   f"{ETCD_CERTS}/server.key /etc/lclusterd/token").stdout.splitlines()
    assert modes == [f"{ETCD_CERTS}/ca.key root root 600", f"{ETCD_CERTS}/client.key root root 600",
                     f"{ETCD_CERTS}/server.key root etcd 640", "/etc/lclusterd/token root root 600"]
    assert len(box.sh("cat /etc/lclusterd/token").stdout.strip()) >= 16


def test_daemon_hardened_and_still_mounts_netns_for_jobs(box):
    """Issue 10 item 5: systemd-analyze security lclusterd.service <= 6.5,
    while the daemon stays in the host's mount namespace, so the network
    namespaces it makes for jobs are seen by everyone. Issue 10 item 6: the
    fd limit and the socket's backlog."""
    out = box.sh("systemd-analyze security --no-pager lclusterd.service").stdout
    score = float(out.rsplit("Overall exposure level for lclusterd.service:", 1)[1].split()[0])
    print(f"systemd-analyze security lclusterd.service: {score}")
    assert score <= 6.5, out[-3000:]
    box.sh("grep -q '^job_networks' /etc/lclusterd/lclusterd.conf || "
           "echo 'job_networks = ns:*' >>/etc/lclusterd/lclusterd.conf")
    box.sh("systemctl restart lclusterd.service")
    uuid = box.lc("addjob --network ns:h4test --wait 'cat /proc/net/dev'").stdout.split()[0]
    assert box.job(uuid)["state"] == "succeeded", box.job(uuid)
    pid = box.sh("systemctl show -p MainPID --value lclusterd.service").stdout.strip()
    assert box.sh(f"readlink /proc/{pid}/ns/mnt").stdout == box.sh("readlink /proc/1/ns/mnt").stdout
    assert "h4test" in box.sh("ip netns list").stdout
    assert box.sh("findmnt -n /run/netns/h4test", check=False).returncode == 0
    assert box.sh("systemctl show -p LimitNOFILE --value lclusterd.service").stdout.strip() == "65536"

    def open_files(pid):
        limits = box.sh(f"cat /proc/{pid}/limits").stdout
        return [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")]
    # As high as the machine lets it (a container's PID 1 may have a lower hard limit).
    ceiling = min(65536, int(open_files(1)[0][1]))
    assert open_files(pid) == [[str(ceiling), str(ceiling)]]
    assert box.sh("systemctl show -p Backlog --value lclusterd.socket").stdout.strip() == "4096"


def test_reload_refuses_a_bad_config_visibly(box):
    """Issue 9 item 20: systemctl reload checks the file first."""
    conf = "/etc/lclusterd/lclusterd.conf"
    box.sh("systemctl start lclusterd.service")
    box.sh(f"cp {conf} /tmp/conf.good && echo 'slots = many' >>{conf}")
    try:
        r = box.sh("systemctl reload lclusterd.service", check=False)
        assert r.returncode != 0
        assert box.sh("systemctl is-active lclusterd.service").stdout.strip() == "active"
    finally:
        box.sh(f"cp /tmp/conf.good {conf}")
    box.sh("systemctl reload lclusterd.service")


def test_etcd_group_made_after_the_certificates(rootfs, deb_dir):
    """etcd-server is only a Recommends: our postinst may make the
    certificates before etcd-server's makes the etcd group; server.key must
    still reach etcd (the drop-in's ExecStartPre runs etcd-certs again)."""
    with ct.Container(ct.unique_name("lcgrp"), rootfs, binds_ro={str(deb_dir): "/mnt/debs"}) as c:
        c.run("systemctl stop etcd && groupmod -n etcdx etcd")  # as if etcd-server came later
        c.run("apt-get install -y /mnt/debs/lclusterd_*_all.deb", timeout=300)
        key = "stat -c '%U:%G %a' /etc/lclusterd/etcd/server.key"
        assert c.run(key).stdout.split() == ["root:root", "600"]
        c.run("groupmod -n etcd etcdx && systemctl restart etcd")  # ExecStartPre=+etcd-certs
        assert c.run(key).stdout.split() == ["root:etcd", "640"]
        assert c.run("systemctl is-active etcd").stdout.strip() == "active"
        c.run("useradd -m alice")
        c.run("lclusterc addjob --wait true", user="alice")


def test_installs_without_etcd_server(rootfs, deb_dir):
    """etcd-server is a Recommends: without it the package installs, and a
    client gets one line, exit 6."""
    with ct.Container(ct.unique_name("lcnoe"), rootfs, binds_ro={str(deb_dir): "/mnt/debs"}) as c:
        c.run("dpkg --purge etcd-server")
        c.run("apt-get install -y --no-install-recommends /mnt/debs/lclusterd_*_all.deb", timeout=300)
        r = c.run("lclusterc nodes", check=False, timeout=60)
        assert r.returncode == 6, r
        assert r.stderr.startswith("lclusterc: etcd is unreachable at https://127.0.0.1:2379")
        assert len(r.stderr.splitlines()) == 1
