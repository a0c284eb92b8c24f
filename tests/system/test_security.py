"""Issue 10, from the attacker's side, in a booted container with the .deb:
a record the daemon did not write is never run (item 1's defence in depth),
root's jobs get a uid each (item 3), nothing of a job outlives it and its
/tmp and /var/tmp are bounded (item 4), and a job unit's exposure score
(item 5).

One container for the module; tests run in file order (the last one
restarts the daemon with a small job_tmp_size)."""

import json
import re
import time
import uuid as uuidlib

import pytest

from lclusterd import core
from tests.system import container as ct
from tests.system.conftest import Box

# etcdctl as the daemon reaches etcd (TLS with the package's client
# certificate when it has one): root's access, standing in for whoever else
# can write etcd (a default etcd without authentication lets every local user).
ETCDCTL = r'''
from lclusterd import config
import os, sys
c = config.load()
args = ["etcdctl", "--endpoints=" + ",".join(c.etcd_endpoints)]
for flag, path in (("--cacert", c.etcd_ca), ("--cert", c.etcd_cert), ("--key", c.etcd_key)):
    if path:
        args.append(f"{flag}={path}")
os.environ["ETCDCTL_API"] = "3"
os.execvp("etcdctl", args + sys.argv[1:])
'''
DYNAMIC_UIDS = range(61184, 65520)  # systemd's range for DynamicUser=


@pytest.fixture(scope="module")
def box(rootfs, deb_dir):
    with ct.Container(ct.unique_name("lcsec"), rootfs, binds_ro={str(deb_dir): "/mnt/debs"}) as c:
        c.run("apt-get install -y --no-install-recommends /mnt/debs/lclusterd_*_all.deb", timeout=300)
        c.run("useradd -m alice && useradd -m bob")
        c.run("cat > /usr/local/bin/lc-etcdctl && chmod 700 /usr/local/bin/lc-etcdctl", input=(
            "#!/usr/bin/python3\n" + ETCDCTL))
        yield Box(c)


def run_job(box, args, user="alice", timeout=60):
    uuid = box.lc(f"addjob {args}", user=user).stdout.strip()
    job = box.wait_state(uuid, timeout=timeout)
    return job, box.sh(f"journalctl -u {job['unit']} --no-pager -o cat").stdout


def plant(box, job):
    """Write job's record and its queue keys into etcd as a stranger would."""
    prefix = "/lcluster"
    record = json.dumps(job.to_dict())
    for key, value in ((f"{prefix}/jobs/{job.uuid}", record),
                       (f"{prefix}/queue/{core.queue_rank(job)}", job.uuid),
                       (f"{prefix}/queued_by/{job.uid}/{job.uuid}", job.uuid)):
        box.sh(f"lc-etcdctl put '{key}'", input=value)


def test_a_record_the_daemon_did_not_write_is_never_run(box):
    assert box.sh("stat -c '%U %a' /etc/lclusterd/token").stdout.split() == ["root", "600"]
    # 1. A record made up from scratch: root, no signature.
    forged = core.Job(uuid=str(uuidlib.uuid4()), command="cat /etc/shadow; echo pwned",
                      uid=0, gid=0, user="root", submitted_at=time.time(), submitter="alice",
                      submitter_uid=int(box.sh("id -u alice").stdout))
    # 2. alice's own signed record, queued again with uid 0 and its signature kept.
    blocker = box.lc("addjob --priority -100 'sleep 300'", user="alice").stdout.strip()
    mine = core.Job.from_dict(box.job(blocker))
    assert mine.signature and len(mine.signature) == 64
    copied = core.Job(uuid=str(uuidlib.uuid4()), command="cat /etc/shadow; echo pwned", uid=0,
                      gid=0, user="root", submitted_at=time.time(), submitter="alice",
                      submitter_uid=mine.submitter_uid, signature=mine.signature)
    for job in (forged, copied):
        plant(box, job)
        record = box.wait_state(job.uuid, ("failed",), timeout=30)
        assert record["reason"] == core.UNSIGNED == (
            "record signature does not verify: not written by a node of this cluster"), record
        assert record["started_at"] is None and record["exit_status"] is None, record
        assert box.unit_state(job.unit)[0] != "loaded"  # never started
        assert box.sh(f"journalctl -u {job.unit} --no-pager -o cat -q").stdout.strip() == ""
    log = box.sh("journalctl -u lclusterd --no-pager -o cat").stdout
    assert f"job {forged.uuid}" in log and core.UNSIGNED in log, log[-2000:]
    assert "pwned" not in box.sh("journalctl --no-pager -o cat").stdout
    box.lc(f"removejob {blocker}", user="alice")


