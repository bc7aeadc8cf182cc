"""CPU, memory and open files of one process, read from Linux's /proc.

The supervisor reads these for itself and each worker when /metrics is scraped. Reading a
few small /proc files takes microseconds, so it is done inline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    name: str  # the `process` label: "supervisor", "worker-1", ...
    cpu_seconds: float  # user + system
    resident_bytes: int
    open_fds: int


def read_process_usage(name: str, pid: int, proc: str = "/proc") -> ProcessUsage | None:
    """The usage of process `pid`, or None if it is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read()
        open_fds = len(os.listdir(f"{proc}/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, in parentheses, may hold spaces: fields are counted after it.
    # After ")" come state (field 3), ..., utime (14), stime (15), ..., rss (24, in pages).
    fields = stat[stat.rindex(b")") + 2 :].split()
    return ProcessUsage(
        name=name,
        cpu_seconds=(int(fields[11]) + int(fields[12])) / _TICKS_PER_SECOND,
        resident_bytes=int(fields[21]) * _PAGE_SIZE,
        open_fds=open_fds,
    )
