"""proxy._core.hpack: RFC 7541 Appendix C, round trips against the pure-Python `hpack`
package (a reference only), the encoder's indexing policy, and every refusal."""

from __future__ import annotations

import random

import hpack
import pytest
from proxy._core.hpack import (
    STATIC_TABLE,
    Decoder,
    Encoder,
    HeaderListTooLarge,
    HPACKError,
)

Fields = list[tuple[bytes, bytes]]


def integer(value: int, prefix: int, first: int = 0) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with `first`'s flag bits above the prefix."""
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes([first | value])
    out = [first | mask]
    value -= mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def reference_decoder(max_table_size: int = 4096) -> hpack.Decoder:
    decoder = hpack.Decoder(max_header_list_size=1 << 30)
    decoder.max_allowed_table_size = max_table_size
    return decoder


def plain(fields) -> Fields:
    return [(bytes(name), bytes(value)) for name, value in fields]


# -- RFC 7541 Appendix C -------------------------------------------------------------------

REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com"),
     (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]
C3 = [  # requests without Huffman coding
    "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
    "8286 84be 5808 6e6f 2d63 6163 6865",
    "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
]
C4 = [  # the same requests, Huffman-coded
    "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
    "8286 84be 5886 a8eb 1064 9cbf",
    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
]
# The table after the third request: custom-key, cache-control, :authority (164 bytes).
REQUEST_TABLE = [(b"custom-key", b"custom-value"), (b"cache-control", b"no-cache"),
                 (b":authority", b"www.example.com")]

