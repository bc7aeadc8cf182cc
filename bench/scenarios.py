"""What each scenario runs: the origin it needs, the listener every target must expose,
the load applied, and the figures that go in the table."""

from collections.abc import Callable
from dataclasses import dataclass

from . import grpcload, load, mtls, tlsload
from .report import Column

_KIB, _MIB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    origin: str  # "http" (nginx), "iperf3" or "grpc" (grpcio): see upstream.py
    # what each target exposes: "tcp" (L4), "http" (L7, HTTP/1.1), "h2c" (L7, HTTP/2 clients by
    # prior knowledge), "grpc" (h2c in, HTTP/2 out), "hop", "tls"
    listener: str
    # (port, seconds, settings[, window]): applies the load, marks the measured window
    run_load: Callable[..., load.LoadResult]
    primary: Column  # the headline figure; ratios to the reference targets are taken on it
    columns: tuple[Column, ...]  # further figures from the load tool
    cost_unit: str  # proxy CPU is reported per this unit of work ("req", "MiB")
    open_loop: bool = False  # whether --rate (the open-loop generator) applies
    needs_rate: bool = False  # open loop only: refuses to run without --rate
    targets: tuple[str, ...] | None = None  # default --targets (None: targets.DEFAULT)
    notes: tuple[str, ...] = ()  # what the report's notes must say about this scenario


_LATENCY = (
    Column("p50 ms", "p50_ms", ".2f"),
    Column("p90 ms", "p90_ms", ".2f"),
    Column("p99 ms", "p99_ms", ".2f"),
    Column("p99.9 ms", "p99.9_ms", ".2f"),
    Column("max ms", "max_ms", ".1f"),
    Column("errors", "errors", ",.0f"),
    Column("non-2xx", "non_2xx", ",.0f"),
)
_REQ_S = Column("req/s", "rps", ",.0f")
_H2LOAD_LATENCY = (  # h2load's "time for request" statistics, and its failure counts
    Column("mean ms", "mean_ms", ".2f"),
    Column("sd ms", "sd_ms", ".2f"),
    Column("max ms", "max_ms", ".1f"),
    Column("failed", "failed", ",.0f"),
    Column("errored", "errored", ",.0f"),
)
_GRPC_LATENCY = (*_LATENCY[:5], Column("failed", "failed", ",.0f"))
_RELOADS = (  # from reload.Reloader, for targets that reload during the window
    Column("reloads applied", "reloads", ",.0f"),
    Column("reloads failed", "reloads_failed", ",.0f"),
    Column("PUT p50 ms", "reload_put_p50_ms", ".1f"),
    Column("PUT max ms", "reload_put_max_ms", ".1f"),
)
_MIB_S = Column("MiB/s", "mibps", ",.0f")
_TLS_TARGETS = ("meshproxy-mtls", "nginx-tls", "haproxy-tls")


def _http(name: str, summary: str, listener: str, request: load.HttpRequest,
          primary: Column = _REQ_S, extra: tuple[Column, ...] = (), **more) -> Scenario:
    return Scenario(
        name=name,
        summary=summary,
        origin="http",
        listener=listener,
        run_load=load.http(request),
        primary=primary,
        columns=(*extra, *_LATENCY),
        cost_unit="req",
        open_loop=True,
        **more,
    )


