"""The accept loop: batched accept4 on a non-blocking listening fd."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from .._core.sockops import accept_nonblocking

log = logging.getLogger("meshproxy.accept")

# Connections taken per wake-up before the loop yields: enough to drain a burst
# in one scheduler pass, small enough that open connections are not starved.
ACCEPT_BURST = 64
# Back-off when the process runs out of fds or buffers: existing connections
# keep being served while some close and free resources.
RESOURCE_BACKOFF = 0.1
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


async def accept_loop(listen_fd: int, on_accept: Callable[[int], None], *, nodelay: bool) -> None:
    """Hand every accepted fd to `on_accept`, which takes ownership of it."""
    wait_readable = trio.lowlevel.wait_readable
    while True:
        await wait_readable(listen_fd)
        for _ in range(ACCEPT_BURST):
            try:
                fd = accept_nonblocking(listen_fd, nodelay)
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                log.warning("accept: %s; backing off %gs", exc.strerror, RESOURCE_BACKOFF)
                await trio.sleep(RESOURCE_BACKOFF)
                break
            if fd < 0:
                break
            on_accept(fd)
