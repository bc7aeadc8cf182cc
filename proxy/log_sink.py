"""Access log lines to stdout or a file, written off the request path.

    sink = AccessLogSink("/var/log/meshproxy/access.log")   # or "stdout"
    await nursery.start(sink.run)        # one per worker, owned by the worker's nursery
    sink.write(line)                     # on the request path: O(1), never waits
    sink.reopen()                        # after logrotate's rename (SIGUSR1, POST /logs/reopen)
    sink.close()                         # run() writes what is buffered, then returns

`write` appends to a buffer bounded in lines and bytes; when it is full the line is dropped
and counted. `run` writes the buffer in batches, every `flush_interval` seconds or as soon
as `batch_lines` wait, each batch with one write(2) in a worker thread: a write to a file or
a pipe may block (slow disk, a reader that stops), and that must not stop the event loop.
Lines are written whole and in order. The file is opened with O_APPEND, so the workers
of one proxy can share it.

`reopen` takes effect before the next batch: lines already written stay in the old file
(renamed), the rest, buffered ones included, go to a new file at the path; none is lost or
written twice.

Counters: `written` lines, `dropped` lines (the buffer was full, or a write failed).

An edge module (it runs a task and does I/O); the line format is `telemetry.access_log`'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from outcome import Outcome

log = logging.getLogger("meshproxy.access_log")

STDOUT = "stdout"
# How long a closing sink may take to write what it holds (a sink that blocks for longer,
# a pipe nobody reads, loses the rest: shutdown must not hang on it).
CLOSE_TIMEOUT = 5.0


class AccessLogSink:
    def __init__(self, path: str, *, max_buffered_lines: int = 16384,
                 max_buffered_bytes: int = 8 << 20, batch_lines: int = 1024,
                 flush_interval: float = 0.25) -> None:
        self.path = path
        self.max_buffered_lines = max_buffered_lines
        self.max_buffered_bytes = max_buffered_bytes
        self.batch_lines = batch_lines
        self.flush_interval = flush_interval
        self._lines: list[str] = []
        self._chars = 0  # in the buffered lines: a cheap measure of their bytes
        self._batch_ready = trio.Event()
        self._fd = -1
        self._reopen = False
        self._closing = False
        self._give_up_at = math.inf  # when run() ends: the last moment to wait for a write
        self._abandoned = False  # a write never returned: its thread keeps the fd
        self._failing = False
        self.written = 0
        self.dropped = 0

    @property
    def buffered(self) -> int:
        return len(self._lines)

    def write(self, line: str) -> None:
        """Buffer one line (without its newline) for writing; never waits."""
        lines = self._lines
        if len(lines) >= self.max_buffered_lines or self._chars >= self.max_buffered_bytes or self._closing:
            self.dropped += 1
            return
        lines.append(line)
        self._chars += len(line)
        if len(lines) == self.batch_lines:
            self._batch_ready.set()

    def reopen(self) -> None:
        """Open the path anew before the next batch (after log rotation renamed the file)."""
        self._reopen = True
        self._batch_ready.set()

    def close(self) -> None:
        """Stop taking lines; `run` writes those it holds and returns."""
        self._closing = True
        self._batch_ready.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until `close` or cancellation; the file is open once started."""
        self._fd = await trio.to_thread.run_sync(self._open)
        task_status.started()
        try:
            while not self._closing:
                with trio.move_on_after(self.flush_interval):
                    await self._batch_ready.wait()
                self._batch_ready = trio.Event()
                await self._flush()
        finally:
            # Closing or cancelled: what is buffered still goes out, within a bound.
            self._give_up_at = trio.current_time() + CLOSE_TIMEOUT
            with trio.CancelScope(shield=True, deadline=self._give_up_at):
                await self._flush()
            self.dropped += len(self._lines)
            self._lines = []
            if not self._abandoned and self.path != STDOUT:
                os.close(self._fd)
            self._fd = -1

    async def _flush(self) -> None:
        if self._abandoned:
            return
        if self._reopen:
            self._reopen = False
            await self._reopen_file()
        if self._lines:
            lines, self._lines, self._chars = self._lines, [], 0
            await self._write(lines)

    async def _write(self, lines: list[str]) -> None:
        """Write `lines` with one write(2) in a thread: it may block (a slow disk, a pipe
        nobody reads), the event loop must not."""
        data = ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        results: list[Outcome[None]] = []

        def deliver(result: Outcome[None]) -> None:  # in the thread
            results.append(result)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        trio.lowlevel.start_thread_soon(functools.partial(_write_all, self._fd, data), deliver)
        try:
            await done.wait()
        finally:
            if not done.is_set():
                # Cancelled: a healthy file finishes within ms, so wait for it, but only so
                # long; a write that never returns is left to its thread, which keeps the fd.
                with trio.CancelScope(shield=True,
                                      deadline=min(trio.current_time() + CLOSE_TIMEOUT, self._give_up_at)):
                    await done.wait()
            self._count(results, len(lines))

    def _count(self, results: list[Outcome[None]], lines: int) -> None:
        if not results:
            self._abandoned = True
            self.dropped += lines
            log.warning("access log %s: a write did not return, %d lines lost", self.path, lines)
            return
        try:
            results[0].unwrap()
        except OSError as exc:
            self.dropped += lines
            if not self._failing:  # once per outage: `dropped` tells the rest
                log.warning("access log %s: write failed, lines are lost: %s", self.path, exc)
            self._failing = True
            return
        if self._failing:
            log.info("access log %s: writes work again", self.path)
        self._failing = False
        self.written += lines

    async def _reopen_file(self) -> None:
        if self.path == STDOUT:
            return
        try:
            fd = await trio.to_thread.run_sync(self._open)
        except OSError as exc:
            log.warning("access log %s: cannot reopen, still writing the old file: %s", self.path, exc)
            return
        os.close(self._fd)
        self._fd = fd

    def _open(self) -> int:
        if self.path == STDOUT:
            return 1
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` (in a worker thread: this may block)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
