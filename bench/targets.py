"""The systems under test: how each is configured, started on the proxy core, and stopped.

Each target writes its config into a fresh work directory and returns the command to run;
`running` starts it with `taskset -c PROXY_CPU`, waits until it accepts, and stops it by PID.
`listener` names what the scenario needs the target to expose: "tcp" (an L4 forwarder).
"""

import functools
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import proc, upstream


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    config: Path
    ready_url: str | None = None  # polled for 200 on top of the listening check


@dataclass(frozen=True)
class Proxy:
    """A started target: where to send load, and the process tree to account (None: direct)."""

    port: int
    process: subprocess.Popen | None
    config: Path | None


class Target:
    name: str
    listeners: frozenset[str] = frozenset({"tcp"})

    def missing(self) -> str | None:
        """Why this target cannot run here, or None."""
        return None

    def launch(
        self, workdir: Path, listener: str, port: int, upstream_port: int, workers: int
    ) -> Launch | None:
        """Write the config for `listener` on `port` forwarding to `upstream_port`."""
        raise NotImplementedError


def _tool(name: str) -> str | None:
    return None if shutil.which(name) else f"{name} is not installed (apt-get install -y {name})"


class Direct(Target):
    """No proxy: the load goes straight to the origin."""

    name = "direct"
    listeners = frozenset({"tcp", "http"})

    def launch(self, workdir, listener, port, upstream_port, workers):
        return None


_MESHPROXY_TCP = """\
node: {{id: bench}}
admin: {{address: {host}:{admin}}}
workers: {workers}
listeners:
  - name: bench-in
    address: {host}:{port}
    protocol: tcp
    cluster: origin
clusters:
  - name: origin
    endpoints: [{host}:{upstream}]
    connect_timeout: 1s
"""


class Meshproxy(Target):
    name = "meshproxy"

    @staticmethod
    def command() -> list[str] | None:
        """The installed `meshproxy` command, else `python -m proxy.cli`; None if neither."""
        beside_python = str(Path(sys.executable).parent)
        if exe := shutil.which("meshproxy") or shutil.which("meshproxy", path=beside_python):
            return [exe]
        try:
            if importlib.util.find_spec("proxy.cli"):
                return [sys.executable, "-m", "proxy.cli"]
        except ImportError:
            pass
        return None

    def missing(self):
        if self.command() is None:
            return "no `meshproxy` command and no importable proxy.cli (pip install -e .)"
        return None

    def launch(self, workdir, listener, port, upstream_port, workers):
        admin = proc.free_port()
        config = workdir / "meshproxy.yaml"
        config.write_text(
            _MESHPROXY_TCP.format(
                host=proc.HOST, admin=admin, workers=workers, port=port, upstream=upstream_port
            )
        )
        return Launch(
            [*self.command(), "--config", str(config)],
            config,
            ready_url=f"http://{proc.HOST}:{admin}/ready",
        )


class Haproxy(Target):
    """HAProxy in `mode tcp`, one thread, default buffers (no splice options)."""

    name = "haproxy"

    def missing(self):
        return _tool("haproxy")

    def launch(self, workdir, listener, port, upstream_port, workers):
        config = workdir / "haproxy.cfg"
        config.write_text(
            "global\n  nbthread 1\n  maxconn 8000\n"
            "defaults\n  mode tcp\n"
            "  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
            f"frontend bench-in\n  bind {proc.HOST}:{port}\n  default_backend origin\n"
            f"backend origin\n  server origin {proc.HOST}:{upstream_port}\n"
        )
        return Launch(["haproxy", "-db", "-f", str(config)], config)


class Socat(Target):
    """socat forking one child per connection, default 8 KiB buffer."""

    name = "socat"

    def missing(self):
        return _tool("socat")

    def launch(self, workdir, listener, port, upstream_port, workers):
        argv = [
            "socat",
            f"TCP-LISTEN:{port},bind={proc.HOST},reuseaddr,fork",
            f"TCP:{proc.HOST}:{upstream_port}",
        ]
        config = workdir / "socat.args"
        config.write_text(shlex.join(argv) + "\n")
        return Launch(argv, config)


@functools.cache
def _nginx_stream_preamble() -> str | None:
    """The `load_module` line the stream module needs ("" if built in), None if absent."""
    built = subprocess.run(["nginx", "-V"], capture_output=True, text=True).stderr
    if "--with-stream=dynamic" not in built:
        return "" if re.search(r"--with-stream(\s|$)", built) else None
    modules = re.search(r"--modules-path=(\S+)", built)
    module = Path(modules[1] if modules else "/usr/lib/nginx/modules") / "ngx_stream_module.so"
    return f"load_module {module};" if module.exists() else None


class Nginx(Target):
    """nginx stream module `proxy_pass`, one worker."""

    name = "nginx"

    def missing(self):
        if reason := _tool("nginx"):
            return reason
        if _nginx_stream_preamble() is None:
            return "nginx has no stream module (apt-get install -y libnginx-mod-stream)"
        return None

    def launch(self, workdir, listener, port, upstream_port, workers):
        argv = upstream.write_nginx_conf(
            workdir,
            f"stream {{\n  server {{\n    listen {proc.HOST}:{port};\n"
            f"    proxy_pass {proc.HOST}:{upstream_port};\n  }}\n}}",
            preamble=_nginx_stream_preamble() or "",
        )
        return Launch(argv, workdir / "nginx.conf")


ALL: dict[str, Target] = {t.name: t for t in (Direct(), Meshproxy(), Haproxy(), Socat(), Nginx())}


def unavailable(target: Target, listener: str) -> str | None:
    """Why `target` cannot take part in a scenario needing `listener`, or None."""
    if listener not in target.listeners:
        return f"no {listener} listener support in this suite yet"
    return target.missing()


@contextmanager
def running(
    target: Target, listener: str, upstream_port: int, workers: int, workdir: Path, log: Path
) -> Iterator[Proxy]:
    """Start `target` pinned to the proxy core; yield where to send load; stop it on exit."""
    port = proc.free_port()
    launch = target.launch(workdir, listener, port, upstream_port, workers)
    if launch is None:
        yield Proxy(upstream_port, None, None)
        return
    with proc.started(launch.argv, proc.PROXY_CPU, log, port, launch.ready_url) as process:
        yield Proxy(port, process, launch.config)
