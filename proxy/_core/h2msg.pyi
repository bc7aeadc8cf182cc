from collections.abc import Iterable

PROTOCOL_ERROR: int
FIELD_OVERHEAD: int
CONNECTION_SPECIFIC: frozenset[bytes]
REPLACED: frozenset[bytes]

class MalformedRequest(Exception):
    status: int | None
    code: str
    error_code: int
    def __init__(self, reason: str, *, status: int | None = None, code: str = "h2_malformed",
                 error_code: int = 1) -> None: ...

class H2Request:
    method: bytes
    scheme: bytes
    authority: bytes | None
    path: bytes
    fields: list[tuple[bytes, bytes]]
    content_length: int
    grpc: bool
    def __init__(self, method: bytes, scheme: bytes, authority: bytes | None, path: bytes,
                 fields: list[tuple[bytes, bytes]], content_length: int, grpc: bool) -> None: ...
    @property
    def route_path(self) -> bytes: ...
    def get(self, name: bytes) -> bytes | None: ...
    def get_all(self, name: bytes) -> list[bytes]: ...

def check_field(name: bytes, value: bytes) -> str | None: ...
def check_value(name: bytes, value: bytes) -> str | None: ...
def parse_request(headers: list[tuple[bytes, bytes]], max_list_size: int = 61440,
                  max_fields: int = 100) -> H2Request: ...
def h1_request_head(request: H2Request, extra: bytes, framing: bytes, drop: tuple[bytes, ...] = ()) -> bytes: ...

HOP_BY_HOP: frozenset[bytes]

def h2_response_headers(status: int, fields: list[tuple[bytes, bytes]],
                        extra: Iterable[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]: ...
