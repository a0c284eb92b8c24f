"""What a job asks for (core.job_spec, core.run_as), the unit properties that
follow from it, and OOM kills seen only by core.OOM_CHECK."""

import dataclasses

import pytest

from lclusterd import config, core
from lclusterd.core import FAILED, Forbidden, InvalidInput

UUID = "0b5e8c1e-3c1f-4a43-9d59-1d1c1f0a2b77"


def job(**changes):
    fields = dict(uuid=UUID, command="echo hello", uid=1000, gid=1000, user="alice",
                  submitted_at=1.0)
    return core.Job(**{**fields, **changes})


def policy(**settings):
    return config.from_mapping(settings)


@pytest.mark.parametrize("text, size", [("256M", 256 << 20), ("1G", 1 << 30), ("1.5G", 3 << 29),
                                        ("2048k", 2 << 20), ("2GiB", 2 << 30), (1 << 20, 1 << 20),
                                        ("1048576", 1 << 20)])
def test_parse_size(text, size):
    assert core.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1M", "12X", "1e9", True, "100", "2P", "99999999T"])
def test_parse_size_refuses(text):
    with pytest.raises(InvalidInput):
        core.parse_size(text)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200),
                                           ("1d", 86400), ("0.5s", 0.5), (30, 30)])
def test_parse_duration(text, seconds):
    assert core.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5s", "10 min", "1h30m", False, "99999999999d"])
def test_parse_duration_refuses(text):
    with pytest.raises(InvalidInput):
        core.parse_duration(text)


def test_parse_cpus_and_tasks():
    assert core.parse_cpus("0.5") == 0.5 and core.parse_tasks("64") == 64
    for bad in ("0", "-1", "x", "", None, "1e6"):
        with pytest.raises(InvalidInput):
            core.parse_cpus(bad)
    for bad in ("0", "1.5", "x", "", "99999999999"):
        with pytest.raises(InvalidInput):
            core.parse_tasks(bad)


def test_show_round_trips():
    assert core.show_size(256 << 20) == "256M" and core.show_size(1000) == "1000"
    assert core.show_duration(600) == "10m" and core.show_duration(90) == "90s"


def test_job_spec_defaults_and_requests():
    p = policy(default_memory="256M", default_timeout="1h", max_timeout="2h")
    assert core.job_spec({}, p) == {"memory": 256 << 20, "cpus": None, "tasks": None,
                                    "timeout": 3600.0}
    spec = core.job_spec({"memory": "1G", "cpus": 0.5, "tasks": "64", "timeout": "10m",
                          "env": ["A=1", "B=x y"], "workdir": "/srv", "network": "none"}, p)
    assert spec == {"memory": 1 << 30, "cpus": 0.5, "tasks": 64, "timeout": 600.0,
                    "env": ("A=1", "B=x y"), "workdir": "/srv", "network": "none"}


def test_job_spec_over_maximum_is_refused_and_says_the_maximum():
    with pytest.raises(InvalidInput, match="memory 2G is over this node's maximum of 1G"):
        core.job_spec({"memory": "2G"}, policy(max_memory="1G"))
    with pytest.raises(InvalidInput, match="timeout 3h is over this node's maximum of 2h"):
        core.job_spec({"timeout": "3h"}, policy(max_timeout="2h"))


@pytest.mark.parametrize("env", ["A=1", ["A"], ["1A=x"], ["A-B=x"], ["LCLUSTER_JOB_ID=x"],
                                 ["A=x\ny"], [3], ["A=x"] * 65])
def test_job_spec_bad_env(env):
    with pytest.raises(InvalidInput):
        core.job_spec({"env": env}, policy())


@pytest.mark.parametrize("workdir", ["tmp", "", "/a/../b", "/a/./b", "/a\0b", 5])
def test_job_spec_bad_workdir(workdir):
    with pytest.raises(InvalidInput):
        core.job_spec({"workdir": workdir}, policy())


def test_job_spec_network_needs_the_nodes_consent():
    assert core.job_spec({"network": "none"}, policy())["network"] == "none"
    for network in ("host", "ns:lab"):
        with pytest.raises(Forbidden, match=f"network {network} is not allowed"):
            core.job_spec({"network": network}, policy())
    allowed = policy(job_networks="host, ns:lab")
    assert core.job_spec({"network": "ns:lab"}, allowed)["network"] == "ns:lab"
    with pytest.raises(Forbidden):
        core.job_spec({"network": "ns:other"}, allowed)
    assert core.job_spec({"network": "ns:other"}, policy(job_networks="ns:*"))["network"] == "ns:other"
    for bad in ("bridge", "ns:", "ns:../x", 1):
        with pytest.raises(InvalidInput):
            core.job_spec({"network": bad}, allowed)


