"""The origin every target forwards to, pinned to the load core.

- "http": nginx serving GET /hello ("hello"), GET /1m.bin (1 MiB of random bytes) and
  POST /upload (reads the whole body, then answers "uploaded"), one worker,
  keepalive_requests high, access_log off, sendfile on.
- "iperf3": an iperf3 server, for bulk TCP.
- "grpc": a grpcio server (grpcorigin.py) answering the unary method `/bench.Echo/Unary`.
"""

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import BenchError, proc

_INSTALL = {"http": "nginx", "iperf3": "iperf3"}
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # holds `bench`, for python -m


@dataclass(frozen=True)
class Origin:
    port: int
    pid: int


def write_nginx_conf(workdir: Path, body: str, preamble: str = "") -> list[str]:
    """Write a one-worker, foreground nginx config whose files all live in `workdir`;
    return the command that runs it."""
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"{preamble}\n"
        "daemon off;\n"
        "master_process on;\n"
        "worker_processes 1;\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        f"{body}\n"
    )
    return ["nginx", "-p", f"{workdir}/", "-e", f"{workdir}/error.log", "-c", str(conf)]


def _nginx_origin(workdir: Path, port: int) -> list[str]:
    www = workdir / "www"
    www.mkdir()
    (www / "1m.bin").write_bytes(os.urandom(1 << 20))
    return write_nginx_conf(
        workdir,
        "http {\n"
        "  access_log off;\n"
        "  sendfile on;\n"
        "  keepalive_requests 10000000;\n"
        "  default_type application/octet-stream;\n"
        "  server {\n"
        f"    listen {proc.HOST}:{port};\n"
        f"    root {www};\n"
        '    location = /hello { default_type text/plain; return 200 "hello"; }\n'
        # POST /upload answers only once the whole body is in: the mirror module reads it
        # before the content phase, whose 405 (empty_gif takes only GET) becomes a 200. A plain
        # `return 200` would answer as soon as the head is in and drop the body afterwards.
        "    location = /upload {\n"
        "      client_body_buffer_size 128k;\n"
        "      mirror /_sink;\n"
        "      mirror_request_body on;\n"
        "      error_page 405 =200 @uploaded;\n"
        "      empty_gif;\n"
        "    }\n"
        '    location @uploaded { default_type text/plain; return 200 "uploaded"; }\n'
        "    location = /_sink { internal; return 204; }\n"
        "  }\n"
        "}",
    )


def missing(kind: str) -> str | None:
    """Why the origin of this kind cannot run here, or None."""
    if kind == "grpc":
        found = importlib.util.find_spec("grpc") is not None
        return None if found else "the grpcio package is not installed (pip install grpcio)"
    tool = _INSTALL[kind]
    return None if shutil.which(tool) else f"{tool} is not installed (apt-get install -y {tool})"


@contextmanager
def origin(kind: str, workdir: Path, log: Path, cpu: int | None) -> Iterator[Origin]:
    """Run the origin of this kind ("http", "iperf3" or "grpc") on `cpu` until the block exits.

    `workdir` must be readable by nginx's unprivileged worker user."""
    if reason := missing(kind):
        raise BenchError(reason)
    workdir.mkdir(mode=0o755)
    port = proc.free_port()
    env = None
    if kind == "http":
        argv = _nginx_origin(workdir, port)
    elif kind == "grpc":
        argv = [sys.executable, "-m", "bench.grpcorigin", "--host", proc.HOST, "--port", str(port)]
        path = os.environ.get("PYTHONPATH")
        env = {"PYTHONPATH": _PACKAGE_ROOT + (os.pathsep + path if path else "")}
    else:
        argv = ["iperf3", "-s", "-B", proc.HOST, "-p", str(port)]
    with proc.started(argv, cpu, log, port, env=env) as process:
        yield Origin(port, process.pid)
