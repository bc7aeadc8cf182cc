# cython: language_level=3
"""The server side of one HTTP/2 connection (RFC 9113), sans-IO, at C speed.

`H2Conn.receive(data, now)` takes the client's bytes and returns what happened as event
tuples; whatever must go back (SETTINGS and PING acknowledgements, WINDOW_UPDATE, RST_STREAM,
GOAWAY, and the responses the driver sends) is appended to `out`, which the driver writes
as the socket takes it. The driver owns requests, routing and upstreams; this owns frames,
HPACK (`proxy._core.hpack`), stream states and flow control in both directions, and the
flood watch of a hardened proxy (Envoy's protections as the reference): header block size
and CONTINUATION count, SETTINGS, PING, PRIORITY, WINDOW_UPDATE and empty-frame floods,
and rapid reset (a client that resets most of the streams it opens).

Events, as tuples whose first item is the kind:
    (EV_REQUEST, stream id, [(name, value), ...], end_stream)   a new stream's header list
    (EV_DATA, stream id, data, end_stream)                      request body bytes
    (EV_TRAILERS, stream id, [(name, value), ...], True)        the trailer section
    (EV_RESET, stream id, error code, by_peer)                  the stream ended abnormally
    (EV_WINDOW, stream id or 0 for every stream, 0, None)       send window opened
    (EV_GOAWAY, last stream id, error code, debug data)         the client stops
    (EV_SETTINGS_ACK, 0, 0, None)                               our SETTINGS are in force

A connection error queues a GOAWAY and sets `error` (the code and the reason); a flood also
sets `violation` (its name, for logs and metrics). Nothing more is parsed after either.

Stream errors reset the stream (RST_STREAM) and report it as EV_RESET with by_peer False.
Frames for streams that are already closed are dropped (their DATA still counts against,
and is given back to, the connection window), as a peer may send them before it sees our
RST_STREAM.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from proxy._core.hpack import Decoder, Encoder, HPACKError, HeaderListTooLarge

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags.
DEF DATA = 0
DEF HEADERS = 1
DEF PRIORITY = 2
DEF RST_STREAM = 3
DEF SETTINGS = 4
DEF PUSH_PROMISE = 5
DEF PING = 6
DEF GOAWAY = 7
DEF WINDOW_UPDATE = 8
DEF CONTINUATION = 9
DEF F_END_STREAM = 0x1
DEF F_ACK = 0x1
DEF F_END_HEADERS = 0x4
DEF F_PADDED = 0x8
DEF F_PRIORITY = 0x20

# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

# Event kinds.
EV_REQUEST = 1
EV_DATA = 2
EV_TRAILERS = 3
EV_RESET = 4
EV_WINDOW = 5
EV_GOAWAY = 6
EV_SETTINGS_ACK = 7

# Stream states, as the server sees them (idle streams are not kept).
OPEN = 1
HALF_CLOSED_REMOTE = 2  # the client sent END_STREAM; we may still send
HALF_CLOSED_LOCAL = 3  # we sent END_STREAM; the client's body may still come
CLOSED = 0

DEF MAX_WINDOW = 0x7FFFFFFF
DEF DEFAULT_FRAME = 16384
DEF GOAWAY_DEBUG_KEEP = 1024


class StreamClosed(Exception):
    """The stream can no longer be sent on (it was reset, or its response ended)."""


cdef class _Stream:
    cdef int state
    cdef long long send_window  # what we may still send
    cdef long long recv_window  # what the client may still send
    cdef long long unacked  # body bytes consumed whose stream window we have not yet reopened

    def __cinit__(self, int state, long long send_window, long long recv_window):
        self.state = state
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0


cdef class H2Conn:
    """One server-side HTTP/2 connection's protocol state. `limits` is an `H2Limits`."""

    cdef readonly bytearray out
    cdef readonly object error  # (code, reason) once a connection error happened
    cdef readonly str violation  # the flood a client was cut off for
    cdef readonly bint settings_acked
    cdef readonly int highest  # the highest stream id the client opened
    cdef readonly double block_started  # when the unfinished header block began
    cdef object decoder
    cdef object encoder
    cdef dict streams
    cdef bytes pending  # a frame cut off by the end of the last receive
    cdef int skip  # preface bytes still to skip
    cdef long long peer_initial_window
    cdef int peer_max_frame
    cdef long long conn_send_window
    cdef long long conn_recv_window
    cdef long long conn_unacked
    cdef long long stream_window  # our SETTINGS_INITIAL_WINDOW_SIZE
    cdef long long conn_window  # what we keep the connection window at
    cdef int local_max_frame
    # The header block being received.
    cdef int block_sid
    cdef bint block_end_stream
    cdef bytearray block
    cdef int block_frames
    # The flood watch.
    cdef object limits
    cdef int max_header_block, max_continuations, max_settings, max_pings, max_priority
    cdef int max_window_updates, max_empty_frames, reset_min_streams
    cdef double flood_window, reset_window, reset_ratio
    cdef double window_start, reset_start
    cdef int n_settings, n_pings, n_priority, n_window_updates, n_empty
    cdef double now  # the time of the receive() in progress
    cdef readonly int opened  # streams opened in the current reset window
    cdef readonly int resets  # ... and reset early (by the client, or by us because of it)

    def __init__(self, limits, int preface=24):
        self.out = bytearray()
        self.error = None
        self.violation = None
        self.settings_acked = False
        self.highest = 0
        self.block_started = 0.0
        self.limits = limits
        self.stream_window = limits.stream_window
        self.conn_window = limits.connection_window
        self.decoder = Decoder(4096, limits.max_header_list_size,
                               max(limits.max_header_list_size // 32, 1))
        self.encoder = Encoder(4096)
        self.streams = {}
        self.pending = b""
        self.skip = preface
        self.peer_initial_window = 65535
        self.peer_max_frame = DEFAULT_FRAME
        self.conn_send_window = 65535
        self.conn_recv_window = 65535
        self.conn_unacked = 0
        self.local_max_frame = DEFAULT_FRAME
        self.block_sid = 0
        self.block = bytearray()
        self.max_header_block = limits.max_header_block
        self.max_continuations = limits.max_continuations
        self.max_settings = limits.max_settings
        self.max_pings = limits.max_pings
        self.max_priority = limits.max_priority
        self.max_window_updates = limits.max_window_updates
        self.max_empty_frames = limits.max_empty_frames
        self.reset_min_streams = limits.reset_min_streams
        self.flood_window = limits.flood_window
        self.reset_window = limits.reset_window
        self.reset_ratio = limits.reset_ratio
        self.window_start = -1e18
        self.reset_start = -1e18

    # -- what the driver asks -----------------------------------------------------------
    def initiate(self):
        """Our SETTINGS (the connection preface) and the connection window's first raise."""
        cdef char* p = self._grow(9 + 18)
        _header(p, 18, SETTINGS, 0, 0)
        _setting(p + 9, 3, self.limits.max_concurrent_streams)
        _setting(p + 15, 4, <unsigned int>self.stream_window)
        _setting(p + 21, 6, self.limits.max_header_list_size)
        if self.conn_window > 65535:
            self._window_update(0, self.conn_window - 65535)
            self.conn_recv_window = self.conn_window

    @property
    def in_header_block(self):
        return self.block_sid != 0

    @property
    def open_streams(self):
        """Streams the client has open as the protocol sees them."""
        return len(self.streams)

    def stream_state(self, int sid):
        cdef _Stream s = self.streams.get(sid)
        return CLOSED if s is None else s.state

    def send_window(self, int sid):
        """How many body bytes may go out on `sid` now (0 once it is closed)."""
        cdef _Stream s = self.streams.get(sid)
        if s is None or s.state == HALF_CLOSED_LOCAL:
            return 0
        return max(0, min(s.send_window, self.conn_send_window))

    cpdef send_headers(self, int sid, list headers, bint end_stream):
        """Encode and queue a header block (a response head, or trailers with end_stream)."""
        cdef _Stream s = self.streams.get(sid)
        if s is None or s.state == HALF_CLOSED_LOCAL:
            raise StreamClosed(f"stream {sid} is closed")
        cdef bytes block = self.encoder.encode(headers)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(block), pos = 0, part
        cdef const char* src = PyBytes_AS_STRING(block)
        cdef int kind = HEADERS
        cdef int flags
        cdef char* p
        while True:
            part = min(size - pos, <Py_ssize_t>self.peer_max_frame)
            flags = F_END_HEADERS if pos + part == size else 0
            if kind == HEADERS and end_stream:
                flags |= F_END_STREAM
            p = self._grow(9 + part)
            _header(p, <int>part, kind, flags, sid)
            memcpy(p + 9, src + pos, part)
            pos += part
            if pos == size:
                break
            kind = CONTINUATION
        if end_stream:
            self._local_end(sid, s)

    cpdef Py_ssize_t send_data(self, int sid, object data, bint end_stream) except -1:
        """Queue as much of `data` as the windows allow; returns how much went. END_STREAM
        goes with the last byte (or alone, for empty `data`) once all of it went."""
        cdef _Stream s = self.streams.get(sid)
        if s is None or s.state == HALF_CLOSED_LOCAL:
            raise StreamClosed(f"stream {sid} is closed")
        cdef const unsigned char[:] view = data
        cdef Py_ssize_t size = view.shape[0], pos = 0, part, room
        cdef char* p
        room = min(s.send_window, self.conn_send_window)
        if room < 0:
            room = 0
        if size == 0:
            if end_stream:
                p = self._grow(9)
                _header(p, 0, DATA, F_END_STREAM, sid)
                self._local_end(sid, s)
            return 0
        while pos < size and room > 0:
            part = min(min(size - pos, room), <Py_ssize_t>self.peer_max_frame)
            pos += part
            room -= part
            p = self._grow(9 + part)
            _header(p, <int>part, DATA, F_END_STREAM if (end_stream and pos == size) else 0, sid)
            memcpy(p + 9, &view[pos - part], part)
        s.send_window -= pos
        self.conn_send_window -= pos
        if end_stream and pos == size:
            self._local_end(sid, s)
        return pos

    def reset(self, int sid, int code):
        """RST_STREAM, if the stream is still open."""
        if self.streams.pop(sid, None) is not None:
            self._rst(sid, code)

    def ack(self, int sid, long long n):
        """`n` body bytes of `sid` were consumed: the client may send as many more (the
        window updates go out once half a window is due, to keep them few)."""
        cdef _Stream s = self.streams.get(sid)
        if n <= 0:
            return
        if s is not None and s.state != HALF_CLOSED_REMOTE:
            s.unacked += n
            if s.unacked >= self.stream_window // 2:
                s.recv_window += s.unacked
                self._window_update(sid, s.unacked)
                s.unacked = 0
        self._give_back_connection(n)

    def goaway(self, int last_sid, int code, bytes debug=b""):
        cdef Py_ssize_t size = len(debug)
        cdef char* p = self._grow(9 + 8 + size)
        _header(p, <int>(8 + size), GOAWAY, 0, 0)
        _u32(p + 9, last_sid)
        _u32(p + 13, code)
        if size:
            memcpy(p + 17, PyBytes_AS_STRING(debug), size)

    def note_reset(self, double now):
        """The proxy reset a stream because of the client (a malformed request, one over
        the limit): counts toward rapid reset like a reset of the client's own."""
        self._count_reset(now)

    # -- what the client sends ----------------------------------------------------------
    def receive(self, bytes data, double now):
        """Take the client's bytes; returns the events they made (see the module doc)."""
        cdef list events = []
        if self.error is not None:
            return events
        if self.pending:
            data = self.pending + data
            self.pending = b""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), pos = 0, length
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef int kind, flags, sid
        self.now = now
        if self.skip:
            pos = min(<Py_ssize_t>self.skip, n)
            self.skip -= pos
        if now - self.window_start >= self.flood_window:
            self.window_start = now
            self.n_settings = self.n_pings = self.n_priority = self.n_window_updates = 0
        while n - pos >= 9:
            length = (p[pos] << 16) | (p[pos + 1] << 8) | p[pos + 2]
            kind = p[pos + 3]
            flags = p[pos + 4]
            sid = ((p[pos + 5] & 0x7F) << 24) | (p[pos + 6] << 16) | (p[pos + 7] << 8) | p[pos + 8]
            if length > self.local_max_frame:
                self._fail(FRAME_SIZE_ERROR, "frame larger than SETTINGS_MAX_FRAME_SIZE")
                break
            if n - pos - 9 < length:
                break
            if self.block_sid and (kind != CONTINUATION or sid != self.block_sid):
                self._fail(PROTOCOL_ERROR, "header block interrupted")
                break
            self._frame(events, kind, flags, sid, p + pos + 9, <int>length, data, pos + 9, now)
            pos += 9 + length
            if self.error is not None:
                break
        if self.error is None and pos < n:
            self.pending = data[pos:]
        return events

    cdef int _frame(self, list events, int kind, int flags, int sid, const unsigned char* p, int length,
                    bytes data, Py_ssize_t offset, double now) except -1:
        cdef char* q
        if kind == DATA:
            self._data(events, flags, sid, p, length, data, offset)
        elif kind == HEADERS:
            self._headers(events, flags, sid, p, length, now)
        elif kind == CONTINUATION:
            if not self.block_sid:
                return self._fail(PROTOCOL_ERROR, "CONTINUATION without a header block")
            self.block_frames += 1
            if self.block_frames > self.max_continuations:
                return self._flood("continuation_flood")
            if length == 0 and not flags & F_END_HEADERS:
                self._empty(True)
                if self.error is not None:
                    return 0
            self._block_add(p, length)
            if self.error is None and flags & F_END_HEADERS:
                self._end_block(events, now)
        elif kind == SETTINGS:
            self._settings(events, flags, sid, p, length)
        elif kind == WINDOW_UPDATE:
            self._window(events, sid, p, length)
        elif kind == RST_STREAM:
            if sid == 0:
                return self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if length != 4:
                return self._fail(FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
            if sid > self.highest or not sid & 1:
                return self._fail(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            self._count_reset(now)
            if self.streams.pop(sid, None) is not None:
                events.append((EV_RESET, sid, _u32_at(p), True))
        elif kind == PING:
            if sid != 0:
                return self._fail(PROTOCOL_ERROR, "PING on a stream")
            if length != 8:
                return self._fail(FRAME_SIZE_ERROR, "PING of the wrong size")
            if not flags & F_ACK:
                self.n_pings += 1
                if self.n_pings > self.max_pings:
                    return self._flood("ping_flood")
                q = self._grow(17)
                _header(q, 8, PING, F_ACK, 0)
                memcpy(q + 9, p, 8)
        elif kind == PRIORITY:
            if sid == 0:
                return self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if length != 5:
                return self._fail(FRAME_SIZE_ERROR, "PRIORITY of the wrong size")
            self.n_priority += 1
            if self.n_priority > self.max_priority:
                return self._flood("priority_flood")
        elif kind == GOAWAY:
            if sid != 0:
                return self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
            if length < 8:
                return self._fail(FRAME_SIZE_ERROR, "GOAWAY too short")
            events.append((EV_GOAWAY, _u32_at(p) & 0x7FFFFFFF, _u32_at(p + 4),
                           data[offset + 8:offset + min(length, 8 + GOAWAY_DEBUG_KEEP)]))
        elif kind == PUSH_PROMISE:
            return self._fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # Other frame types are ignored (RFC 9113 §4.1).
        return 0

    cdef int _data(self, list events, int flags, int sid, const unsigned char* p, int length,
                   bytes data, Py_ssize_t offset) except -1:
        cdef int pad = 0, start = 0
        cdef bint end = flags & F_END_STREAM
        if sid == 0:
            return self._fail(PROTOCOL_ERROR, "DATA on stream 0")
        if flags & F_PADDED:
            if length < 1 or p[0] >= length:
                return self._fail(PROTOCOL_ERROR, "DATA padding too long")
            pad = p[0] + 1
            start = 1
        self.conn_recv_window -= length
        if self.conn_recv_window < 0:
            return self._fail(FLOW_CONTROL_ERROR, "DATA past the connection window")
        cdef _Stream s = self.streams.get(sid)
        if s is None:
            if sid > self.highest or not sid & 1:
                return self._fail(PROTOCOL_ERROR, "DATA on an idle stream")
            self._give_back_connection(length)  # a closed stream: dropped
            return 0
        if s.state == HALF_CLOSED_REMOTE:
            self._give_back_connection(length)
            self._stream_error(events, sid, s, STREAM_CLOSED)
            return 0
        s.recv_window -= length
        if s.recv_window < 0:
            self._give_back_connection(length)
            self._stream_error(events, sid, s, FLOW_CONTROL_ERROR)
            return 0
        if pad:
            # Padding is nobody's to read: its window opens at once.
            s.unacked += pad
            self._give_back_connection(pad)
        self._empty(length == 0 and not end)
        if self.error is not None:
            return 0
        if end:
            self._remote_end(sid, s)
        events.append((EV_DATA, sid, data[offset + start:offset + length - (pad - start)] if length else b"", end))
        return 0

    cdef int _headers(self, list events, int flags, int sid, const unsigned char* p, int length,
                      double now) except -1:
        cdef int start = 0, pad = 0
        if sid == 0 or not sid & 1:
            return self._fail(PROTOCOL_ERROR, "HEADERS on stream 0 or an even stream")
        if flags & F_PADDED:
            if length < 1:
                return self._fail(PROTOCOL_ERROR, "HEADERS padding too long")
            pad = p[0]
            start = 1
        if flags & F_PRIORITY:
            if length < start + 5:
                return self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if (_u32_at(p + start) & 0x7FFFFFFF) == <unsigned int>sid:
                return self._fail(PROTOCOL_ERROR, "stream depends on itself")
            start += 5
        if start + pad > length:
            return self._fail(PROTOCOL_ERROR, "HEADERS padding too long")
        if sid > self.highest:
            self._count_open(now)
        self.block_sid = sid
        self.block_end_stream = flags & F_END_STREAM
        self.block_frames = 0
        self.block_started = now
        del self.block[:]
        self._empty(length - start - pad == 0 and not flags & (F_END_STREAM | F_END_HEADERS))
        if self.error is not None:
            return 0
        self._block_add(p + start, length - start - pad)
        if self.error is None and flags & F_END_HEADERS:
            self._end_block(events, now)
        return 0

    cdef int _block_add(self, const unsigned char* p, int length) except -1:
        cdef Py_ssize_t old = PyByteArray_GET_SIZE(self.block)
        if old + length > self.max_header_block:
            return self._flood("header_block_too_large")
        PyByteArray_Resize(self.block, old + length)
        memcpy(PyByteArray_AS_STRING(self.block) + old, p, length)
        return 0

    cdef int _end_block(self, list events, double now) except -1:
        cdef int sid = self.block_sid
        cdef bint end = self.block_end_stream
        self.block_sid = 0
        try:
            headers = self.decoder.decode(bytes(self.block))
        except HeaderListTooLarge as exc:
            return self._fail(ENHANCE_YOUR_CALM, f"header list too large: {exc}")
        except HPACKError as exc:
            return self._fail(COMPRESSION_ERROR, f"HPACK: {exc}")
        cdef _Stream s = self.streams.get(sid)
        if s is None:
            if sid <= self.highest:
                return 0  # trailers of a stream already closed: dropped
            self.highest = sid
            s = _Stream(HALF_CLOSED_REMOTE if end else OPEN, self.peer_initial_window, self.stream_window)
            self.streams[sid] = s
            events.append((EV_REQUEST, sid, headers, end))
            return 0
        if s.state == HALF_CLOSED_REMOTE:
            self._stream_error(events, sid, s, STREAM_CLOSED)
            return 0
        if not end:
            self._stream_error(events, sid, s, PROTOCOL_ERROR)  # trailers must end the stream
            return 0
        self._remote_end(sid, s)
        events.append((EV_TRAILERS, sid, headers, True))
        return 0

    cdef int _settings(self, list events, int flags, int sid, const unsigned char* p, int length) except -1:
        cdef int i, ident
        cdef unsigned int value
        cdef long long delta, window = -1
        if sid != 0:
            return self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & F_ACK:
            if length:
                return self._fail(FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload")
            self.settings_acked = True
            events.append((EV_SETTINGS_ACK, 0, 0, None))
            return 0
        if length % 6:
            return self._fail(FRAME_SIZE_ERROR, "SETTINGS of a wrong size")
        self.n_settings += 1
        if self.n_settings > self.max_settings:
            return self._flood("settings_flood")
        for i in range(0, length, 6):
            ident = (p[i] << 8) | p[i + 1]
            value = _u32_at(p + i + 2)
            if ident == 1:
                self.encoder.set_max_table_size(min(value, 65536))  # ours stays at most 4096 anyway
            elif ident == 2:
                if value > 1:
                    return self._fail(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH not 0 or 1")
            elif ident == 4:
                if value > MAX_WINDOW:
                    return self._fail(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                window = value  # the last one in the frame holds: applied once, below
            elif ident == 5:
                if value < DEFAULT_FRAME or value > 0xFFFFFF:
                    return self._fail(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
        if window >= 0:
            delta = window - self.peer_initial_window
            self.peer_initial_window = window
            if delta:
                for s in self.streams.values():
                    (<_Stream>s).send_window += delta
                    if (<_Stream>s).send_window > MAX_WINDOW:
                        return self._fail(FLOW_CONTROL_ERROR, "a stream window past 2^31-1")
                events.append((EV_WINDOW, 0, 0, None))
        q = self._grow(9)
        _header(q, 0, SETTINGS, F_ACK, 0)
        return 0

    cdef int _window(self, list events, int sid, const unsigned char* p, int length) except -1:
        if length != 4:
            return self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        self.n_window_updates += 1
        if self.n_window_updates > self.max_window_updates:
            return self._flood("window_update_flood")
        cdef long long inc = _u32_at(p) & 0x7FFFFFFF
        cdef _Stream s
        if sid == 0:
            if inc == 0:
                return self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.conn_send_window += inc
            if self.conn_send_window > MAX_WINDOW:
                return self._fail(FLOW_CONTROL_ERROR, "connection window past 2^31-1")
            events.append((EV_WINDOW, 0, 0, None))
            return 0
        s = self.streams.get(sid)
        if s is None:
            if sid > self.highest:
                return self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
            return 0
        if inc == 0:
            self._stream_error(events, sid, s, PROTOCOL_ERROR)
            return 0
        s.send_window += inc
        if s.send_window > MAX_WINDOW:
            self._stream_error(events, sid, s, FLOW_CONTROL_ERROR)
            return 0
        events.append((EV_WINDOW, sid, 0, None))
        return 0

    # -- states and flow control --------------------------------------------------------
    cdef void _remote_end(self, int sid, _Stream s):
        if s.state == HALF_CLOSED_LOCAL:
            del self.streams[sid]
        else:
            s.state = HALF_CLOSED_REMOTE

    cdef void _local_end(self, int sid, _Stream s):
        if s.state == HALF_CLOSED_REMOTE:
            del self.streams[sid]
        else:
            s.state = HALF_CLOSED_LOCAL

    cdef void _stream_error(self, list events, int sid, _Stream s, int code):
        # A reset the client caused counts like one it sent: otherwise a client could make
        # us reset its streams instead (MadeYouReset) and open them without limit.
        self._count_reset(self.now)
        if self.error is not None:
            return
        self.streams.pop(sid, None)
        self._rst(sid, code)
        events.append((EV_RESET, sid, code, False))

    cdef void _give_back_connection(self, long long n):
        if n <= 0:
            return
        self.conn_unacked += n
        if self.conn_unacked >= self.conn_window // 2:
            self.conn_recv_window += self.conn_unacked
            self._window_update(0, self.conn_unacked)
            self.conn_unacked = 0

    cdef void _window_update(self, int sid, long long n):
        cdef char* p = self._grow(13)
        _header(p, 4, WINDOW_UPDATE, 0, sid)
        _u32(p + 9, <unsigned int>n)

    cdef void _rst(self, int sid, int code):
        cdef char* p = self._grow(13)
        _header(p, 4, RST_STREAM, 0, sid)
        _u32(p + 9, code)

    # -- the flood watch ----------------------------------------------------------------
    cdef void _empty(self, bint empty):
        if not empty:
            self.n_empty = 0
            return
        self.n_empty += 1
        if self.n_empty > self.max_empty_frames:
            self._flood("empty_frame_flood")

    cdef void _count_open(self, double now):
        self._reset_window_roll(now)
        self.opened += 1

    cdef void _count_reset(self, double now):
        self._reset_window_roll(now)
        self.resets += 1
        if self.resets >= self.reset_min_streams and self.resets >= self.reset_ratio * self.opened:
            self._flood("rapid_reset")

    cdef void _reset_window_roll(self, double now):
        if now - self.reset_start >= self.reset_window:
            self.reset_start = now
            self.opened = self.resets = 0

    cdef int _flood(self, str name) except -1:
        if self.error is None:
            self.violation = name
            self._fail(ENHANCE_YOUR_CALM, name)
        return 0

    cdef int _fail(self, int code, str reason) except -1:
        """A connection error: GOAWAY, and nothing more is read."""
        if self.error is None:
            self.error = (code, reason)
            self.goaway(self.highest, code, reason.encode()[:128])
        return 0

    cdef char* _grow(self, Py_ssize_t n) except NULL:
        cdef Py_ssize_t old = PyByteArray_GET_SIZE(self.out)
        PyByteArray_Resize(self.out, old + n)
        return PyByteArray_AS_STRING(self.out) + old


cdef inline void _header(char* p, int length, int kind, int flags, int sid):
    p[0] = <char>(length >> 16)
    p[1] = <char>(length >> 8)
    p[2] = <char>length
    p[3] = <char>kind
    p[4] = <char>flags
    _u32(p + 5, sid & 0x7FFFFFFF)


cdef inline void _u32(char* p, unsigned int v):
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef inline void _setting(char* p, int ident, unsigned int value):
    p[0] = <char>(ident >> 8)
    p[1] = <char>ident
    _u32(p + 2, value)


cdef inline unsigned int _u32_at(const unsigned char* p):
    return (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | p[3]

