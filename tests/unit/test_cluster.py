"""The cluster's pure rules: attempts, lost jobs, failed nodes, the prime."""

import pytest

from lclusterd import core
from lclusterd.core import FAILED, LOST, QUEUED, RUNNING, STARTING, SUCCEEDED

U1, U2, U3 = (f"{n}0000000-0000-4000-8000-000000000000" for n in "123")


def job(state=QUEUED, job_uuid=U1, submitted_at=100.0, **changes):
    return core.Job(uuid=job_uuid, command="true", uid=0, gid=0, user="root",
                    submitted_at=submitted_at, state=state, **changes)


def run_on(j, node, start):
    """Claim and start j on node at time start."""
    j = core.transition(j, STARTING, now=start, node=node)
    return core.transition(j, RUNNING, started_at=start + 0.1)


def test_claim_opens_an_attempt_and_the_end_closes_it():
    j = run_on(job(), "n1", 10.0)
    assert j.attempts == ({"node": "n1", "started_at": 10.1, "ended_at": None, "outcome": None},)
    done = core.transition(j, SUCCEEDED, ended_at=12.0)
    assert done.attempts == ({"node": "n1", "started_at": 10.1, "ended_at": 12.0,
                              "outcome": SUCCEEDED},)


def test_lost_job_is_requeued_while_it_has_attempts_then_fails_node_lost():
    j = job(max_attempts=3)
    for attempt, node in enumerate(("n1", "n2", "n3"), start=1):
        j = core.lose(run_on(j, node, 10.0 * attempt), node, 10.0 * attempt + 5)
        assert len(j.attempts) == attempt
        assert j.attempts[-1]["outcome"] == LOST and j.attempts[-1]["node"] == node
        assert j.attempts[-1]["ended_at"] == 10.0 * attempt + 5
    assert j.state == FAILED and j.reason == core.NODE_LOST and j.ended_at == 35.0
    assert [a["node"] for a in j.attempts] == ["n1", "n2", "n3"]


def test_lost_job_requeued_forgets_its_node():
    j = core.lose(run_on(job(), "n1", 10.0), "n1", 11.0)
    assert j.state == QUEUED and j.node is None and j.started_at is None
    assert "n1" in j.reason and "attempt 2 of 3" in j.reason


def test_one_attempt_only():
    j = core.lose(run_on(job(max_attempts=1), "n1", 10.0), "n1", 11.0)
    assert j.state == FAILED and j.reason == core.NODE_LOST


@pytest.mark.parametrize("state", [QUEUED, SUCCEEDED, FAILED])
def test_only_starting_or_running_jobs_can_be_lost(state):
    with pytest.raises(core.IllegalTransition):
        core.lose(job(state), "n1", 1.0)


@pytest.mark.parametrize("value", [0, -1, core.MAX_ATTEMPTS + 1, "3", 2.5, True, None])
def test_bad_attempts_refused(value):
    with pytest.raises(core.InvalidInput):
        core.validate_attempts(value)


def test_lost_jobs_are_live_jobs_of_nodes_without_a_lease():
    jobs = [job(RUNNING, U1, node="dead"), job(STARTING, U2, node="dead"),
            job(RUNNING, U3, node="alive"), job(SUCCEEDED, node="dead"), job(QUEUED)]
    assert core.lost_jobs(jobs, {"alive"}) == [U1, U2]
    assert core.lost_jobs(jobs, {"alive", "dead"}) == []


def test_failed_nodes_are_members_without_lease_not_yet_recorded():
    assert core.failed_nodes({"a", "b", "c"}, {"a"}, {"b"}) == ["c"]
    assert core.failed_nodes({"a"}, {"a"}, {}) == []


@pytest.mark.parametrize("holds,free,action", [
    (False, 2, "campaign"), (True, 0, "resign"), (True, 1, "keep"), (False, 0, "idle")])
def test_prime_policy(holds, free, action):
    assert core.prime_action(holds, free) == action


