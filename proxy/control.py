"""Supervisor <-> worker messages over a socketpair.

Frames are a 4-byte big-endian length and a pickled message. Both ends are our
own code in processes we started, so pickle's trust model holds; the frame
size is bounded anyway so a bug cannot make a peer allocate without limit.
"""

from __future__ import annotations

import array
import pickle
import socket
import struct
from dataclasses import dataclass
from typing import Any

import trio

from .config import Config
from .telemetry import Snapshot

MAX_FRAME = 64 * 1024 * 1024
MAX_FDS = 256  # descriptors one message may carry
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
class Apply:
    """Supervisor -> worker: switch to `config`. The message carries one new listening
    socket per name in `new_listeners`, in that order (listeners added or moved)."""

    version: int
    config: Config
    new_listeners: tuple[str, ...]


@dataclass(frozen=True)
class Applied:
    """Worker -> supervisor: `version` is in effect for new connections and requests."""

    version: int


@dataclass(frozen=True)
class Identity:
    """Supervisor -> worker: this sidecar's current SVID, for connections from now on. Sent
    after `Setup` (once one is issued) and again on every rotation or trust bundle change."""

    cert_chain_pem: bytes  # the leaf, then the intermediates
    key_pem: bytes  # PKCS#8, unencrypted: it only travels over the control socketpair
    bundle_pem: bytes  # the trust domain's roots, from `identity.trust_bundle`
    spiffe_id: str

    def __repr__(self) -> str:  # never log a key
        return f"Identity(spiffe_id={self.spiffe_id!r})"


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
    """One end of the control socketpair, as a Trio stream of messages.

    A message may carry file descriptors (new listening sockets on a reload): they
    travel as SCM_RIGHTS with the message's bytes and are queued on arrival, in order,
    for `take_fds`.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._socket = trio.socket.from_stdlib_socket(sock)
        self._decoder = FrameDecoder()
        self._pending: list[Any] = []
        self._fds: list[int] = []
        self._send_lock = trio.Lock()

    async def send(self, message: Any, fds: list[int] | tuple[int, ...] = ()) -> None:
        data = memoryview(encode(message))
        async with self._send_lock:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            while data:
                try:
                    sent = await self._socket.sendmsg([data], ancillary)
                except OSError as exc:  # the peer is gone (EPIPE, ECONNRESET, closed)
                    raise trio.BrokenResourceError(str(exc)) from exc
                data = data[sent:]
                ancillary = []  # the fds went with the first bytes

    async def receive(self) -> Any | None:
        """The next message, or None once the peer has closed its end."""
        while not self._pending:
            try:
                data, ancillary, _, _ = await self._socket.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
            except (ConnectionResetError, BrokenPipeError):
                return None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                return None
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    def take_fds(self, count: int) -> list[int]:
        """The next `count` descriptors received (the caller owns them)."""
        if count > len(self._fds):
            raise ValueError(f"expected {count} descriptors, have {len(self._fds)}")
        taken, self._fds = self._fds[:count], self._fds[count:]
        return taken

    async def aclose(self) -> None:
        self._socket.close()
