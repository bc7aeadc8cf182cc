"""HTTP/1.1 head parser and chunked-body scanner, strict per RFC 9112 (sans-IO)."""

from collections.abc import Iterable
from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

BODY_NONE: int
BODY_LENGTH: int
BODY_CHUNKED: int
BODY_UNTIL_CLOSE: int
MAX_CHUNK_LINE: int

class ProtocolError(Exception):
    status: int
    code: str
    def __init__(self, reason: str, status: int = 400, code: str = "bad_request") -> None: ...

class Limits:
    max_request_line: int
    max_header_bytes: int
    max_headers: int
    def __init__(self, max_request_line: int = 8192, max_header_bytes: int = 61440,
                 max_headers: int = 100) -> None: ...

class _Head:
    version: int
    content_length: int
    chunked: bool
    keep_alive: bool
    size: int
    @property
    def upgrade(self) -> bytes | None: ...
    @property
    def raw(self) -> bytes: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...
    def get(self, name: bytes) -> bytes | None: ...
    def get_all(self, name: bytes) -> list[bytes]: ...

class RequestHead(_Head):
    expect_continue: bool
    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def path(self) -> bytes: ...
    @property
    def host(self) -> bytes | None: ...
    def serialize(self, extra: bytes = b"", keep_upgrade: bool = False,
                  drop: Iterable[bytes] = ()) -> bytes: ...

class ResponseHead(_Head):
    status: int
    body: int
    @property
    def reason(self) -> bytes: ...
    def serialize(self, extra: bytes = b"", keep_upgrade: bool = False,
                  drop: Iterable[bytes] = ()) -> bytes: ...

def parse_request(data: Buffer, start: int, end: int, limits: Limits) -> RequestHead | None: ...
def parse_response(data: Buffer, start: int, end: int, limits: Limits,
                   request_method: bytes) -> ResponseHead | None: ...

class ChunkedScanner:
    done: bool
    def __init__(self, limits: Limits, response: bool = False) -> None: ...
    @property
    def remaining(self) -> int: ...
    def reset(self) -> None: ...
    def scan(self, data: Buffer, start: int, end: int) -> int: ...