RESPONSES = [
    [(b":status", b"302"), (b"cache-control", b"private"), (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
     (b"location", b"https://www.example.com")],
    [(b":status", b"307"), (b"cache-control", b"private"), (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
     (b"location", b"https://www.example.com")],
    [(b":status", b"200"), (b"cache-control", b"private"), (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
     (b"location", b"https://www.example.com"), (b"content-encoding", b"gzip"),
     (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")],
]
C5 = [  # responses without Huffman coding, table size 256: entries get evicted
    ("4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a"
     " 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
    "4803 3330 37c1 c0bf",
    ("88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04"
     " 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49"
     " 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e 3d31"),
]
C6 = [  # the same responses, Huffman-coded
    ("4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e"
     " 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3"),
    "4883 640e ffc1 c0bf",
    ("88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7"
     " 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed"
     " 4ee5 b106 3d50 07"),
]
# The table after the third response: set-cookie, content-encoding, date (215 bytes).
RESPONSE_TABLE = [RESPONSES[2][5], RESPONSES[2][4], RESPONSES[2][2]]


def test_static_table_is_rfc_7541_appendix_a():
    assert len(STATIC_TABLE) == 61
    assert STATIC_TABLE[0] == (b":authority", b"")
    assert STATIC_TABLE[7] == (b":status", b"200")
    assert STATIC_TABLE[60] == (b"www-authenticate", b"")
    assert list(STATIC_TABLE) == list(hpack.Decoder().header_table.STATIC_TABLE)


@pytest.mark.parametrize(("block", "fields"), [
    # C.2.1: literal with incremental indexing
    ("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572", [(b"custom-key", b"custom-header")]),
    # C.2.2: literal without indexing
    ("040c 2f73 616d 706c 652f 7061 7468", [(b":path", b"/sample/path")]),
    # C.2.3: literal never indexed
    ("1008 7061 7373 776f 7264 0673 6563 7265 74", [(b"password", b"secret")]),
    # C.2.4: indexed
    ("82", [(b":method", b"GET")]),
], ids=["C.2.1", "C.2.2", "C.2.3", "C.2.4"])
def test_c2_single_fields(block, fields):
    decoder = Decoder()
    assert decoder.decode(bytes.fromhex(block)) == fields


def test_c2_1_indexes_the_field_and_c2_2_c2_3_do_not():
    decoder = Decoder()
    decoder.decode(bytes.fromhex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"))
    decoder.decode(bytes.fromhex("040c 2f73 616d 706c 652f 7061 7468"))
    decoder.decode(bytes.fromhex("1008 7061 7373 776f 7264 0673 6563 7265 74"))
    assert decoder.decode(b"\xbe") == [(b"custom-key", b"custom-header")]
    with pytest.raises(HPACKError, match="index 63 is past the tables"):
        decoder.decode(b"\xbf")


@pytest.mark.parametrize("blocks", [C3, C4], ids=["C.3", "C.4"])
def test_requests_on_one_decoder(blocks):
    decoder = Decoder()
    for block, fields in zip(blocks, REQUESTS, strict=True):
        assert decoder.decode(bytes.fromhex(block)) == fields
    # The dynamic table is [62] custom-key, [63] cache-control, [64] :authority.
    assert decoder.decode(b"\xbe\xbf\xc0") == REQUEST_TABLE
    with pytest.raises(HPACKError, match="past the tables"):
        decoder.decode(b"\xc1")


@pytest.mark.parametrize("blocks", [C5, C6], ids=["C.5", "C.6"])
def test_responses_with_eviction_at_256(blocks):
    decoder = Decoder(max_table_size=256)
    for block, fields in zip(blocks, RESPONSES, strict=True):
        assert decoder.decode(bytes.fromhex(block)) == fields
    # :status 302, :status 307, location, cache-control and the first date were evicted.
    assert decoder.decode(b"\xbe\xbf\xc0") == RESPONSE_TABLE
    with pytest.raises(HPACKError, match=r"past the tables \(61 static \+ 3 dynamic"):
        decoder.decode(b"\xc1")


def test_second_response_evicts_the_oldest_entry():
    decoder = Decoder(max_table_size=256)
    for block in C5[:2]:
        decoder.decode(bytes.fromhex(block))
    assert decoder.decode(b"\xbe\xbf\xc0\xc1") == [
        (b":status", b"307"), (b"location", b"https://www.example.com"),
        (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"), (b"cache-control", b"private")]
    with pytest.raises(HPACKError, match="past the tables"):
        decoder.decode(b"\xc2")


def test_encoder_reproduces_c4():
    """Same choices as the RFC's example encoder: index, name index, Huffman when shorter."""
    encoder = Encoder()
    assert [encoder.encode(fields).hex() for fields in REQUESTS] == [b.replace(" ", "") for b in C4]


def test_decode_takes_bytes_like_objects():
    block = bytes.fromhex(C4[0])
    for data in (bytearray(block), memoryview(block), memoryview(b"xx" + block)[2:]):
        assert Decoder().decode(data) == REQUESTS[0]


def test_empty_block_and_empty_strings():
    decoder = Decoder()
    assert decoder.decode(b"") == []
    assert decoder.decode(b"\x40\x00\x00\x40\x80\x80") == [(b"", b""), (b"", b"")]
    assert decoder.decode(b"\xbe") == [(b"", b"")]


def test_names_come_back_as_sent():
    assert Decoder().decode(b"\x00\x04X-Up\x01v") == [(b"X-Up", b"v")]


# -- round trips with the reference implementation ------------------------------------------

COMMON = [
    (b":status", [b"200", b"204", b"404", b"503", b"302"]),
    (b":method", [b"GET", b"POST", b"PUT"]),
    (b":path", [b"/", b"/api/v1/items", b"/healthz"]),
    (b":authority", [b"api.test", b"api.test:8080"]),
    (b"content-type", [b"application/json", b"text/plain; charset=utf-8", b"application/grpc"]),
    (b"content-length", [b"0", b"12", b"4096"]),
    (b"server", [b"meshproxy", b"envoy"]),
    (b"date", [b"Mon, 21 Oct 2013 20:13:21 GMT", b"Tue, 22 Oct 2013 01:02:03 GMT"]),
    (b"cookie", [b"a=1", b"session=0123456789abcdef0123456789"]),
    (b"set-cookie", [b"id=7; Path=/"]),
    (b"authorization", [b"Bearer abc", b"Basic dXNlcjpwYXNz"]),
    (b"x-request-id", [b"5f6c2a9e-0000-4000-8000-000000000001"]),
    (b"traceparent", [b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]),
    (b"cache-control", [b"no-cache", b"private", b"max-age=60"]),
    (b"etag", [b'"abc"', b'W/"1"']),
    (b"x-custom", [b"one", b"two", b""]),
    (b"vary", [b"accept-encoding"]),
]


def random_value(rng: random.Random) -> bytes:
    """Any bytes at all, so that every Huffman symbol turns up."""
    return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 20, 60, 300])))


def random_fields(rng: random.Random) -> Fields:
    fields = []
    for _ in range(rng.randrange(1, 12)):
        roll = rng.random()
        if roll < 0.7:
            name, values = rng.choice(COMMON)
            fields.append((name, rng.choice(values)))
        elif roll < 0.85:
            fields.append((b"x-%d" % rng.randrange(40), b"v%d" % rng.randrange(10)))
        else:
            fields.append((b"x-random-%d" % rng.randrange(5), random_value(rng)))
    return fields


def all_byte_values(rng: random.Random) -> Fields:
    values = list(range(256))
    rng.shuffle(values)
    return [(b"x-bytes", bytes(values)), (b"x-byte", bytes([rng.randrange(256)]))]


@pytest.mark.parametrize("seed", range(4))
def test_our_encoder_to_reference_decoder(seed):
    rng = random.Random(seed)
    encoder = Encoder()
    reference = reference_decoder()
    for i in range(400):
        if rng.random() < 0.08:  # the peer's SETTINGS_HEADER_TABLE_SIZE changes, maybe twice
            for _ in range(rng.choice([1, 2])):
                size = rng.choice([0, 40, 100, 256, 1000, 4096, 8192])
                reference.max_allowed_table_size = size
                encoder.set_max_table_size(size)
        fields = all_byte_values(rng) if i % 50 == 0 else random_fields(rng)
        assert plain(reference.decode(encoder.encode(fields), raw=True)) == fields


@pytest.mark.parametrize("seed", range(4))
def test_reference_encoder_to_our_decoder(seed):
    rng = random.Random(seed)
    reference = hpack.Encoder()  # Huffman-codes every literal
    decoder = Decoder(max_table_size=8192, max_header_list_size=1 << 20, max_headers=1000)
    for i in range(400):
        if rng.random() < 0.08:  # hpack sends one size update per change: at most two here
            for _ in range(rng.choice([1, 2])):
                size = rng.choice([0, 64, 256, 1024, 4096, 8192])
                # Setting hpack's current size again clears its "resized" flag and drops
                # the pending update (an hpack bug): only real changes.
                if size != reference.header_table_size:
                    reference.header_table_size = size
        fields = all_byte_values(rng) if i % 50 == 0 else random_fields(rng)
        sent = [(name, value, rng.random() < 0.1) for name, value in fields]  # some never indexed
        block = reference.encode(sent, huffman=rng.random() < 0.8)
        assert decoder.decode(block) == fields


def test_reference_huffman_to_our_decoder_for_every_symbol_and_padding():
    reference = hpack.Encoder()
    decoder = Decoder()
    for symbol in range(256):
        # Lengths 1..8 give every padding length for this symbol's code.
        fields = [(b"x-s", bytes([symbol]) * n) for n in range(1, 9)]
        assert decoder.decode(reference.encode(fields)) == fields


@pytest.mark.parametrize("seed", range(3))
def test_our_encoder_to_our_decoder(seed):
    rng = random.Random(seed)
    encoder = Encoder(max_table_size=8192)
    decoder = Decoder(max_table_size=8192, max_header_list_size=1 << 20, max_headers=1000)
    for i in range(600):
        if rng.random() < 0.08:
            for _ in range(rng.choice([1, 2])):
                encoder.set_max_table_size(rng.choice([0, 50, 300, 2000, 4096, 8192, 100000]))
        fields = all_byte_values(rng) if i % 50 == 0 else random_fields(rng)
        assert decoder.decode(encoder.encode(fields)) == fields


# -- encoder policy --------------------------------------------------------------------------


def test_static_full_matches_are_one_byte():
    encoder = Encoder()
    assert encoder.encode([(b":status", b"200")]) == b"\x88"
    assert encoder.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https")]) == b"\x82\x84\x87"
    assert encoder.encode([(b"accept-encoding", b"gzip, deflate")]) == bytes([0x80 | 16])


def test_dynamic_full_match_after_incremental_indexing():
    encoder = Encoder()
    fields = [(b"server", b"meshproxy"), (b"x-upstream", b"svc-a")]
    first = encoder.encode(fields)
    assert first[0] == 0x40 | 54  # literal with incremental indexing, name = static "server"
    assert encoder.encode(fields) == b"\xbf\xbe"  # server is now 63, x-upstream 62
    assert encoder.encode([(b"x-upstream", b"svc-b")])[0] == 0x40 | 62  # name from the dynamic table


def test_a_list_of_pairs_other_than_tuples_is_accepted():
    encoder = Encoder()
    assert Decoder().decode(encoder.encode([[b"x-a", b"1"]])) == [(b"x-a", b"1")]


@pytest.mark.parametrize(("name", "value"), [
    (b"authorization", b"Bearer 0123456789abcdef0123456789abcdef"),
    (b"proxy-authorization", b"Basic dXNlcjpwYXNz"),
    (b"set-cookie", b"id=0123456789abcdef0123456789; Path=/; HttpOnly"),
    (b"cookie", b"sid=0123456789abcde"),  # 19 bytes
])
def test_sensitive_fields_are_never_indexed(name, value):
    encoder = Encoder()
    block = encoder.encode([(name, value)])
    assert block[0] & 0xF0 == 0x10
    assert encoder.encode([(name, value)]) == block
    decoded = reference_decoder().decode(block, raw=True)
    assert isinstance(decoded[0], hpack.NeverIndexedHeaderTuple)
    assert plain(decoded) == [(name, value)]


def test_a_long_cookie_is_indexed():
    encoder = Encoder()
    cookie = [(b"cookie", b"sid=0123456789abcdef")]  # 20 bytes
    assert encoder.encode(cookie)[0] == 0x40 | 32
    assert encoder.encode(cookie) == b"\xbe"


@pytest.mark.parametrize("name", [b":path", b"content-length", b"date", b"etag", b"last-modified",
                                  b"x-request-id", b"traceparent", b"age"])
def test_high_churn_fields_are_not_indexed(name):
    encoder = Encoder()
    fields = [(name, b"value-1234")]
    block = encoder.encode(fields)
    assert block[0] & 0xF0 == 0x00
    assert encoder.encode(fields) == block
    decoded = reference_decoder().decode(block, raw=True)
    assert plain(decoded) == fields
    assert not isinstance(decoded[0], hpack.NeverIndexedHeaderTuple)


def test_values_over_a_quarter_of_the_table_are_not_indexed():
    encoder = Encoder()
    quarter = [(b"x-big", b"\xfe" * 1024)]
    over = [(b"x-bigger", b"\xfe" * 1025)]
    assert encoder.encode(quarter)[0] == 0x40
    assert encoder.encode(quarter) == b"\xbe"
    block = encoder.encode(over)
    assert block[0] == 0x00
    assert encoder.encode(over) == block


def test_eviction_keeps_encoder_and_decoder_in_step():
    encoder = Encoder(max_table_size=100)  # room for two entries of 42 bytes
    reference = reference_decoder(4096)
    for round_ in range(3):
        for name in (b"x-a", b"x-b", b"x-a", b"x-c", b"x-c"):
            fields = [(name, b"value-%d" % round_)]
            assert plain(reference.decode(encoder.encode(fields), raw=True)) == fields
    # Each round ends with x-a evicted by x-c: the table is [62] x-c, [63] x-b.
    assert encoder.encode([(b"x-c", b"value-2"), (b"x-b", b"value-2")]) == b"\xbe\xbf"
    assert encoder.encode([(b"x-a", b"value-2")])[0] == 0x40  # evicted: literal name again


# -- dynamic table size updates --------------------------------------------------------------


def test_a_smaller_setting_is_announced_at_the_next_block():
    encoder = Encoder()
    encoder.set_max_table_size(0)
    assert encoder.encode([(b"x-a", b"1")])[0] == 0x20
    block = encoder.encode([(b"x-a", b"1")])
    assert block[0] == 0x00  # nothing fits a table of 0: without indexing, no update
    assert encoder.encode([(b"x-a", b"1")]) == block


def test_shrink_then_grow_announces_the_smallest_then_the_final_size():
    encoder = Encoder()
    encoder.encode([(b"x-a", b"1")])
    encoder.set_max_table_size(0)
    encoder.set_max_table_size(4096)
    block = encoder.encode([(b"x-a", b"1")])
    assert block.startswith(b"\x20" + integer(4096, 5, 0x20))
    assert block[4] == 0x40  # the entry was evicted by the 0: literal again


def test_a_larger_setting_is_capped_at_our_own_size():
    encoder = Encoder()
    encoder.set_max_table_size(65536)  # still 4096: nothing to announce
    assert encoder.encode([(b":status", b"200")]) == b"\x88"
    capped = Encoder(max_table_size=1024)  # below the peer's initial 4096: announced at once
    assert capped.encode([(b":status", b"200")]) == integer(1024, 5, 0x20) + b"\x88"
    capped.set_max_table_size(8192)
    assert capped.encode([(b":status", b"200")]) == b"\x88"


def test_decoder_applies_size_updates():
    decoder = Decoder()
    decoder.decode(bytes.fromhex(C3[0]))  # one entry, 57 bytes
    assert decoder.decode(b"\x3f\x1a\xbe") == [(b":authority", b"www.example.com")]  # 57: still fits
    assert decoder.decode(b"\x20" + integer(4096, 5, 0x20)) == []  # 0 evicts everything
    with pytest.raises(HPACKError, match="past the tables"):
        decoder.decode(b"\xbe")


def test_size_update_up_to_the_limit_is_accepted():
    assert Decoder(max_table_size=300).decode(integer(300, 5, 0x20) + b"\x82") == [(b":method", b"GET")]


# -- refusals --------------------------------------------------------------------------------

HUFFMAN_A = 0b00011  # "a", 5 bits


@pytest.mark.parametrize(("block", "message"), [
    (b"\x80", "index 0"),
    (b"\xbe", r"index 62 is past the tables \(61 static \+ 0 dynamic"),
    (b"\x7e\x01v", "index 62 is past the tables"),  # a literal's name index
    (b"\xff", "truncated integer"),
    (b"\x82\xff\x80\x80", "truncated integer"),
    (b"\xff\xff\xff\xff\xff\x0f", "integer overflow: more than 4 continuation bytes"),
    (b"\xff\xff\xff\xff\x7f", "integer overflow"),  # 127 + 2**28 - 1: four bytes, but above 2**28
    (b"\x40\x0acustom", "truncated string: 10 bytes announced, 6 left"),
    (b"\x40", "truncated string"),
    (b"\x04", "truncated string"),
    (b"\x40\x01a\x7f", "truncated integer"),
    (integer(4097, 5, 0x20), "size update to 4097 is above the limit 4096"),
    (b"\x82\x20", "size update after a header field"),
    (b"\x20\x20\x20", "more than two dynamic table size updates"),
    (b"\x00\x01n\x82" + bytes([HUFFMAN_A << 3 | 0b111, 0xFF]), "Huffman padding longer than 7 bits"),
    (b"\x00\x01n\x81" + bytes([HUFFMAN_A << 3]), "Huffman padding is not all ones"),
    (b"\x00\x01n\x81" + bytes([HUFFMAN_A << 3 | 0b110]), "Huffman padding is not all ones"),
    (b"\x00\x01n\x84\xff\xff\xff\xff", "EOS"),
    (b"\x00\x01n\x85" + bytes([HUFFMAN_A << 3 | 0b111, 0xFF, 0xFF, 0xFF, 0xFF]), "EOS"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_refusals(block, message):
    with pytest.raises(HPACKError, match=message) as caught:
        Decoder().decode(block)
    assert type(caught.value) is HPACKError


def test_valid_huffman_padding_of_up_to_7_bits():
    assert Decoder().decode(b"\x00\x01n\x81" + bytes([HUFFMAN_A << 3 | 0b111])) == [(b"n", b"a")]
    assert Decoder().decode(b"\x00\x01n\x80") == [(b"n", b"")]


def test_too_many_fields():
    block = b"\x82\x86\x84\x87"
    assert len(Decoder(max_headers=4).decode(block)) == 4
    with pytest.raises(HeaderListTooLarge, match="more than 3 header fields"):
        Decoder(max_headers=3).decode(block)


def test_too_many_bytes():
    block = b"\x82\x82\x82"  # :method GET is 7 + 3 + 32 = 42 bytes
    assert len(Decoder(max_header_list_size=126).decode(block)) == 3
    with pytest.raises(HeaderListTooLarge, match="larger than 125 bytes") as caught:
        Decoder(max_header_list_size=125).decode(block)
    assert isinstance(caught.value, HPACKError)


def test_bad_arguments():
    with pytest.raises(ValueError):
        Decoder(max_table_size=-1)
    with pytest.raises(ValueError):
        Encoder(max_table_size=-1)
    with pytest.raises(ValueError):
        Encoder().set_max_table_size(-1)
    with pytest.raises(TypeError):
        Encoder().encode([("x-a", "1")])
    with pytest.raises(TypeError):
        Encoder().encode([(b"x-a", b"1", b"2")])


def test_bad_input_leaves_the_encoder_in_step():
    encoder = Encoder()
    reference = reference_decoder()
    with pytest.raises(TypeError):
        encoder.encode([(b"x-a", b"1"), (b"x-b", 2)])
    fields = [(b"x-a", b"1"), (b"x-a", b"1")]
    assert plain(reference.decode(encoder.encode(fields), raw=True)) == fields


def test_tuple_and_bytes_subclasses_are_accepted():
    class Name(bytes):
        pass

    fields = [hpack.HeaderTuple(b"x-a", b"1"), (Name(b"x-b"), b"2")]
    encoder = Encoder()
    decoder = Decoder()
    for _ in range(2):
        assert decoder.decode(encoder.encode(fields)) == [(b"x-a", b"1"), (b"x-b", b"2")]


def test_large_tables_hold_many_small_entries():
    """The tables' rings start small and grow: 2000 entries (73000 bytes) fit exactly."""
    encoder = Encoder(max_table_size=73000)
    encoder.set_max_table_size(73000)
    decoder = Decoder(max_table_size=73000)
    fields = [(b"x", b"%02x" % (i % 100)) for i in range(100)]
    for round_ in range(20):
        batch = [(b"x%d" % round_, value) for _, value in fields]
        assert decoder.decode(encoder.encode(batch)) == batch
    oldest = 62 + 1999
    assert decoder.decode(integer(oldest, 7, 0x80)) == [(b"x0", b"00")]
    everything = [(b"x%d" % r, b"%02x" % i) for r in range(20) for i in range(100)]
    assert encoder.encode(everything) == b"".join(integer(oldest - n, 7, 0x80) for n in range(2000))
