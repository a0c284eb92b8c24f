"""Job isolation, checked from inside real jobs: network, file system,
processes, users, limits, named network namespaces, a rootfs built by
`lclusterd mkrootfs`, environment and working directory.

One container for the module, the .deb installed with apt; tests run in file
order (the last ones restart the daemon with other settings)."""

import fcntl
import hashlib
import json
import re
import subprocess

import pytest

from tests.system import container as ct
from tests.system.conftest import REPO, Box
from tests.system.test_spine import API

# The rootfs that jobs get in the rootfs test: built on the host by the
# package's own `lclusterd mkrootfs` (the containers have no network), cached
# like the harness's rootfs. Bump when mkrootfs changes what it builds.
JOBROOT_RECIPE = "2"


def build_jobroot():
    key = hashlib.sha256(f"{ct.SUITE} {JOBROOT_RECIPE}".encode()).hexdigest()[:16]
    final = ct.CACHE_DIR / f"jobroot-{key}"
    if final.is_dir():
        return final
    ct.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(ct.CACHE_DIR / f"jobroot-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            log = ct.CACHE_DIR / f"jobroot-{key}.log"
            with open(log, "wb") as out:
                r = subprocess.run(
                    ["/usr/bin/python3", "-c", "from lclusterd.daemon import main; main()",
                     "mkrootfs", str(final), "--suite", ct.SUITE, "--mirror", ct.apt_mirror()],
                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            assert r.returncode == 0, f"lclusterd mkrootfs failed, see {log}"
    return final


# Probes that jobs run (jobs see the container's / read-only, so /opt is theirs too).
PROBE = r'''
import os, socket, sys, time
what, args = sys.argv[1], sys.argv[2:]
if what == "connect":  # HOST PORT
    try:
        socket.create_connection((args[0], int(args[1])), timeout=3).close()
        print("connected")
    except OSError as e:
        print("unreachable:", e)
elif what == "serve":  # PORT: answer one client, for at most 60 s
    s = socket.socket()
    s.bind(("127.0.0.1", int(args[0])))
    s.listen()
    s.settimeout(60)
    conn, _ = s.accept()
    conn.sendall(("pong from " + os.environ["LCLUSTER_JOB_ID"]).encode())
    conn.close()
elif what == "ask":  # PORT: what the server says, retrying for 30 s
    deadline = time.monotonic() + 30
    while True:
        try:
            print(socket.create_connection(("127.0.0.1", int(args[0])), timeout=3).recv(200).decode())
            break
        except OSError as e:
            if time.monotonic() > deadline:
                print("unreachable:", e)
                break
            time.sleep(0.2)
elif what == "fork":  # N: fork up to N children that sleep
    n = 0
    try:
        while n < int(args[0]):
            if os.fork() == 0:
                time.sleep(5)
                os._exit(0)
            n += 1
        print("forked", n)
    except OSError as e:
        print("fork failed after", n, "children:", e)
elif what == "alloc":  # MB, touched
    block = bytearray(int(args[0]) << 20)
    print("allocated", len(block))
elif what == "cpu-quota":  # this process's CPU quota, in CPUs (cgroup v1 or v2)
    paths = dict(l.split(":", 2)[1:] for l in open("/proc/self/cgroup").read().splitlines())
    cpu = next((v for k, v in paths.items() if "cpu" in k.split(",")), None)
    if cpu is not None:
        base = "/sys/fs/cgroup/cpu" + cpu
        quota = int(open(base + "/cpu.cfs_quota_us").read())
        period = int(open(base + "/cpu.cfs_period_us").read())
    else:
        quota, period = open("/sys/fs/cgroup" + paths[""] + "/cpu.max").read().split()
    print("cpus", int(quota) / int(period))
'''


@pytest.fixture(scope="module")
def box(rootfs, deb_dir):
    jobroot = build_jobroot()
    binds = {str(deb_dir): "/mnt/debs", str(jobroot): "/srv/jobroot"}
    with ct.Container(ct.unique_name("lciso"), rootfs, binds_ro=binds) as c:
        c.enable_resource_control()
        c.run("apt-get install -y --no-install-recommends /mnt/debs/lclusterd_*_all.deb", timeout=300)
        c.run("useradd -m alice && useradd -m bob")
        c.run("mkdir -p /opt/lciso && cat > /opt/lciso/probe.py", input=PROBE)
        yield Box(c)


def run_job(box, args, user="alice", timeout=60):
    """Queue `lclusterc addjob ARGS` as user and wait for its end: (record, output)."""
    uuid = box.lc(f"addjob {args}", user=user).stdout.strip()
    job = box.wait_state(uuid, timeout=timeout)
    out = box.sh(f"journalctl -u {job['unit']} --no-pager -o cat").stdout
    return job, out


def probe(*args):
    return "'python3 /opt/lciso/probe.py " + " ".join(args) + "'"


def configure(box, **settings):
    """Set settings (None: back to the default) in the config file and restart the daemon."""
    conf = "/etc/lclusterd/lclusterd.conf"
    for key, value in settings.items():
        box.sh(f"sed -i '/^{key} =/d' {conf}")
        if value is not None:
            box.sh(f"echo '{key} = {value}' >> {conf}")
    # reset-failed: these restarts come faster than the unit's start rate limit allows.
    return box.sh("systemctl reset-failed lclusterd; systemctl restart lclusterd", check=False)


def restart_with(box, flags=""):
    """Restart the packaged daemon with these command-line flags (a drop-in)."""
    dropin = "/etc/systemd/system/lclusterd.service.d"
    if flags:
        box.sh(f"mkdir -p {dropin} && printf '[Service]\\nExecStart=\\nExecStart=/usr/bin/lclusterd %s\\n' "
               f"'{flags}' > {dropin}/flags.conf")
    else:
        box.sh(f"rm -f {dropin}/flags.conf")
    return box.sh("systemctl daemon-reload; systemctl reset-failed lclusterd; "
                  "systemctl restart lclusterd", check=False)


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lclusterc: "), result.stderr
    return lines[0]


def test_job_cannot_see_host_interfaces_or_reach_its_loopback(box):
    box.sh("ip link add lciso0 type veth peer name lciso1")  # an interface of the host
    box.sh("systemd-run --unit=lciso-server python3 -m http.server --bind 127.0.0.1 8765")
    box.sh("until python3 /opt/lciso/probe.py connect 127.0.0.1 8765 | grep -q ^connected; "
           "do sleep 0.2; done", timeout=30)  # the server is there, for the host
    job, out = run_job(box, "'cat /proc/net/dev; python3 /opt/lciso/probe.py connect 127.0.0.1 8765'")
    assert job["state"] == "succeeded", job
    interfaces = re.findall(r"(?m)^\s*([\w.@-]+):\s+\d", out)  # /proc/net/dev's rows
    assert interfaces == ["lo"], out
    assert "lciso0" not in out and "unreachable: [Errno 111] Connection refused" in out, out
    box.sh("systemctl stop lciso-server")


def test_job_writes_only_its_own_tmp(box):
    box.sh("echo host-file > /tmp/host-marker")
    job, out = run_job(box, "'for f in /etc/x /usr/x /var/x /opt/x /srv/x /root/x /home/alice/x /tmp/mine; "
                            "do echo job > $f 2>/dev/null && echo wrote $f; done; "
                            "cat /tmp/host-marker 2>&1; ls -A /home | wc -l'")
    assert job["state"] == "succeeded", job
    assert [line for line in out.splitlines() if line.startswith("wrote")] == ["wrote /tmp/mine"], out
    assert "host-file" not in out and "No such file" in out, out  # not the host's /tmp
    assert box.sh("test -e /tmp/mine", check=False).returncode == 1  # nor did it write there


def test_job_cannot_see_the_hosts_or_other_users_jobs_processes(box):
    other = box.lc("addjob 'sleep 300'", user="bob").stdout.strip()
    unit = box.wait_state(other, ("running",))["unit"]
    bob_pid = box.sh(f"systemctl show -p MainPID --value {unit}").stdout.strip()
    assert int(bob_pid) > 0
    job, out = run_job(box, "'echo pids: $(ls /proc | grep -E \"^[0-9]+$\"); ps -e -o user=,comm='")
    pids = next(line for line in out.splitlines() if line.startswith("pids:")).split()[1:]
    # Neither bob's job nor systemd (PID 1 is the job's own init where
    # PrivatePIDs= gives it a PID namespace: test_private_pids.py).
    assert bob_pid not in pids and ("1" not in pids or box.suite != "bookworm"), out
    users = {line.split()[0] for line in out.splitlines() if line.split() and
             line.split()[0] in ("alice", "bob", "root", "etcd", "messagebus", "nobody")}
    assert users == {"alice"}, out  # only its own processes
    box.lc(f"removejob {other}", user="bob")


def test_jobs_run_as_their_submitter_root_chooses_explicitly(box):
    alice = box.sh("id -u alice").stdout.strip() + "/" + box.sh("id -g alice").stdout.strip()
    job, out = run_job(box, "'echo ids $(id -u)/$(id -g)'")
    assert f"ids {alice}" in out and f"{job['uid']}/{job['gid']}" == alice
    assert f"alice ({alice})" in box.lc(f"checkjob {job['uuid']}").stdout
    # root: nobody unless it names a user (a dynamic user of the job's own,
    # uid from systemd's range); root itself only when asked by name.
    job, out = run_job(box, "'echo ids $(id -u)'", user=None)
    assert job["user"] == "nobody" and job["submitter"] == "root", job
    assert 61184 <= int(out.split("ids ")[1].split()[0]) <= 65519, out
    job, out = run_job(box, "--user bob 'echo ids $(id -un)'", user=None)
    assert job["user"] == "bob" and "ids bob" in out
    job, out = run_job(box, "--user root 'echo ids $(id -u)'", user=None)
    assert job["uid"] == 0 and "ids 0" in out
    r = box.lc("addjob --user bob true", user="alice", check=False)
    assert r.returncode == 4 and "only root may run jobs as another user" in one_line_error(r)
    # Only the submitter (or root) removes a job.
    uuid = box.lc("addjob 'sleep 300'", user="alice").stdout.strip()
    box.wait_state(uuid, ("running",))
    r = box.lc(f"removejob {uuid}", user="bob", check=False)
    assert r.returncode == 4 and "permission denied" in one_line_error(r)
    assert box.job(uuid)["state"] == "running"
    box.lc(f"removejob {uuid}", user="alice")


def test_unit_properties_document_the_sandbox(box):
    job, _ = run_job(box, "--memory 64M --tasks 10 true")
    props = box.lc(f"checkjob --unit-properties {job['uuid']}").stdout
    for line in ("PrivateTmp=no", "PrivateIPC=yes", "ProtectClock=yes", "ProtectHostname=yes",
                 "RestrictRealtime=yes", "PrivateNetwork=yes", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateDevices=yes", "ProtectKernelTunables=yes",
                 "ProtectKernelModules=yes", "ProtectKernelLogs=yes", "ProtectControlGroups=yes",
                 "ProtectProc=invisible", "RestrictSUIDSGID=yes", "LockPersonality=yes",
                 "CapabilityBoundingSet=0", "MemoryMax=67108864",
                 # one more where PrivatePIDs= puts an init in front (core.PID_INIT)
                 "TasksMax=10" if box.suite == "bookworm" else "TasksMax=11"):
        assert line in props.splitlines(), (line, props)


def test_hardening_holds_inside_jobs(box):
    job, out = run_job(box, "'grep -E \"^(CapBnd|NoNewPrivs):\" /proc/self/status'")
    assert "CapBnd:\t0000000000000000" in out and "NoNewPrivs:\t1" in out, out
    # Even a job that root runs as root cannot touch the kernel's knobs, its
    # cgroup, or make setuid files.
    job, out = run_job(box, "--user root 'echo 1 > /proc/sys/vm/drop_caches; "
                            "mkdir /sys/fs/cgroup/pids/escape; cp /bin/true /tmp/t; "
                            "chmod u+s /tmp/t || echo no setuid; ls /dev/kmsg'", user=None)
    assert out.count("Read-only file system") == 2, out
    assert "no setuid" in out and "cannot access '/dev/kmsg'" in out, out


def test_limits_end_jobs_with_a_reason_that_says_which(box):
    job, out = run_job(box, "--memory 64M " + probe("alloc", "400"))
    assert job["state"] == "failed" and job["result"] == "oom-kill", job
    assert "oom-kill" in box.lc(f"checkjob {job['uuid']}").stdout and "allocated" not in out
    job, _ = run_job(box, "--timeout 2s 'sleep 60'")
    assert job["state"] == "failed" and job["result"] == "timeout" and "timeout" in job["reason"], job
    assert job["ended_at"] - job["started_at"] < 15
    job, out = run_job(box, "--tasks 8 " + probe("fork", "50"))
    assert "fork failed after" in out and "Resource temporarily unavailable" in out, out
    assert int(out.split("fork failed after ")[1].split()[0]) < 8
    job, out = run_job(box, "--cpus 0.5 " + probe("cpu-quota"))
    assert "cpus 0.5" in out, out


def test_over_maximum_and_disallowed_network_are_refused_up_front(box):
    assert configure(box, max_memory="1G").returncode == 0
    before = box.job_count()
    r = box.lc("addjob --memory 2G true", user="alice", check=False)
    assert r.returncode == 2 and "over this node's maximum of 1G" in one_line_error(r)
    r = box.lc("addjob --network host true", user="alice", check=False)
    assert r.returncode == 4 and "network host is not allowed" in one_line_error(r)
    assert box.job_count() == before
    assert configure(box, max_memory=None, job_networks="host").returncode == 0
    # the host's interface of the first test (made here too: this test may run alone)
    box.sh("ip link show lciso0 >/dev/null 2>&1 || ip link add lciso0 type veth peer name lciso1")
    job, out = run_job(box, "--network host 'cat /proc/net/dev'")
    assert "lciso0" in out, out


def test_http_api_refuses_bad_job_requests_and_writes_nothing(box):
    before = box.job_count()
    for body, status in (('{"command": "true", "memory": [1]}', "400"),
                         ('{"command": "true", "cpus": "fast"}', "400"),
                         ('{"command": "true", "env": "A=1"}', "400"),
                         ('{"command": "true", "workdir": "../x"}', "400"),
                         ('{"command": "true", "user": "bob"}', "403"),
                         ('{"command": "true", "network": "ns:lab"}', "403")):
        out = box.sh(f"python3 -c '{API}'", input=body, user="alice").stdout
        assert out.split(" ", 1)[0] == status, (body, out)
        assert json.loads(out.split(" ", 1)[1])["error"]
    assert box.job_count() == before


def test_env_and_workdir_arrive(box):
    job, out = run_job(box, "--env FOO=bar --env 'GREETING=hello world' --workdir /usr/share "
                            "'echo \"$FOO|$GREETING|$(pwd)\"'")
    assert job["state"] == "succeeded" and "bar|hello world|/usr/share" in out, out
    assert job["env"] == ["FOO=bar", "GREETING=hello world"] and job["workdir"] == "/usr/share"


def test_jobs_in_one_named_namespace_reach_each_other(box):
    assert "lclab" not in box.sh("lclusterd namespaces").stdout.split()
    assert restart_with(box, "--namespace=lclab").returncode == 0  # made by the daemon
    assert "lclab" in box.sh("lclusterd namespaces").stdout.split()
    server = box.lc("addjob " + probe("serve", "9009"), user="alice").stdout.strip()
    box.wait_state(server, ("running",))
    job, out = run_job(box, probe("ask", "9009"), user="bob")
    assert f"pong from {server}" in out, out
    assert box.wait_state(server)["state"] == "succeeded"
    r = box.sh("python3 /opt/lciso/probe.py connect 127.0.0.1 9009").stdout
    assert "unreachable" in r  # not the host's loopback
    assert restart_with(box).returncode == 0


def test_rootfs_from_mkrootfs_is_what_jobs_see(box):
    assert restart_with(box, "--rootfs=/srv/jobroot").returncode == 0
    job, out = run_job(box, "'cat /etc/lclusterd-rootfs; grep ^VERSION_CODENAME /etc/os-release; "
                            "command -v python3 || echo no python3 here'")
    assert job["state"] == "succeeded", job
    assert "built by lclusterd mkrootfs" in out and "VERSION_CODENAME=bookworm" in out, out
    assert "no python3 here" in out, out  # the container's / has python3; the rootfs does not
    # The memory limit's OOM check works there too. (Up to 180 s: once, in
    # .ci/run on Debian 13, cgroup v1, the job had not ended after 60 s.)
    job, _ = run_job(box, "--memory 16M 'x=$(head -c 200000000 /dev/zero | tr \"\\\\0\" x)'",
                     timeout=180)
    assert job["result"] == "oom-kill", job


def test_rootfs_without_a_shell_is_refused_at_start_up(box):
    box.sh("mkdir -p /srv/empty-root/etc")
    r = restart_with(box, "--rootfs=/srv/empty-root")
    assert r.returncode != 0
    message = "rootfs /srv/empty-root has no executable /bin/sh"
    box.sh(f"until journalctl -u lclusterd --no-pager | grep -q '{message}'; do sleep 0.2; done",
           timeout=15)
    status = box.sh("systemctl status lclusterd --no-pager", check=False).stdout
    assert message in status, status
    assert restart_with(box).returncode == 0
    assert box.lc("list", user="alice").returncode == 0


def test_mkrootfs_refuses_in_one_line(box):
    # debootstrap is a Recommends, and the test rootfs has it: a PATH without
    # it stands for a node without it.
    for args, words in (("/etc", "/etc exists and is not an empty directory"),
                        ("/srv/new-root", "debootstrap is not installed")):
        r = box.sh(f"PATH=/nonexistent /usr/bin/lclusterd mkrootfs {args}", check=False)
        assert r.returncode == 1 and r.stderr.strip() == f"lclusterd: {words}" + (
            " (apt install debootstrap)" if "debootstrap" in words else ""), r.stderr
    assert box.sh("test -e /srv/new-root", check=False).returncode == 1
