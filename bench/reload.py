"""Config reloads beside the load: a thread of the harness that PUTs a changed config to
meshproxy's admin plane (`PUT /config`) once a second while the measured window runs.

A PUT counts as applied when it answers 200 with `"changed": true` and a version above the
previous one (meshproxy answers once every worker has the new version); anything else (another
status, `changed: false`, no answer within the time limit) counts as failed. The thread runs
where the harness runs (CPU 0, with the load side); the work meshproxy does for each reload is
in the proxy's CPU figure like the rest of its work.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

PERIOD = 1.0  # seconds between PUTs
_TIMEOUT = 5.0  # seconds a PUT may take
_MAX_ERRORS_KEPT = 5


class Background(Protocol):
    """Work that runs beside the load in the measured window."""

    errors: list[str]  # what went wrong, for the progress log

    def start(self) -> None: ...

    def signal_stop(self) -> None: ...  # start no further work; returns at once

    def stop(self) -> None: ...  # idempotent; returns once the work has ended

    def metrics(self) -> dict[str, float]: ...


class Reloader:
    """PUT `config(k)` (k = 1, 2, …) to `admin_url`/config at 0.5 s, 1.5 s, … after start();
    a PUT that overruns its slot delays the next one, which never piles up."""

    def __init__(self, admin_url: str, config: Callable[[int], str],
                 period: float = PERIOD) -> None:
        url = urlsplit(admin_url)
        self._host, self._port = url.hostname, url.port
        self._config = config
        self._period = period
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.applied = 0
        self.failed = 0
        self.put_ms: list[float] = []
        self.errors: list[str] = []
        self._version = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="bench-reloader", daemon=True)
        self._thread.start()

    def signal_stop(self) -> None:
        """Send no further PUT (one in flight still finishes)."""
        self._stopping.set()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(_TIMEOUT + 1)

    def _loop(self) -> None:
        start = time.monotonic()
        k = 1
        while not self._stopping.wait(max(0.0, start + (k - 0.5) * self._period
                                          - time.monotonic())):
            self._put(k)
            k += 1

    def _put(self, k: int) -> None:
        body = self._config(k).encode()
        began = time.monotonic()
        try:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=_TIMEOUT)
            try:
                conn.request("PUT", "/config", body, {"Content-Type": "application/yaml"})
                response = conn.getresponse()
                text = response.read()
            finally:
                conn.close()
            self.put_ms.append((time.monotonic() - began) * 1000)
            answer = json.loads(text) if response.status == 200 else {}
            if (response.status == 200 and answer.get("changed") is True
                    and answer.get("version", 0) > self._version):
                self._version = answer["version"]
                self.applied += 1
                return
            error = f"PUT {k}: {response.status} {text[:200]!r}"
        except (OSError, http.client.HTTPException, ValueError) as e:
            error = f"PUT {k}: {type(e).__name__}: {e}"
        self.failed += 1
        if len(self.errors) < _MAX_ERRORS_KEPT:
            self.errors.append(error)

    def metrics(self) -> dict[str, float]:
        figures = {"reloads": self.applied, "reloads_failed": self.failed}
        if self.put_ms:
            figures["reload_put_p50_ms"] = statistics.median(self.put_ms)
            figures["reload_put_max_ms"] = max(self.put_ms)
        return figures
