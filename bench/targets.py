"""The systems under test: how each is configured, started on the proxy core, and stopped.

Each target writes its config into a fresh work directory and returns the command to run;
`running` starts it with `taskset -c PROXY_CPU` (unless --no-pin), waits until it accepts, and
stops it by PID. `listener` names what the scenario needs the target to expose: "tcp" (an L4
forwarder), "http" (an HTTP/1.1 reverse proxy with upstream keep-alive), "h2c" (the same
taking HTTP/2 clients with prior knowledge, upstream still HTTP/1.1) or "grpc" (h2c in, HTTP/2
to a gRPC origin); the TLS targets of bench/mtls.py expose "hop" (two proxies in a chain) and
"tls" (a mutual-TLS listener).
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

from . import collector, mtls, proc, reload, upstream


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    config: Path
    ready_url: str | None = None  # polled for 200 on top of the listening check
    admin_url: str | None = None  # meshproxy's admin plane
    env: dict[str, str] | None = None  # added to the environment


@dataclass(frozen=True)
class Proxy:
    """A started target: where to send load, and the process tree to account (None: direct)."""

    port: int
    process: subprocess.Popen | None
    config: Path | None
    admin_url: str | None = None
    http1_only: bool = False  # the port speaks HTTP/1.1 only (the origin, in an h2c scenario)


class Target:
    name: str
    listeners: frozenset[str] = frozenset({"tcp"})

    def missing(self, listener: str) -> str | None:
        """Why this target cannot expose `listener` here, or None."""
        return None

    def launch(
        self, workdir: Path, listener: str, port: int, upstream_port: int, workers: int
    ) -> Launch | None:
        """Write the config for `listener` on `port` forwarding to `upstream_port`."""
        raise NotImplementedError

    def during_window(self, proxy: Proxy) -> reload.Background | None:
        """What runs beside the load in the measured window (None: nothing)."""
        return None

    @contextmanager
    def running(
        self, listener: str, upstream_port: int, workers: int, workdir: Path, log: Path,
        cpu: int | None,
    ) -> Iterator[Proxy]:
        """Start this target pinned to `cpu`; yield where to send load; stop it on exit. By
        default: the one process `launch()` describes (none for `direct`)."""
        port = proc.free_port()
        launch = self.launch(workdir, listener, port, upstream_port, workers)
        if launch is None:  # no proxy: the load goes to the origin, whose HTTP is HTTP/1.1
            yield Proxy(upstream_port, None, None, http1_only=listener == "h2c")
            return
        with proc.started(launch.argv, cpu, log, port, launch.ready_url, launch.env) as process:
            yield Proxy(port, process, launch.config, launch.admin_url)


def _tool(name: str, package: str | None = None) -> str | None:
    if shutil.which(name):
        return None
    return f"{name} is not installed (apt-get install -y {package or name})"


class Direct(Target):
    """No proxy: the load goes straight to the origin. In an h2c scenario that is HTTP/1.1 (the
    nginx origin takes no HTTP/2), so the load there is the same over HTTP/1.1 (h2load --h1:
    pipelined), the reference of perf-anchors.md."""

    name = "direct"
    listeners = frozenset({"tcp", "http", "h2c", "grpc"})

    def launch(self, workdir, listener, port, upstream_port, workers):
        return None


_MESHPROXY = """\
node: {{id: bench}}
admin: {{address: {host}:{admin}}}
workers: {workers}
listeners:
  - name: bench-in
    address: {host}:{port}
{listener}
clusters:
  - name: origin
    endpoints: [{host}:{upstream}]
    connect_timeout: 1s
{cluster}"""


_MESHPROXY_LISTENER = {
    "tcp": "    protocol: tcp\n    cluster: origin",
    "http": "    protocol: http\n    routes:\n      - {name: all, match: {prefix: /}, cluster: origin}",
}
# A `protocol: http` listener also takes HTTP/2 clients with prior knowledge (h2c).
_MESHPROXY_LISTENER["h2c"] = _MESHPROXY_LISTENER["grpc"] = _MESHPROXY_LISTENER["http"]
_MESHPROXY_CLUSTER = {"grpc": "    protocol: http2\n"}  # gRPC needs HTTP/2 to the endpoints


def _reload_variant(config: str, k: int) -> str:
    """The `k`-th config PUT by `meshproxy+reload`: the launched one plus a second route
    `reload-k` (prefix /reload-k/, timeout 5s) ahead of the catch-all, so that every PUT
    changes the route table of the listener carrying the load, but not the route it uses."""
    catch_all = "      - {name: all, match: {prefix: /}, cluster: origin}"
    extra = (f"      - {{name: reload-{k}, match: {{prefix: /reload-{k}/}}, cluster: origin, "
             "timeout: 5s}\n")
    return config.replace(catch_all, extra + catch_all, 1)


class Meshproxy(Target):
    """meshproxy itself: a `protocol: tcp` listener, or a `protocol: http` listener with one
    route for every path, both to the cluster `origin`. The http listener takes HTTP/1.1 and
    h2c clients alike ("http", "h2c"); for "grpc" the cluster has `protocol: http2`."""

    name = "meshproxy"
    listeners = frozenset({"tcp", "http", "h2c", "grpc"})

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

    def missing(self, listener):
        if self.command() is None:
            return "no `meshproxy` command and no importable proxy.cli (pip install -e .)"
        return None

    def launch(self, workdir, listener, port, upstream_port, workers):
        admin = proc.free_port()
        config = workdir / "meshproxy.yaml"
        config.write_text(
            _MESHPROXY.format(
                host=proc.HOST, admin=admin, workers=workers, port=port, upstream=upstream_port,
                listener=_MESHPROXY_LISTENER[listener],
                cluster=_MESHPROXY_CLUSTER.get(listener, ""),
            )
        )
        return Launch(
            [*self.command(), "--config", str(config)],
            config,
            ready_url=f"http://{proc.HOST}:{admin}/ready",
            admin_url=f"http://{proc.HOST}:{admin}",
        )


class MeshproxyReload(Meshproxy):
    """meshproxy with its HTTP listener, plus a thread of the harness (on CPU 0) that PUTs a
    changed config to `/config` on the admin plane every second of the measured window."""

    name = "meshproxy+reload"
    listeners = frozenset({"http"})

    def during_window(self, proxy):
        base = proxy.config.read_text()
        return reload.Reloader(proxy.admin_url, lambda k: _reload_variant(base, k))


class MeshproxyVariant(Meshproxy):
    """meshproxy's HTTP listener with features switched on, to measure what they cost against
    plain `meshproxy` in the same run: extra route fields, cluster fields, and top-level
    sections (each a YAML fragment; `{workdir}` and `{collector}` are filled in)."""

    listeners = frozenset({"http"})

    def __init__(self, name: str, route: str = "", cluster: str = "", top: str = "") -> None:
        self.name = name
        self.route, self.cluster, self.top = route, cluster, top

    def launch(self, workdir, listener, port, upstream_port, workers):
        launch = super().launch(workdir, listener, port, upstream_port, workers)
        fill = {"workdir": workdir, "collector": collector.url() if "{collector}" in self.top else ""}
        text = launch.config.read_text()
        catch_all = "{name: all, match: {prefix: /}, cluster: origin}"
        text = text.replace(catch_all, catch_all[:-1] + self.route + "}", 1)
        text = text.replace("    connect_timeout: 1s\n", "    connect_timeout: 1s\n" + self.cluster, 1)
        launch.config.write_text(text + self.top.format(**fill))
        return launch


# What issue-level features cost on the small-request path (see bench/README.md).
RESILIENCE = MeshproxyVariant(
    "meshproxy+resilience",
    route=", timeout: 5s, retry: {attempts: 2, on: [reset, gateway-error], per_try_timeout: 2s}",
    cluster="    circuit_breaker: {max_requests: 4096}\n    outlier_detection: {consecutive_5xx: 5}\n",
)
ACCESS_LOG = MeshproxyVariant(
    "meshproxy+accesslog", top="telemetry:\n  access_log: {{path: {workdir}/access.log, format: json}}\n")
TRACING = {
    rate: MeshproxyVariant(
        f"meshproxy+trace{label}",
        top=("telemetry:\n  tracing: {{propagation: [w3c], otlp_endpoint: '{collector}', "
             f"sample_rate: {rate}, service_name: bench}}}}\n"))
    for label, rate in (("100", 1.0), ("1", 0.01))
}
LOGS_AND_TRACING = MeshproxyVariant(
    "meshproxy+logs+trace1",
    top=("telemetry:\n  access_log: {{path: {workdir}/access.log, format: json}}\n"
         "  tracing: {{propagation: [w3c], otlp_endpoint: '{collector}', sample_rate: 0.01, "
         "service_name: bench}}\n"))


class Haproxy(Target):
    """HAProxy, one thread, default buffers (no splice options): `mode tcp`, or `mode http` with
    `option http-keep-alive` and `http-reuse always` (pooled upstream connections); for h2c the
    frontend binds with `proto h2` (perf-anchors.md's), for gRPC the server line too."""

    name = "haproxy"
    listeners = frozenset({"tcp", "http", "h2c", "grpc"})

    def missing(self, listener):
        return _tool("haproxy")

    def launch(self, workdir, listener, port, upstream_port, workers):
        config = workdir / "haproxy.cfg"
        http = listener != "tcp"
        mode = "  mode http\n  option http-keep-alive\n" if http else "  mode tcp\n"
        reuse = "  http-reuse always\n" if http else ""
        bind = " proto h2" if listener in ("h2c", "grpc") else ""
        server = " proto h2" if listener == "grpc" else ""
        config.write_text(
            "global\n  nbthread 1\n  maxconn 8000\n"
            f"defaults\n{mode}"
            "  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
            f"frontend bench-in\n  bind {proc.HOST}:{port}{bind}\n  default_backend origin\n"
            f"backend origin\n{reuse}  server origin {proc.HOST}:{upstream_port}{server}\n"
        )
        return Launch(["haproxy", "-db", "-f", str(config)], config)


class Socat(Target):
    """socat forking one child per connection, default 8 KiB buffer."""

    name = "socat"

    def missing(self, listener):
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
    built = subprocess.run(["nginx", "-V"], capture_output=True, text=True, check=False).stderr
    if "--with-stream=dynamic" not in built:
        return "" if re.search(r"--with-stream(\s|$)", built) else None
    modules = re.search(r"--modules-path=(\S+)", built)
    module = Path(modules[1] if modules else "/usr/lib/nginx/modules") / "ngx_stream_module.so"
    return f"load_module {module};" if module.exists() else None


# The HTTP reverse proxy of shared/reference/perf-anchors.md, plus client_body_buffer_size so
# that a 64 KiB upload stays in memory (the default 16k spools every such body to a temp file).
_NGINX_HTTP = """\
http {{
  access_log off;
  keepalive_requests 10000000;
  client_body_buffer_size 128k;
  upstream origin {{
    server {host}:{upstream};
    keepalive 64;
  }}
  server {{
    listen {host}:{port}{http2};
    location / {{
{location}
    }}
  }}
}}"""
_NGINX_PROXY = """\
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffers 16 64k;
      proxy_buffer_size 64k;
      proxy_max_temp_file_size 0;"""
_NGINX_GRPC = "      grpc_pass grpc://origin;"  # HTTP/2 to the origin, on the kept-alive pool


class Nginx(Target):
    """nginx, one worker: the stream module's `proxy_pass` (L4), or the HTTP reverse proxy of
    perf-anchors.md (upstream keepalive 64); for h2c the same with `listen ... http2` (nginx
    1.22: HTTP/2 only on that port, by prior knowledge), for gRPC with `grpc_pass` instead."""

    name = "nginx"
    listeners = frozenset({"tcp", "http", "h2c", "grpc"})

    def missing(self, listener):
        if reason := _tool("nginx"):
            return reason
        if listener == "tcp" and _nginx_stream_preamble() is None:
            return "nginx has no stream module (apt-get install -y libnginx-mod-stream)"
        return None

    def launch(self, workdir, listener, port, upstream_port, workers):
        if listener != "tcp":
            body = _NGINX_HTTP.format(
                host=proc.HOST, port=port, upstream=upstream_port,
                http2="" if listener == "http" else " http2",
                location=_NGINX_GRPC if listener == "grpc" else _NGINX_PROXY)
            return Launch(upstream.write_nginx_conf(workdir, body), workdir / "nginx.conf")
        argv = upstream.write_nginx_conf(
            workdir,
            f"stream {{\n  server {{\n    listen {proc.HOST}:{port};\n"
            f"    proxy_pass {proc.HOST}:{upstream_port};\n  }}\n}}",
            preamble=_nginx_stream_preamble() or "",
        )
        return Launch(argv, workdir / "nginx.conf")


class Caddy(Target):
    """Caddy (optional), `reverse_proxy` to the origin, GOMAXPROCS=1 so its Go runtime keeps to
    the one core it is pinned to; HTTP only. The Caddyfile of perf-anchors.md without h2c, plus
    `bind`: a site address alone does not restrict the interface, Caddy would listen on all of
    them (on the IPv6 wildcard, which /proc/net/tcp does not show)."""

    name = "caddy"
    listeners = frozenset({"http"})

    def missing(self, listener):
        return _tool("caddy")

    def launch(self, workdir, listener, port, upstream_port, workers):
        config = workdir / "Caddyfile"
        config.write_text(
            "{\n\tadmin off\n\tauto_https off\n}\n\n"
            f"http://{proc.HOST}:{port} {{\n\tbind {proc.HOST}\n"
            f"\treverse_proxy {proc.HOST}:{upstream_port}\n}}\n"
        )
        argv = ["caddy", "run", "--config", str(config), "--adapter", "caddyfile"]
        # XDG_*: its autosaved config and its (unused) storage stay in the work directory.
        env = {"GOMAXPROCS": "1", "XDG_CONFIG_HOME": str(workdir / "xdg-config"),
               "XDG_DATA_HOME": str(workdir / "xdg-data")}
        return Launch(argv, config, env=env)


class Nghttpx(Target):
    """nghttpx (optional), one worker: frontend h1/h2c without TLS, HTTP/1.1 backend ("http",
    "h2c"), or an HTTP/2 backend (`;proto=h2`) for gRPC. An empty --conf so
    /etc/nghttpx/nghttpx.conf is not read."""

    name = "nghttpx"
    listeners = frozenset({"http", "h2c", "grpc"})

    def missing(self, listener):
        return _tool("nghttpx", "nghttp2-proxy")

    def launch(self, workdir, listener, port, upstream_port, workers):
        empty = workdir / "nghttpx.conf"
        empty.write_text("")
        argv = [
            "nghttpx", "-n1", f"-f{proc.HOST},{port};no-tls",
            f"-b{proc.HOST},{upstream_port}" + (";;proto=h2" if listener == "grpc" else ""),
            "--log-level=WARN", f"--conf={empty}",
        ]
        config = workdir / "nghttpx.args"  # the whole configuration is on the command line
        config.write_text(shlex.join(argv) + "\n")
        return Launch(argv, config)


class MtlsTarget(Target):
    """A target of the mtls-* scenarios (bench/mtls.py): listener "hop" is a chain of two proxies
    A -> B on the proxy core (TLS between them for all but meshproxy-plain), "tls" is B's
    mutual-TLS listener alone; a mesh CA, where there is one, runs on the load core."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.listeners = mtls.LISTENERS[name]

    def missing(self, listener):
        return mtls.missing(self.name, Meshproxy.command())

    @contextmanager
    def running(self, listener, upstream_port, workers, workdir, log, cpu):
        with mtls.started(self.name, listener, upstream_port, workers, workdir, log, cpu,
                          Meshproxy.command()) as started:
            yield Proxy(started.port, started.process, started.config, started.admin_url)


ALL: dict[str, Target] = {
    t.name: t
    for t in (Direct(), Meshproxy(), Haproxy(), Socat(), Nginx(), MeshproxyReload(), Caddy(),
              Nghttpx(), RESILIENCE, ACCESS_LOG, *TRACING.values(), LOGS_AND_TRACING,
              *map(MtlsTarget, mtls.KINDS))
}
DEFAULT = ("direct", "meshproxy", "haproxy", "socat", "nginx")  # when a scenario names none


def unavailable(target: Target, listener: str) -> str | None:
    """Why `target` cannot take part in a scenario needing `listener`, or None."""
    if listener not in target.listeners:
        return f"no {listener} listener in this suite"
    return target.missing(listener)


@contextmanager
def running(
    target: Target, listener: str, upstream_port: int, workers: int, workdir: Path, log: Path,
    cpu: int | None,
) -> Iterator[Proxy]:
    """Start `target` pinned to `cpu` (None: unpinned); yield where to send load; stop it on
    exit."""
    with target.running(listener, upstream_port, workers, workdir, log, cpu) as proxy:
        yield proxy
