"""The bench's pure parts: the targets table (met / missed / not measured)
and what it reads from cgroups and from python3 -X importtime."""

import pytest

from tests.bench import readings, run


def rows_by_figure(res):
    return {r["figure"]: r for r in run.with_ratios(run.table(res))}


def e2e(jobs_per_s, **more):
    return {"jobs_per_s": jobs_per_s, **more}


def single(lc_true, sd_true, sl_true, **lc_more):
    return {"lclusterd": {"e2e": {"true": e2e(lc_true, **lc_more)}, "batch": e2e(lc_true)},
            "systemd": {"e2e": {"true": e2e(sd_true)}}, "slurm": {"e2e": {"true": e2e(sl_true)}}}


@pytest.mark.parametrize("lc, sd, sl, met", [
    (18.0, 20.0, 17.0, "met"),      # 0.9 x raw systemd exactly, above Slurm
    (17.9, 20.0, 17.0, "missed"),   # below 0.9 x raw systemd
    (18.0, 20.0, 18.0, "missed"),   # not above Slurm
])
def test_e2e_needs_both_baselines_beaten(lc, sd, sl, met):
    row = rows_by_figure({"quiet": single(lc, sd, sl)})["quiet: e2e true, jobs/s"]
    assert row["met"] == met
    assert row["target"] == ">= 0.9 x raw systemd and > Slurm"


def test_batch_run_is_judged_against_the_baselines_true_run():
    res = {"loaded": single(10.0, 20.0, 5.0)}
    res["loaded"]["lclusterd"]["batch"] = e2e(19.0)
    row = rows_by_figure(res)["loaded: e2e true, batch-submitted, jobs/s"]
    assert (row["systemd"], row["slurm"], row["met"]) == (20.0, 5.0, "met")


def test_a_missing_baseline_is_not_measured_never_met():
    res = {"quiet": {"lclusterd": {"e2e": {"true": e2e(50.0)}}}}  # --only lclusterd
    assert rows_by_figure(res)["quiet: e2e true, jobs/s"]["met"] == "not measured"


def test_cpu_and_revisions_per_job():
    res = {"quiet": single(18, 20, 17, cpu_ms_per_job={"daemon": 3.0, "etcd": 3.5},
                           revisions_per_job=2.01)}
    rows = rows_by_figure(res)
    assert rows["quiet: daemon CPU per job, true, ms"]["met"] == "met"
    assert rows["quiet: etcd CPU per job, true, ms"]["met"] == "missed"
    assert rows["quiet: etcd revisions per job, true"]["met"] == "missed"
    assert rows["quiet: daemon CPU per job, sleep 0.1, ms"]["met"] == "not measured"


def test_latency_targets_only_in_the_quiet_mode():
    lat = {"latency": {"true": [0.010] * 98 + [0.060] * 2}}  # p50 10 ms, p99 60 ms
    rows = rows_by_figure({"quiet": {"lclusterd": lat}, "loaded": {"lclusterd": lat}})
    assert rows["quiet: dispatch true p50, ms"]["met"] == "met"
    assert rows["quiet: dispatch true p99, ms"]["met"] == "missed"
    assert "met" not in rows["loaded: dispatch true p99, ms"]  # reported, no target


def test_submission_targets():
    cli = {"loop_per_s": 40.0, "startup_s": 0.030, "count_per_s": 5000.0, "file_per_s": 4999.0,
           "array_size": 1000}
    res = {"quiet": {"lclusterd": {"lclusterc": cli, "idle": {"etcd_writes_per_s": 0.25}}}}
    rows = rows_by_figure(res)
    assert rows["submit, lclusterc addjob / sbatch in a shell loop, jobs/s"]["met"] == "met"
    assert rows["lclusterc addjob start-up, median wall up to its first check (no request), ms"][
        "met"] == "missed"  # 30 ms is not under 30 ms
    assert rows["submit, lclusterc addjob --count 1000, one call after another, jobs/s"]["met"] == "met"
    assert rows["submit, lclusterc addjob --file (1000 lines), one after another, jobs/s"]["met"] \
        == "missed"
    assert rows["idle node: etcd writes/s"]["met"] == "missed"


