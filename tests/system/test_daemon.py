"""The daemon under systemd, on the installed package: what it says it can
enforce, supervision (a crashed task gets it restarted), the watchdog (a
hung loop gets it restarted), `systemctl reload` refusing a bad config
visibly, the warning about an etcd anyone can write to, the fd limit, a
node name live on another machine (exit 78). Each test starts the daemon
afresh and undoes what it changed."""

import time

DROPIN = "/run/systemd/system/lclusterd.service.d/test.conf"
CONF = "/etc/lclusterd/lclusterd.conf"


def status_text(box):
    return box.sh("systemctl show -p StatusText --value lclusterd").stdout.strip()


def journal(box, since):
    return box.sh(f"journalctl -u lclusterd --since @{since} --no-pager -o cat").stdout


def now(box):
    return box.sh("date +%s.%N").stdout.strip()


def wait_for(box, what, timeout=30):
    """Wait until the shell condition what holds inside."""
    box.sh(f"until {what}; do sleep 0.2; done", timeout=timeout)


def started(box):
    """(Re)start the daemon and wait until it runs registered."""
    box.sh("systemctl restart lclusterd")
    wait_for(box, "systemctl show -p StatusText --value lclusterd | grep -q '^running'")
    return status_text(box)


def with_dropin(box, text):
    box.sh(f"mkdir -p {DROPIN.rsplit('/', 1)[0]} && cat > {DROPIN} && systemctl daemon-reload",
           input=text)


def without_dropin(box):
    box.sh(f"rm -f {DROPIN} && systemctl daemon-reload && systemctl reset-failed lclusterd")


def controllers_read_only(box):
    """Are the memory/cpu cgroup v1 hierarchies mounted read-only here (nspawn
    on a v1 or hybrid host)? On a v2 host nspawn delegates a writable tree."""
    mounts = box.sh("cat /proc/self/mountinfo").stdout.splitlines()
    memory = [m for m in mounts if " - cgroup " in m and m.split(" - ")[1].split()[2].endswith("memory")]
    return bool(memory) and memory[0].split()[5].split(",")[0] == "ro"


def test_a_node_says_which_limits_it_cannot_enforce_and_refuses_them(box):
    since = now(box)
    said = started(box)
    if controllers_read_only(box):
        assert "cannot enforce --memory (no writable memory cgroup controller)" in said, said
        assert "cannot enforce --memory" in journal(box, since)
        r = box.lc("addjob --memory 64M true", user="alice", check=False)
        assert r.returncode != 0 and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        # Refused at submission: no registered node could ever run it (scheduler.never_fits).
        assert len(lines) == 1 and "no node enforces --memory" in lines[0], r.stderr
        assert r.returncode == 2, r.returncode
    # With the controllers writable (as on a real machine) it enforces them all.
    box.c.enable_resource_control()
    since = now(box)
    said = started(box)
    assert "cannot enforce" not in said, said
    assert "enforces memory, cpu and pids limits" in journal(box, since)


def test_the_fd_limit_is_raised_to_the_hard_one(box):
    with_dropin(box, "[Service]\nLimitNOFILE=1024:8192\n")
    try:
        started(box)
        pid = box.sh("systemctl show -p MainPID --value lclusterd").stdout.strip()
        limits = box.sh(f"grep 'Max open files' /proc/{pid}/limits").stdout.split()
        assert limits[3:5] == ["8192", "8192"], limits
    finally:
        without_dropin(box)


def test_a_crashed_task_makes_systemd_restart_the_daemon(box):
    with_dropin(box, "[Service]\nEnvironment=LCLUSTERD_TEST_FAULT=crash:heartbeat\n")
    try:
        since = now(box)
        box.sh("systemctl restart lclusterd")
        wait_for(box, f"journalctl -u lclusterd --since @{since} -o cat | grep -q 'Scheduled restart job'")
        log = journal(box, since)
        assert "task heartbeat ended: RuntimeError('crash injected by LCLUSTERD_TEST_FAULT')" in log
        assert "status=1/FAILURE" in log, log[-2000:]
    finally:
        without_dropin(box)
    assert started(box).startswith("running")


def test_a_hung_loop_stops_the_watchdog_and_systemd_restarts_the_daemon(box):
    # A heartbeat that never goes round while the event loop lives: the
    # reporter must stop petting, and systemd's watchdog must act.
    box.sh("cat > /etc/lclusterd/fast.conf", input="[lclusterd]\npoll_interval = 0.5\nlease_ttl = 2\n")
    with_dropin(box, "[Service]\nEnvironment=LCLUSTERD_TEST_FAULT=stall:heartbeat\nWatchdogSec=3\n"
                     "ExecStart=\nExecStart=/usr/bin/lclusterd --config /etc/lclusterd/fast.conf\n")
    try:
        since = now(box)
        t0 = time.monotonic()
        box.sh("systemctl restart lclusterd")
        wait_for(box, f"journalctl -u lclusterd --since @{since} -o cat | grep -q 'Scheduled restart job'")
        took = time.monotonic() - t0
        log = journal(box, since)
        assert "the heartbeat has made no progress" in log and "watchdog not petted" in log, log[-2000:]
        assert "Watchdog timeout" in log, log[-2000:]
        assert took < 20, took  # stall limit 2 s + WatchdogSec 3 s + the restart
    finally:
        without_dropin(box)
        box.sh("rm -f /etc/lclusterd/fast.conf")
    assert started(box).startswith("running")


