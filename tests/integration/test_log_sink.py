"""The access log sink on real files and pipes: order, bounds, rotation, and a loop that never waits."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import trio

from proxy import log_sink
from proxy.log_sink import AccessLogSink


def numbered(path: Path) -> list[int]:
    return [int(line.split()[0]) for line in path.read_text().splitlines()]


async def test_lines_are_written_whole_and_in_order(tmp_path):
    path = tmp_path / "access.log"
    sink = AccessLogSink(str(path), batch_lines=100, flush_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(5000):
            sink.write(f"{i} {'é' * (i % 7)}{'x' * (i % 50)}")
            if i % 500 == 0:
                await trio.sleep(0.001)
        sink.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [f"{i} {'é' * (i % 7)}{'x' * (i % 50)}" for i in range(5000)]
    assert (sink.written, sink.dropped, sink.buffered) == (5000, 0, 0)


async def test_lines_are_appended_to_an_existing_file(tmp_path):
    path = tmp_path / "access.log"
    path.write_text("0 from before\n")
    sink = AccessLogSink(str(path), flush_interval=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        sink.write("1 new")
        sink.close()
    assert numbered(path) == [0, 1]


async def test_cancellation_still_writes_what_is_buffered(tmp_path):
    path = tmp_path / "access.log"
    sink = AccessLogSink(str(path), flush_interval=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(300):
            sink.write(str(i))
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert numbered(path) == list(range(300))


async def test_cancellation_in_the_middle_of_writes_loses_nothing(tmp_path):
    for run in range(10):
        path = tmp_path / f"access-{run}.log"
        sink = AccessLogSink(str(path), batch_lines=50, flush_interval=0.001)
        written = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            with trio.move_on_after(0.005 + run * 0.002):
                while written < 10000:  # within the buffer's bound: nothing is dropped
                    sink.write(f"{written} {'x' * 200}")
                    written += 1
                    if written % 25 == 0:
                        await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
        assert numbered(path) == list(range(written))
        assert (sink.written, sink.dropped) == (written, 0)


async def test_write_is_cheap_and_bounded(tmp_path):
    sink = AccessLogSink(str(tmp_path / "access.log"), max_buffered_lines=8000,
                         max_buffered_bytes=1 << 30)
    line = "x" * 200
    started = time.perf_counter()
    for _ in range(10000):
        sink.write(line)
    assert time.perf_counter() - started < 0.05
    assert (sink.buffered, sink.dropped) == (8000, 2000)
    by_bytes = AccessLogSink("stdout", max_buffered_bytes=1000)
    for _ in range(10):
        by_bytes.write("y" * 300)
    assert (by_bytes.buffered, by_bytes.dropped) == (4, 6)  # it stops once 1000 are held


async def test_a_reader_that_stops_costs_dropped_lines_not_a_blocked_loop(tmp_path):
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that reads nothing, for now
    try:
        fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)  # fills after a few dozen lines
        sink = AccessLogSink(str(fifo), max_buffered_lines=200, batch_lines=20, flush_interval=0.01)
        received = bytearray()

        async def read_until_closed() -> None:
            while True:
                try:
                    data = os.read(reader, 65536)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(reader)
                    continue
                if not data:
                    return  # the sink closed its end
                received.extend(data)

        longest_gap = 0.0

        async def tick(task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal longest_gap
            with trio.CancelScope() as scope:
                task_status.started(scope)
                while True:
                    before = time.monotonic()
                    await trio.sleep(0.002)
                    longest_gap = max(longest_gap, time.monotonic() - before)

        written = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            ticker = await nursery.start(tick)
            with trio.fail_after(5):
                while sink.dropped < 500:
                    sink.write(f"{written:06d} " + "x" * 90)
                    written += 1
                    if written % 10 == 0:
                        await trio.sleep(0.0005)
            # The flushing thread is stuck on a full pipe; the event loop is not.
            await trio.sleep(0.2)
            ticker.cancel()
            assert longest_gap < 0.1
            assert sink.buffered == 200
            nursery.start_soon(read_until_closed)
            sink.close()
    finally:
        os.close(reader)
    numbers = [int(line.split()[0]) for line in bytes(received).splitlines()]
    assert len(numbers) == sink.written and sink.written + sink.dropped == written
    # Once the pipe was full nothing more was taken: what was written is all the first lines.
    assert numbers == list(range(sink.written))


async def test_stopping_with_a_write_that_never_returns_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(log_sink, "CLOSE_TIMEOUT", 0.2)
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(reader, fcntl.F_SETPIPE_SZ, 4096)
        sink = AccessLogSink(str(fifo), max_buffered_lines=100, batch_lines=20, flush_interval=0.01)
        written = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            with trio.fail_after(5):
                while not sink.dropped:
                    sink.write("x" * 100)
                    written += 1
                    if written % 10 == 0:
                        await trio.sleep(0.0005)
            stopping = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - stopping < 1.0
        assert sink.written + sink.dropped == written and sink.buffered == 0
    finally:
        os.close(reader)  # the abandoned write ends with EPIPE


async def test_reopen_after_a_rename_loses_no_line(tmp_path):
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    sink = AccessLogSink(str(path), batch_lines=64, flush_interval=0.005)
    n = 4000
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        for i in range(n):
            sink.write(f"{i}")
            if i % 100 == 99:
                await trio.sleep(0.002)
            if i == 1500:
                os.rename(path, rotated)  # logrotate's move; lines still go to the moved file ...
            if i == 2500:
                sink.reopen()  # ... until it says so
        sink.close()
    old, new = numbered(rotated), numbered(path)
    assert len(old) > 1500 and len(new) >= 1499
    assert old + new == list(range(n))
    assert (sink.written, sink.dropped) == (n, 0)


def test_stdout():
    code = ("import trio\n"
            "from proxy.log_sink import AccessLogSink\n"
            "async def main():\n"
            "    sink = AccessLogSink('stdout', flush_interval=0.01)\n"
            "    async with trio.open_nursery() as nursery:\n"
            "        await nursery.start(sink.run)\n"
            "        for i in range(3):\n"
            "            sink.write(f'line {i}')\n"
            "        sink.reopen()\n"
            "        sink.write('line 3')\n"
            "        sink.close()\n"
            "    print('after', sink.written, flush=True)\n"
            "trio.run(main)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                            check=False)
    assert result.stdout.splitlines() == ["line 0", "line 1", "line 2", "line 3", "after 4"], result.stderr
