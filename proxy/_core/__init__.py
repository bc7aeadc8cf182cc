"""Compiled hot-path modules (built from the top-level `_core/*.pyx` sources).

- `splice`: one-direction L4 byte pumps (splice(2) through a pipe, or recv/send).
- `sockops`: accept/connect/shutdown/close on plain int fds.
- `iobuf`: receive buffers and resumable sends for the HTTP path.
- `http1`: strict HTTP/1.1 head parser, serializer and chunked-body scanner (sans-IO).
- `lb`: endpoint selection (round robin, random, least request, peak EWMA, ring hash, Maglev).
"""
