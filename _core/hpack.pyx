# cython: language_level=3
"""HPACK (RFC 7541) header compression for HTTP/2, in C.

`Decoder.decode(block)` turns one complete header block (a HEADERS payload and
its CONTINUATIONs, joined) into a list of `(name, value)` bytes tuples;
`Encoder.encode(fields)` does the reverse. A connection has one of each, used
for every block in the order they travel: each dynamic table depends on all
the blocks before.

Decoder choices (everything refused raises `HPACKError`, a COMPRESSION_ERROR):

- Names and values come back exactly as sent (no lowercasing, no RFC 9113
  8.2.1 checks: those are the caller's). A never-indexed field comes back as
  a plain tuple; the flag is not reported.
- Dynamic table size updates: at most two, only before the first field, each
  at most `max_table_size` (our SETTINGS_HEADER_TABLE_SIZE, acknowledged).
- Integers: at most 4 continuation bytes and at most 2**28.
- Huffman: an EOS symbol, padding longer than 7 bits and padding that is not
  all ones (a prefix of EOS) are refused (RFC 7541 5.2).
- Limits (RFC 9113 sizes): once the fields decoded so far pass
  `max_headers` or `max_header_list_size` (sum of name + value + 32),
  `HeaderListTooLarge` is raised at once, without decoding the rest.

After any `HPACKError`, `HeaderListTooLarge` included, the decoder's table is
out of step with the peer's encoder and its state is undefined: the
connection must end (a 431 may still be answered on the stream first).

Encoder choices: a field in the static or dynamic table is sent as an index;
otherwise as a literal (name by index when one exists) with incremental
indexing, except `authorization`, `proxy-authorization`, `set-cookie` and
`cookie` values under 20 bytes (never indexed: RFC 7541 7.1), fields that
change with every message (`:path`, `content-length`, `date`, `etag`,
`last-modified`, `x-request-id`, `traceparent`, `age`) and values longer than
a quarter of the table (both without indexing). Strings are Huffman-coded
when that is shorter.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_CheckExact, PyTuple_GET_SIZE
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

__all__ = ["HPACKError", "HeaderListTooLarge", "Decoder", "Encoder", "STATIC_TABLE"]


class HPACKError(Exception):
    """The header block cannot be decoded: a COMPRESSION_ERROR (RFC 9113 4.3), the connection must end."""


class HeaderListTooLarge(HPACKError):
    """The decoded fields passed `max_headers` or `max_header_list_size`.

    The stream may be answered with 431, but the decoder is out of step with
    the peer (the rest of the block was not decoded): the connection must end.
    """


cdef enum:
    STATIC_ENTRIES = 61
    ENTRY_OVERHEAD = 32       # RFC 7541 4.1
    DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value
    MAX_INT_SHIFT = 21        # 4 continuation bytes of 7 bits
    MAX_INT = 1 << 28
    COOKIE_NEVER_INDEX_BELOW = 20  # short cookies are guessable from the compressed size

    # What the encoder does with a name that is not a full table match.
    KIND_INDEX = 0
    KIND_NEVER = 1      # never indexed
    KIND_COOKIE = 2     # never indexed when the value is short
    KIND_NO_INDEX = 3   # without indexing: the value changes with every message


STATIC_TABLE = (
    (b":authority", b""),  # 1
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),  # 8
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),  # 15
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),  # 21
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),  # 33
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),  # 44
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),  # 55
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),  # 61
)

cdef tuple _STATIC = STATIC_TABLE
# (name, value) -> index, and name -> (lowest index | kind << 8), for the encoder.
cdef dict _STATIC_PAIRS = {}
cdef dict _NAME_INFO = {}


cdef void _init_static_lookups() except *:
    cdef Py_ssize_t i
    for i in range(STATIC_ENTRIES - 1, -1, -1):  # backwards: the lowest index wins
        _STATIC_PAIRS[_STATIC[i]] = i + 1
        _NAME_INFO[_STATIC[i][0]] = i + 1
    for name in (b"authorization", b"proxy-authorization", b"set-cookie"):
        _NAME_INFO[name] = _NAME_INFO[name] | KIND_NEVER << 8
    _NAME_INFO[b"cookie"] = _NAME_INFO[b"cookie"] | KIND_COOKIE << 8
    for name in (b":path", b"content-length", b"date", b"etag", b"last-modified",
                 b"x-request-id", b"traceparent", b"age"):
        _NAME_INFO[name] = _NAME_INFO.get(name, 0) | KIND_NO_INDEX << 8


_init_static_lookups()


# ---------------------------------------------------------------------------
# Huffman code (RFC 7541 Appendix B), symbols 0-255 and EOS (256)

_HUFFMAN_CODES = (
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5, 0xfffffe6, 0xfffffe7,
    0xfffffe8, 0xffffea, 0x3ffffffc, 0xfffffe9, 0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec,
    0xfffffed, 0xfffffee, 0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3,
    0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9, 0xffffffa, 0xffffffb,
    0x14, 0x3f8, 0x3f9, 0xffa, 0x1ff9, 0x15, 0xf8, 0x7fa,
    0x3fa, 0x3fb, 0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b, 0x1c, 0x1d,
    0x1e, 0x1f, 0x5c, 0xfb, 0x7ffc, 0x20, 0xffb, 0x3fc,
    0x1ffa, 0x21, 0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62,
    0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a,
    0x6b, 0x6c, 0x6d, 0x6e, 0x6f, 0x70, 0x71, 0x72,
    0xfc, 0x73, 0xfd, 0x1ffb, 0x7fff0, 0x1ffc, 0x3ffc, 0x22,
    0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5, 0x25, 0x26,
    0x27, 0x6, 0x74, 0x75, 0x28, 0x29, 0x2a, 0x7,
    0x2b, 0x76, 0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78,
    0x79, 0x7a, 0x7b, 0x7ffe, 0x7fc, 0x3ffd, 0x1ffd, 0xffffffc,
    0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8, 0x3fffd3, 0x3fffd4, 0x3fffd5, 0x7fffd9,
    0x3fffd6, 0x7fffda, 0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb, 0x7fffdf,
    0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1, 0x7fffe2, 0x7fffe3,
    0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5, 0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef,
    0x3fffda, 0x1fffdd, 0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde,
    0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf, 0x7fffeb, 0x7fffec,
    0x1fffe0, 0x1fffe1, 0x3fffe0, 0x1fffe2, 0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef,
    0xfffea, 0x3fffe2, 0x3fffe3, 0x3fffe4, 0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1,
    0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7, 0x7ffff2, 0x3fffe8, 0x1ffffec,
    0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde, 0x7ffffdf, 0x3ffffe5, 0xfffff1, 0x1ffffed,
    0x7fff2, 0x1fffe3, 0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7, 0x7ffffe2, 0xfffff2,
    0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3, 0x7ffffe4, 0x7ffffe5,
    0xfffec, 0xfffff3, 0xfffed, 0x1fffe6, 0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3,
    0x3fffea, 0x3fffeb, 0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4,
    0x3ffffeb, 0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8, 0x7ffffe9, 0x7ffffea,
    0x7ffffeb, 0xffffffe, 0x7ffffec, 0x7ffffed, 0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee,
    0x3fffffff,
)

_HUFFMAN_LENGTHS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
)

# Decoding is a state machine over 4-bit nibbles (as nghttp2's): a state is an
# internal node of the code tree (256 of them for 257 leaves), the root being
# state 0. A code is at least 5 bits long, so one nibble completes at most one
# symbol.
cdef enum:
    HUFF_SYM = 1   # this step completed `sym`
    HUFF_FAIL = 2  # this step completed EOS

cdef struct HuffStep:
    unsigned char next
    unsigned char flags
    unsigned char sym

cdef HuffStep _HUFF_STEP[256][16]
cdef unsigned char _HUFF_END_OK[256]  # the bits since the last symbol are at most 7 ones
cdef unsigned char _HUFF_ONES[256]    # the bits since the last symbol are all ones
cdef unsigned int _HUFF_CODE[257]
cdef unsigned char _HUFF_BITS[257]


cdef void _init_huffman() except *:
    # child[node][bit]: > 0 an internal node, < 0 the leaf -(sym + 1), 0 not set
    # (the root is no one's child).
    cdef int child[256][2]
    cdef int nodes = 1, sym, bits, i, node, c, state, nibble, depth
    cdef unsigned int code
    cdef unsigned char flags, out
    for i in range(256):
        child[i][0] = 0
        child[i][1] = 0
    for sym in range(257):
        code = _HUFFMAN_CODES[sym]
        bits = _HUFFMAN_LENGTHS[sym]
        _HUFF_CODE[sym] = code
        _HUFF_BITS[sym] = bits
        node = 0
        for i in range(bits - 1, 0, -1):
            c = child[node][(code >> i) & 1]
            if c < 0:
                raise RuntimeError("Huffman table is not a prefix code")
            if c == 0:
                if nodes == 256:
                    raise RuntimeError("Huffman table has too many codes")
                c = nodes
                nodes += 1
                child[node][(code >> i) & 1] = c
            node = c
        if child[node][code & 1] != 0:
            raise RuntimeError("Huffman table is not a prefix code")
        child[node][code & 1] = -(sym + 1)
    if nodes != 256:
        raise RuntimeError("Huffman table is not complete")

    node = 0
    depth = 0
    while node >= 0:  # the all-ones path, down to EOS (30 ones)
        _HUFF_ONES[node] = 1
        _HUFF_END_OK[node] = depth <= 7
        node = child[node][1]
        depth += 1

    for state in range(256):
        for nibble in range(16):
            node = state
            flags = 0
            out = 0
            for i in range(3, -1, -1):
                c = child[node][(nibble >> i) & 1]
                if c == 0:
                    raise RuntimeError("Huffman table is not complete")
                if c == -257:
                    flags = HUFF_FAIL
                    node = 0
                    break
                if c < 0:
                    flags = HUFF_SYM
                    out = -c - 1
                    node = 0
                else:
                    node = c
            _HUFF_STEP[state][nibble].next = node
            _HUFF_STEP[state][nibble].flags = flags
            _HUFF_STEP[state][nibble].sym = out


_init_huffman()


cdef inline Py_ssize_t _huffman_length(const unsigned char* s, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i, bits = 0
    for i in range(n):
        bits += _HUFF_BITS[s[i]]
    return (bits + 7) >> 3


cdef inline Py_ssize_t _put_huffman(unsigned char* out, Py_ssize_t pos,
                                    const unsigned char* s, Py_ssize_t n) noexcept:
    # At most 7 + 30 bits are pending at once, so 64 bits never lose one.
    cdef unsigned long long acc = 0
    cdef int pending = 0
    cdef Py_ssize_t i
    cdef unsigned char sym
    for i in range(n):
        sym = s[i]
        acc = (acc << _HUFF_BITS[sym]) | _HUFF_CODE[sym]
        pending += _HUFF_BITS[sym]
        while pending >= 8:
            pending -= 8
            out[pos] = <unsigned char>(acc >> pending)
            pos += 1
    if pending:
        out[pos] = <unsigned char>((acc << (8 - pending)) | (0xff >> pending))
        pos += 1
    return pos


# ---------------------------------------------------------------------------
# Integers and strings (RFC 7541 5.1, 5.2)

cdef inline Py_ssize_t _read_int(const unsigned char* p, Py_ssize_t n, Py_ssize_t* pos,
                                 int prefix) except -1:
    cdef Py_ssize_t i = pos[0]
    cdef Py_ssize_t mask = (1 << prefix) - 1
    cdef Py_ssize_t value = p[i] & mask
    cdef int shift = 0
    cdef unsigned char b
    i += 1
    if value == mask:
        while True:
            if i >= n:
                raise HPACKError("truncated integer at the end of the header block")
            b = p[i]
            i += 1
            value += <Py_ssize_t>(b & 0x7f) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > MAX_INT_SHIFT:
                raise HPACKError("integer overflow: more than 4 continuation bytes")
        if value > MAX_INT:
            raise HPACKError(f"integer overflow: {value} is above 2**28")
    pos[0] = i
    return value


cdef inline Py_ssize_t _put_int(unsigned char* out, Py_ssize_t pos, unsigned char first,
                                int prefix, Py_ssize_t value) noexcept:
    cdef Py_ssize_t mask = (1 << prefix) - 1
    if value < mask:
        out[pos] = first | <unsigned char>value
        return pos + 1
    out[pos] = first | <unsigned char>mask
    pos += 1
    value -= mask
    while value >= 0x80:
        out[pos] = <unsigned char>(value & 0x7f) | 0x80
        value >>= 7
        pos += 1
    out[pos] = <unsigned char>value
    return pos + 1


cdef inline Py_ssize_t _put_string(unsigned char* out, Py_ssize_t pos, bytes s) noexcept:
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(s)
    cdef Py_ssize_t coded = _huffman_length(p, n)
    if coded < n:
        pos = _put_int(out, pos, 0x80, 7, coded)
        return _put_huffman(out, pos, p, n)
    pos = _put_int(out, pos, 0, 7, n)
    memcpy(out + pos, p, n)
    return pos + n


cdef inline Py_ssize_t _entry_size(tuple field) noexcept:
    return PyBytes_GET_SIZE(field[0]) + PyBytes_GET_SIZE(field[1]) + ENTRY_OVERHEAD


# ---------------------------------------------------------------------------
# The dynamic table (RFC 7541 2.3.2, 4)

cdef class _DynamicTable:
    """A ring of (name, value) tuples, newest at `head`, evicted oldest first.

    `inserted` counts every insertion ever: the entry inserted as number k is
    at HPACK index 62 + (inserted - 1 - k) while it is in the table.
    """
    cdef list entries
    cdef Py_ssize_t ring, head, count, size, max_size, inserted

    def __init__(self, Py_ssize_t max_size, Py_ssize_t ceiling):
        # An entry takes at least 32 bytes: a 4096-byte table never needs more
        # than 129 slots; a huge ceiling only costs memory if it is used.
        self.ring = min(ceiling // ENTRY_OVERHEAD + 1, 256)
        self.entries = [None] * self.ring
        self.head = 0
        self.count = 0
        self.size = 0
        self.max_size = max_size
        self.inserted = 0

    cdef inline tuple get(self, Py_ssize_t i):
        """The i-th newest entry (0 is the newest); 0 <= i < count."""
        i = self.head - i
        if i < 0:
            i += self.ring
        return self.entries[i]

    cdef tuple pop_oldest(self):
        cdef Py_ssize_t i = self.head - self.count + 1
        if i < 0:
            i += self.ring
        cdef tuple field = self.entries[i]
        self.entries[i] = None
        self.count -= 1
        self.size -= _entry_size(field)
        return field

    cdef inline void push(self, tuple field, Py_ssize_t size) except *:
        """Add the newest entry; the caller has made room for its `size`."""
        if self.count == self.ring:
            self._grow()
        self.head += 1
        if self.head == self.ring:
            self.head = 0
        self.entries[self.head] = field
        self.count += 1
        self.size += size
        self.inserted += 1

    cdef void _grow(self) except *:
        cdef list entries = [self.get(i) for i in range(self.count - 1, -1, -1)]  # oldest first
        self.ring *= 2
        entries.extend([None] * (self.ring - self.count))
        self.entries = entries
        self.head = self.count - 1


# ---------------------------------------------------------------------------
# Decoder

cdef class Decoder:
    """Decodes the header blocks a peer sends on one connection, in order.

    `max_table_size` is our SETTINGS_HEADER_TABLE_SIZE (the largest table the
    peer may choose), `max_header_list_size` the limit on the sum of
    len(name) + len(value) + 32 and `max_headers` on the number of fields.
    After any `HPACKError` the state is undefined: the connection must end.
    """
    cdef _DynamicTable _table
    cdef Py_ssize_t _max_table_size, _max_list_size, _max_headers
    cdef unsigned char* _buf  # Huffman output, reused
    cdef Py_ssize_t _buf_size

    def __cinit__(self, *args, **kwargs):
        self._buf_size = 256
        self._buf = <unsigned char*>malloc(self._buf_size)
        if self._buf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._buf)

    def __init__(self, int max_table_size=4096, int max_header_list_size=65536, int max_headers=100):
        if max_table_size < 0 or max_header_list_size < 0 or max_headers < 0:
            raise ValueError("Decoder limits must not be negative")
        self._max_table_size = max_table_size
        self._max_list_size = max_header_list_size
        self._max_headers = max_headers
        self._table = _DynamicTable(max_table_size, max_table_size)

    cpdef list decode(self, object block):
        """The fields of one complete header block (bytes, bytearray or memoryview)."""
        cdef Py_buffer view
        if PyBytes_CheckExact(block):
            return self._decode(<const unsigned char*>PyBytes_AS_STRING(block), PyBytes_GET_SIZE(block))
        PyObject_GetBuffer(block, &view, PyBUF_SIMPLE)
        try:
            return self._decode(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef list _decode(self, const unsigned char* p, Py_ssize_t n):
        cdef list fields = []
        cdef Py_ssize_t pos = 0, index, count = 0, list_size = 0, updates = 0
        cdef unsigned char b
        cdef tuple field
        cdef bytes name
        cdef _DynamicTable table = self._table
        while pos < n:
            b = p[pos]
            if b & 0x80:  # indexed field
                field = self._field(_read_int(p, n, &pos, 7))
            elif b & 0x40 or not b & 0x20:  # literal: with incremental indexing, or without / never
                index = _read_int(p, n, &pos, 6 if b & 0x40 else 4)
                if index:
                    name = self._field(index)[0]
                else:
                    name = self._read_string(p, n, &pos)
                field = (name, self._read_string(p, n, &pos))
                if b & 0x40:
                    self._insert(field)
            else:  # dynamic table size update
                if count:
                    raise HPACKError("dynamic table size update after a header field")
                if updates == 2:
                    raise HPACKError("more than two dynamic table size updates in one block")
                updates += 1
                index = _read_int(p, n, &pos, 5)
                if index > self._max_table_size:
                    raise HPACKError(
                        f"dynamic table size update to {index} is above the limit {self._max_table_size}")
                table.max_size = index
                while table.size > index:
                    table.pop_oldest()
                continue
            count += 1
            list_size += _entry_size(field)
            if count > self._max_headers:
                raise HeaderListTooLarge(f"more than {self._max_headers} header fields")
            if list_size > self._max_list_size:
                raise HeaderListTooLarge(f"header list larger than {self._max_list_size} bytes")
            fields.append(field)
        return fields

    cdef inline tuple _field(self, Py_ssize_t index):
        if index <= 0:
            raise HPACKError("index 0 is not a valid table index")
        if index <= STATIC_ENTRIES:
            return _STATIC[index - 1]
        if index - STATIC_ENTRIES > self._table.count:
            raise HPACKError(
                f"index {index} is past the tables "
                f"({STATIC_ENTRIES} static + {self._table.count} dynamic entries)")
        return self._table.get(index - STATIC_ENTRIES - 1)

    cdef void _insert(self, tuple field) except *:
        cdef _DynamicTable table = self._table
        cdef Py_ssize_t size = _entry_size(field)
        if size > table.max_size:  # too large: empties the table (RFC 7541 4.4)
            while table.count:
                table.pop_oldest()
            return
        while table.size + size > table.max_size:
            table.pop_oldest()
        table.push(field, size)

    cdef bytes _read_string(self, const unsigned char* p, Py_ssize_t n, Py_ssize_t* pos):
        if pos[0] >= n:
            raise HPACKError("truncated string: the header block ends before its length")
        cdef bint huffman = p[pos[0]] & 0x80
        cdef Py_ssize_t length = _read_int(p, n, pos, 7)
        cdef Py_ssize_t start = pos[0]
        if length > n - start:
            raise HPACKError(f"truncated string: {length} bytes announced, {n - start} left")
        pos[0] = start + length
        if huffman:
            return self._huffman_decode(p + start, length)
        return PyBytes_FromStringAndSize(<char*>(p + start), length)

    cdef bytes _huffman_decode(self, const unsigned char* p, Py_ssize_t n):
        # 5 bits at least per symbol; +1 for the unconditional store below.
        cdef Py_ssize_t need = n * 8 // 5 + 1, i, k = 0
        cdef unsigned char* grown
        if need > self._buf_size:
            grown = <unsigned char*>realloc(self._buf, need)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._buf_size = need
        cdef unsigned char* out = self._buf
        cdef unsigned char state = 0
        cdef const HuffStep* step
        for i in range(n):
            # Store always, keep only when a symbol completed: no branch to mispredict.
            step = &_HUFF_STEP[state][p[i] >> 4]
            out[k] = step.sym
            k += step.flags & HUFF_SYM
            if step.flags & HUFF_FAIL:
                raise HPACKError("Huffman-coded string contains the EOS symbol")
            state = step.next
            step = &_HUFF_STEP[state][p[i] & 15]
            out[k] = step.sym
            k += step.flags & HUFF_SYM
            if step.flags & HUFF_FAIL:
                raise HPACKError("Huffman-coded string contains the EOS symbol")
            state = step.next
        if not _HUFF_END_OK[state]:
            if _HUFF_ONES[state]:
                raise HPACKError("Huffman padding longer than 7 bits")
            raise HPACKError("Huffman padding is not all ones (not a prefix of EOS)")
        return PyBytes_FromStringAndSize(<char*>out, k)


# ---------------------------------------------------------------------------
# Encoder

cdef list _checked_fields(list headers):
    """`headers` as (name, value) tuples of bytes, or TypeError."""
    cdef list fields = []
    for item in headers:
        field = tuple(item)
        if PyTuple_GET_SIZE(field) != 2:
            raise TypeError("a header field is a (name, value) pair")
        name, value = field
        if not (PyBytes_Check(name) and PyBytes_Check(value)):
            raise TypeError("header names and values must be bytes")
        fields.append((bytes(name), bytes(value)))
    return fields


cdef class Encoder:
    """Encodes the header blocks we send on one connection, in order.

    `max_table_size` caps the dynamic table whatever the peer allows; the
    table starts at min(max_table_size, 4096), the peer's initial setting.
    """
    cdef _DynamicTable _table
    cdef Py_ssize_t _ceiling
    cdef dict _pairs  # (name, value) -> insertion number of its newest entry
    cdef dict _names  # name -> insertion number of the newest entry with it
    cdef bint _resized
    cdef Py_ssize_t _smallest  # the smallest size since the last block, when resized
    cdef unsigned char* _out  # the block being written, reused
    cdef Py_ssize_t _out_size

    def __cinit__(self, *args, **kwargs):
        self._out_size = 1024
        self._out = <unsigned char*>malloc(self._out_size)
        if self._out == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._out)

    def __init__(self, int max_table_size=4096):
        if max_table_size < 0:
            raise ValueError("max_table_size must not be negative")
        cdef Py_ssize_t size = min(max_table_size, DEFAULT_TABLE_SIZE)
        self._ceiling = max_table_size
        self._table = _DynamicTable(size, max_table_size)
        self._pairs = {}
        self._names = {}
        # The peer's decoder starts at 4096: a smaller table must be announced.
        self._resized = size != DEFAULT_TABLE_SIZE
        self._smallest = size

    def set_max_table_size(self, int n):
        """The peer's SETTINGS_HEADER_TABLE_SIZE is now `n`: use min(n, max_table_size).

        A change is announced at the start of the next block (RFC 7541 4.2),
        preceded by the smallest size used since the last block if lower.
        """
        if n < 0:
            raise ValueError("table size must not be negative")
        cdef Py_ssize_t size = min(n, self._ceiling)
        if size == self._table.max_size:
            return
        if not self._resized or size < self._smallest:
            self._smallest = size
        self._resized = True
        self._table.max_size = size
        while self._table.size > size:
            self._evict()

    cpdef bytes encode(self, list headers):
        """One header block for `headers`, [(name, value), ...] of bytes, names lowercase."""
        cdef Py_ssize_t pos = 0, nlen, vlen, index, info, size
        cdef bytes name, value
        cdef tuple field
        cdef PyObject* found
        cdef unsigned char first
        cdef int prefix
        cdef _DynamicTable table = self._table
        for item in headers:  # refuse bad input before the table changes
            if not (PyTuple_CheckExact(item) and PyTuple_GET_SIZE(item) == 2
                    and PyBytes_CheckExact((<tuple>item)[0]) and PyBytes_CheckExact((<tuple>item)[1])):
                headers = _checked_fields(headers)
                break
        if self._resized:
            self._reserve(16)
            if self._smallest < table.max_size:
                pos = _put_int(self._out, pos, 0x20, 5, self._smallest)
            pos = _put_int(self._out, pos, 0x20, 5, table.max_size)
            self._resized = False
        for item in headers:
            field = <tuple>item
            name = field[0]
            value = field[1]
            nlen = PyBytes_GET_SIZE(name)
            vlen = PyBytes_GET_SIZE(value)
            # Two integers of at most 5 + 1 bytes, one more for the representation.
            self._reserve(pos + nlen + vlen + 16)

            found = PyDict_GetItem(_STATIC_PAIRS, field)
            if found != NULL:
                pos = _put_int(self._out, pos, 0x80, 7, <Py_ssize_t><object>found)
                continue
            found = PyDict_GetItem(self._pairs, field)
            if found != NULL:
                index = STATIC_ENTRIES + table.inserted - <Py_ssize_t><object>found
                pos = _put_int(self._out, pos, 0x80, 7, index)
                continue

            found = PyDict_GetItem(_NAME_INFO, name)
            info = <Py_ssize_t><object>found if found != NULL else 0
            index = info & 0xff
            if not index:
                found = PyDict_GetItem(self._names, name)
                if found != NULL:
                    index = STATIC_ENTRIES + table.inserted - <Py_ssize_t><object>found
            info >>= 8
            size = nlen + vlen + ENTRY_OVERHEAD
            if info == KIND_NEVER or (info == KIND_COOKIE and vlen < COOKIE_NEVER_INDEX_BELOW):
                first = 0x10
                prefix = 4
            elif info == KIND_NO_INDEX or vlen * 4 > table.max_size or size > table.max_size:
                first = 0x00
                prefix = 4
            else:
                first = 0x40
                prefix = 6
            if index:
                pos = _put_int(self._out, pos, first, prefix, index)
            else:
                self._out[pos] = first
                pos = _put_string(self._out, pos + 1, name)
            pos = _put_string(self._out, pos, value)
            if first == 0x40:
                while table.size + size > table.max_size:
                    self._evict()
                self._pairs[field] = table.inserted
                self._names[name] = table.inserted
                table.push(field, size)
        return PyBytes_FromStringAndSize(<char*>self._out, pos)

    cdef void _evict(self) except *:
        """Drop the oldest entry, and its lookups unless a newer copy owns them."""
        cdef Py_ssize_t number = self._table.inserted - self._table.count
        cdef tuple field = self._table.pop_oldest()
        if self._pairs.get(field) == number:
            del self._pairs[field]
        if self._names.get(field[0]) == number:
            del self._names[field[0]]

    cdef inline void _reserve(self, Py_ssize_t size) except *:
        if size <= self._out_size:
            return
        size = max(size, 2 * self._out_size)
        cdef unsigned char* grown = <unsigned char*>realloc(self._out, size)
        if grown == NULL:
            raise MemoryError()
        self._out = grown
        self._out_size = size
