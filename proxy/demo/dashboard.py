"""The live view: a table redrawn every second, and the keys that poke the mesh.

    screen = make_screen(sys.stdout)           # RichScreen with rich installed, else PlainScreen
    screen.show(view)                          # a View: rows, identities, lines, events
    with KeyReader.open() as keys:             # cbreak stdin when it is a terminal, else nothing
        await keys.run(on_key)                 # on_key("s"), ... until cancelled

`render_text(view)` is the plain-text form (pure); rich draws the same View as tables.
"""

from __future__ import annotations

import contextlib
import os
import sys
import termios
import tty
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import trio

CLEAR = "\x1b[H\x1b[2J"


@dataclass(frozen=True)
class Row:
    service: str
    admin: str  # the sidecar's admin URL ("" for the load generator)
    rps: float | None
    success: float | None  # 0..1
    p50_ms: float | None
    p99_ms: float | None
    note: str = ""


@dataclass(frozen=True)
class IdentityRow:
    service: str
    identity: str
    serial: str
    expires_in: float | None  # seconds
    rotations: int


@dataclass
class View:
    title: str
    rows: list[Row]
    identities: list[IdentityRow]
    lines: list[str] = field(default_factory=list)  # state: canary, v2, policy
    events: list[str] = field(default_factory=list)  # newest last
    keys: str = ""


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _expires(seconds: float | None) -> str:
    return "-" if seconds is None else f"{max(0.0, seconds):.0f}s"


HEADERS = ("service", "sidecar admin", "req/s", "ok", "p50 ms", "p99 ms", "")
ID_HEADERS = ("service", "mTLS identity (SPIFFE ID)", "cert serial", "expires in", "rotations")


def row_cells(row: Row) -> list[str]:
    return [row.service, row.admin or "-", _num(row.rps, 0), _percent(row.success), _num(row.p50_ms, 2),
            _num(row.p99_ms, 2), row.note]


def identity_cells(row: IdentityRow) -> list[str]:
    return [row.service, row.identity, row.serial or "-", _expires(row.expires_in), str(row.rotations)]


def _table(headers: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cells[i])) for cells in [list(headers), *rows]) for i in range(len(headers))]
    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
    return [line(headers), line(["-" * w for w in widths]), *(line(cells) for cells in rows)]


def render_text(view: View) -> str:
    """The whole view as plain text (no colours, no cursor codes)."""
    out = [view.title, ""]
    out += _table(HEADERS, [row_cells(row) for row in view.rows])
    out.append("")
    out += _table(ID_HEADERS, [identity_cells(row) for row in view.identities])
    out.append("")
    out += view.lines
    if view.events:
        out += ["", "events:"] + [f"  {event}" for event in view.events]
    if view.keys:
        out += ["", view.keys]
    return "\n".join(out) + "\n"


class PlainScreen:
    """Redraws the plain-text view in place on a terminal."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def show(self, view: View) -> None:
        self.out.write(CLEAR + render_text(view))
        self.out.flush()

    def close(self) -> None:
        pass


class RichScreen:
    """The view as rich tables, redrawn in place."""

    def __init__(self, out: IO[str]) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=out)
        self.live = Live(console=self.console, auto_refresh=False, transient=False)
        self.live.start()

    def show(self, view: View) -> None:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        main = Table(title=view.title, title_justify="left", expand=False)
        for i, header in enumerate(HEADERS):
            if 2 <= i <= 5:  # the numbers: never cut
                main.add_column(header, justify="right", no_wrap=True, min_width=max(len(header), 6))
            else:
                main.add_column(header, overflow="fold", no_wrap=i == 0)
        for row in view.rows:
            cells = row_cells(row)
            style = "red" if row.success is not None and row.success < 0.99 else None
            main.add_row(*cells, style=style)
        ids = Table(expand=False)
        for i, header in enumerate(ID_HEADERS):
            ids.add_column(header, overflow="fold", no_wrap=i in (0, 3, 4))
        for identity in view.identities:
            ids.add_row(*identity_cells(identity))
        parts: list[Any] = [main, ids, Text("\n".join(view.lines))]
        if view.events:
            parts.append(Text("events:\n" + "\n".join(f"  {e}" for e in view.events), style="dim"))
        if view.keys:
            parts.append(Text(view.keys, style="bold"))
        self.live.update(Group(*parts), refresh=True)

    def close(self) -> None:
        self.live.stop()


def make_screen(out: IO[str]) -> PlainScreen | RichScreen:
    try:
        import rich  # noqa: F401 - only whether it is there
    except ImportError:
        return PlainScreen(out)
    return RichScreen(out)


class KeyReader:
    """Single key presses from a terminal, without Enter and without echo (cbreak mode);
    restored on exit. When stdin is not a terminal, `run` just waits."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    @contextlib.contextmanager
    def open(cls, stream: IO[str] | None = None) -> Iterator[KeyReader]:
        stream = sys.stdin if stream is None else stream
        try:
            fd = stream.fileno()
            interactive = os.isatty(fd)
        except (AttributeError, ValueError, OSError):
            interactive = False
        if not interactive:
            yield cls(None)
            return
        saved = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd, termios.TCSANOW)  # keys typed while the mesh started still count
            yield cls(fd)
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    @property
    def interactive(self) -> bool:
        return self.fd is not None

    async def run(self, on_key: Callable[[str], Awaitable[None]]) -> None:
        if self.fd is None:
            await trio.sleep_forever()
            return
        while True:
            await trio.lowlevel.wait_readable(self.fd)
            try:
                data = os.read(self.fd, 32)
            except BlockingIOError:
                continue
            if not data:  # the terminal went away
                await trio.sleep_forever()
            for char in data.decode("utf-8", "replace").lower():
                await on_key(char)
