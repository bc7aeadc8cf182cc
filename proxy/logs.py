"""Logging set-up shared by the supervisor, the workers and the CA."""

from __future__ import annotations

import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self, process: str) -> None:
        super().__init__(f"%(asctime)s.%(msecs)03dZ %(levelname)s {process} %(name)s: %(message)s",
                         "%Y-%m-%dT%H:%M:%S")


def setup_logging(level: str, process: str) -> None:
    """Log lines go to stderr, one per event, tagged with the process role."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
