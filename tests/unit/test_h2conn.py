"""The server-side HTTP/2 state (`_core.h2conn.H2Conn`) against h2's client as the peer,
and against hand-made frames (hyperframe, hpack) for what a well-behaved client never
sends."""

import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from proxy._core.h2conn import (
    CLOSED,
    EV_DATA,
    EV_GOAWAY,
    EV_REQUEST,
    EV_RESET,
    EV_SETTINGS_ACK,
    EV_TRAILERS,
    EV_WINDOW,
    HALF_CLOSED_LOCAL,
    HALF_CLOSED_REMOTE,
    OPEN,
    PREFACE,
    H2Conn,
    StreamClosed,
)
from proxy.http.h2codec import H2Limits

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"example"), (b":path", b"/")]
LIMITS = H2Limits()


def frames_of(data: bytes) -> list[Frame]:
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def take(server: H2Conn) -> bytes:
    data = bytes(server.out)
    del server.out[:]
    return data


class Pair:
    """h2's client connected in memory to an H2Conn."""

    def __init__(self, limits: H2Limits = LIMITS, initial_window_size: int | None = None) -> None:
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        if initial_window_size is not None:
            self.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: initial_window_size})
        self.server = H2Conn(limits, len(PREFACE))
        self.server.initiate()
        self.now = 0.0

    def to_server(self) -> list[tuple]:
        return self.server.receive(self.client.data_to_send(), self.now)

    def to_client(self) -> list:
        return self.client.receive_data(take(self.server))


def request_events(events: list[tuple], kind: int) -> list[tuple]:
    return [e for e in events if e[0] == kind]


def test_request_and_response_with_h2_as_the_client():
    pair = Pair()
    pair.client.send_headers(1, [*REQUEST, (b"user-agent", b"t")], end_stream=True)
    events = pair.to_server()
    [(_, sid, headers, ended)] = request_events(events, EV_REQUEST)
    assert (sid, ended) == (1, True)
    assert headers == [*REQUEST, (b"user-agent", b"t")]
    assert pair.server.stream_state(1) == HALF_CLOSED_REMOTE
    pair.server.send_headers(1, [(b":status", b"200"), (b"content-type", b"text/plain")], False)
    assert pair.server.send_data(1, b"hello", True) == 5
    assert pair.server.stream_state(1) == CLOSED
    got = pair.to_client()
    [response] = [e for e in got if isinstance(e, ResponseReceived)]
    assert response.headers == [(b":status", b"200"), (b"content-type", b"text/plain")]
    assert b"".join(e.data for e in got if isinstance(e, DataReceived)) == b"hello"
    assert any(isinstance(e, StreamEnded) for e in got)
    # Our SETTINGS were acknowledged; the client's too.
    assert any(e[0] == EV_SETTINGS_ACK for e in pair.to_server())
    assert pair.client.local_settings.max_frame_size == 16384
    assert pair.server.settings_acked


def test_many_streams_and_bytes_split_anywhere():
    pair = Pair()
    for sid in range(1, 40, 2):
        pair.client.send_headers(sid, [*REQUEST[:3], (b":path", b"/%d" % sid)], end_stream=True)
    data = pair.client.data_to_send()
    events = []
    for i in range(len(data)):  # one byte at a time
        events += pair.server.receive(data[i:i + 1], 0.0)
    assert [e[1] for e in events if e[0] == EV_REQUEST] == list(range(1, 40, 2))
    assert [e[2][3][1] for e in events if e[0] == EV_REQUEST] == [b"/%d" % sid for sid in range(1, 40, 2)]


def test_request_body_flow_control_and_window_updates():
    limits = H2Limits(stream_window=65535, connection_window=1 << 20)
    pair = Pair(limits)
    pair.to_client()
    pair.to_server()
    pair.client.send_headers(1, [(b":method", b"POST"), *REQUEST[1:]], end_stream=False)
    for _ in range(4):
        pair.client.send_data(1, b"x" * 10000)
    events = pair.to_server()
    body = b"".join(e[2] for e in events if e[0] == EV_DATA)
    assert len(body) == 40000
    pair.server.ack(1, 20000)  # under half a window: no stream update yet
    assert not [f for f in frames_of(take(pair.server)) if isinstance(f, WindowUpdateFrame) and f.stream_id == 1]
    pair.server.ack(1, 20000)
    updates = [f for f in frames_of(take(pair.server)) if isinstance(f, WindowUpdateFrame)]
    assert [(f.stream_id, f.window_increment) for f in updates] == [(1, 40000)]


