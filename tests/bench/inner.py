"""The measurements, run inside the bench container as root by tests/bench/run.py
(`make bench`), with lclusterd installed from the .deb and Slurm + munge in
the rootfs. Prints one JSON object on stdout; progress goes to stderr.

Every system gets the same jobs and the same number of them in flight:

  lclusterd  jobs submitted over its HTTP API (and with lclusterc), `slots`
             set to IN_FLIGHT; "finished" = its record turned terminal in etcd
             (seen by an etcd watch)
  systemd    StartTransientUnit of the same sandboxed unit (core.unit_properties,
             but without RemainAfterExit: nobody records it), IN_FLIGHT at a
             time; "finished" = systemd announced it inactive after it had been
             active (not its unloading: systemd garbage-collects at idle
             priority, late under load)
  slurm      sbatch --wrap, one node, OverSubscribe=FORCE so IN_FLIGHT jobs
             fit on its 2 CPUs; "finished" = gone from squeue

Two modes, one call each (BENCH_MODE): quiet, then loaded, while
tests/bench/run.py keeps a CPU hog busy on the host (outside the container,
the same for all three). Every end-to-end run also reads, around it, the CPU
time of the daemon's, etcd's and the whole container's cgroups
(readings.py) and, for lclusterd, etcd's header revision.

Dispatch latency is submit -> unit started: the unit's ActiveEnterTimestamp
(for Type=simple: its main process was forked) as systemd announces it in
PropertiesChanged, minus the wall clock just before the submit; for Slurm
the job itself writes the clock when it starts (its batch script runs then).
"""

import asyncio
import concurrent.futures
import json
import os
import pwd
import re
import shutil
import ssl
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid as uuidlib

import aiohttp
import etcd3
from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus

from lclusterd import core
from lclusterd.units import SIGNATURES, _variant, unit_path

import readings  # beside this script (run.py binds tests/bench at /mnt/bench)

SOCKET = "/run/lclusterd/lclusterd.sock"
CONF = "/etc/lclusterd/lclusterd.conf"
# etcd as the daemon reaches it (lclusterd.config reads CONF): the package's
# local etcd takes only its client certificate (root's); the 3-node
# harness's members speak plain http.
PREFIX = "/lcluster"

# The sizes of the runs: (name, value). BENCH_SCALE < 1 shrinks them for a quick try.
SCALE = float(os.environ.get("BENCH_SCALE", "1"))
MODE = os.environ.get("BENCH_MODE", "quiet")  # or "loaded": run.py's CPU hog is on
MODES = ("quiet", "loaded")
JOBS = {"true": "true", "sleep": "sleep 0.1"}  # job kind -> command
IN_FLIGHT = 16  # lclusterd's slots, systemd's calls in flight, Slurm's jobs per node
N_E2E = max(32, int(500 * SCALE))  # jobs of an end-to-end throughput run
# one at a time; half as many in the loaded mode (each waits longer there)
N_LATENCY = {"true": max(10, int(200 * SCALE)), "sleep": max(10, int(100 * SCALE))}
N_SLURM_LATENCY = max(5, int(50 * SCALE))
N_CLI = max(10, int(50 * SCALE))  # lclusterc addjob (and sbatch) calls in a shell loop
# jobs by addjob --count and by --file: one full array each, at any scale
# (its jobs then run, about a minute each at 16 jobs/s)
N_ARRAY = core.MAX_ARRAY
N_STARTUP = 20  # runs of the addjob path's start-up (the median is reported)
# addjob up to its first check, which fails before any request: the start-up
# (interpreter, imports, reading the command line, the client) of the
# command users loop over, without the request
ADDJOB_STARTUP = ["lclusterc", "addjob", "--count", "0", "true"]
ADDJOB_PATH = ("lclusterd", "lclusterd.quick", "lclusterd.client", "lclusterd.inputs")
HTTP_CLIENTS = 32  # concurrent HTTP clients
BATCH_CLIENTS = 4  # concurrent HTTP clients of the batch submit, core.MAX_BATCH jobs a request
SBATCH_PROCS = 8  # sbatch processes at a time in Slurm's end-to-end run
# The cgroups whose CPU time an end-to-end run reads ("" the container's own).
CGROUPS = {"daemon": "system.slice/lclusterd.service", "etcd": "system.slice/etcd.service",
           "container": ""}
