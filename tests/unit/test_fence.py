"""lclusterd-fence's rule and which units it takes (pure parts)."""

from lclusterd import fence


def test_the_rule_fences_only_past_the_deadline_with_others_live():
    assert fence.must_fence({"node": "n1", "deadline": 10.0, "others_live": True}, 10.5)
    assert not fence.must_fence({"node": "n1", "deadline": 10.0, "others_live": True}, 9.5)
    assert not fence.must_fence({"node": "n1", "deadline": 10.0, "others_live": False}, 99.0)
    assert not fence.must_fence(None, 99.0)


def test_only_units_whose_job_still_runs_are_fenced(monkeypatch):
    listing = "\n".join([
        "lcluster-job@a.service loaded active running lcluster job a",
        "lcluster-job@b.service loaded active exited lcluster job b",  # ended: its result is real
        "lcluster-job@c.service loaded failed failed lcluster job c",  # fenced already
        "lcluster-job@d.service loaded deactivating stop-sigterm lcluster job d",
        "lcluster-job@e.service loaded inactive dead lcluster job e",
        "lcluster-job@f.service not-found inactive dead lcluster job f",
    ])

    class Done:
        stdout = listing
    monkeypatch.setattr(fence, "systemctl", lambda *args: Done)
    assert fence.job_units() == ["lcluster-job@a.service", "lcluster-job@d.service"]