ALL: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="tcp-throughput",
            summary="iperf3 bulk TCP through each target's L4 listener (Gbit/s)",
            origin="iperf3",
            listener="tcp",
            run_load=load.iperf3,
            primary=Column("Gbit/s", "gbps", ".2f"),
            columns=(Column("retransmits", "retransmits", ",.0f"),),
            cost_unit="MiB",
        ),
        _http("tcp-rps", "GET /hello over 50 kept-alive connections through the L4 listener",
              "tcp", load.HttpRequest()),
        _http("tcp-new-conn", "GET /hello with 'Connection: close' through the L4 listener",
              "tcp", load.HttpRequest(close=True)),
        _http("http1-keepalive",
              "GET /hello over 50 kept-alive connections through the HTTP listener",
              "http", load.HttpRequest()),
        _http("http1-new-conn",
              "GET /hello with 'Connection: close' (a new connection per request), HTTP listener",
              "http", load.HttpRequest(close=True)),
        _http("http1-1mib", "GET /1m.bin (1 MiB responses) over 50 kept-alive connections, "
              "HTTP listener (MiB/s of response bodies)",
              "http", load.HttpRequest(path="/1m.bin", payload=_MIB), primary=_MIB_S,
              extra=(_REQ_S,)),
        _http("http1-post", "POST /upload with a 64 KiB body over 50 kept-alive connections, "
              "HTTP listener (req/s; MiB/s of request bodies)",
              "http", load.HttpRequest("POST", "/upload", 64 * _KIB, payload=64 * _KIB),
              extra=(_MIB_S,)),
        _http("reload-under-load",
              "GET /hello at --rate over 50 kept-alive connections, HTTP listener: meshproxy "
              "plain and with PUT /config every second (meshproxy+reload)",
              "http", load.HttpRequest(), extra=_RELOADS, needs_rate=True,
              targets=("direct", "meshproxy", "meshproxy+reload")),
        _http("mtls-hop-keepalive",
              "GET /hello over 50 kept-alive connections through a hop of two proxies, both on "
              "CPU 1: plaintext into A, mutual TLS from A to B, B to the origin",
              mtls.HOP, load.HttpRequest(), targets=("meshproxy-plain", *_TLS_TARGETS)),
        Scenario(
            name="mtls-handshakes",
            summary="A new mutual-TLS connection per request straight into the TLS-terminating "
                    "proxy (B of the hop): full handshake with a client certificate, GET /hello, "
                    "close (handshakes/s)",
            origin="http",
            listener=mtls.TLS,
            run_load=tlsload.handshakes,
            primary=Column("handshakes/s", "hps", ",.0f"),
            columns=(Column("handshake p50 ms", "handshake_p50_ms", ".2f"),
                     Column("resumed", "resumed", ",.0f"), *_LATENCY),
            cost_unit="handshake",
            targets=_TLS_TARGETS,
        ),
        Scenario(
            name="h2-small",
            summary="GET /hello over HTTP/2 cleartext (h2c, prior knowledge), h2load 50 "
                    "connections x 10 streams, through each target's h2c listener, HTTP/1.1 to "
                    "the origin (direct: the origin itself over HTTP/1.1, 10 pipelined)",
            origin="http",
            listener="h2c",
            run_load=load.h2(load.HttpRequest(), streams=10),
            primary=_REQ_S,
            columns=_H2LOAD_LATENCY,
            cost_unit="req",
            targets=("meshproxy", "nghttpx", "haproxy"),
            notes=(
                ("Closed loop (h2load, one thread, -D seconds): latency is h2load's "
                 "\"time for request\" (mean, sd and max over the requests it sampled, all of "
                 "them up to a million; it gives no percentiles). failed = errored + timed out + "
                 "status other than 2xx/3xx; req/s counts the succeeded requests."),
                ("`direct` is **not HTTP/2**: the nginx origin takes HTTP/1.1 only, so it gets "
                 "`h2load --h1`, the 10 streams per connection becoming 10 pipelined requests "
                 "(perf-anchors.md's reference row); ×direct compares with that."),
            ),
        ),
        Scenario(
            name="grpc-unary",
            summary="gRPC unary calls (5-byte messages), a grpcio client with 50 calls in flight "
                    "over 4 HTTP/2 connections, to a grpcio origin: one proxy hop (cluster "
                    "protocol: http2) vs direct; the Python client and origin share CPU 0 and "
                    "bound the rate there, so compare proxy µs/call",
            origin="grpc",
            listener="grpc",
            run_load=grpcload.unary,
            primary=Column("calls/s", "cps", ",.0f"),
            columns=(Column("unfinished", "unfinished", ",.0f"), *_GRPC_LATENCY),
            cost_unit="call",
            targets=("direct", "meshproxy"),
            notes=(
                ("gRPC load (bench/grpcload.py): grpc.aio, closed loop. A call counts as "
                 "completed when its status is OK, the answer is right and the trailing "
                 "metadata `x-bench: kept` arrived; failed = any other ending (by status code in "
                 "raw/), unfinished = calls still in flight 3 s after the window. Latency: call "
                 "start to status, completed calls only."),
                ("The grpcio client and origin cost roughly 130-160 µs of CPU per call each, on "
                 "CPU 0: calls/s is bound by that core (see its busy time under Load side), not "
                 "by a proxy on CPU 1; compare the proxy's µs/call."),
            ),
        ),
    )
}
