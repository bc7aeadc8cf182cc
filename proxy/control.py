"""Supervisor <-> worker messages over a socketpair.

Frames are a 4-byte big-endian length and a pickled message. Both ends are our
own code in processes we started, so pickle's trust model holds; the frame
size is bounded anyway so a bug cannot make a peer allocate without limit.
"""

from __future__ import annotations

import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any

import trio

from .config import Config
from .telemetry import Snapshot

MAX_FRAME = 64 * 1024 * 1024
_HEADER = struct.Struct("!I")


@dataclass(frozen=True)
class Setup:
    """Supervisor -> worker, once: what to serve."""

    worker: int
    config: Config
    listener_fds: dict[str, int]  # listener name -> this worker's listening fd


@dataclass(frozen=True)
class Ready:
    """Worker -> supervisor: every listener is accepting."""

    worker: int


@dataclass(frozen=True)
class SnapshotRequest:
    """Supervisor -> worker: send your telemetry snapshot (for a scrape)."""

    request: int


@dataclass(frozen=True)
class SnapshotReply:
    """Worker -> supervisor: the answer to a `SnapshotRequest`."""

    request: int
    snapshot: Snapshot


@dataclass(frozen=True)
class Drain:
    """Supervisor -> worker: stop accepting, finish open connections, exit."""

    timeout: float


def encode(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"control message of {len(payload)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Bytes in, whole messages out (sans-IO)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                raise ValueError(f"control frame of {length} bytes exceeds {MAX_FRAME}")
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            messages.append(pickle.loads(self._buffer[_HEADER.size:end]))
            del self._buffer[:end]
        return messages


class ControlChannel:
    """One end of the control socketpair, as a Trio stream of messages."""

    def __init__(self, sock: socket.socket) -> None:
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._decoder = FrameDecoder()
        self._pending: list[Any] = []
        self._send_lock = trio.Lock()

    async def send(self, message: Any) -> None:
        async with self._send_lock:
            await self._stream.send_all(encode(message))

    async def receive(self) -> Any | None:
        """The next message, or None once the peer has closed its end."""
        while not self._pending:
            data = await self._stream.receive_some(65536)
            if not data:
                return None
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    async def aclose(self) -> None:
        await self._stream.aclose()
