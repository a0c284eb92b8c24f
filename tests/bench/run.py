"""`make bench`: issue 13's targets, each printed met / missed / not measured.

First the history run (tests/bench/sim.py --history: 100,000 jobs through
one simulated node with the package's retention settings). Then boot the
test container (with Slurm and munge in its rootfs), install the built .deb
with apt and run tests/bench/inner.py inside twice: quiet, then loaded (one
busy process a CPU on the host, outside the container, started here and
stopped by pid). Prints the table of figures and their ratios to the
baselines, and saves it as JSON with latency.png (dispatch latency) and
throughput.png (jobs/s by job shape, quiet and loaded).

Then the 3-node section: tests/cluster/harness.py's cluster (three containers,
three etcd members, lclusterd from the .deb on each), inner.py's `cluster`
run inside node 1. On one 2-core machine this measures overhead, not scaling;
it also checks that short jobs spread evenly (each node within 25% of the
mean). Scaling is tests/bench/sim.py's (make bench runs it first).

    python3 -m tests.bench.run --deb-dir dist --out dist/bench [--scale 0.1] [--only lclusterd]
    (--only: lclusterd, systemd, slurm, cluster, history; repeatable)
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster import harness
from tests.system import container as ct

HERE = Path(__file__).resolve().parent
# The bench rootfs: the system tests' packages plus the Slurm baseline's.
BENCH_PACKAGES = ct.TEST_PACKAGES + ["slurm-wlm", "munge"]

# etcd's db in use after the history run's N jobs against after its first
# max_finished_jobs (10,000): without pruning it would grow with N (every
# record and its revisions kept, ~10x at 100,000); pruning to the cap and
# compacting keep it near the cap's size.
DB_BOUND = 1.5
# Issue 13's targets: kind -> (test of a table row, as said). A test that
# cannot be made (a figure or a baseline not measured) is "not measured".
TARGETS = {
    "e2e": (lambda r: r["ratio_systemd"] >= 0.9 and r["lclusterd"] > r["slurm"],
            ">= 0.9 x raw systemd and > Slurm"),
    "p50": (lambda r: r["lclusterd"] <= 15, "<= 15 ms"),
    "p99": (lambda r: r["lclusterd"] <= 50, "<= 50 ms"),
    "cpu": (lambda r: r["lclusterd"] <= 3, "<= 3 ms"),
    "revisions": (lambda r: r["lclusterd"] <= 2, "<= 2"),
    "http": (lambda r: r["lclusterd"] >= 2000, ">= 2,000/s"),
    "loop": (lambda r: r["lclusterd"] >= 40, ">= 40/s"),
    "startup": (lambda r: r["lclusterd"] < 30, "< 30 ms"),
    "array": (lambda r: r["lclusterd"] >= 5000, ">= 5,000/s"),
    "idle": (lambda r: r["lclusterd"] <= 0.2, "<= 0.2/s"),
    "db": (lambda r: r["lclusterd"] <= DB_BOUND, f"<= {DB_BOUND} (pruned)"),
    "pruned": (lambda r: r["lclusterd"] >= 1, ">= 1 (pruning ran)"),
    "rss": (lambda r: r["lclusterd"] <= 5, "<= 5 MB"),
}
KIND_LABEL = {"true": "true", "sleep": "sleep 0.1"}
SHAPES = {"true": "true", "sleep": "sleep 0.1", "batch": "true, batch-submitted"}
MODES = ("quiet", "loaded")
SYSTEMS = ("lclusterd", "systemd", "slurm", "cluster", "history")  # what --only picks
# Slots a node in the 3-node run: 18 in flight over the cluster, about the
# single node's 16 (core.IN_FLIGHT in inner.py), so the ratio shows overhead.
CLUSTER_SLOTS = 6
CLUSTER_LABEL = "3-node (overhead on one 2-core machine, not scaling)"
HISTORY_JOBS = 100000  # jobs through the simulated node of the history run (x --scale)


def table(res):
    """[(figure, lclusterd, systemd or None, slurm or None, target kind or None)];
    larger or smaller is better as the figure says."""
    g = _dig
    ms = lambda v: None if v is None else v * 1000
    rows = []
    for mode in MODES:
        m = res.get(mode) or {}
        if not m:
            continue
        lc, sd, sl = m.get("lclusterd") or {}, m.get("systemd") or {}, m.get("slurm") or {}
        runs = {s: (g(lc, ("batch",)) if s == "batch" else g(lc, ("e2e", s)),
                    g(sd, ("e2e", "true" if s == "batch" else s)),
                    g(sl, ("e2e", "true" if s == "batch" else s))) for s in SHAPES}
        for shape, label in SHAPES.items():
            rows.append((f"{mode}: e2e {label}, jobs/s",
                         *(g(r, ("jobs_per_s",)) for r in runs[shape]), "e2e"))
        for kind, label in KIND_LABEL.items():
            stats = [_pct(g(d, ("latency", kind))) for d in (lc, sd, sl)]
            for q in ("p50", "p99"):
                rows.append((f"{mode}: dispatch {label} {q}, ms", *(ms(s.get(q)) for s in stats),
                             q if mode == "quiet" else None))
        for who, key in (("daemon", "daemon"), ("etcd", "etcd")):
            for shape, label in SHAPES.items():
                rows.append((f"{mode}: {who} CPU per job, {label}, ms",
                             g(runs[shape][0], ("cpu_ms_per_job", key)), None, None, "cpu"))
        for shape, label in SHAPES.items():
            rows.append((f"{mode}: container CPU per job, {label}, ms",
                         *(g(r, ("cpu_ms_per_job", "container")) for r in runs[shape]), None))
        for shape, label in SHAPES.items():
            rows.append((f"{mode}: etcd revisions per job, {label}",
                         g(runs[shape][0], ("revisions_per_job",)), None, None, "revisions"))
        for shape, label in SHAPES.items():
            rows.append((f"{mode}: load average at the start of e2e {label}",
                         *((g(r, ("load",)) or [None])[0] for r in runs[shape]), None))
        if mode == "quiet":
            cli = g(lc, ("lclusterc",)) or {}
            size = cli.get("array_size", "N")
            rows += [
                ("submit, single HTTP requests, 32 clients (Slurm: sbatch, 8 at once), jobs/s",
                 g(runs["true"][0], ("submit_per_s",)), None,
                 g(runs["true"][2], ("submit_per_s",)), "http"),
                ("submit, lclusterc addjob / sbatch in a shell loop, jobs/s",
                 cli.get("loop_per_s"), None, g(sl, ("sbatch_loop_per_s",)), "loop"),
                ("lclusterc addjob start-up, median wall up to its first check (no request), ms",
                 ms(cli.get("startup_s")), None, None, "startup"),
                ("  python3 -c pass, median wall, ms", ms(cli.get("python_s")), None, None, None),
                ("  imports of the addjob path, cumulative (-X importtime), ms",
                 ms(cli.get("import_addjob_s")), None, None, None),
                (f"submit, lclusterc addjob --count {size}, one call after another, jobs/s",
                 cli.get("count_per_s"), None, None, "array"),
                (f"submit, lclusterc addjob --file ({size} lines), one after another, jobs/s",
                 cli.get("file_per_s"), None, None, "array"),
                ("idle node: etcd writes/s", g(lc, ("idle", "etcd_writes_per_s")), None, None,
                 "idle"),
                ("idle node: daemon CPU, ms/s", g(lc, ("idle", "daemon_cpu_ms_per_s")), None, None,
                 None),
                ("daemon RSS at the start of the quiet part, MB", g(lc, ("rss_at_start_mb",)),
                 None, None, None),
                ("daemon RSS at its end, MB", g(lc, ("rss_at_end_mb",)), None, None, None),
            ]
    h = res.get("history") or {}
    if h:
        past_cap = h.get("jobs", 0) > h.get("first", 0)  # else nothing to prune, no growth to see
        tag = f"history (simulated node, {h.get('jobs', 0):,} jobs, defaults)"
        rows += [
            (f"{tag}: etcd db in use after {h.get('first', 0):,} jobs, MB",
             g(h, ("first_db_in_use_mb",)), None, None, None),
            (f"{tag}: etcd db in use after all, MB", g(h, ("db_in_use_mb",)), None, None, None),
            (f"{tag}: db in use, all / first",  # (all = first: no bound to test)
             _div(g(h, ("db_in_use_mb",)), g(h, ("first_db_in_use_mb",))) if past_cap else None,
             None, None, "db"),
            (f"{tag}: the node's own prune passes that deleted records",
             g(h, ("prunes",)) if past_cap else None, None, None, "pruned"),
            (f"{tag}: finished records kept at the end", g(h, ("records",)), None, None, None),
            (f"{tag}: node RSS growth after the first {h.get('first', 0):,} jobs, MB",
             g(h, ("rss_growth_mb",)) if past_cap else None, None, None, "rss"),
            (f"{tag}: etcd revisions per job", g(h, ("revisions_per_job",)), None, None, None),
            (f"{tag}: jobs/s", g(h, ("jobs_per_s",)), None, None, None),
        ]
    return rows


def cluster_table(res):
    """[(figure, 3 nodes, single node or None)] of the same run."""
    cl, lc = res.get("cluster") or {}, _dig(res, ("quiet", "lclusterd")) or {}
    rows = []
    # The single node's figure to compare: batch-submitted too where it has one.
    one = {"true": ("batch", "jobs_per_s"), "sleep": ("e2e", "sleep", "jobs_per_s")}
    for kind, label in {**KIND_LABEL, "sleep1": "sleep 1"}.items():
        e2e = _dig(cl, ("e2e", kind)) or {}
        rows.append((f"e2e {label} (n={e2e.get('n')}, --count across nodes), jobs/s",
                     e2e.get("jobs_per_s"), _dig(lc, one.get(kind, ("-",)))))
        rows.append((f"submit {label}, lclusterc addjob --count, 3 at once, jobs/s",
                     e2e.get("submit_per_s"), _dig(lc, ("lclusterc", "count_per_s"))))
        sp = e2e.get("spread")
        for node, count in ((sp or {}).get("counts") or e2e.get("ran_on") or {}).items():
            rows.append((f"  {label}: jobs run on {node}", count, None))
        if sp:  # short jobs under spread: every node within the tolerance of the mean
            rows.append((f"  {label}: worst node off the mean by (spread, target "
                         f"<= {sp['tolerance']:.0%}: {'met' if sp['ok'] else 'MISSED'})",
                         sp["worst_deviation"], None))
    rows += [
        ("etcd writes per job, all", cl.get("etcd_writes_per_job"), None),
        ("etcd writes per job, less the nodes' idle rate", cl.get("etcd_job_writes_per_job"), None),
        ("etcd writes per second, idle", cl.get("etcd_idle_writes_per_s"),
         _dig(lc, ("idle", "etcd_writes_per_s"))),
    ]
    return [{"figure": f, "3-node": c, "1-node": one,
             "ratio": c / one if c is not None and one else None} for f, c, one in rows]


def render_cluster(rows, res):
    head = ("figure", "3-node", "1-node", "3-node/1-node")  # 1-node e2e true: its batch run
    lines = [[r["figure"], fmt(r["3-node"]), fmt(r["1-node"]), fmt(r["ratio"])] for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    show = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    slots = (res.get("cluster") or {}).get("slots")
    return "\n".join([f"{CLUSTER_LABEL}: 3 containers, a 3-member etcd, slots {slots}",
                      show(head), show(["-" * w for w in widths]), *map(show, lines)])


def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _div(a, b):
    return None if a is None or not b else a / b


def _pct(samples):
    if not samples:
        return {}
    s = sorted(samples)
    return {q: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]
            for q, f in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}


def judge(row, kind):
    """met / missed / not measured: the row against TARGETS[kind]."""
    try:
        return "met" if TARGETS[kind][0](row) else "missed"
    except TypeError:  # a None: the figure or its baseline was not measured
        return "not measured"


def with_ratios(rows):
    out = []
    for name, lc, sd, sl, kind in rows:
        row = {"figure": name, "lclusterd": lc, "systemd": sd, "slurm": sl,
               "ratio_systemd": lc / sd if lc is not None and sd else None,
               "ratio_slurm": lc / sl if lc is not None and sl else None}
        if "load average" in name:  # a condition of the run, not a figure to compare
            row["ratio_systemd"] = row["ratio_slurm"] = None
        if kind:
            row["target"] = TARGETS[kind][1]
            row["met"] = judge(row, kind)
        out.append(row)
    return out


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def render(rows):
    head = ("figure", "lclusterd", "systemd", "slurm", "lcd/systemd", "lcd/slurm", "target", "met")
    lines = [[r["figure"], fmt(r["lclusterd"]), fmt(r["systemd"]), fmt(r["slurm"]),
              fmt(r["ratio_systemd"]), fmt(r["ratio_slurm"]), r.get("target", ""),
              r.get("met", "")] for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    show = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([show(head), show(["-" * w for w in widths]), *map(show, lines)])


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (kind, label) in zip(axes, KIND_LABEL.items()):
        for mode, style in zip(MODES, ("-", ":")):
            for system in ("lclusterd", "systemd", "slurm"):
                samples = sorted(_dig(res, (mode, system, "latency", kind)) or [])
                if samples:
                    ys = [(i + 1) / len(samples) for i in range(len(samples))]
                    ax.step([s * 1000 for s in samples], ys, where="post", linestyle=style,
                            color=COLORS[system], label=f"{system}, {mode} (n={len(samples)})")
        ax.set_xscale("log")
        ax.set_xlabel("submit -> unit started, ms (log)")
        ax.set_ylabel("fraction of jobs")
        ax.set_title(f"dispatch latency, one job at a time, '{label}'")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COLORS = {"lclusterd": "tab:blue", "systemd": "tab:green", "slurm": "tab:orange"}


def throughput_bars(res):
    """{mode: {system: [jobs/s of each of SHAPES]}}: the baselines' batch-submitted
    figure is their `true` run, as in the table."""
    out = {}
    for mode in MODES:
        m = res.get(mode) or {}
        if m:
            out[mode] = {system: [_dig(m, (system, "batch", "jobs_per_s") if system == "lclusterd"
                                       and shape == "batch" else
                                       (system, "e2e", "true" if shape == "batch" else shape,
                                        "jobs_per_s"))
                                  for shape in SHAPES] for system in COLORS}
    return out


def plot_throughput(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bars = throughput_bars(res)
    fig, axes = plt.subplots(1, len(bars) or 1, figsize=(12, 4.5), squeeze=False)
    width = 0.27
    for ax, (mode, by_system) in zip(axes[0], bars.items()):
        for i, (system, values) in enumerate(by_system.items()):
            xs = [j + (i - 1) * width for j in range(len(SHAPES))]
            ax.bar(xs, [v or 0 for v in values], width, label=system, color=COLORS[system])
            for x, v in zip(xs, values):
                if v:
                    ax.annotate(f"{v:.0f}", (x, v), ha="center", va="bottom", fontsize="small")
        ax.set_xticks(range(len(SHAPES)))
        ax.set_xticklabels([f"{label}\n(baselines: true)" if shape == "batch" else label
                            for shape, label in SHAPES.items()])
        ax.set_ylabel("jobs/s, end to end")
        ax.set_title(f"{mode}" + (": CPU hog on every core, outside the container"
                                  if mode == "loaded" else ""))
        ax.grid(True, axis="y", alpha=0.3)
        ax.margins(y=0.25)
        ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_inside(c, cmd, timeout):
    """Like Container.run, but stderr (progress) goes straight to ours."""
    argv = ["nsenter", "-t", str(c.init_pid), "-a", "env", "-i", *ct.INNER_ENV,
            "HOME=/root", "sh", "-c", cmd]
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                       timeout=timeout, env={"PATH": ct.INNER_PATH})
    if r.returncode:
        raise ct.ContainerError(f"{cmd!r} exited {r.returncode}")
    return r.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m tests.bench.run")
    ap.add_argument("--deb-dir", required=True)
    ap.add_argument("--out", required=True,
                    help="directory for results.json, latency.png and throughput.png")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink the runs (quick tries)")
    ap.add_argument("--only", action="append", choices=SYSTEMS)
    ap.add_argument("--report", action="store_true",
                    help="only print the table (and redo the plots) of OUT/results.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(json.loads((out / "results.json").read_text()), out)
    if not 0 < args.scale <= 1:
        print(f"bench: --scale wants a number in (0, 1], not {args.scale}", file=sys.stderr)
        return 2
    debs = sorted(Path(args.deb_dir).glob("lclusterd_*_all.deb"))
    if not debs:
        print(f"bench: no lclusterd_*_all.deb in {args.deb_dir}", file=sys.stderr)
        return 1
    which = args.only or SYSTEMS
    single = [s for s in which if s in SYSTEMS[:3]]
    t = time.monotonic()
    res = {}
    try:
        ct.check_host()
        if "history" in which:
            res["history"] = bench_history(out / "history.json", int(HISTORY_JOBS * args.scale))
        if single:
            res.update(bench_single(debs[-1], single, args.scale))
            (out / "results.json").write_text(json.dumps(res, indent=1))  # before anything can fail
        if "cluster" in which:
            cl = bench_cluster(args.deb_dir, args.scale)
            res = {**cl, **res, "cluster": cl["cluster"]}
    except (ct.ContainerError, subprocess.TimeoutExpired, subprocess.CalledProcessError,
             AssertionError, RuntimeError) as e:
        print(f"bench: FAILED: {e}", file=sys.stderr)
        if res:
            report(res, out)
        return 1
    res["wall_seconds"] = time.monotonic() - t
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return report(res, out)


def bench_history(path, jobs):
    """tests/bench/sim.py's history run: one simulated node, the package's
    retention settings, a real etcd; its JSON."""
    t = time.monotonic()
    print(f"bench: history run, {jobs:,} jobs through a simulated node; load average "
          f"{os.getloadavg()[0]:.1f}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "tests.bench.sim", "--history", str(jobs),
                    "--out", str(path)], check=True, stdout=subprocess.DEVNULL,
                   cwd=HERE.parent.parent, timeout=3600)
    res = json.loads(path.read_text())
    res["wall_seconds"] = time.monotonic() - t
    return res


def hog_start(n):
    """n busy processes on the host (outside the container): the loaded mode's CPU load."""
    return [subprocess.Popen(["/usr/bin/python3", "-c", "while True: pass"],
                             stdin=subprocess.DEVNULL) for _ in range(n)]