def test_run_as():
    assert core.run_as(1000, "alice", None) is None  # the caller itself
    assert core.run_as(1000, "alice", "alice") is None
    assert core.run_as(0, "root", None) == "nobody"  # root only when asked for
    assert core.run_as(0, "root", "root") == "root"
    assert core.run_as(0, "root", "bob") == "bob"
    with pytest.raises(Forbidden, match="only root"):
        core.run_as(1000, "alice", "bob")
    with pytest.raises(InvalidInput):
        core.run_as(0, "root", "../etc")


def test_config_refuses_default_over_maximum_and_bad_limits():
    with pytest.raises(config.ConfigError, match="'default_memory' .2G. is over 'max_memory' .1G."):
        policy(default_memory="2G", max_memory="1G")
    with pytest.raises(config.ConfigError, match="max_tasks"):
        policy(max_tasks="many")
    with pytest.raises(config.ConfigError, match="job_networks"):
        policy(job_networks="bridge")


# --- the unit ----------------------------------------------------------------

HARDENING = {"PrivateIPC": True, "NoNewPrivileges": True, "ProtectSystem": "strict",
             "ProtectHome": "yes", "PrivateDevices": True, "ProtectKernelTunables": True,
             "ProtectKernelModules": True, "ProtectKernelLogs": True,
             "ProtectControlGroups": True, "ProtectProc": "invisible", "RestrictSUIDSGID": True,
             "LockPersonality": True}


def props(j, **kwargs):
    names = [name for name, _ in core.unit_properties(j, 10, **kwargs)]
    assert len(names) == len(set(names))
    return dict(core.unit_properties(j, 10, **kwargs))


def test_every_job_gets_the_hardening():
    for j in (job(), job(uid=0, gid=0)):
        p = props(j)
        assert {k: p[k] for k in HARDENING} == HARDENING


def test_capabilities_are_dropped_unless_root_asked():
    assert props(job())["CapabilityBoundingSet"] == 0
    assert "CapabilityBoundingSet" not in props(job(uid=0, gid=0))


def test_limits_env_workdir_become_properties():
    p = props(job(memory=256 << 20, cpus=0.5, tasks=64, timeout=600.0, env=("A=1",),
                  workdir="/srv"))
    assert (p["MemoryMax"], p["MemorySwapMax"]) == (256 << 20, 0)
    assert p["CPUQuotaPerSecUSec"] == 500_000 and p["TasksMax"] == 64
    assert p["RuntimeMaxUSec"] == 600_000_000 and p["WorkingDirectory"] == "/srv"
    assert p["Environment"] == [f"LCLUSTER_JOB_ID={UUID}", "A=1"]
    assert p["ExecStopPostEx"] == [("/bin/sh", ["/bin/sh", "-c", core.OOM_CHECK], ["ignore-failure"])]
    p = props(job())
    for name in ("MemoryMax", "CPUQuotaPerSecUSec", "TasksMax", "RuntimeMaxUSec",
                 "WorkingDirectory", "ExecStopPostEx"):
        assert name not in p


@pytest.mark.parametrize("network, namespace, expect", [
    (None, None, ("PrivateNetwork", True)),
    (None, "lab", ("NetworkNamespacePath", "/run/netns/lab")),
    ("none", "lab", ("PrivateNetwork", True)),
    ("ns:other", "lab", ("NetworkNamespacePath", "/run/netns/other")),
])
def test_network_properties(network, namespace, expect):
    p = props(job(network=network), namespace=namespace)
    assert p[expect[0]] == expect[1]
    assert ("PrivateNetwork" in p) != ("NetworkNamespacePath" in p)


def test_host_network_is_neither_private_nor_a_namespace():
    p = props(job(network="host"), namespace="lab")
    assert "PrivateNetwork" not in p and "NetworkNamespacePath" not in p


# --- records and outcomes ----------------------------------------------------------

def test_older_records_without_the_new_fields_still_load():
    old = {"uuid": UUID, "command": "true", "uid": 1000, "gid": 1000, "user": "alice",
           "submitted_at": 1.0, "state": "succeeded"}
    j = core.Job.from_dict(old)
    assert j.env == () and j.memory is None and j.submitter_uid is None and j.owner_uid == 1000


def test_record_round_trip_with_spec():
    j = job(env=("A=1",), memory=1 << 20, submitter="root", submitter_uid=0, network="host")
    assert core.Job.from_dict(j.to_dict()) == j
    assert j.owner_uid == 0


def test_oom_seen_by_the_check_is_an_oom_kill():
    status = core.UnitStatus("failed", "failed", "signal", core.CLD_KILLED, 9, oom_killed=True)
    assert core.outcome(status) == (FAILED, 137, "killed by signal 9 (oom-kill)")
    done = core.finish(dataclasses.replace(job(), state=core.RUNNING), status, 5.0)
    assert done.result == "oom-kill"
    ok = core.UnitStatus("active", "exited", "success", core.CLD_EXITED, 0, oom_killed=True)
    assert core.outcome(ok)[0] == FAILED  # a child was OOM-killed: oom-kill, as OOMPolicy=stop on v2 (issue 9 item 18)


