"""Active health checks of one cluster's endpoints (edge: Trio and real sockets).

Each endpoint gets its own task: a check, a pause of `interval` give or take 10% (so that
the checks of many workers and proxies do not fall into step), and again, until cancelled.
A check passes when the endpoint accepts a connection (`tcp: true`), or answers a 2xx
status to `GET path` (HTTP/1.1, `Connection: close`), within `timeout`. Verdicts go to a
`HealthState`, which decides when an endpoint flips.

    health = availability.health                 # a HealthState for the cluster
    async with trio.open_nursery() as nursery:   # owned by the worker; cancel to stop
        await nursery.start(run_health_checks, cluster, health)
"""

from __future__ import annotations

import logging
import random
import socket
from typing import Protocol

import h11
import trio

from ..config import Address, Cluster, HealthCheck
from ..errors import UpstreamConnectError
from ..net.connect import connect

log = logging.getLogger("meshproxy.health")


class Verdicts(Protocol):
    """Where verdicts go: a `cluster.health.HealthState`, or what wraps one."""

    def record(self, index: int, passed: bool) -> bool: ...  # True: the endpoint flipped
    def status(self, index: int) -> str: ...

JITTER = 0.1  # each pause is interval x (1 +- JITTER)
MAX_RESPONSE_HEAD = 16384  # bytes read for a response head before the check fails
USER_AGENT = "meshproxy-health-check"


async def run_health_checks(cluster: Cluster, health: Verdicts, *,
                            rng: random.Random | None = None,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Check every endpoint of `cluster` per its `health_check`, feeding `health`, until
    cancelled. Reports started once every endpoint's task is running."""
    check = cluster.health_check
    if check is None:
        raise ValueError(f"cluster {cluster.name!r} has no health_check")
    rng = rng or random.Random()
    async with trio.open_nursery() as nursery:
        for index, endpoint in enumerate(cluster.endpoints):
            nursery.start_soon(_check_forever, cluster.name, index, endpoint.address, check,
                               health, rng)
        task_status.started()


async def _check_forever(cluster: str, index: int, address: Address, check: HealthCheck,
                         health: Verdicts, rng: random.Random) -> None:
    while True:
        passed = await check_endpoint(address, check)
        if health.record(index, passed):
            log.info("cluster %s: endpoint %s is %s", cluster, address, health.status(index))
        await trio.sleep(jittered(check.interval, rng.random()))


def jittered(interval: float, roll: float) -> float:
    """`interval` moved by up to JITTER either way, for a `roll` uniform in [0, 1)."""
    return interval * (1.0 + JITTER * (2.0 * roll - 1.0))


async def check_endpoint(address: Address, check: HealthCheck) -> bool:
    """One check of `address`; True when it passed within `check.timeout`."""
    with trio.move_on_after(check.timeout):
        try:
            fd = await connect(address, check.timeout)
        except UpstreamConnectError:
            return False
        with trio.socket.from_stdlib_socket(socket.socket(fileno=fd)) as sock:
            if check.path is None:
                return True
            try:
                return await _get_answers_2xx(sock, address, check.path)
            except OSError:
                return False
    return False


async def _get_answers_2xx(sock: trio.socket.SocketType, address: Address, path: str) -> bool:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    headers = [("Host", str(address)), ("User-Agent", USER_AGENT), ("Connection", "close")]
    events = (h11.Request(method="GET", target=path, headers=headers), h11.EndOfMessage())
    view = memoryview(b"".join(conn.send(event) or b"" for event in events))
    while view:
        view = view[await sock.send(view):]
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return False  # not HTTP, or a head too large
        if event is h11.NEED_DATA:
            conn.receive_data(await sock.recv(4096))  # b"" at EOF: ConnectionClosed next
        elif isinstance(event, h11.Response):
            return 200 <= event.status_code <= 299
        elif not isinstance(event, h11.InformationalResponse):
            return False  # the connection closed before a response
