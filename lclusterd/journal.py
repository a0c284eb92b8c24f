"""journald (systemd-python's journal.Reader): the only module that reads it.

A job's output is what its unit wrote to stdout and stderr: the entries of
this machine's journal whose _SYSTEMD_UNIT is the job's unit and whose
_TRANSPORT is stdout (not systemd's own notes about the unit, such as
"Failed to configure loopback network device" in a container). JobLog reads
them in chunks of at most CHUNK_BYTES, so a job that printed millions of
lines costs the daemon one chunk at a time, whatever the caller does with it.

journald stores a stream's output line by line and says in _LINE_BREAK how a
line ended when it was not a newline (systemd.journal-fields(7)); JobLog puts
back what that tells:

    no _LINE_BREAK   the line ended with "\n"             -> "\n"
    line-max         split at journald's LineMax (48 KiB)  -> rejoined with the next piece
    nul              the line ended with a NUL byte        -> "\0"
    eof              the stream ended without a newline    -> nothing
    pid-change       another process wrote next            -> "\n"

pid-change is a line end, not a join: in the common case (`tr ...; echo`:
a line without its newline, then the shell's "\n" alone) journald drops the
empty line that the newline makes, so the newline is what was there. A line
that another process really went on with comes back as two lines.

What journald itself changes cannot be put back (README, "A job's output";
docs/api.md): empty lines are dropped; blanks at the end of a line with
other text are dropped; a line of blanks only is kept.

The reader blocks: every call of a JobLog runs on one thread of its own
(sd-journal objects must not be used by two threads at once, and a follower
waiting for lines must not hold up the threads that talk to etcd).
"""

import asyncio
import concurrent.futures

from systemd import journal

CHUNK_BYTES = 256 * 1024  # at most this much output read before it is sent on
# What ends an entry's text in the output, by its _LINE_BREAK (None: a newline).
LINE_ENDS = {None: b"\n", b"line-max": b"", b"nul": b"\0", b"eof": b"", b"pid-change": b"\n"}
WAIT = 1.0  # seconds one wait for new entries lasts (then the caller looks again)


class JobLog:
    """The output of one unit, read forward from a starting point."""

    def __init__(self, unit, tail=None, since=None):
        self.unit, self.tail, self.since = unit, tail, since
        self._reader = None
        self._last = None  # (realtime, monotonic, message) of the last entry read
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def __aenter__(self):
        await self._run(self._open)
        return self

    async def __aexit__(self, *exc):
        await self._run(self._close)
        self._thread.shutdown(wait=False)

    async def read(self):
        """The next lines as one bytes chunk (b"" when there are none yet)."""
        return await self._run(self._read)

    async def wait(self, timeout=WAIT):
        """Until the journal changed, or timeout seconds passed."""
        await self._run(self._reader.wait, timeout)

    # -- on the journal thread ---------------------------------------------------

    def _open(self):
        reader = journal.Reader(journal.LOCAL_ONLY)
        reader.add_match(_SYSTEMD_UNIT=self.unit, _TRANSPORT="stdout")  # both must match
        if self.since is not None:
            reader.seek_realtime(float(self.since))
        if self.tail is not None:
            # Stand tail+1 entries before the end, so that the next read
            # gives the last tail ones; fewer than that: all of them.
            # (_previous(n) only says whether it moved at all: step by one.)
            reader.seek_tail()
            if not all(reader._previous() for _ in range(self.tail + 1)):
                reader.seek_head()
        self._reader = reader

    def _close(self):
        if self._reader is not None:
            self._reader.close()

    def _read(self):
        reader, parts, size = self._reader, [], 0
        since = None if self.since is None else int(self.since * 1_000_000)
        while size < CHUNK_BYTES and reader._next():
            try:
                message = reader._get("MESSAGE")
            except KeyError:
                continue  # an entry without text (none expected from a stdout stream)
            stamp = (reader._get_realtime(), reader._get_monotonic(), message)
            # systemd 252's journald writes the entry that fills a journal file
            # into both the full file and the new one: skip the copy.
            if stamp == self._last or (since is not None and stamp[0] < since):
                continue
            self._last = stamp
            end = line_end(reader)
            parts.append(message)
            parts.append(end)
            size += len(message) + len(end)
        return b"".join(parts)


def line_end(reader):
    """The bytes that ended the reader's current entry in the job's output."""
    try:
        how = reader._get("_LINE_BREAK")
    except KeyError:
        how = None
    if isinstance(how, str):
        how = how.encode()
    return LINE_ENDS.get(how, b"\n")  # a kind we do not know yet: a line of its own