# The 3-node run's jobs: also `sleep 1`, which keeps every node's slots busy.
CLUSTER_JOBS = {**JOBS, "sleep1": "sleep 1"}
# Short jobs placed by the primed node under `placement = spread` (the
# default): each node runs within this share of the mean (issue 11 item 8).
SPREAD_KINDS = ("true", "sleep")
SPREAD_TOLERANCE = 0.25
N_CLUSTER = {"true": int(300 * SCALE), "sleep": int(150 * SCALE), "sleep1": int(90 * SCALE)}
# etcd's own counters read before and after the 3-node `true` run
ETCD_COUNTERS = ("etcd_server_proposals_committed_total", "etcd_mvcc_put_total",
                 "etcd_mvcc_txn_total", "etcd_mvcc_delete_total", "etcd_mvcc_range_total",
                 "etcd_mvcc_db_total_size_in_bytes", "etcd_mvcc_db_total_size_in_use_in_bytes",
                 "etcd_debugging_mvcc_keys_total")
PROPOSALS = "etcd_server_proposals_committed_total"  # = writes: every write is one
IDLE_SECONDS = 20
TERMINAL = tuple(core.TERMINAL)


def say(*args):
    print("bench:", *args, file=sys.stderr, flush=True)


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, shell=True, text=True, capture_output=True, **kw)
    if check and r.returncode:
        raise RuntimeError(f"{cmd!r} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def percentiles(samples):
    s = sorted(samples)
    if not s:
        return {}
    pick = lambda q: s[min(len(s) - 1, int(round(q * (len(s) - 1))))]
    return {"n": len(s), "p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99),
            "min": s[0], "max": s[-1], "mean": sum(s) / len(s)}


def load_average():
    return os.getloadavg()[0]  # the host's: a container has no load average of its own


def cgroup_cpu():
    return {name: readings.cgroup_cpu(path) for name, path in CGROUPS.items()}


def measured(run, n, revisions=False):
    """run() (n jobs end to end) and what it cost: CPU ms per job of each
    cgroup in CGROUPS that was there before and after, etcd revisions per
    job (header revision before and after: a transaction counts once), the
    load average at its start and end."""
    client = etcd_client(timeout=30) if revisions else None
    try:
        cpu0, la0 = cgroup_cpu(), load_average()
        rev0 = client.get_response(f"{PREFIX}/ping").header.revision if client else None
        out = run()
        cpu1, la1 = cgroup_cpu(), load_average()
        if client:
            out["revisions_per_job"] = (client.get_response(f"{PREFIX}/ping").header.revision
                                        - rev0) / n
    finally:
        if client:
            client.close()
    out["cpu_ms_per_job"] = {k: (cpu1[k] - cpu0[k]) * 1000 / n for k in CGROUPS
                             if cpu0[k] is not None and cpu1[k] is not None}
    out["load"] = [la0, la1]
    return out


# --- observers -----------------------------------------------------------------

class UnitMonitor:
    """Our own connection to systemd: the first ActiveEnterTimestamp of every
    unit (by object path), and the end of units we wait for."""

    def __init__(self):
        self.started = {}  # object path -> seconds since the epoch
        self.waiters = {}  # object path -> future resolved when the unit has ended
        self.bus = None

    async def connect(self):
        self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self.bus.add_message_handler(self._on_message)
        for rule in ("type='signal',sender='org.freedesktop.systemd1',"
                     "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',"
                     "path_namespace='/org/freedesktop/systemd1/unit',"
                     "arg0='org.freedesktop.systemd1.Unit'",):
            await self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                            "AddMatch", "s", [rule])
        await self.manager("Subscribe", "", [])

    def _on_message(self, msg):
        if msg.message_type != MessageType.SIGNAL:
            return None
        if msg.member == "PropertiesChanged" and msg.body[0] == "org.freedesktop.systemd1.Unit":
            ts = msg.body[1].get("ActiveEnterTimestamp")
            if ts is not None and ts.value and msg.path not in self.started:
                self.started[msg.path] = ts.value / 1e6
            state = msg.body[1].get("ActiveState")
            # Inactive with an ActiveEnterTimestamp: it ran and ended (not "just loaded").
            if ts is not None and ts.value and state is not None \
                    and state.value in ("inactive", "failed"):
                fut = self.waiters.pop(msg.path, None)
                if fut is not None and not fut.done():
                    fut.set_result(time.time())
        return None

    async def call(self, dest, path, iface, member, sig, body):
        reply = await self.bus.call(Message(destination=dest, path=path, interface=iface,
                                            member=member, signature=sig, body=body))
        if reply.message_type == MessageType.ERROR:
            raise RuntimeError(f"{member}: {reply.error_name} {reply.body}")
        return reply.body

    async def manager(self, member, sig, body):
        return await self.call("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                               "org.freedesktop.systemd1.Manager", member, sig, body)

    async def started_at(self, unit, timeout=30):
        path = unit_path(unit)
        deadline = time.monotonic() + timeout
        while path not in self.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{unit}: no ActiveEnterTimestamp within {timeout} s")
            await asyncio.sleep(0.002)
        return self.started.pop(path)


class RecordWatch:
    """An etcd watch on the job records: when each job's record was first seen
    terminal (and its record then)."""

    def __init__(self):
        self.client = etcd_client(timeout=30)
        self.ended = {}  # uuid -> (time seen, record)
        self.cond = threading.Condition()
        events, self.cancel = self.client.watch_prefix(f"{PREFIX}/jobs/")
        self.thread = threading.Thread(target=self._run, args=(events,), daemon=True)
        self.thread.start()

    def _run(self, events):
        try:
            for ev in events:
                value = ev.value
                if not value or b'"state":"queued"' in value or b'"state":"running"' in value \
                        or b'"state":"starting"' in value:
                    continue
                now = time.time()
                job = json.loads(value)
                with self.cond:
                    self.ended.setdefault(job["uuid"], (now, job))
                    self.cond.notify_all()
        except Exception as e:  # the watch is cancelled at the end
            say("record watch ended:", e)

    def wait(self, uuids, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(u in self.ended for u in uuids):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [u for u in uuids if u not in self.ended]
                    raise RuntimeError(f"{len(missing)} jobs not finished after {timeout} s, "
                                       f"e.g. {missing[0]}")
                self.cond.wait(min(left, 1))
        return [self.ended[u] for u in uuids]

    def close(self):
        self.cancel()  # (closing the client too makes etcd3's watch thread complain)


def etcd_settings():
    """(endpoint URL, TLS arguments of etcd3.client or {}) of the daemon's first etcd endpoint."""
    from lclusterd import config as configuration
    config = configuration.load(CONF)
    endpoint = config.etcd_endpoints[0]
    if not endpoint.startswith("https://"):
        return endpoint, {}
    return endpoint, {"ca_cert": config.etcd_ca, "cert_cert": config.etcd_cert,
                      "cert_key": config.etcd_key}


def etcd_client(timeout):
    endpoint, tls = etcd_settings()
    host, port = endpoint.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    return etcd3.client(host=host, port=int(port), timeout=timeout, **tls)


def etcd_counters():
    endpoint, tls = etcd_settings()
    context = None
    if tls:
        context = ssl.create_default_context(cafile=tls["ca_cert"])
        context.load_cert_chain(tls["cert_cert"], tls["cert_key"])
    text = urllib.request.urlopen(f"{endpoint.rstrip('/')}/metrics", timeout=10,
                                  context=context).read().decode()
    values = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m and m.group(1) in ETCD_COUNTERS:
            values[m.group(1)] = values.get(m.group(1), 0) + float(m.group(2))
    return values


def daemon_pid():
    pid = int(sh("systemctl show -p MainPID --value lclusterd").strip() or 0)
    if not pid:
        raise RuntimeError("lclusterd is not running")
    return pid


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# --- lclusterd ---------------------------------------------------------------------

def lclusterd_setup():
    with open(CONF) as f:
        text = f.read()
    text = re.sub(r"(?m)^#?slots *=.*$", f"slots = {IN_FLIGHT}", text)
    with open(CONF, "w") as f:
        f.write(text)
    sh("systemctl restart lclusterd")
    wait_for(lambda: subprocess.run(["lclusterc", "list", "--limit", "1"],
                                    capture_output=True).returncode == 0, "lclusterd to answer")


def wait_for(pred, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


async def http_submit(command, n, clients, batch=None):
    """Submit n jobs over HTTP with `clients` concurrent connections, one job
    a request or `batch` ({"count": batch}). Returns (first submit, last accepted, uuids)."""
    todo = iter(range(0, n, batch or 1))
    uuids = []
    conn = aiohttp.UnixConnector(path=SOCKET, limit=clients)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker():
            for i in todo:
                req = {"command": command}
                if batch:
                    req["count"] = min(batch, n - i)
                async with session.post("http://lclusterd/v1/jobs", json=req) as r:
                    body = await r.json()
                    if r.status != 201:
                        raise RuntimeError(f"submit: HTTP {r.status} {body}")
                    uuids.extend(j["uuid"] for j in body.get("jobs", [body.get("job")]))
        t0 = time.time()
        await asyncio.gather(*(worker() for _ in range(clients)))
        t1 = time.time()
    return t0, t1, uuids


def lclusterd_e2e(watch, kind, n=N_E2E, batch=None):
    t0, t1, uuids = asyncio.run(http_submit(JOBS[kind], n, BATCH_CLIENTS if batch else HTTP_CLIENTS,
                                            batch))
    ends = watch.wait(uuids, timeout=max(300, n / 5))
    t_end = max(t for t, _ in ends)
    bad = [job for _, job in ends if job["state"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} lclusterd jobs did not succeed, e.g. {bad[0]}")
    return {"n": n, "submit_per_s": n / (t1 - t0), "seconds": t_end - t0,
            "jobs_per_s": n / (t_end - t0)}


async def lclusterd_latency(watch, kind, n):
    mon = UnitMonitor()
    await mon.connect()
    samples = []
    conn = aiohttp.UnixConnector(path=SOCKET)
    async with aiohttp.ClientSession(connector=conn) as session:
        for _ in range(n):
            t0 = time.time()
            async with session.post("http://lclusterd/v1/jobs", json={"command": JOBS[kind]}) as r:
                job = (await r.json())["job"]
            samples.append(await mon.started_at(job["unit"]) - t0)
            await asyncio.to_thread(watch.wait, [job["uuid"]], 60)
            await asyncio.sleep(0.02)  # the node settles: idle again
    mon.bus.disconnect()
    return samples


def addjob_arrays(lclusterc, command, n, file=None):
    """n jobs by `lclusterc addjob --count` (or --file FILE, k lines of
    command, written before each call) in arrays of at most core.MAX_ARRAY,
    one call after another; their uuids. lclusterc: the argv before addjob."""
    uuids = []
    for i in range(0, n, core.MAX_ARRAY):
        k = min(core.MAX_ARRAY, n - i)
        if file:
            with open(file, "w") as f:
                f.write(f"{command}\n" * k)
        how = ["--file", file] if file else ["--count", str(k), "--", command]
        r = subprocess.run([*lclusterc, "addjob", *how], capture_output=True, text=True,
                           timeout=300)
        if r.returncode:
            raise RuntimeError(f"lclusterc addjob {how[0]} exited {r.returncode}: {r.stderr.strip()}")
        lines = r.stdout.split()
        uuids += lines[1:]  # the first line is the array's id
        if len(lines) != k + 1:
            raise RuntimeError(f"lclusterc addjob {how[0]} printed {len(lines)} lines")
    return uuids


def median_wall(argv, n=N_STARTUP, exit_code=0):
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t0)
        if r.returncode != exit_code:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}, not {exit_code}")
    return sorted(walls)[len(walls) // 2]


def shell_loop(command, n):
    """Seconds `command` takes n times over in a shell loop; its output."""
    t0 = time.time()
    out = sh(f"for i in $(seq {n}); do {command} || exit 1; done")
    return time.time() - t0, out


def lclusterc_submit(watch):
    """lclusterc addjob's start-up, addjob in a shell loop, and arrays (--count, --file)."""
    lclusterc = shutil.which("lclusterc")
    imports = subprocess.run(["/usr/bin/python3", "-X", "importtime", lclusterc, *ADDJOB_STARTUP[1:]],
                             capture_output=True, text=True).stderr
    out = {"startup_s": median_wall(ADDJOB_STARTUP, exit_code=2),  # 2: the usage error
           "python_s": median_wall(["/usr/bin/python3", "-c", "pass"]),
           "import_addjob_s": sum(readings.parse_importtime(imports, m) for m in ADDJOB_PATH),
           "loop_n": N_CLI, "array_n": N_ARRAY, "array_size": core.MAX_ARRAY}
    seconds, printed = shell_loop("lclusterc addjob true", N_CLI)
    out["loop_per_s"] = N_CLI / seconds
    uuids = printed.split()
    watch.wait(uuids, timeout=300)
    t0 = time.time()
    uuids = addjob_arrays(["lclusterc"], "true", N_ARRAY)
    out["count_per_s"] = N_ARRAY / (time.time() - t0)
    watch.wait(uuids, timeout=max(300, N_ARRAY / 5))
    path = "/var/tmp/bench-jobs"
    t0 = time.time()  # (writing the file of true lines is in it: microseconds)
    uuids = addjob_arrays(["lclusterc"], "true", N_ARRAY, file=path)
    out["file_per_s"] = N_ARRAY / (time.time() - t0)
    watch.wait(uuids, timeout=max(300, N_ARRAY / 5))
    return out


def lclusterd_idle():
    """The idle node's etcd writes/s (raft proposals: every write is one)
    and its daemon's CPU, over IDLE_SECONDS."""
    c0, cpu0, t0 = etcd_counters(), readings.cgroup_cpu(CGROUPS["daemon"]), time.time()
    time.sleep(IDLE_SECONDS)
    c1, cpu1, t1 = etcd_counters(), readings.cgroup_cpu(CGROUPS["daemon"]), time.time()
    return {"seconds": t1 - t0, "etcd_writes_per_s": (c1[PROPOSALS] - c0[PROPOSALS]) / (t1 - t0),
            "daemon_cpu_ms_per_s": None if cpu0 is None or cpu1 is None
            else (cpu1 - cpu0) * 1000 / (t1 - t0)}


def bench_lclusterd():
    say(f"lclusterd ({MODE}): setting slots =", IN_FLIGHT)
    lclusterd_setup()
    pid = daemon_pid()
    watch = RecordWatch()
    out = {"slots": IN_FLIGHT, "rss_at_start_mb": rss_mb(pid), "latency": {}, "e2e": {},
           "load": {}}
    n_latency = {k: v if MODE == "quiet" else v // 2 for k, v in N_LATENCY.items()}
    try:
        if MODE == "quiet":
            say(f"lclusterd: the idle node, {IDLE_SECONDS} s")
            out["idle"] = lclusterd_idle()
            say("  ", json.dumps(out["idle"]))
        for kind in JOBS:
            say(f"lclusterd ({MODE}): dispatch latency, {n_latency[kind]} x {kind!r} one at a time")
            out["load"][f"latency {kind}"] = load_average()
            out["latency"][kind] = asyncio.run(lclusterd_latency(watch, kind, n_latency[kind]))
        if MODE == "quiet":
            say(f"lclusterd: lclusterc start-up, {N_CLI} addjob in a shell loop, "
                f"{N_ARRAY} by --count and by --file")
            out["load"]["lclusterc"] = load_average()
            out["lclusterc"] = lclusterc_submit(watch)
            say("  ", json.dumps(out["lclusterc"]))
        for kind in JOBS:
            say(f"lclusterd ({MODE}): end to end, {N_E2E} x {kind!r}, {HTTP_CLIENTS} HTTP clients")
            out["e2e"][kind] = measured(lambda: lclusterd_e2e(watch, kind), N_E2E, revisions=True)
            say("  ", json.dumps(out["e2e"][kind]))
        say(f"lclusterd ({MODE}): end to end, {N_E2E} x 'true', batch submit by "
            f"{BATCH_CLIENTS} HTTP clients")
        out["batch"] = measured(lambda: lclusterd_e2e(watch, "true", batch=core.MAX_BATCH), N_E2E,
                                revisions=True)
        say("  ", json.dumps(out["batch"]))
        if daemon_pid() != pid:
            raise RuntimeError("lclusterd restarted during the run")
        out["rss_at_end_mb"] = rss_mb(pid)
    finally:
        watch.close()
    sh("systemctl stop lclusterd.socket lclusterd.service")
    return out


# --- raw systemd --------------------------------------------------------------------

def raw_properties(command):
    # as lclusterd runs root's jobs: as nobody (core.run_as)
    nobody = pwd.getpwnam("nobody")
    job = core.new_job(command, nobody.pw_uid, nobody.pw_gid, "nobody", time.time())
    props = [(k, False if k == "RemainAfterExit" else v)
             for k, v in core.unit_properties(job, 10)]
    return [[k, Variant(SIGNATURES[k], _variant(v))] for k, v in props]


async def raw_start(mon, command):
    """Start one unit; returns (unit name, future resolved when it has ended)."""
    name = f"lcluster-bench@{uuidlib.uuid4()}.service"
    fut = asyncio.get_running_loop().create_future()
    mon.waiters[unit_path(name)] = fut
    await mon.manager("StartTransientUnit", "ssa(sv)a(sa(sv))",
                      [name, "fail", raw_properties(command), []])
    return name, fut


async def raw_e2e(kind, n=N_E2E):
    mon = UnitMonitor()
    await mon.connect()
    todo = iter(range(n))

    async def worker():
        for _ in todo:
            _, fut = await raw_start(mon, JOBS[kind])
            await asyncio.wait_for(fut, 60)
    t0 = time.time()
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    t1 = time.time()
    mon.bus.disconnect()
    return {"n": n, "seconds": t1 - t0, "jobs_per_s": n / (t1 - t0)}


async def raw_latency(kind, n):
    mon = UnitMonitor()
    await mon.connect()
    samples = []
    for _ in range(n):
        t0 = time.time()
        name, fut = await raw_start(mon, JOBS[kind])
        samples.append(await mon.started_at(name) - t0)
        await asyncio.wait_for(fut, 60)
        await asyncio.sleep(0.02)
    mon.bus.disconnect()
    return samples


def bench_systemd():
    out = {"in_flight": IN_FLIGHT, "latency": {}, "e2e": {}, "load": {}}
    for kind in JOBS:
        n = N_LATENCY[kind] if MODE == "quiet" else N_LATENCY[kind] // 2
        say(f"systemd ({MODE}): dispatch latency, {n} x {kind!r}")
        out["load"][f"latency {kind}"] = load_average()
        out["latency"][kind] = asyncio.run(raw_latency(kind, n))
        say(f"systemd ({MODE}): end to end, {N_E2E} x {kind!r}, {IN_FLIGHT} in flight")
        out["e2e"][kind] = measured(lambda: asyncio.run(raw_e2e(kind)), N_E2E)
        say("  ", json.dumps(out["e2e"][kind]))
    return out


# --- Slurm -------------------------------------------------------------------------

# DESIGN.md's figures: the settings that made one node fast. One node whose 2
# CPUs take IN_FLIGHT jobs (OverSubscribe=FORCE:8), jobs scheduled at once
# (batch_sched_delay=0), finished jobs forgotten after 2 s (MinJobAge), no
# accounting, job-completion log or accounting gathering; proctrack/linuxproc
# because proctrack/cgroup fails in the container.
SLURM_CONF = """\
ClusterName=bench
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MinJobAge=2
ReturnToService=2
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName={host} CPUs=2 State=UNKNOWN
PartitionName=bench Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:{share}
"""


def slurm_setup():
    host = socket.gethostname()
    # Slurm resolves names with AI_ADDRCONFIG: with only loopback (the container's
    # private network) no name resolves. A veth pair inside the container's own
    # network namespace gives it a non-loopback address for the hostname, which
    # munge's credentials need too (else they carry 0.0.0.0).
    if "bench0" not in sh("ip -br link"):
        sh("ip link add bench0 type veth peer name bench1 && ip addr add 10.254.0.1/32 dev bench0"
           " && ip link set bench0 up && ip link set bench1 up")
    with open("/etc/hosts") as f:
        known = f"10.254.0.1\t{host}\n" in f.read()
    if not known:  # (the loaded mode sets Slurm up again)
        with open("/etc/hosts", "a") as f:
            f.write(f"10.254.0.1\t{host}\n")
    with open("/etc/slurm/slurm.conf", "w") as f:
        f.write(SLURM_CONF.format(host=host, share=IN_FLIGHT // 2))
    os.makedirs("/var/lib/slurm/slurmctld", exist_ok=True)
    os.makedirs("/var/lib/slurm/slurmd", exist_ok=True)
    os.makedirs("/var/log/slurm", exist_ok=True)
    os.makedirs("/etc/systemd/system/munge.service.d", exist_ok=True)
    with open("/etc/systemd/system/munge.service.d/bench.conf", "w") as f:
        f.write("[Service]\nExecStart=\nExecStart=/usr/sbin/munged --num-threads 10\n")
    sh("systemctl daemon-reload && systemctl restart munge && systemctl restart slurmctld slurmd")
    wait_for(lambda: sh("sinfo -h -o %T", check=False).strip() == "idle", "the Slurm node to be idle")


def sbatch(command, extra=""):
    out = sh(f"sbatch --parsable -o /dev/null -e /dev/null {extra} --wrap={command!r}")
    return out.strip().split(";")[0]


def slurm_idle():
    return sh("squeue -h -o %i", check=False).strip() == ""


def slurm_wait_idle(timeout):
    deadline = time.monotonic() + timeout
    while not slurm_idle():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Slurm jobs still queued after {timeout} s")
        time.sleep(0.1)
    return time.time()


def slurm_e2e(kind, n=N_E2E):
    t0 = time.time()
    sh(f"seq {n} | xargs -P {SBATCH_PROCS} -I@ sbatch --parsable -o /dev/null -e /dev/null "
       f"--wrap={JOBS[kind]!r}")
    t1 = time.time()
    t_end = slurm_wait_idle(max(600, n))
    return {"n": n, "submit_per_s": n / (t1 - t0), "seconds": t_end - t0,
            "jobs_per_s": n / (t_end - t0)}


def slurm_latency(kind, n):
    os.makedirs("/var/tmp/slurm-lat", exist_ok=True)
    samples = []
    cmd = JOBS[kind]
    for _ in range(n):
        t0 = time.time()
        jobid = sbatch(f"date +%s.%N >/var/tmp/slurm-lat/$SLURM_JOB_ID; {cmd}")
        path = f"/var/tmp/slurm-lat/{jobid}"
        deadline = time.monotonic() + 60
        while not (os.path.exists(path) and os.path.getsize(path)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm job {jobid} did not start within 60 s")
            time.sleep(0.002)
        with open(path) as f:
            samples.append(float(f.read()) - t0)
        slurm_wait_idle(60)
    return samples


def bench_slurm():
    say("slurm: configuring one node (munge, slurmctld, slurmd)")
    slurm_setup()
    out = {"in_flight": IN_FLIGHT, "latency": {}, "e2e": {}, "load": {}}
    if MODE == "quiet":
        out["load"]["sbatch loop"] = load_average()
        seconds, _ = shell_loop("sbatch --parsable -o /dev/null -e /dev/null --wrap=true", N_CLI)
        out["sbatch_loop_per_s"] = N_CLI / seconds
        slurm_wait_idle(300)
    n = N_SLURM_LATENCY if MODE == "quiet" else N_SLURM_LATENCY // 2
    for kind in JOBS:
        say(f"slurm ({MODE}): dispatch latency, {n} x {kind!r}")
        out["load"][f"latency {kind}"] = load_average()
        out["latency"][kind] = slurm_latency(kind, n)
        say(f"slurm ({MODE}): end to end, {N_E2E} x {kind!r}, sbatch from {SBATCH_PROCS} processes")
        out["e2e"][kind] = measured(lambda: slurm_e2e(kind), N_E2E)
        say("  ", json.dumps(out["e2e"][kind]))
    sh("systemctl stop slurmd slurmctld munge")
    return out


# --- 3 nodes ---------------------------------------------------------------------

def spread(ran_on, names):
    """How evenly jobs ran over the nodes: each node's count against the
    mean (a node that ran none counts too)."""
    counts = {name: ran_on.get(name, 0) for name in names}
    mean = sum(counts.values()) / len(counts)
    worst = max(abs(c - mean) / mean for c in counts.values()) if mean else 0.0
    return {"counts": counts, "mean": mean, "worst_deviation": worst,
            "tolerance": SPREAD_TOLERANCE, "ok": worst <= SPREAD_TOLERANCE}


def cluster_e2e(watch, kind, urls, n):
    """n jobs submitted across the nodes at once (lclusterc --server URL addjob
    --count, n/len(urls) each, in arrays of at most core.MAX_ARRAY) until all
    are recorded finished; where they ran."""
    shares = [n // len(urls) + (i < n % len(urls)) for i in range(len(urls))]
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        parts = list(pool.map(lambda url_k: addjob_arrays(
            ["lclusterc", "--server", url_k[0], "--token-file", "/etc/lclusterd/token"],
            CLUSTER_JOBS[kind], url_k[1]), zip(urls, shares)))
    uuids = [u for part in parts for u in part]
    t1 = time.time()
    if len(uuids) != n:
        raise RuntimeError(f"submitted {n} jobs, got {len(uuids)} ids")
    ends = watch.wait(uuids, timeout=max(300, n / 2))
    t_end = max(t for t, _ in ends)
    bad = [job for _, job in ends if job["state"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} jobs did not succeed, e.g. {bad[0]}")
    ran_on = {}
    for _, job in ends:
        ran_on[job.get("node")] = ran_on.get(job.get("node"), 0) + 1
    return {"n": n, "submit_per_s": n / (t1 - t0), "seconds": t_end - t0,
            "jobs_per_s": n / (t_end - t0), "ran_on": dict(sorted(ran_on.items()))}


def bench_cluster():
    """Inside node 1 of tests/cluster/harness.py's cluster; BENCH_NODES the
    nodes' URLs. etcd's counters are cluster-wide: every member commits every
    proposal, so node 1's member counts all the nodes' writes."""
    urls = os.environ["BENCH_NODES"].split(",")
    nodes = json.loads(sh("lclusterc nodes --json"))
    watch = RecordWatch()
    out = {"nodes": len(urls), "slots": {n["name"]: n.get("slots") for n in nodes}, "e2e": {}}
    try:
        i0, t_idle = etcd_counters(), time.time()
        time.sleep(IDLE_SECONDS)
        c0, t_c0 = etcd_counters(), time.time()
        idle_per_s = (c0[PROPOSALS] - i0[PROPOSALS]) / (t_c0 - t_idle)
        for kind in CLUSTER_JOBS:
            say(f"3 nodes: end to end, {N_CLUSTER[kind]} x {kind!r}, "
                f"--count across {len(urls)} nodes")
            out["e2e"][kind] = cluster_e2e(watch, kind, urls, N_CLUSTER[kind])
            if kind in SPREAD_KINDS:
                out["e2e"][kind]["spread"] = spread(out["e2e"][kind]["ran_on"],
                                                    [n["name"] for n in nodes])
            if kind == "true":  # etcd's writes over the `true` run, its idle rate taken off
                time.sleep(2 * 2 + 1)  # two sweeps: the nodes are idle again
                c1, t_c1 = etcd_counters(), time.time()
                delta = {k: c1.get(k, 0) - c0.get(k, 0) for k in ETCD_COUNTERS}
                n = N_CLUSTER[kind]
                out["etcd_per_job"] = {k: v / n for k, v in delta.items() if k.endswith("_total")}
                out["etcd_writes_per_job"] = delta[PROPOSALS] / n
                out["etcd_idle_writes_per_s"] = idle_per_s
                out["etcd_job_writes_per_job"] = (delta[PROPOSALS]
                                                  - idle_per_s * (t_c1 - t_c0)) / n
            say("  ", json.dumps(out["e2e"][kind]))
    finally:
        watch.close()
    return out


def main():
    which = sys.argv[1:] or ["lclusterd", "systemd", "slurm"]
    results = {"cpus": os.cpu_count(), "scale": SCALE, "mode": MODE,
               "sizes": {"e2e": N_E2E, "latency": N_LATENCY, "slurm_latency": N_SLURM_LATENCY,
                         "cli_loop": N_CLI, "arrays": N_ARRAY, "http_clients": HTTP_CLIENTS,
                         "in_flight": IN_FLIGHT, "cluster": N_CLUSTER}}
    if which != ["cluster"]:
        sh("systemctl stop slurmd slurmctld", check=False)  # quiet while the others run
    for name in which:
        t = time.monotonic()
        results[name] = {"lclusterd": bench_lclusterd, "systemd": bench_systemd,
                         "slurm": bench_slurm, "cluster": bench_cluster}[name]()
        say(f"{name}: done in {time.monotonic() - t:.0f} s")
    json.dump(results, sys.stdout)
    print()


if __name__ == "__main__":
    main()
