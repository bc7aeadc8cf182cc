"""What each scenario runs: the origin it needs, the listener every target must expose,
the load applied, and the figures that go in the table."""

from collections.abc import Callable
from dataclasses import dataclass

from . import load
from .report import Column


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    origin: str  # "http" (nginx) or "iperf3": see upstream.py
    listener: str  # what each target exposes: "tcp" (L4)
    run_load: Callable[[int, int], load.LoadResult]  # (port, seconds)
    primary: Column  # the headline figure; ratios to direct and haproxy are taken on it
    columns: tuple[Column, ...]  # further figures from the load tool
    cost_unit: str  # proxy CPU is reported per this unit of work ("req", "MiB")


_LATENCY = (
    Column("p50 ms", "p50_ms", ".2f"),
    Column("p90 ms", "p90_ms", ".2f"),
    Column("p99 ms", "p99_ms", ".2f"),
    Column("errors", "errors", ",.0f"),
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
        Scenario(
            name="tcp-rps",
            summary="wrk GET /hello over 50 kept-alive connections through the L4 listener",
            origin="http",
            listener="tcp",
            run_load=lambda port, seconds: load.wrk(port, "/hello", seconds),
            primary=Column("req/s", "rps", ",.0f"),
            columns=_LATENCY,
            cost_unit="req",
        ),
        Scenario(
            name="tcp-new-conn",
            summary="wrk GET /hello with 'Connection: close' (a new connection per request)",
            origin="http",
            listener="tcp",
            run_load=lambda port, seconds: load.wrk(
                port, "/hello", seconds, headers=("Connection: close",)
            ),
            primary=Column("req/s", "rps", ",.0f"),
            columns=_LATENCY,
            cost_unit="req",
        ),
    )
}
