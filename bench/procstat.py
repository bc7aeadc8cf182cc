"""CPU time and peak memory of a process tree, and kernel counters, read from /proc.

A proxy may be several processes (a supervisor and its workers, an nginx master and worker,
socat's child per connection). Its CPU time is, over every live process of its tree, utime+stime
plus cutime+cstime (the time of children it has already reaped). A child alive at the start and
reaped before the end is counted once: first in the tree, then in its parent's cutime.
"""

import os
import threading
import time
from typing import Self

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [11:15] CPU times."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2 :].split()


def _tree_stats(root: int) -> dict[int, list[bytes]]:
    """One snapshot of the stat fields of `root` and all its live descendants."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            stats[int(entry)] = fields
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            tree[pid] = stats[pid]
            todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(root: int, settle_timeout: float = 3.0) -> float:
    """User+system CPU seconds used so far by `root`, its descendants and their reaped children.

    Read once the tree is steady (the same processes in two snapshots 50 ms apart, no zombie),
    as right after a load run children are still exiting: one reaped between reading its parent
    and reading it would be lost, or counted twice.
    """
    deadline = time.monotonic() + settle_timeout
    previous = _tree_stats(root)
    while True:
        time.sleep(0.05)
        current = _tree_stats(root)
        steady = current.keys() == previous.keys() and all(f[0] != b"Z" for f in current.values())
        if steady or time.monotonic() > deadline:
            return sum(int(t) for f in current.values() for t in f[11:15]) / _TICKS_PER_SECOND
        previous = current


def _hwm_mib(root: int) -> float:
    """Sum of VmHWM (peak resident set) over the live processes of the tree, in MiB."""
    total_kib = 0
    for pid in _tree_stats(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total_kib += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total_kib / 1024


class PeakRss:
    """While in use, samples the tree's summed VmHWM every `interval` seconds; `mib` is the
    largest sum seen (per-connection children come and go: a reading at the end misses them)."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self._root, self._interval = root, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.mib = 0.0

    def _sample(self) -> None:
        while True:
            self.mib = max(self.mib, _hwm_mib(self._root))
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_fields(cpu: int) -> list[int]:
    """One CPU's line of /proc/stat: user nice system idle iowait irq softirq steal, in ticks."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                return [int(v) for v in line.split()[1:9]]
    raise ValueError(f"no cpu{cpu} in /proc/stat")


def cpu_idle_seconds(cpu: int) -> float:
    """Idle (and iowait) seconds of one CPU since boot. A CPU's busy time over a window is the
    window minus this: with a tickless kernel the idle time is measured exactly, while the
    user/system columns are sampled at ticks, and a CPU that sleeps and wakes thousands of times a
    second (a proxy, a load generator) gets far fewer busy ticks than it was busy."""
    fields = _cpu_fields(cpu)
    return (fields[3] + fields[4]) / _TICKS_PER_SECOND


def cpu_irq_seconds(cpu: int) -> float:
    """Seconds one CPU spent in interrupts and softirqs since boot: work such as loopback TCP
    receive processing that the kernel charges to the CPU, not to a process."""
    fields = _cpu_fields(cpu)
    return (fields[5] + fields[6]) / _TICKS_PER_SECOND


def listen_drops() -> int:
    """Connections the kernel dropped because a listen queue was full (TcpExt ListenDrops),
    system-wide since boot: a burst of connects against a short backlog shows up here."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    names, values = lines[0], lines[1]
    return int(values[names.index("ListenDrops")])
