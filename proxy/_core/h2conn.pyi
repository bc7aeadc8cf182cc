from typing import Any

PREFACE: bytes
NO_ERROR: int
PROTOCOL_ERROR: int
INTERNAL_ERROR: int
FLOW_CONTROL_ERROR: int
STREAM_CLOSED: int
FRAME_SIZE_ERROR: int
REFUSED_STREAM: int
CANCEL: int
COMPRESSION_ERROR: int
ENHANCE_YOUR_CALM: int
EV_REQUEST: int
EV_DATA: int
EV_TRAILERS: int
EV_RESET: int
EV_WINDOW: int
EV_GOAWAY: int
EV_SETTINGS_ACK: int
OPEN: int
HALF_CLOSED_REMOTE: int
HALF_CLOSED_LOCAL: int
CLOSED: int

class StreamClosed(Exception): ...

class H2Conn:
    out: bytearray
    error: tuple[int, str] | None
    violation: str | None
    settings_acked: bool
    highest: int
    block_started: float
    opened: int
    resets: int
    def __init__(self, limits: Any, preface: int = 24) -> None: ...
    def initiate(self) -> None: ...
    @property
    def in_header_block(self) -> bool: ...
    @property
    def open_streams(self) -> int: ...
    def stream_state(self, sid: int) -> int: ...
    def send_window(self, sid: int) -> int: ...
    def send_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None: ...
    def send_data(self, sid: int, data: bytes | bytearray | memoryview, end_stream: bool) -> int: ...
    def reset(self, sid: int, code: int) -> None: ...
    def ack(self, sid: int, n: int) -> None: ...
    def goaway(self, last_sid: int, code: int, debug: bytes = b"") -> None: ...
    def note_reset(self, now: float) -> None: ...
    def receive(self, data: bytes, now: float) -> list[tuple[int, int, Any, Any]]: ...
