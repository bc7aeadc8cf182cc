"""Trace context on the wire: W3C Trace Context and B3, read, continued and written.

    parent = extract(head.get, ("w3c", "b3"))         # the client's context, or None
    sampled = decide_sampled(parent, 0.01, random.random())
    server = continue_trace(parent, sampled)          # our server span's context
    client = continue_trace(server, sampled)          # one upstream attempt's span
    for name, value in inject(client, ("w3c", "b3")): # what the upstream receives
        ...                                           # (drop PROPAGATION_HEADERS first)

Formats, as in OpenTelemetry's propagator names: `w3c` (`traceparent` and `tracestate`),
`b3` (the single `b3` header) and `b3multi` (`X-B3-TraceId`, `X-B3-SpanId`,
`X-B3-ParentSpanId`, `X-B3-Sampled`, `X-B3-Flags`). Both B3 formats read either B3 form; each
writes its own. Extraction takes the first format, in the configured order, whose headers
are present and valid; anything malformed counts as absent, never as an error.

Ids are lowercase hex bytes, as on the wire: a trace id 32 characters, a span id 16. A 64-bit
B3 trace id is padded to 128 bits with zeros on the left, so W3C can carry it. A B3 header
that only carries a sampling decision (`b3: 0`) has no ids and is read as no context.

Pure: no trio, no sockets.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

FORMATS = ("w3c", "b3", "b3multi")

# Request headers a proxy replaces with its own context (lowercase, as the parser keys them).
PROPAGATION_HEADERS = (b"traceparent", b"tracestate", b"b3", b"x-b3-traceid", b"x-b3-spanid",
                       b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags")

HeaderLookup = Callable[[bytes], bytes | None]  # lowercase name -> value (e.g. RequestHead.get)


class SpanContext(NamedTuple):
    """One span as the next hop sees it: the trace, the span, and whether it is recorded."""

    trace_id: bytes  # 32 lowercase hex
    span_id: bytes  # 16 lowercase hex
    sampled: bool | None  # None: the sender left the decision to us (B3 without a flag)
    parent_span_id: bytes | None = None  # the span's own parent, when known
    tracestate: bytes | None = None  # W3C vendor data, passed on unchanged


_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16


# -- ids ------------------------------------------------------------------------------------

# A generator of its own, seeded from os.urandom: tests seeding the global one, or a forked
# process sharing the parent's state, must not make two processes hand out the same ids.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_trace_id() -> bytes:
    while True:
        n = _ids.getrandbits(128)
        if n:
            return b"%032x" % n


def new_span_id() -> bytes:
    while True:
        n = _ids.getrandbits(64)
        if n:
            return b"%016x" % n


# -- decisions ------------------------------------------------------------------------------


def decide_sampled(parent: SpanContext | None, sample_rate: float, u: float) -> bool:
    """The parent's decision when it made one; else `u < sample_rate` (`u` uniform in [0, 1))."""
    if parent is not None and parent.sampled is not None:
        return parent.sampled
    return u < sample_rate


def server_and_client(parent: SpanContext | None, sampled: bool) -> tuple[SpanContext, SpanContext]:
    """A proxy's two spans for one request: its server span (a child of `parent`, or the
    root of a new trace) and the client span under it that the upstream sees as its parent.
    The same as two `continue_trace` calls, with the ids drawn at once."""
    if parent is None:
        ids = b"%064x" % _ids.getrandbits(256)
        trace_id, server_id, client_id = ids[:32], ids[32:48], ids[48:]
        if trace_id == _ZERO_TRACE or server_id == _ZERO_SPAN or client_id == _ZERO_SPAN:
            server = continue_trace(None, sampled)
            return server, continue_trace(server, sampled)
        server = SpanContext(trace_id, server_id, sampled)
    else:
        ids = b"%032x" % _ids.getrandbits(128)
        server_id, client_id = ids[:16], ids[16:]
        if server_id == _ZERO_SPAN or client_id == _ZERO_SPAN:
            server = continue_trace(parent, sampled)
            return server, continue_trace(server, sampled)
        server = SpanContext(parent.trace_id, server_id, sampled, parent.span_id, parent.tracestate)
    return server, SpanContext(server.trace_id, client_id, sampled, server.span_id, server.tracestate)


def continue_trace(parent: SpanContext | None, sampled: bool) -> SpanContext:
    """A new span's context: a child of `parent` (same trace, tracestate kept), or the root
    of a new trace."""
    if parent is None:
        return SpanContext(new_trace_id(), new_span_id(), sampled)
    return SpanContext(parent.trace_id, new_span_id(), sampled, parent.span_id, parent.tracestate)


# -- reading --------------------------------------------------------------------------------


def extract(lookup: HeaderLookup, propagation: Iterable[str]) -> SpanContext | None:
    """The first valid context among the formats in `propagation`, in that order."""
    for name in propagation:
        if name == "w3c":
            ctx = parse_traceparent(lookup(b"traceparent"), lookup(b"tracestate"))
        else:  # b3 and b3multi both read either B3 form
            ctx = _extract_b3(lookup)
        if ctx is not None:
            return ctx
    return None


