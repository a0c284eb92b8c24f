"""The history: finished records past the retention or the count cap are
deleted, by one node per interval (a lock under a lease), and etcd's own
history of revisions is compacted with them."""

import logging

from lclusterd import core

log = logging.getLogger("lclusterd.node")

MAX_PRUNE_EVERY = 300.0  # seconds; shorter retentions are pruned every retention/10
# A node that has ended this share of max_finished_jobs since its last look
# looks again at once: at 130 jobs/s, 300 s would let the records grow to 5
# times the cap (make bench's 100,000-job run: +443 MB of RSS and 40 MB of
# etcd db).
EARLY_PRUNE_SHARE = 0.1
# finished/ entries read, and records deleted, at a time: what a batch
# leaves in the allocators' high water (sim --history 20,000: RSS growth
# 1.4 MB with 100, 3.1 MB with 500).
PRUNE_BATCH = 100
# Records finished by an older lclusterd (a rolling upgrade) have no
# finished/ key: the pruning node indexes them on its first pass and this
# often after (store.reindex reads every record, a page at a time).
REINDEX_EVERY = 3600.0  # seconds


class History:
    def __init__(self, config, applier, clock, batch=PRUNE_BATCH):
        self.config = config
        self.batch = batch  # PRUNE_BATCH
        self.applier = applier
        self.store = applier.store
        self.clock = clock
        self.next_prune = 0.0  # loop time of the next look at the history
        self.ended_at_last = 0  # this node's count of ended jobs at its last look
        self.next_reindex = 0.0  # clock() time

    def prune_every(self):
        return max(self.config.poll_interval, min(self.config.retention / 10, MAX_PRUNE_EVERY))

    async def prune(self):
        """Delete finished records past the retention or the count cap, if no
        other node has done so this interval (a lock under a lease as long as
        the interval, left to run out). Reads the history's index
        (store.finished) from its oldest end, and only the records it
        deletes, a batch at a time (and every REINDEX_EVERY, every record:
        store.reindex). Returns how many were deleted."""
        call = self.applier.call
        if not await call(self.store.lock, "prune", self.config.node_name, self.prune_every()):
            return 0
        await call(self.store.compact)  # etcd's history of revisions nobody reads (C7)
        if self.clock() >= self.next_reindex:
            written = await call(self.store.reindex)
            self.next_reindex = self.clock() + REINDEX_EVERY  # (not if etcd failed: next pass)
            if written:
                log.info("history: wrote or dropped %d index key(s) (records of an older lclusterd)",
                         written)
        deleted, after = 0, None
        while True:
            count, oldest = await call(self.store.finished, after, self.batch)
            doomed = core.expired_among(oldest, count, self.clock(), self.config.retention,
                                        self.config.max_finished_jobs)
            if doomed:
                gone, dropped = await call(self.store.delete_finished, oldest[:len(doomed)])
                deleted += gone
                if dropped:  # keys an older lclusterd left: they were counted, count again
                    after = None
                    continue
            if len(doomed) < len(oldest) or not oldest:
                break
            after = oldest[-1]
        if deleted:
            log.info("history: deleted %d finished job record(s)", deleted)
        return deleted

    async def prune_when_due(self, now):
        """now: loop time. Due once prune_every(), or sooner after many ends."""
        ended = sum(self.applier.counters.ended.values())
        cap = self.config.max_finished_jobs
        many = cap and ended - self.ended_at_last >= max(1, cap * EARLY_PRUNE_SHARE)
        if now >= self.next_prune or many:
            self.next_prune = now + self.prune_every()
            self.ended_at_last = ended
            await self.prune()