def test_node_rows():
    members = {n: {"name": n, "address": f"http://{n}:7800", "slots": 2} for n in ("a", "b", "c")}
    live = {"a": {**members["a"], "running": 2, "free": 0}, "b": {**members["b"], "running": 0, "free": 2}}
    rows = core.node_rows(members, live, {"c": {"name": "c", "at": 50.0}}, "b")
    assert [(r["name"], r["state"], r["running"], r["failed_at"]) for r in rows] == [
        ("a", "ready", 2, None), ("b", "primed", 0, None), ("c", "failed", 0, 50.0)]
    assert rows[0]["address"] == "http://a:7800" and rows[0]["slots"] == 2
    assert [r["free"] for r in rows] == [0, 2, 0]


def test_reconcile_fences_units_whose_job_went_to_another_node():
    units = {U1: core.UnitStatus("active", "running", "success", 0, 0),
             U2: core.UnitStatus("active", "running", "success", 0, 0)}
    jobs = {U1: job(RUNNING, U1, node="other"), U2: job(QUEUED, U2)}
    assert core.reconcile(jobs, units, node="me") == [(core.RELEASE_UNIT, U1),
                                                      (core.RELEASE_UNIT, U2)]
    mine = {U1: job(RUNNING, U1, node="me")}
    assert core.reconcile(mine, {U1: units[U1]}, node="me") == []
    # Its unit gone here and the job another node's: nothing for us to record.
    assert core.reconcile({U1: job(RUNNING, U1, node="other")}, {}, node="me") == []
    assert core.reconcile({U1: job(RUNNING, U1, node="me")}, {}, node="me") == [
        (core.RECORD_VANISHED, U1)]


# --- the cluster's settings ----------------------------------------------------

from lclusterd import config  # noqa: E402


def test_cluster_settings_parse():
    c = config.from_mapping({"listen": "0.0.0.0:7800", "node_name": "n1", "lease_ttl": "4",
                             "etcd_ca": "/ca.pem", "etcd_cert": "/c.pem", "etcd_key": "/c.key"})
    assert c.listen == ("0.0.0.0", 7800) and c.lease_ttl == 4
    assert c.address == "http://n1:7800"  # from listen's port and the node's name
    assert config.from_mapping({"listen": "10.0.0.5:99"}).address == "http://10.0.0.5:99"
    assert config.from_mapping({}).listen is None and config.from_mapping({}).lease_ttl == 10


@pytest.mark.parametrize("key,value", [("listen", "7800"), ("listen", "host:99999"),
                                       ("lease_ttl", "1"), ("lease_ttl", "x"),
                                       ("etcd_cert", "/c.pem")])
def test_bad_cluster_settings_refused(key, value):
    with pytest.raises(config.ConfigError):
        config.from_mapping({key: value})


def test_queue_rank_sorts_by_priority_then_submission():
    jobs = [job(job_uuid=U1, priority=0, submitted_at=1.0), job(job_uuid=U2, priority=5, submitted_at=3.0),
            job(job_uuid=U3, priority=0, submitted_at=2.0)]
    assert [j.uuid for j in sorted(jobs, key=core.queue_rank)] == [U2, U1, U3]
    low, high = job(priority=core.MIN_PRIORITY), job(priority=core.MAX_PRIORITY)
    assert core.queue_rank(high) < core.queue_rank(low)


@pytest.mark.parametrize("value", [core.MIN_PRIORITY - 1, core.MAX_PRIORITY + 1, "1", 1.5, True])
def test_bad_priority_refused(value):
    with pytest.raises(core.InvalidInput):
        core.validate_priority(value)


# --- the token file (daemon.read_token) -------------------------------------------

from lclusterd import daemon  # noqa: E402


def test_token_file_must_be_root_only(tmp_path):
    token = tmp_path / "token"
    assert daemon.read_token(str(token), required=False) is None
    with pytest.raises(daemon.StartupError, match="does not exist"):
        daemon.read_token(str(token), required=True)
    token.write_text("s3cret-s3cret-s3cret\n")
    token.chmod(0o644)
    with pytest.raises(daemon.StartupError, match="readable by root only"):
        daemon.read_token(str(token), required=True)
    token.chmod(0o600)
    assert daemon.read_token(str(token), required=True) == "s3cret-s3cret-s3cret"
    token.write_text("short\n")
    with pytest.raises(daemon.StartupError, match="too short"):
        daemon.read_token(str(token), required=True)