_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_MAX_TRACESTATE_BYTES = 512  # W3C: vendors must pass on at least this much
_MAX_TRACESTATE_MEMBERS = 32  # W3C: more makes the whole header invalid
_TRACESTATE_CHARS = re.compile(rb"[\t\x20-\x7e]*")


def parse_traceparent(value: bytes | None, tracestate: bytes | None = None) -> SpanContext | None:
    """A W3C `traceparent` (and its `tracestate`), or None if absent or invalid.

    Version 00 is exactly four fields; a later version may append fields, which are ignored
    (W3C's forward compatibility rule); version ff is invalid.
    """
    if value is None:
        return None
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == b"ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if len(value) != 55 and (version == b"00" or value[55:56] != b"-"):
        return None
    return SpanContext(trace_id, span_id, bool(int(flags, 16) & 1), None, _tracestate(tracestate))


def _tracestate(value: bytes | None) -> bytes | None:
    """`tracestate` as passed on: dropped whole when too long, too many members, or holding
    bytes a header value cannot (its members' syntax is the vendors' business)."""
    if not value or len(value) > _MAX_TRACESTATE_BYTES:
        return None
    if value.count(b",") >= _MAX_TRACESTATE_MEMBERS or not _TRACESTATE_CHARS.fullmatch(value):
        return None
    value = value.strip(b" \t")
    return value or None


_B3_SINGLE = re.compile(rb"([0-9a-f]{32}|[0-9a-f]{16})-([0-9a-f]{16})(?:-([01d])(?:-([0-9a-f]{16}))?)?")
_B3_TRACE_ID = re.compile(rb"[0-9a-f]{32}|[0-9a-f]{16}")
_B3_SPAN_ID = re.compile(rb"[0-9a-f]{16}")
_B3_SAMPLED = {b"1": True, b"0": False, b"d": True, b"true": True, b"false": False}


def _extract_b3(lookup: HeaderLookup) -> SpanContext | None:
    single = lookup(b"b3")
    if single is not None:
        return parse_b3(single)
    return parse_b3_multi(lookup)


def parse_b3(value: bytes) -> SpanContext | None:
    """A `b3: {trace id}-{span id}[-{0|1|d}[-{parent span id}]]` header, or None."""
    match = _B3_SINGLE.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id, sampled, parent = match.groups()
    return _b3_context(trace_id, span_id, None if sampled is None else _B3_SAMPLED[sampled], parent)


def parse_b3_multi(lookup: HeaderLookup) -> SpanContext | None:
    """The `X-B3-*` headers, or None when the ids are absent or invalid."""
    trace_id = lookup(b"x-b3-traceid")
    span_id = lookup(b"x-b3-spanid")
    if trace_id is None or span_id is None:
        return None
    if not _B3_TRACE_ID.fullmatch(trace_id) or not _B3_SPAN_ID.fullmatch(span_id):
        return None
    parent = lookup(b"x-b3-parentspanid")
    if parent is not None and not _B3_SPAN_ID.fullmatch(parent):
        parent = None  # optional, informational: a bad one is dropped, not the whole context
    sampled = _B3_SAMPLED.get(lookup(b"x-b3-sampled") or b"")
    if lookup(b"x-b3-flags") == b"1":  # debug: always sampled
        sampled = True
    return _b3_context(trace_id, span_id, sampled, parent)


def _b3_context(trace_id: bytes, span_id: bytes, sampled: bool | None,
                parent: bytes | None) -> SpanContext | None:
    trace_id = trace_id.rjust(32, b"0")
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN or parent == _ZERO_SPAN:
        return None
    return SpanContext(trace_id, span_id, sampled, parent)


# -- writing --------------------------------------------------------------------------------


def inject(ctx: SpanContext, propagation: Iterable[str]) -> list[tuple[bytes, bytes]]:
    """The headers that make `ctx` the parent of the next hop's span, in every configured
    format. `ctx.sampled` must be decided (see `decide_sampled`)."""
    headers = []
    for name in propagation:
        if name == "w3c":
            headers.append((b"traceparent", b"00-%s-%s-%s" % (ctx.trace_id, ctx.span_id,
                                                               b"01" if ctx.sampled else b"00")))
            if ctx.tracestate:
                headers.append((b"tracestate", ctx.tracestate))
        elif name == "b3":
            value = b"%s-%s-%s" % (ctx.trace_id, ctx.span_id, b"1" if ctx.sampled else b"0")
            if ctx.parent_span_id is not None:
                value += b"-" + ctx.parent_span_id
            headers.append((b"b3", value))
        elif name == "b3multi":
            headers += [(b"x-b3-traceid", ctx.trace_id), (b"x-b3-spanid", ctx.span_id),
                        (b"x-b3-sampled", b"1" if ctx.sampled else b"0")]
            if ctx.parent_span_id is not None:
                headers.append((b"x-b3-parentspanid", ctx.parent_span_id))
    return headers


def validate_propagation(names: Iterable[str]) -> list[str]:
    """What is wrong with a `propagation` list; empty when nothing is."""
    names = list(names)
    errors = [f"unknown format {name!r}; formats: {', '.join(FORMATS)}"
              for name in names if name not in FORMATS]
    if len(set(names)) != len(names):
        errors.append("a format is listed twice")
    return errors