def test_reload_with_a_bad_config_fails_visibly_and_keeps_the_daemon(box):
    started(box)  # afresh: the last test's restarts may still be settling
    pid = box.sh("systemctl show -p MainPID --value lclusterd").stdout.strip()
    box.sh(f"cp {CONF} /root/lclusterd.conf.orig")
    try:
        box.sh(f"printf '[lclusterd]\\nslots = lots\\n' > {CONF}")
        r = box.sh("lclusterd check-config", check=False)
        assert r.returncode == 78 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"lclusterd: {CONF}: bad value "
                                                                 "for 'slots'"), r.stderr
        since = now(box)
        r = box.sh("systemctl reload lclusterd", check=False)
        assert r.returncode != 0, r
        assert "bad value for 'slots'" in journal(box, since)
        assert box.sh("systemctl show -p MainPID --value lclusterd").stdout.strip() == pid
        assert box.sh("systemctl is-active lclusterd").stdout.strip() == "active"
        # A good file reloads.
        box.sh(f"printf '[lclusterd]\\nslots = 3\\n' > {CONF}")
        since = now(box)
        box.sh("systemctl reload lclusterd")
        wait_for(box, f"journalctl -u lclusterd --since @{since} -o cat | grep -q 'reloaded slots'")
        wait_for(box, "systemctl show -p StatusText --value lclusterd | grep -q 'of 3 slot(s)'")
    finally:
        box.sh(f"cp /root/lclusterd.conf.orig {CONF} && systemctl reload lclusterd")


def test_an_etcd_anyone_can_write_to_is_warned_about(box):
    # The package's etcd takes client certificates only: no warning.
    said = started(box)
    assert "accepts writes from anyone" not in said, said
    # A plain etcd beside it, as an external cluster without authentication would be.
    box.sh("systemd-run --unit plain-etcd -p DynamicUser=yes -p StateDirectory=plain-etcd "
           "etcd --data-dir /var/lib/plain-etcd/data --name plain "
           "--listen-client-urls http://127.0.0.1:2399 --advertise-client-urls http://127.0.0.1:2399 "
           "--listen-peer-urls http://127.0.0.1:2398 --initial-advertise-peer-urls http://127.0.0.1:2398 "
           "--initial-cluster plain=http://127.0.0.1:2398 --listen-metrics-urls ''")
    box.sh("cat > /etc/lclusterd/plain.conf",
           input="[lclusterd]\netcd_endpoints = http://127.0.0.1:2399\n")
    with_dropin(box, "[Service]\nExecStart=\nExecStart=/usr/bin/lclusterd --config /etc/lclusterd/plain.conf\n")
    try:
        since = now(box)
        box.sh("systemctl restart lclusterd")
        wait_for(box, "systemctl show -p StatusText --value lclusterd | grep -q 'accepts writes from anyone'")
        said = status_text(box)
        assert "etcd at http://127.0.0.1:2399 accepts writes from anyone without TLS" in said, said
        assert "accepts writes from anyone without TLS" in journal(box, since)
    finally:
        without_dropin(box)
        box.sh("systemctl stop plain-etcd; rm -f /etc/lclusterd/plain.conf")
    assert started(box).startswith("running")


ETCDCTL = ("etcdctl --endpoints=https://127.0.0.1:2379 --cacert=/etc/lclusterd/etcd/ca.pem "
           "--cert=/etc/lclusterd/etcd/client.pem --key=/etc/lclusterd/etcd/client.key")


def test_a_name_live_on_another_machine_ends_the_daemon_with_78_naming_it(box):
    # Issue 9 item 10 (contract C2): another machine's live registration of
    # our name, written as that node would, under a lease of its own.
    started(box)
    name = box.sh("hostname").stdout.strip()
    lease = box.sh(f"{ETCDCTL} lease grant 60").stdout.split()[1]
    other = f'{{"name":"{name}","machine":"0123456789abcdef0123456789abcdef","address":"http://10.9.9.9:7800"}}'
    box.sh(f"{ETCDCTL} put --lease={lease} /lcluster/nodes/{name} '{other}'")
    try:
        since = now(box)
        box.sh("systemctl restart lclusterd")
        wait_for(box, "systemctl is-failed --quiet lclusterd")
        assert box.sh("systemctl show -p ExecMainStatus --value lclusterd").stdout.strip() == "78"
        said = [line for line in journal(box, since).splitlines() if line.startswith("lclusterd: ")]
        assert said == [f"lclusterd: node name {name} is held by a live node on another machine, "
                        f"at http://10.9.9.9:7800: set another node_name in {CONF}"], said
        time.sleep(3)  # RestartSec=2: no restart comes (RestartPreventExitStatus=78)
        assert box.sh("systemctl is-failed lclusterd", check=False).stdout.strip() == "failed"
    finally:
        box.sh(f"{ETCDCTL} lease revoke {lease}")
        box.sh("systemctl reset-failed lclusterd")
    assert started(box).startswith("running")
