"""What each scenario runs: the origin it needs, the listener every target must expose,
the load applied, and the figures that go in the table."""

from collections.abc import Callable
from dataclasses import dataclass

from . import load, mtls, tlsload
from .report import Column

_KIB, _MIB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    origin: str  # "http" (nginx) or "iperf3": see upstream.py
    listener: str  # what each target exposes: "tcp" (L4), "http" (L7, HTTP/1.1), "hop", "tls"
    # (port, seconds, settings[, window]): applies the load, marks the measured window
    run_load: Callable[..., load.LoadResult]
    primary: Column  # the headline figure; ratios to direct, nginx and haproxy are taken on it
    columns: tuple[Column, ...]  # further figures from the load tool
    cost_unit: str  # proxy CPU is reported per this unit of work ("req", "MiB")
    open_loop: bool = False  # whether --rate (the open-loop generator) applies
    needs_rate: bool = False  # open loop only: refuses to run without --rate
    targets: tuple[str, ...] | None = None  # default --targets (None: targets.DEFAULT)


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
    )
}