def test_root_jobs_get_a_uid_each_and_cannot_touch_each_other(box):
    victim = box.lc("addjob --env SECRET=hunter2 'id -u; sleep 300'").stdout.strip()
    job = box.wait_state(victim, ("running",))
    pid = box.sh(f"systemctl show -p MainPID --value {job['unit']}").stdout.strip()
    assert int(pid) > 0
    assert box.sh(f"tr '\\0' '\\n' </proc/{pid}/environ").stdout.count("SECRET=hunter2") == 1
    attacker, out = run_job(box, f"'id -u; ls -d /proc/[0-9]* | wc -l; "
                                 f"cat /proc/{pid}/environ || echo no environ; "
                                 f"kill -9 {pid} || echo no kill; kill -9 -1; echo alive'", user=None)
    assert job["user"] == attacker["user"] == "nobody" and job["submitter"] == "root"
    assert "hunter2" not in out and "no environ" in out and "no kill" in out, out
    assert box.job(victim)["state"] == "running"  # kill -9 -1 did not reach it either
    victim_out = box.sh(f"journalctl -u {job['unit']} --no-pager -o cat").stdout
    uids = [int(re.search(r"(?m)^(\d+)$", text).group(1)) for text in (victim_out, out)]
    assert uids[0] != uids[1] and all(u in DYNAMIC_UIDS for u in uids), (uids, out)
    show = box.sh(f"systemctl show -p DynamicUser,User {job['unit']}").stdout
    assert "DynamicUser=yes" in show and f"User=lcj-{victim.replace('-', '')[:27]}" in show, show
    box.lc(f"removejob {victim}")


LEFTOVERS = ("ipcmk -M 4096 && ipcmk -Q && ipcmk -S 1 && echo made ipc; "
             "echo left > /dev/shm/lcsec-left && echo made shm; echo seen=$(ipcs -m | grep -c 4096)")


@pytest.mark.parametrize("user", ["alice", None])  # None: root's, a dynamic user
def test_nothing_of_a_job_outlives_it(box, user):
    before = box.sh("ipcs -m -q -s").stdout
    job, out = run_job(box, f"'{LEFTOVERS}'", user=user)
    assert job["state"] == "succeeded" and "made ipc" in out and "made shm" in out, out
    assert "seen=1" in out.splitlines(), out
    assert box.sh("ipcs -m -q -s").stdout == before  # no segment, queue, semaphore left
    assert box.sh("test -e /dev/shm/lcsec-left", check=False).returncode == 1
    # Nor can a job see what another left: each has its own.
    assert box.sh("ipcmk -M 4096").returncode == 0
    job, out = run_job(box, "'echo seen=$(ipcs -m | grep -c 4096)'", user=user)
    assert "seen=0" in out.splitlines(), out
    box.sh("ipcrm --all=shm")


def test_job_unit_exposure_is_at_most_3(box):
    scores = {}
    for who, user in (("alice", "alice"), ("root (dynamic user)", None)):
        uuid = box.lc("addjob 'sleep 300'", user=user).stdout.strip()
        unit = box.wait_state(uuid, ("running",))["unit"]
        out = box.sh(f"systemd-analyze security --no-pager {unit}").stdout
        scores[who] = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out).group(1))
        applied = box.sh(f"systemctl show -p RestrictNamespaces,RestrictAddressFamilies,PrivateIPC,"
                         f"SystemCallArchitectures,RestrictRealtime {unit}").stdout.splitlines()
        applied = dict(line.split("=", 1) for line in applied)
        assert set(applied.pop("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
        assert applied == {"PrivateIPC": "yes", "RestrictNamespaces": "yes", "RestrictRealtime": "yes",
                           "SystemCallArchitectures": "native"}, applied
        box.lc(f"removejob {uuid}")
    print(f"systemd-analyze security of a job unit ({box.sh('systemctl --version').stdout.split()[1]}):",
          scores)
    assert all(score <= 3.0 for score in scores.values()), scores
    # What it takes away, seen from inside.
    job, out = run_job(box, "'unshare -U true || echo no userns; unshare -n true || echo no netns; "
                            "python3 -c \"import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\" "
                            "|| echo no netlink; python3 -c \"import socket; socket.socket(socket.AF_PACKET, "
                            "socket.SOCK_RAW)\" || echo no packet; python3 -c \"import socket; "
                            "socket.socket(socket.AF_INET6).close(); print(\\\"inet6 ok\\\")\"'")
    for line in ("no userns", "no netns", "no netlink", "no packet", "inet6 ok"):
        assert line in out.splitlines(), (line, out)


def test_tmp_and_var_tmp_are_bounded_by_job_tmp_size(box):
    conf = "/etc/lclusterd/lclusterd.conf"
    box.sh(f"sed -i '/^job_tmp_size =/d' {conf} && echo 'job_tmp_size = 8M' >> {conf}")
    box.sh("systemctl reset-failed lclusterd; systemctl restart lclusterd")
    job, out = run_job(box, "'df -B1 --output=size,target /tmp /var/tmp /dev/shm; "
                            "for d in /tmp /var/tmp; do head -c 16M /dev/zero > $d/big; "
                            "echo $d $? $(stat -c %s $d/big); done'")
    sizes = dict(reversed(line.split()) for line in out.splitlines()
                 if re.match(r"^\s*\d+\s+/", line))
    assert sizes == {"/tmp": "8388608", "/var/tmp": "8388608", "/dev/shm": "8388608"}, out
    assert out.count("No space left on device") == 2, out
    written = dict(re.findall(r"(?m)^(/tmp|/var/tmp) 1 (\d+)$", out))  # head failed, at the bound
    assert set(written) == {"/tmp", "/var/tmp"} and all(
        8_000_000 < int(size) <= 8388608 for size in written.values()), out
    assert box.sh("test -e /tmp/big || test -e /var/tmp/big", check=False).returncode == 1