def test_data_past_the_stream_window_resets_the_stream():
    limits = H2Limits(stream_window=1000)
    server = H2Conn(limits, 0)
    encoder = hpack.Encoder()
    data = HeadersFrame(1, encoder.encode([(b":method", b"POST"), *REQUEST[1:]]), flags=["END_HEADERS"]).serialize()
    data += DataFrame(1, b"x" * 1001).serialize()
    events = server.receive(data, 0.0)
    assert (EV_RESET, 1, 3, False) in events  # FLOW_CONTROL_ERROR
    [rst] = [f for f in frames_of(take(server)) if isinstance(f, RstStreamFrame)]
    assert rst.error_code == 3 and server.error is None


def test_send_data_waits_for_the_clients_window():
    pair = Pair(initial_window_size=10)
    pair.client.send_headers(1, REQUEST, end_stream=True)
    pair.to_server()
    pair.server.send_headers(1, [(b":status", b"200")], False)
    assert pair.server.send_window(1) == 10
    assert pair.server.send_data(1, b"0123456789abcdef", True) == 10
    assert pair.server.stream_state(1) == HALF_CLOSED_REMOTE  # END_STREAM not sent yet
    got = pair.to_client()
    data = [e for e in got if isinstance(e, DataReceived)]
    pair.client.acknowledge_received_data(data[0].flow_controlled_length, 1)
    events = pair.to_server()
    assert (EV_WINDOW, 1, 0, None) in events
    assert pair.server.send_data(1, b"abcdef", True) == 6
    got = pair.to_client()
    assert any(isinstance(e, StreamEnded) for e in got)


def test_initial_window_change_applies_to_open_streams():
    pair = Pair(initial_window_size=0)
    pair.client.send_headers(1, REQUEST, end_stream=True)
    pair.to_server()
    pair.server.send_headers(1, [(b":status", b"200")], False)
    assert pair.server.send_data(1, b"abc", True) == 0
    pair.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 100})
    assert (EV_WINDOW, 0, 0, None) in pair.to_server()
    assert pair.server.send_data(1, b"abc", True) == 3


def test_large_header_block_goes_out_with_continuation():
    pair = Pair()
    pair.client.send_headers(1, REQUEST, end_stream=True)
    pair.to_server()
    big = [(b":status", b"200")] + [(b"x-h%d" % i, b"v" * 1000) for i in range(40)]
    pair.server.send_headers(1, big, True)
    out = take(pair.server)
    kinds = [type(f) for f in frames_of(out)]
    assert ContinuationFrame in kinds
    got = pair.client.receive_data(out)
    [response] = [e for e in got if isinstance(e, ResponseReceived)]
    assert response.headers == big


def test_trailers_end_the_stream():
    pair = Pair()
    pair.client.send_headers(1, [(b":method", b"POST"), *REQUEST[1:]], end_stream=False)
    pair.client.send_data(1, b"abc")
    pair.client.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
    events = pair.to_server()
    assert (EV_TRAILERS, 1, [(b"grpc-status", b"0")], True) in events
    assert pair.server.stream_state(1) == HALF_CLOSED_REMOTE
    pair.server.send_headers(1, [(b":status", b"200")], False)
    pair.server.send_data(1, b"ok", False)
    pair.server.send_headers(1, [(b"grpc-status", b"0")], True)
    got = pair.to_client()
    assert any(isinstance(e, TrailersReceived) for e in got)
    with pytest.raises(StreamClosed):
        pair.server.send_data(1, b"late", True)


def test_client_reset_is_reported_and_counted():
    pair = Pair()
    pair.client.send_headers(1, REQUEST, end_stream=True)
    pair.to_server()
    pair.client.reset_stream(1, 8)
    events = pair.to_server()
    assert (EV_RESET, 1, 8, True) in events
    assert pair.server.resets == 1 and pair.server.opened == 1
    with pytest.raises(StreamClosed):
        pair.server.send_headers(1, [(b":status", b"200")], True)


def test_server_reset_reaches_the_client():
    pair = Pair()
    pair.client.send_headers(1, [(b":method", b"POST"), *REQUEST[1:]], end_stream=False)
    pair.to_server()
    pair.server.send_headers(1, [(b":status", b"200")], True)
    assert pair.server.stream_state(1) == HALF_CLOSED_LOCAL
    pair.server.reset(1, 0)
    got = pair.to_client()
    assert any(isinstance(e, StreamReset) and e.error_code == 0 for e in got)
    # A DATA frame the client sent before it saw the reset is dropped, its window given back.
    pair.server.receive(DataFrame(1, b"x" * 10).serialize(), 0.0)
    assert pair.server.error is None