def hog_stop(procs):
    for p in procs:  # ours, by their pids
        p.kill()
        p.wait()


def bench_single(deb, which, scale):
    """{mode: inner.py's results, ..., "hog": what loaded the loaded mode}."""
    rootfs = ct.build_rootfs(BENCH_PACKAGES)
    res = {}
    with ct.Container(ct.unique_name("lcbench"), rootfs,
                      binds_ro={str(deb.parent.resolve()): "/mnt/debs",
                                str(HERE): "/mnt/bench"}) as c:
        print(f"bench: container {c.name} up; installing {deb.name}", file=sys.stderr)
        c.run(f"apt-get install -y --no-install-recommends /mnt/debs/{deb.name}", timeout=300)
        for mode in MODES:
            hog = hog_start(os.cpu_count()) if mode == "loaded" else []
            try:
                if hog:
                    res["hog"] = {"processes": len(hog), "what": "python3 -c 'while True: pass' "
                                  "on the host, one a CPU"}
                    print(f"bench: loaded mode: {len(hog)} busy processes on the host "
                          f"(pids {' '.join(str(p.pid) for p in hog)})", file=sys.stderr)
                raw = run_inside(c, f"BENCH_SCALE={scale} BENCH_MODE={mode} /usr/bin/python3 "
                                 "/mnt/bench/inner.py " + " ".join(which), timeout=3600)
            finally:
                hog_stop(hog)
            got = json.loads(raw.strip().splitlines()[-1])
            res[mode] = {s: got[s] for s in which}
            res.update({k: got[k] for k in ("cpus", "sizes", "scale")})
    return res


