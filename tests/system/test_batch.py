"""Batch submit on the installed package: `lclusterc addjob --count N` (an
array of up to 1,000, queued all or none in one request), and that every
member runs, as its submitter, with its index, and leaves no unit behind;
an array over the count or too big for etcd is refused whole, in one line."""

import json
import re

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def test_addjob_count_queues_and_runs_every_copy(box):
    array, *out = box.lc("addjob --count 64 'id -un; echo $LCLUSTER_ARRAY_INDEX'",
                         user="alice").stdout.split()
    assert UUID.match(array) and array not in out
    assert len(out) == 64 and len(set(out)) == 64 and all(UUID.match(u) for u in out)
    for uuid in out:
        job = box.wait_state(uuid, timeout=120)
        assert job["state"] == "succeeded" and job["user"] == "alice", job
    assert job["array"] == array and job["array_index"] == 63, job  # printed in index order
    log = box.lc(f"logs {out[-1]}", user="alice").stdout
    assert log.split() == ["alice", "63"], log
    box.sh("until [ -z \"$(systemctl list-units --all --plain --no-legend 'lcluster-job@*')\" ];"
           " do sleep 0.2; done", timeout=30)


def test_addjob_count_json_and_bad_counts(box):
    answer = json.loads(box.lc("addjob --count 3 --json true", user="bob").stdout)
    jobs = answer["jobs"]
    assert len(jobs) == 3 and {j["user"] for j in jobs} == {"bob"}
    assert {j["array"] for j in jobs} == {answer["array"]}
    assert sorted(j["array_index"] for j in jobs) == [0, 1, 2]
    before = box.job_count()
    for args, message in (("--count 0 true", "count must be a whole number of at least 1"),
                          ("--count 2 --wait true", "--wait takes one job"),
                          ("--count 1001 true", "an array holds at most 1000 jobs")):
        r = box.lc(f"addjob {args}", user="bob", check=False)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    # The API refuses a batch over the limit whole, and writes nothing.
    r = box.sh("python3 -c 'from lclusterd.client import Client, ClientError\n"
               "try: Client().add_jobs(\"true\", 1001)\n"
               "except ClientError as e: print(e.cause, e.message)'", user="bob")
    assert r.stdout.startswith("400 an array holds at most 1000 jobs"), r.stdout
    assert box.job_count() == before


def test_addjob_count_1000_queues_them_in_one_call_and_all_run(box):
    array, *out = box.lc("addjob --count 1000 true", user="alice").stdout.split()
    assert len(out) == 1000 and len(set(out)) == 1000 and all(UUID.match(u) for u in out)
    box.lc(f"wait {array}", user="alice", timeout=900)  # at ~16 jobs/s, about a minute
    answer = json.loads(box.lc(f"checkjob {array} --json", user="alice").stdout)
    assert answer["counts"] == {"succeeded": 1000}, answer["counts"]


def test_an_array_too_big_for_one_etcd_transaction_is_refused_in_one_line(box):
    before = box.job_count()
    command = "echo " + "x" * 600  # 1,000 records of ~1.6 KB: over etcd's 1.5 MiB a request
    box.sh(f"for i in $(seq 100); do echo '{command}'; done > /tmp/big-array")
    env = " ".join(f"--env K{i}={'x' * 480}" for i in range(40))  # ~20 KB a member
    for args, words in ((f"--count 1000 '{command}'", "more than the 1.5 MiB etcd takes in one "
                         "transaction: queue fewer jobs"),
                        (f"--file /tmp/big-array {env}", "more than the 1.5 MiB etcd takes"),
                        ("--file /tmp/too-long", "request body too large (over 128 KiB")):
        box.sh(f"for i in $(seq 1000); do echo '{command[:200]}'; done > /tmp/too-long")
        r = box.lc(f"addjob {args}", user="bob", check=False)
        assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert words in r.stderr, r.stderr
    assert box.job_count() == before
