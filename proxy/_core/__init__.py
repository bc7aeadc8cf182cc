"""Compiled hot-path modules (built from the top-level `_core/*.pyx` sources).

- `splice`: one-direction L4 byte pumps (splice(2) through a pipe, or recv/send).
- `sockops`: accept/connect/shutdown/close on plain int fds.
- `iobuf`: receive buffers and resumable sends for the HTTP path.
- `lb`: endpoint selection (round robin, random, least request, peak EWMA, ring hash, Maglev).
"""
