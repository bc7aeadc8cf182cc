"""ChunkedDecoder: the data of a checked chunked body, however it is split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.http.dechunk import ChunkedDecoder

BODY = (b"5;ext=1\r\nhello\r\n"
        b"7 ;name=\"quoted;\"\r\n, world\r\n"
        b"1a\r\n" + b"x" * 26 + b"\r\n"
        b"0\r\nx-trailer: yes\r\nother: 1\r\n\r\n")
DATA = b"hello, world" + b"x" * 26


def test_whole_body_at_once():
    decoder = ChunkedDecoder()
    assert decoder.feed(BODY) == DATA
    assert decoder.done


@given(st.lists(st.integers(min_value=0, max_value=len(BODY)), max_size=8))
def test_any_split_gives_the_same_data(cuts):
    decoder = ChunkedDecoder()
    points = sorted(set(cuts))
    pieces = [BODY[a:b] for a, b in zip([0, *points], [*points, len(BODY)])]
    assert b"".join(decoder.feed(piece) for piece in pieces) == DATA
    assert decoder.done


def test_bytes_after_the_body_are_ignored():
    decoder = ChunkedDecoder()
    assert decoder.feed(b"0\r\n\r\nHTTP/1.1 200 OK\r\n") == b""
    assert decoder.done