def test_rapid_reset_is_a_violation():
    limits = H2Limits(reset_min_streams=10)
    server = H2Conn(limits, 0)
    encoder = hpack.Encoder()
    data = b""
    for sid in range(1, 40, 2):
        data += HeadersFrame(sid, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()
        data += RstStreamFrame(sid, error_code=8).serialize()
    server.receive(data, 0.0)
    assert server.violation == "rapid_reset"
    assert server.error[0] == 0xB
    [goaway] = [f for f in frames_of(take(server)) if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == 0xB


@pytest.mark.parametrize(("frame", "name"), [
    (PingFrame(0, b"12345678"), "ping_flood"),
    (SettingsFrame(0, {}), "settings_flood"),
    (PriorityFrame(1, depends_on=0, stream_weight=16), "priority_flood"),
    (WindowUpdateFrame(0, window_increment=1), "window_update_flood"),
])
def test_control_frame_floods(frame, name):
    limits = H2Limits(max_pings=5, max_settings=5, max_priority=5, max_window_updates=5)
    server = H2Conn(limits, 0)
    server.receive(frame.serialize() * 6, 0.0)
    assert server.violation == name
    # Under the limit, in a new window, it is fine.
    again = H2Conn(limits, 0)
    again.receive(frame.serialize() * 5, 0.0)
    again.receive(frame.serialize() * 5, 1.5)
    assert again.violation is None


def test_empty_data_frames_flood():
    server = H2Conn(H2Limits(max_empty_frames=4), 0)
    encoder = hpack.Encoder()
    data = HeadersFrame(1, encoder.encode([(b":method", b"POST"), *REQUEST[1:]]), flags=["END_HEADERS"]).serialize()
    server.receive(data + DataFrame(1, b"").serialize() * 5, 0.0)
    assert server.violation == "empty_frame_flood"


def test_continuation_flood_and_block_size():
    server = H2Conn(H2Limits(max_continuations=3), 0)
    block = hpack.Encoder().encode(REQUEST)
    data = HeadersFrame(1, block[:1]).serialize()
    data += b"".join(ContinuationFrame(1, block[1:2]).serialize() for _ in range(4))
    server.receive(data, 0.0)
    assert server.violation == "continuation_flood"
    server = H2Conn(H2Limits(max_header_block=100), 0)
    server.receive(HeadersFrame(1, b"\x00" * 101).serialize(), 0.0)
    assert server.violation == "header_block_too_large"


def test_unfinished_header_block_is_visible():
    server = H2Conn(LIMITS, 0)
    block = hpack.Encoder().encode(REQUEST)
    server.receive(HeadersFrame(1, block[:3]).serialize(), 5.0)
    assert server.in_header_block and server.block_started == 5.0
    events = server.receive(ContinuationFrame(1, block[3:], flags=["END_HEADERS"]).serialize(), 6.0)
    assert not server.in_header_block
    assert events[0][:2] == (EV_REQUEST, 1)


@pytest.mark.parametrize(("data", "code"), [
    (DataFrame(1, b"x").serialize(), 1),  # DATA on an idle stream
    (HeadersFrame(2, b"\x82", flags=["END_HEADERS"]).serialize(), 1),  # even stream id
    (HeadersFrame(1, b"\x82").serialize() + PingFrame(0, b"12345678").serialize(), 1),  # interrupted block
    (ContinuationFrame(1, b"\x82").serialize(), 1),
    (PushPromiseFrame(1, promised_stream_id=2, data=b"\x82", flags=["END_HEADERS"]).serialize(), 1),
    (HeadersFrame(1, b"\xff\xff\xff\xff\xff\xff", flags=["END_HEADERS"]).serialize(), 9),  # HPACK garbage
    (b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + b"\x00" * 16385, 6),  # over the frame size
    (b"\x00\x00\x08\x06\x00\x00\x00\x00\x01" + b"12345678", 1),  # PING on a stream
    (WindowUpdateFrame(0, window_increment=0).serialize(), 1),
    (WindowUpdateFrame(0, window_increment=0x7FFFFFFF).serialize(), 3),
    (SettingsFrame(0, {5: 100}).serialize(), 1),  # max frame size under 16384
    (SettingsFrame(0, {4: 0x80000000}).serialize(), 3),
    (RstStreamFrame(7, error_code=0).serialize(), 1),  # an idle stream
])
def test_connection_errors_send_goaway(data, code):
    server = H2Conn(LIMITS, 0)
    server.receive(data, 0.0)
    assert server.error is not None and server.error[0] == code
    [goaway] = [f for f in frames_of(take(server)) if isinstance(f, GoAwayFrame)]
    assert goaway.error_code == code
    assert server.receive(PingFrame(0, b"12345678").serialize(), 0.0) == []  # nothing more is read


def test_padding_is_stripped_and_given_back():
    server = H2Conn(H2Limits(connection_window=200), 0)
    encoder = hpack.Encoder()
    headers = HeadersFrame(1, encoder.encode([(b":method", b"POST"), *REQUEST[1:]]),
                           flags=["END_HEADERS", "PADDED"], pad_length=10)
    data = DataFrame(1, b"abc", flags=["PADDED", "END_STREAM"], pad_length=100)
    events = server.receive(headers.serialize() + data.serialize(), 0.0)
    assert (EV_DATA, 1, b"abc", True) in events
    # 100 bytes of padding and its length byte: past half of the 200-byte window, given back.
    updates = [f for f in frames_of(take(server)) if isinstance(f, WindowUpdateFrame)]
    assert [(f.stream_id, f.window_increment) for f in updates] == [(0, 101)]


def test_peer_goaway_is_reported():
    server = H2Conn(LIMITS, 0)
    events = server.receive(GoAwayFrame(0, last_stream_id=0, error_code=0, additional_data=b"bye").serialize(), 0.0)
    assert events == [(EV_GOAWAY, 0, 0, b"bye")]
    assert server.error is None


def test_open_streams_counts_what_the_protocol_sees():
    pair = Pair()
    for sid in (1, 3, 5):
        pair.client.send_headers(sid, REQUEST, end_stream=sid != 5)
    pair.to_server()
    assert pair.server.open_streams == 3
    assert pair.server.stream_state(5) == OPEN
    pair.server.send_headers(1, [(b":status", b"204")], True)
    assert pair.server.open_streams == 2


def test_flood_counts_are_per_window():
    server = H2Conn(H2Limits(max_pings=10, flood_window=1.0), 0)
    for second in range(5):
        server.receive(PingFrame(0, b"12345678").serialize() * 10, float(second))
    assert server.violation is None
    server.receive(PingFrame(0, b"12345678", flags=["ACK"]).serialize() * 100, 4.5)  # ACKs are not counted
    assert server.violation is None


def test_rapid_reset_needs_the_minimum_and_the_ratio():
    limits = H2Limits(reset_min_streams=50, reset_ratio=0.5)
    encoder = hpack.Encoder()

    def opened_and_reset(sid: int) -> bytes:
        return (HeadersFrame(sid, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()
                + RstStreamFrame(sid, error_code=8).serialize())

    server = H2Conn(limits, 0)
    server.receive(b"".join(opened_and_reset(sid) for sid in range(1, 98, 2)), 0.0)  # 49 opened and reset
    assert server.violation is None
    server.receive(opened_and_reset(99), 0.1)
    assert server.violation == "rapid_reset"
    # A few resets among many streams are fine.
    server = H2Conn(limits, 0)
    encoder = hpack.Encoder()
    sid = 1
    for _ in range(100):
        data = b"".join(HeadersFrame(s, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()
                        for s in (sid, sid + 2, sid + 4))
        server.receive(data + RstStreamFrame(sid, error_code=8).serialize(), 0.0)
        sid += 6
    server.note_reset(0.0)
    assert server.violation is None


def test_resets_the_client_provokes_count_toward_rapid_reset():
    """MadeYouReset: streams the server must reset because of the client (here a zero
    WINDOW_UPDATE) count like resets the client sends."""
    server = H2Conn(H2Limits(reset_min_streams=50), 0)
    encoder = hpack.Encoder()
    data = b"".join(HeadersFrame(sid, encoder.encode(REQUEST), flags=["END_HEADERS", "END_STREAM"]).serialize()
                    + WindowUpdateFrame(sid, window_increment=0).serialize() for sid in range(1, 200, 2))
    server.receive(data, 0.0)
    assert server.violation == "rapid_reset"


def test_any_header_table_size_is_accepted():
    pair = Pair()
    pair.to_server()
    pair.server.receive(SettingsFrame(0, {SettingCodes.HEADER_TABLE_SIZE: 0xFFFFFFFF}).serialize(), 0.0)
    assert pair.server.error is None
    pair.client.send_headers(1, REQUEST, end_stream=True)
    pair.to_server()
    pair.server.send_headers(1, [(b":status", b"200"), (b"x-a", b"b")], True)
    assert any(isinstance(e, ResponseReceived) for e in pair.to_client())


def test_a_settings_frame_moves_the_windows_once():
    pair = Pair()
    for sid in range(1, 21, 2):
        pair.client.send_headers(sid, REQUEST, end_stream=True)
    pair.to_server()
    many = SettingsFrame(0, {}).serialize()[:9]
    payload = b"".join(b"\x00\x04" + (1000 + i).to_bytes(4, "big") for i in range(2000))
    frame = len(payload).to_bytes(3, "big") + many[3:] + payload
    events = pair.server.receive(frame, 0.0)
    assert [e for e in events if e[0] == EV_WINDOW] == [(EV_WINDOW, 0, 0, None)]
    pair.server.send_headers(1, [(b":status", b"200")], False)
    assert pair.server.send_window(1) == 2999  # the last value in the frame holds