# --- issue 11: after, constraints, max_running, labels ------------------------------

P1, P2 = "3f2a1b2c-0000-4000-8000-000000000001", "3f2a1b2c-0000-4000-8000-000000000002"


@pytest.mark.parametrize("value, parents", [
    (None, ()), ([], ()), ("", ()), ([P1], (P1,)), (f"{P1},{P2}", (P1, P2)),
    ([P1.upper(), P1, P2], (P1, P2)), (f" {P2} , {P1} ", (P2, P1)),
])
def test_validate_after(value, parents):
    assert core.validate_after(value) == parents


@pytest.mark.parametrize("value", ["3f2a1b2c", [P1[:-1]], [P1 + "0"], "nope", [1], {"a": 1}, 5,
                                   [P1.replace("-", "")]])
def test_validate_after_refuses_what_is_not_a_list_of_full_uuids(value):
    with pytest.raises(InvalidInput) as e:
        core.validate_after(value)
    assert "\n" not in str(e.value)


def test_validate_after_bounds_the_parents():
    many = [f"3f2a1b2c-0000-4000-8000-{n:012d}" for n in range(core.MAX_AFTER + 1)]
    assert len(core.validate_after(many[:-1])) == core.MAX_AFTER
    with pytest.raises(InvalidInput, match="at most"):
        core.validate_after(many)


@pytest.mark.parametrize("value, constraints", [
    (None, ()), ([], ()), (["gpu=1"], ("gpu=1",)), ("rack=a,ssd=yes", ("rack=a", "ssd=yes")),
    (["gpu=1", "gpu=1"], ("gpu=1",)), (["node=n2", "zone=eu-west/1"], ("node=n2", "zone=eu-west/1")),
])
def test_validate_constraints(value, constraints):
    assert core.validate_constraints(value) == constraints


@pytest.mark.parametrize("value, said", [
    (["gpu"], "is not KEY=VALUE"), (["=1"], "is not KEY=VALUE"), (["gpu="], "is not KEY=VALUE"),
    (["g pu=1"], "is not KEY=VALUE"), (["gpu=a b"], "is not KEY=VALUE"), (["a=b=c"], "is not KEY=VALUE"),
    (["gpu=1", "gpu=2"], "no node has both"), ([3], "must be a list"), (7, "must be a list"),
])
def test_validate_constraints_refuses(value, said):
    with pytest.raises(InvalidInput, match=said):
        core.validate_constraints(value)


@pytest.mark.parametrize("value, limit", [(None, None), (1, 1), (64, 64), ("4", 4)])
def test_validate_max_running(value, limit):
    assert core.validate_max_running(value) == limit


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "x", "", core.MAX_RUNNING + 1])
def test_validate_max_running_refuses(value):
    with pytest.raises(InvalidInput, match="max_running must be"):
        core.validate_max_running(value)


def test_parse_labels():
    assert core.parse_labels("rack=a,ssd=yes") == {"rack": "a", "ssd": "yes"}
    assert core.parse_labels(" rack=a , ") == {"rack": "a"}
    assert core.parse_labels("rack = a, ssd= yes") == {"rack": "a", "ssd": "yes"}
    assert core.parse_labels("") == {} and core.parse_labels(None) == {}
    for bad, said in (("rack", "is not KEY=VALUE"), ("rack=a,rack=b", "given twice")):
        with pytest.raises(InvalidInput, match=said):
            core.parse_labels(bad)


def test_node_labels_always_name_the_node():
    assert core.node_labels("n2", {"rack": "a"}) == {"rack": "a", "node": "n2"}
    assert core.node_labels("n2", {}) == {"node": "n2"}


def test_job_spec_takes_after_constraints_and_max_running():
    spec = core.job_spec({"after": [P1], "constraints": ["gpu=1"], "max_running": 3}, policy())
    assert (spec["after"], spec["after_mode"], spec["constraints"], spec["max_running"]) == (
        (P1,), core.AFTER_OK, ("gpu=1",), 3)
    assert core.job_spec({"after": [P1, P2], "after_mode": "failed"}, policy())["after_mode"] == "failed"
    plain = core.job_spec({}, policy())
    assert not {"after", "after_mode", "constraints", "max_running"} & set(plain)
    j = core.new_job("true", 1000, 1000, "alice", 1.0, **spec)
    assert (j.after, j.constraints, j.max_running) == ((P1,), ("gpu=1",), 3)


@pytest.mark.parametrize("request_, said", [
    ({"after": [P1], "after_mode": "afterok"}, "after_mode must be one of ok, any, failed"),
    ({"after_mode": "any"}, "after_mode needs after"),
    ({"after": ["3f2a"]}, "not a full job uuid"),
    ({"constraints": ["gpu"]}, "is not KEY=VALUE"),
    ({"max_running": 0}, "max_running must be"),
])
def test_job_spec_refuses_bad_scheduling_requests(request_, said):
    with pytest.raises(InvalidInput, match=said):
        core.job_spec(request_, policy())
