"""Chunk data out of a chunked body, for clients that cannot read the framing.

An HTTP/1.0 client does not understand `Transfer-Encoding: chunked`; it gets
the data alone, with the end of the body marked by closing the connection.
The input is a body whose framing `ChunkedScanner` already checked, so this
decoder only has to find the boundaries. Trailers have no HTTP/1.0 form and
are dropped. Pure: bytes in, bytes out.
"""

from __future__ import annotations

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    def __init__(self) -> None:
        self._state = _SIZE
        self._line = bytearray()  # a size or trailer line split across feeds
        self._left = 0  # bytes left in the current chunk's data, or of its CRLF

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        i, end = 0, len(data)
        while i < end and self._state != _DONE:
            if self._state == _DATA:
                take = min(self._left, end - i)
                out.append(data[i:i + take])
                i += take
                self._left -= take
                if not self._left:
                    self._state, self._left = _DATA_END, 2
            elif self._state == _DATA_END:
                skip = min(self._left, end - i)
                i += skip
                self._left -= skip
                if not self._left:
                    self._state = _SIZE
            else:
                newline = data.find(b"\n", i)
                if newline < 0:
                    self._line += data[i:]
                    break
                self._line += data[i:newline + 1]
                i = newline + 1
                line = bytes(self._line)
                self._line.clear()
                if self._state == _TRAILER:
                    if line == b"\r\n":
                        self._state = _DONE
                    continue
                size = int(line.split(b";", 1)[0].strip(b" \t\r\n"), 16)
                if size:
                    self._state, self._left = _DATA, size
                else:
                    self._state = _TRAILER
        return b"".join(out)
