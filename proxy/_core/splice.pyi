PUMP_WANT_READ: int
PUMP_WANT_WRITE: int
PUMP_AGAIN: int
PUMP_EOF: int
PUMP_READ_ERROR: int
PUMP_WRITE_ERROR: int

class SplicePump:
    src: int
    dst: int
    bytes: int
    error: int
    def __init__(self, src: int, dst: int) -> None: ...
    @property
    def pending(self) -> int: ...
    def pump(self, budget: int = ...) -> int: ...
    def close(self) -> None: ...

class CopyPump:
    src: int
    dst: int
    bytes: int
    error: int
    def __init__(self, src: int, dst: int, size: int = 65536) -> None: ...
    @property
    def pending(self) -> int: ...
    def pump(self, budget: int = ...) -> int: ...
    def close(self) -> None: ...
