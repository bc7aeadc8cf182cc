"""The bytes side of one upstream HTTP/2 connection (`upstream.h2pool`) on a non-blocking fd.
(The downstream server has its own, around its C protocol state: `h2server`.)

`h2`'s state machine (the `state`) turns events into bytes to send; `flush()` queues those
bytes for the writer task, which writes whatever every stream queued since it last ran in
one send, and waits for the fd to become writable when the socket takes no more. The queue is bounded in
effect: whoever produces output waits in `wait_room()` while more than
`limits.outbound_cap` bytes are queued (the reader stops reading, a stream stops sending),
so a peer that does not read slows down its own connection and nothing else; one that
reads nothing for `limits.write_stall_timeout` loses the connection.

Streams wait here for send window (`send_data`); the reader reports window updates with
`window_opened`.
"""

from __future__ import annotations

import errno
import logging

import trio
from h2.connection import H2Connection
from h2.exceptions import FlowControlError, StreamClosedError
from hyperframe.frame import GoAwayFrame

from .._core.iobuf import send_from
from .h2codec import H2Limits

log = logging.getLogger("meshproxy.http2")


class StreamGone(Exception):
    """The stream was reset or closed (by the peer, or because the connection ended)."""


class H2Transport:
    """What one HTTP/2 connection sends, and the waits for room and window."""

    def __init__(self, fd: int, state: H2Connection, limits: H2Limits) -> None:
        self.fd = fd
        self.state = state
        self.limits = limits
        self._out = bytearray()
        self._wake_writer = trio.Event()
        self._room = trio.Event()
        self._room.set()
        self._windows: dict[int, trio.Event] = {}
        self.broken: str | None = None  # why the connection can no longer be written to
        self.cancel_scope: trio.CancelScope | None = None  # cancelled when the writer fails

    @property
    def queued(self) -> int:
        return len(self._out)

    # -- sending ------------------------------------------------------------------------
    def flush(self) -> None:
        """Send what the state machine has for the peer: now if the socket takes it,
        otherwise through the writer task."""
        data = self.state.data_to_send()
        if data:
            self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        """Queue whole frames (after anything queued before them). The writer sends them
        when it next runs, so what all streams produce in one scheduler pass goes out
        in one write."""
        if self.broken is not None:
            return
        out = self._out
        if not out and not self._wake_writer.is_set():
            self._wake_writer.set()
        out += data
        if len(out) > self.limits.outbound_cap and self._room.is_set():
            self._room = trio.Event()

    def send_goaway(self, last_stream_id: int, error_code: int, debug: bytes = b"") -> None:
        """A GOAWAY written past h2's state machine, which would otherwise refuse to send
        anything more on the streams still open (a graceful GOAWAY lets them finish)."""
        self.flush()
        frame = GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code, additional_data=debug)
        self.send_raw(frame.serialize())

    async def wait_room(self) -> None:
        """Wait while the peer has more than `outbound_cap` bytes waiting for it."""
        while len(self._out) > self.limits.outbound_cap and self.broken is None:
            await self._room.wait()
        if self.broken is not None:
            raise StreamGone(self.broken)

    async def run_writer(self) -> None:
        """Write queued bytes as the socket takes them; on a write error, or a peer that
        reads nothing for `write_stall_timeout`, mark the connection broken and cancel
        `cancel_scope` (the connection's tasks)."""
        fd = self.fd
        out = self._out
        stall = self.limits.write_stall_timeout
        while True:
            if not out:
                self._wake_writer = trio.Event()
                await self._wake_writer.wait()
                continue
            try:
                sent = send_from(fd, out, 0)
            except OSError as exc:
                self._fail(f"send: {exc}")
                return
            if sent > 0:
                del out[:sent]
                if len(out) <= self.limits.outbound_cap // 2 and not self._room.is_set():
                    self._room.set()
                continue
            with trio.move_on_after(stall):
                await trio.lowlevel.wait_writable(fd)
                continue
            self._fail(f"peer read nothing for {stall:g}s")
            return

    async def drain_output(self, timeout: float) -> None:
        """Wait (up to `timeout`) until everything queued is written, e.g. a final GOAWAY."""
        with trio.move_on_after(timeout):
            while self._out and self.broken is None:
                try:
                    sent = send_from(self.fd, self._out, 0)
                except OSError:
                    return
                if sent > 0:
                    del self._out[:sent]
                else:
                    await trio.lowlevel.wait_writable(self.fd)

    def _fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.debug("h2 connection broken: %s", reason)
        self._out.clear()
        self._room.set()
        for event in self._windows.values():
            event.set()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    # -- flow control ----------------------------------------------------------------------
    def window_opened(self, stream_id: int) -> None:
        """The peer opened send window on `stream_id` (0: the connection, or all streams)."""
        if stream_id:
            event = self._windows.get(stream_id)
            if event is not None:
                event.set()
        else:
            for event in self._windows.values():
                event.set()

    async def send_data(self, stream_id: int, data: bytes, end_stream: bool, idle: float) -> None:
        """Send `data` on a stream as the peer's windows allow, waiting for window (up to
        `idle` seconds at a time) and for room in the outbound queue. StreamGone when the
        stream is reset or the connection ends; TimeoutError when the window stays shut."""
        state = self.state
        total = len(data)
        pos = 0
        while True:
            if len(self._out) > self.limits.outbound_cap:
                await self.wait_room()
            if self.broken is not None:
                raise StreamGone(self.broken)
            try:
                window = state.local_flow_control_window(stream_id)
            except StreamClosedError as exc:
                raise StreamGone("stream closed") from exc
            size = min(window, state.max_outbound_frame_size, total - pos)
            if size <= 0 and pos < total:
                await self._wait_window(stream_id, idle)
                continue
            last = pos + size >= total
            try:
                state.send_data(stream_id, data[pos:pos + size] if size != total else data,
                                end_stream=end_stream and last)
            except (StreamClosedError, FlowControlError) as exc:
                raise StreamGone(str(exc)) from exc
            pos += size
            self.flush()
            if last:
                return

    async def _wait_window(self, stream_id: int, idle: float) -> None:
        event = self._windows.get(stream_id)
        if event is None or event.is_set():
            event = self._windows[stream_id] = trio.Event()
        try:
            with trio.move_on_after(idle):
                await event.wait()
                return
            raise TimeoutError(errno.ETIMEDOUT, f"no send window for {idle:g}s")
        finally:
            if self._windows.get(stream_id) is event:
                del self._windows[stream_id]

    def forget(self, stream_id: int) -> None:
        """Wake anything waiting for window on a stream that ended."""
        event = self._windows.pop(stream_id, None)
        if event is not None:
            event.set()