def test_history_db_bound_and_pruning():
    h = {"jobs": 100000, "first": 10000, "first_db_in_use_mb": 40.0, "db_in_use_mb": 61.0,
         "prunes": 0, "rss_growth_mb": 4.9}
    rows = {r["figure"].split(": ", 1)[1]: r for r in run.with_ratios(run.table({"history": h}))}
    assert rows["db in use, all / first"]["lclusterd"] == pytest.approx(1.525)
    assert rows["db in use, all / first"]["met"] == "missed"
    assert rows["the node's own prune passes that deleted records"]["met"] == "missed"
    assert rows["node RSS growth after the first 10,000 jobs, MB"]["met"] == "met"


def test_throughput_bars_use_the_baselines_true_run_for_batch():
    res = {"quiet": single(10.0, 20.0, 15.0)}
    res["quiet"]["lclusterd"]["batch"] = e2e(12.0)
    bars = run.throughput_bars(res)
    assert list(bars) == ["quiet"]
    assert bars["quiet"]["lclusterd"] == [10.0, None, 12.0]
    assert bars["quiet"]["systemd"] == [20.0, None, 20.0]


def test_cpu_stat_and_cpuacct_usage():
    text = "usage_usec 1216606\nuser_usec 793572\nsystem_usec 423034\nnice_usec 0\n"
    assert readings.parse_cpu_stat(text) == pytest.approx(1.216606)
    assert readings.parse_cpuacct_usage("2500000000\n") == pytest.approx(2.5)
    with pytest.raises(ValueError):
        readings.parse_cpu_stat("user_usec 5\n")


@pytest.mark.parametrize("where, name, text, seconds", [
    ("system.slice/etcd.service", "cpu.stat", "usage_usec 2000000\n", 2.0),          # v2
    ("unified/system.slice/etcd.service", "cpu.stat", "usage_usec 3000000\n", 3.0),  # hybrid
    ("cpuacct/system.slice/etcd.service", "cpuacct.usage", "4000000000\n", 4.0),     # v1
])
def test_cgroup_cpu_finds_each_layout(tmp_path, where, name, text, seconds):
    (tmp_path / where).mkdir(parents=True)
    (tmp_path / where / name).write_text(text)
    assert readings.cgroup_cpu("system.slice/etcd.service", root=str(tmp_path)) == seconds


def test_cgroup_cpu_of_the_root_and_of_a_gone_unit(tmp_path):
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cpu.stat").write_text("usage_usec 7000000\n")
    assert readings.cgroup_cpu("", root=str(tmp_path)) == 7.0
    assert readings.cgroup_cpu("system.slice/lclusterd.service", root=str(tmp_path)) is None


def test_importtime_cumulative():
    text = ("import time: self [us] | cumulative | imported package\n"
            "import time:       120 |        120 |   _io\n"
            "import time:       900 |      12500 | lclusterd.cli\n")
    assert readings.parse_importtime(text, "lclusterd.cli") == pytest.approx(0.0125)
    with pytest.raises(ValueError):
        readings.parse_importtime(text, "lclusterd.api")


def test_history_shorter_than_the_cap_is_not_judged():
    h = {"jobs": 10000, "first": 10000, "first_db_in_use_mb": 40.0, "db_in_use_mb": 40.0,
         "prunes": 0, "rss_growth_mb": 0.0}
    rows = {r["figure"].split(": ", 1)[1]: r for r in run.with_ratios(run.table({"history": h}))}
    assert rows["db in use, all / first"]["met"] == "not measured"
    assert rows["the node's own prune passes that deleted records"]["met"] == "not measured"
    assert rows["node RSS growth after the first 10,000 jobs, MB"]["met"] == "not measured"


def test_load_average_rows_show_the_start():
    res = {"quiet": single(18, 20, 17, load=[1.5, 2.5])}
    row = rows_by_figure(res)["quiet: load average at the start of e2e true"]
    assert row["lclusterd"] == 1.5 and "met" not in row and row["ratio_systemd"] is None