def bench_cluster(deb_dir, scale):
    """The 3-node run, inside node 1; the harness removes containers, namespaces,
    veths and the bridge on the way out, failures too."""
    t = time.monotonic()
    # the cluster tests' rootfs (no Slurm: its units would fail at boot on every node)
    with harness.booted(ct.build_rootfs(), deb_dir, binds_ro={str(HERE): "/mnt/bench"},
                        slots=CLUSTER_SLOTS) as nodes:
        print(f"bench: 3 nodes up in {time.monotonic() - t:.0f} s", file=sys.stderr)
        urls = ",".join(n.url for n in nodes)
        raw = run_inside(nodes[0].c, f"BENCH_SCALE={scale} BENCH_NODES={urls} "
                         "/usr/bin/python3 /mnt/bench/inner.py cluster", timeout=1800)
    cl = json.loads(raw.strip().splitlines()[-1])
    cl["cluster"]["wall_seconds"] = time.monotonic() - t
    return cl


def report(res, out):
    rows = with_ratios(table(res))
    res["table"] = rows
    if res.get("cluster"):
        res["cluster_table"] = cluster_table(res)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    single = any(res.get(m) for m in MODES)
    saved = [out / "results.json"]
    if single:
        plot(res, out / "latency.png")
        plot_throughput(res, out / "throughput.png")
        saved += [out / "latency.png", out / "throughput.png"]
    if rows:
        print(render(rows) + "\n")
        missed = [r["figure"] for r in rows if r.get("met") == "missed"]
        judged = [r for r in rows if "met" in r]
        print(f"targets: {sum(r['met'] == 'met' for r in judged)} met, {len(missed)} missed, "
              f"{sum(r['met'] == 'not measured' for r in judged)} not measured, of {len(judged)}")
    for mode in MODES:
        for system in COLORS:
            load = _dig(res, (mode, system, "load"))
            if load:
                print(f"load average at the start of {mode} {system}'s parts: "
                      + ", ".join(f"{part} {v:.1f}" for part, v in load.items()))
    if res.get("hog"):
        print(f"loaded mode: {res['hog']['processes']} x {res['hog']['what']}")
    h = res.get("history")
    if h:
        print(f"history: {h.get('note', '')}; load average {h.get('load', [0])[0]:.1f} at its "
              f"start; wall {h.get('wall_seconds', 0):.0f} s"
              + (f"; FAILED: {h['failed']}" if h.get("failed") else ""))
    if res.get("cluster"):
        print(render_cluster(res["cluster_table"], res))
        print(f"3-node wall {res['cluster'].get('wall_seconds', 0):.0f} s, booting included")
    if res.get("sizes"):
        print(f"\n{res['cpus']} CPUs; {res['sizes']}; in flight {res['sizes']['in_flight']} "
              f"(lclusterd slots, systemd units, Slurm OverSubscribe)")
    print(f"wall {res.get('wall_seconds', 0):.0f} s")
    print("ratios are lclusterd / baseline: above 1 is better for rates, below 1 for latencies")
    print("saved " + ", ".join(map(str, saved)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
