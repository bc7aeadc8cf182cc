"""Side-by-side load tests: meshproxy against nginx, HAProxy, socat and no proxy at all.

Run as ``python -m bench SCENARIO``; see bench/README.md.
"""


class BenchError(Exception):
    """A benchmark step failed; the message says which step and why."""
