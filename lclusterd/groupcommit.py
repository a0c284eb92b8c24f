"""Group commit of single-job submissions (issue 13 item 2).

While one submission transaction is in flight, the jobs that arrive wait;
when it ends, the next transaction takes all that wait (as many as one
transaction holds). No timer: a lone submission is written at once. Each
caller is answered once the transaction that holds its job committed, and a
transaction that fails fails its own callers only.
"""

import asyncio

from lclusterd import core, store as etcd_store


class GroupCommit:
    def __init__(self, write, size=etcd_store.submit_size, most=core.MAX_BATCH):
        """write(jobs): awaitable, writes jobs in one transaction, all or none.
        size(job): its (ops, bytes) in that transaction (store.batches cuts by them)."""
        self.write = write
        self.size = size
        self.most = most
        self.waiting = []  # [(job, its size, future)] in arrival order
        self.writing = None  # the task that writes, while jobs wait or are in flight
        self.transactions = 0  # written or failed

    async def submit(self, job):
        """Return once job is written; raise what its transaction raised."""
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((job, self.size(job), future))
        if self.writing is None:
            self.writing = asyncio.create_task(self._drain())
        await future

    async def _drain(self):
        batch = []
        try:
            while True:
                # A caller that went away (cancelled) before its transaction is not written.
                self.waiting = [entry for entry in self.waiting if not entry[2].done()]
                if not self.waiting:
                    return
                first = next(etcd_store.batches([size for _, size, _ in self.waiting[:self.most]]))
                batch, self.waiting = self.waiting[:len(first)], self.waiting[len(first):]
                self.transactions += 1
                try:
                    await self.write([job for job, _, _ in batch])
                except Exception as e:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                else:
                    for _, _, future in batch:
                        if not future.done():
                            future.set_result(None)
                batch = []
        except asyncio.CancelledError:  # the loop is closing: nobody is left waiting for ever
            for _, _, future in batch + self.waiting:
                future.cancel()
            raise
        finally:
            self.writing = None
