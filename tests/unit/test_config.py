"""Config: valid files parse into the expected frozen objects and survive the trips they make."""
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

import proxy.config
from proxy.config import (
    Address,
    Admin,
    Cluster,
    Config,
    ConfigError,
    Endpoint,
    FieldError,
    HashOn,
    Listener,
    Node,
    Route,
    RouteMatch,
    WeightedCluster,
    config_to_dict,
    load_config,
    parse_config,
)
from proxy.config.model import format_duration, parse_duration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIGS.glob("**/*.yaml"))

DESIGN_EXAMPLE = """
node: {id: web-1}
admin: {address: 127.0.0.1:15000}
workers: 1
listeners:
  - name: http-in
    address: 127.0.0.1:8080
    protocol: http
    routes:
      - name: api
        match: {prefix: /api, headers: {X-Canary: "1"}, methods: [get]}
        split:
          - {cluster: api-v2, weight: 10}
          - {cluster: api-v1, weight: 90}
        timeout: 5s
      - name: default
        match: {prefix: /}
        cluster: web
  - name: db
    address: 127.0.0.1:15432
    protocol: tcp
    cluster: postgres
clusters:
  - name: web
    endpoints: [127.0.0.1:9001, {address: 127.0.0.1:9002, weight: 2}]
    lb: round_robin
    connect_timeout: 1s
  - {name: api-v1, endpoints: [10.0.0.1:80]}
  - {name: api-v2, endpoints: [10.0.0.2:80]}
  - {name: postgres, endpoints: [db.internal:5432]}
"""


def tcp_config(**overrides: str) -> str:
    """A minimal valid tcp config; overrides replace whole top-level YAML lines."""
    lines = {
        "workers": "workers: 1",
        "listeners": "listeners: [{name: in, address: '127.0.0.1:8080', protocol: tcp, cluster: up}]",
        "clusters": "clusters: [{name: up, endpoints: ['127.0.0.1:9001']}]",
    }
    lines.update(overrides)
    return "\n".join(lines.values())


def test_public_surface():
    assert set(proxy.config.__all__) == {
        "Address", "Admin", "Cluster", "Config", "ConfigError", "Endpoint", "FieldError", "HashOn",
        "HttpLimits", "Listener", "Node", "Route", "RouteMatch", "WeightedCluster",
        "config_to_dict", "load_config", "parse_config",
        # resilience: routes[].retry, fault, rate_limit, mirror; clusters[].circuit_breaker,
        # outlier_detection, health_check
        "Retry", "Backoff", "RetryBudget", "Fault", "FaultDelay", "FaultAbort", "RateLimit",
        "Mirror", "CircuitLimits", "OutlierDetection", "HealthCheck",
        # identity: identity; listeners[].tls, policy; clusters[].tls
        "Identity", "ListenerTls", "PolicyRule", "PolicyMatch", "ClusterTls",
        # telemetry: access_log, tracing
        "Telemetry", "AccessLog", "Tracing",
    }


def test_design_example_parses_into_typed_objects():
    config = parse_config(DESIGN_EXAMPLE)
    assert config.node == Node(id="web-1")
    assert config.admin == Admin()
    assert config.worker_count == 1
    assert config.drain_timeout == 30.0

    api, default = config.listener("http-in").routes
    assert api.match == RouteMatch(prefix="/api", headers=(("x-canary", "1"),), methods=("GET",))
    assert api.split == (
        WeightedCluster(cluster="api-v2", weight=10),
        WeightedCluster(cluster="api-v1", weight=90),
    )
    assert api.cluster is None and api.timeout == 5.0
    assert default == Route(name="default", match=RouteMatch(prefix="/"), cluster="web")

    db = config.listener("db")
    assert (db.protocol, db.cluster, db.routes) == ("tcp", "postgres", ())
    assert (db.splice, db.idle_timeout, db.max_connections) == (True, 3600.0, None)
    assert config.cluster("web").endpoints == (
        Endpoint(address=Address("127.0.0.1", 9001)),
        Endpoint(address=Address("127.0.0.1", 9002), weight=2),
    )
    assert config.cluster("web").connect_timeout == 1.0


def test_lookups_raise_keyerror_for_unknown_names():
    config = parse_config(DESIGN_EXAMPLE)
    with pytest.raises(KeyError):
        config.listener("nope")
    with pytest.raises(KeyError):
        config.cluster("nope")


def test_models_are_frozen_and_hashable():
    config = parse_config(DESIGN_EXAMPLE)
    with pytest.raises(pydantic.ValidationError):
        config.workers = 4
    assert hash(config) == hash(parse_config(DESIGN_EXAMPLE))
    assert len({config.cluster("web"), config.cluster("web")}) == 1


def test_pickle_round_trip():
    # The supervisor pickles the Config to hand it to worker processes.
    config = parse_config(DESIGN_EXAMPLE)
    assert pickle.loads(pickle.dumps(config)) == config


def test_config_to_dict_is_json_in_the_file_shape():
    data = config_to_dict(parse_config(DESIGN_EXAMPLE))
    assert data["listeners"][0]["address"] == "127.0.0.1:8080"
    assert data["listeners"][0]["routes"][0]["timeout"] == "5s"
    assert data["listeners"][0]["routes"][0]["match"]["headers"] == {"x-canary": "1"}
    assert data["clusters"][0]["connect_timeout"] == "1s"
    assert data["clusters"][0]["endpoints"][1] == {"address": "127.0.0.1:9002", "weight": 2}
    assert "token_file" not in data["admin"]
    json.dumps(data)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_load_and_round_trip(path):
    config = load_config(path)
    assert parse_config(json.dumps(config_to_dict(config))) == config
    assert pickle.loads(pickle.dumps(config)) == config


def test_shipped_configs_include_quickstart_and_examples():
    names = {str(p.relative_to(CONFIGS)) for p in SHIPPED}
    assert "quickstart.yaml" in names
    assert len([n for n in names if n.startswith("examples/")]) >= 3


def test_quickstart():
    config = load_config(CONFIGS / "quickstart.yaml")
    assert config.node.id == "quickstart"
    assert config.admin.address == Address("127.0.0.1", 15000)
    assert config.worker_count == 1
    http, tcp = config.listeners
    assert (http.name, str(http.address), http.protocol) == ("web-in", "127.0.0.1:8080", "http")
    assert [route.cluster for route in http.routes] == ["demo", "demo"]
    assert (tcp.name, str(tcp.address), tcp.protocol, tcp.cluster) == ("tcp-in", "127.0.0.1:8081", "tcp", "demo")
    assert config.cluster("demo").endpoints == (Endpoint(address=Address("127.0.0.1", 9001)),)


def test_defaults_for_node_admin_and_clusters_options():
    config = parse_config(tcp_config())
    assert config.node.id == "meshproxy"
    assert str(config.admin.address) == "127.0.0.1:15000"
    assert config.cluster("up").lb == "round_robin"
    assert config.cluster("up").connect_timeout == 1.0


# -- valid edge cases -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", Address("127.0.0.1", 80)),
        ("[::1]:443", Address("::1", 443)),
        ("[2001:DB8:0:0::1]:8000", Address("2001:db8::1", 8000)),  # stored canonical
        ("db:5432", Address("db", 5432)),
        ("API.Example.com:8443", Address("api.example.com", 8443)),
        ("my-svc.ns.svc.cluster.local:65535", Address("my-svc.ns.svc.cluster.local", 65535)),
    ],
)
def test_endpoint_addresses(text, expected):
    config = parse_config(tcp_config(clusters=f"clusters: [{{name: up, endpoints: ['{text}']}}]"))
    assert config.cluster("up").endpoints[0].address == expected


def test_address_str_brackets_ipv6():
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"
    assert str(Address("::1", 80)) == "[::1]:80"
    assert Address("::1", 80).host == "::1"


@pytest.mark.parametrize(
    "address", ["127.0.0.1:0", "[::]:0", "0.0.0.0:15006", "localhost:8080", "[::1]:8080"]
)
def test_listener_addresses_allow_port_zero_and_ipv6(address):
    listeners = f"listeners: [{{name: in, address: '{address}', protocol: tcp, cluster: up}}]"
    config = parse_config(tcp_config(listeners=listeners))
    assert str(config.listener("in").address) == address


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25), ("5s", 5.0), ("1.5s", 1.5), ("0.1s", 0.1), (".5s", 0.5),
        ("2m", 120.0), ("1.5m", 90.0), ("1h", 3600.0), ("0.5ms", 0.0005),
    ],
)
def test_durations(text, seconds):
    clusters = f"clusters: [{{name: up, endpoints: ['a:1'], connect_timeout: {text}}}]"
    config = parse_config(tcp_config(clusters=clusters))
    assert config.cluster("up").connect_timeout == seconds
    assert parse_config(json.dumps(config_to_dict(config))) == config


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (1.0, "1s"), (1.5, "1.5s"), (120.0, "2m"), (5400.0, "90m"), (3600.0, "1h"),
     (0.0005, "0.0005s"), (1 / 3, "0.3333333333333333s")],
)
def test_durations_are_written_back_readably(seconds, text):
    cluster = Cluster(name="up", endpoints=["a:1"], connect_timeout=seconds)
    listener = Listener(name="in", address="127.0.0.1:0", protocol="tcp", cluster="up")
    data = config_to_dict(Config(listeners=[listener], clusters=[cluster]))
    assert data["clusters"][0]["connect_timeout"] == text
    assert parse_config(json.dumps(data)).cluster("up").connect_timeout == seconds


def test_workers_auto_uses_cpu_count():
    config = parse_config(tcp_config(workers="workers: auto"))
    assert config.workers == "auto"
    assert config.worker_count == (os.cpu_count() or 1)
    assert config_to_dict(config)["workers"] == "auto"


def test_workers_number():
    assert parse_config(tcp_config(workers="workers: 8")).worker_count == 8


def test_route_match_without_prefix_or_path_matches_everything():
    assert RouteMatch().prefix == "/"
    assert RouteMatch(path="/healthz") == RouteMatch(prefix=None, path="/healthz")


def test_route_match_headers_are_lowercased_sorted_pairs():
    match = RouteMatch(headers={"X-B": "2", "x-a": "1"}, methods=["get", "Post"])
    assert match.headers == (("x-a", "1"), ("x-b", "2"))
    assert match.methods == ("GET", "POST")


@pytest.mark.parametrize(
    ("host", "stored"),
    [("API.Example.com", "api.example.com"), ("*.Example.COM", "*.example.com"),
     ("localhost", "localhost"), ("10.0.0.7", "10.0.0.7")],
)
def test_route_match_host_is_stored_lowercase(host, stored):
    assert RouteMatch(host=host).host == stored


@pytest.mark.parametrize("lb", ["round_robin", "random", "least_request", "peak_ewma"])
def test_every_lb_policy_without_hash_on(lb):
    clusters = f"clusters: [{{name: up, endpoints: ['a:1'], lb: {lb}}}]"
    config = parse_config(tcp_config(clusters=clusters))
    assert (config.cluster("up").lb, config.cluster("up").hash_on) == (lb, None)


@pytest.mark.parametrize(
    ("hash_on", "expected"),
    [
        ("{header: X-User}", HashOn(header="x-user")),
        ("{cookie: Session}", HashOn(cookie="Session")),  # cookie names are case-sensitive
        ("{source_ip: true}", HashOn(source_ip=True)),
    ],
)
@pytest.mark.parametrize("lb", ["ring_hash", "maglev"])
def test_hash_lb_with_hash_on(lb, hash_on, expected):
    clusters = f"clusters: [{{name: up, endpoints: ['a:1'], lb: {lb}, hash_on: {hash_on}}}]"
    config = parse_config(tcp_config(clusters=clusters))
    assert config.cluster("up").hash_on == expected
    data = config_to_dict(config)
    assert len(data["clusters"][0]["hash_on"]) == 1  # written back as it was given
    assert parse_config(json.dumps(data)) == config


def test_admin_off_loopback_is_fine_with_a_token_file():
    admin = Admin(address="0.0.0.0:15000", token_file="/run/meshproxy/token")
    assert admin.address == Address("0.0.0.0", 15000)


def test_tcp_listener_copy_path_and_limits():
    listeners = ("listeners: [{name: in, address: '127.0.0.1:5432', protocol: tcp, cluster: up, "
                 "splice: false, max_connections: 100, idle_timeout: 30m}]")
    listener = parse_config(tcp_config(listeners=listeners)).listener("in")
    assert (listener.splice, listener.max_connections, listener.idle_timeout) == (False, 100, 1800.0)


def test_python_callers_may_pass_seconds_and_addresses():
    endpoint = Endpoint(address=Address("::1", 80), weight=3)
    cluster = Cluster(name="up", endpoints=[endpoint], connect_timeout=0.5)
    assert cluster.connect_timeout == 0.5
    assert Endpoint(address="[::1]:80") == Endpoint(address=Address("::1", 80))


def test_python_built_config_is_checked_as_a_whole():
    listener = Listener(name="in", address="127.0.0.1:0", protocol="tcp", cluster="missing")
    with pytest.raises(pydantic.ValidationError, match="unknown cluster 'missing'"):
        Config(listeners=[listener])


def test_json_text_is_accepted():
    data = {"listeners": [{"name": "in", "address": "[::1]:0", "protocol": "tcp", "cluster": "up"}],
            "clusters": [{"name": "up", "endpoints": ["[::1]:9001"]}]}
    assert parse_config(json.dumps(data)).listener("in").address == Address("::1", 0)


def test_load_config_from_file(tmp_path):
    path = tmp_path / "sidecar.yaml"
    path.write_text(tcp_config())
    assert load_config(path) == parse_config(tcp_config())
    assert load_config(str(path)) == parse_config(tcp_config())


# -- ConfigError itself ---------------------------------------------------------------------


def test_config_error_is_one_line_per_error():
    error = ConfigError(
        [FieldError("workers", "must be an integer"), FieldError("", "config is empty")], "x.yaml"
    )
    assert str(error) == "workers: must be an integer\nx.yaml: config is empty"
    assert str(error.errors[0]) == "workers: must be an integer"


def test_config_error_pickles():
    error = ConfigError([FieldError("workers", "bad")], "x.yaml")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.errors, copy.source, str(copy)) == (error.errors, "x.yaml", str(error))


@given(st.floats(min_value=1e-9, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_any_duration_survives_the_round_trip(seconds):
    assert parse_duration(format_duration(seconds)) == seconds


def test_config_does_not_need_the_compiled_core():
    # `meshproxy check` must work before the Cython extensions are built.
    code = "import sys, proxy.config; print('\\n'.join(sys.modules))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert not [m for m in out.stdout.splitlines() if m.startswith("proxy._core")]


def test_http_limits_default_and_override():
    base = "listeners: [{name: w, address: 127.0.0.1:0, protocol: http, routes: [{name: r, match: {prefix: /}, cluster: c}]%s}]\nclusters: [{name: c, endpoints: [127.0.0.1:1]}]\n"
    assert parse_config(base % "").listeners[0].limits is None
    limits = parse_config(base % ", limits: {max_request_line: 4096, max_headers: 50}").listeners[0].limits
    assert (limits.max_request_line, limits.max_header_bytes, limits.max_headers) == (4096, 61440, 50)


def test_http_limits_are_checked_with_their_path():
    text = (
        "listeners:\n"
        "  - {name: w, address: 127.0.0.1:0, protocol: http, routes: [{name: r, match: {prefix: /}, cluster: c}],\n"
        "     limits: {max_headers: 0, max_request_line: big}}\n"
        "  - {name: t, address: 127.0.0.1:0, protocol: tcp, cluster: c, limits: {}}\n"
        "clusters: [{name: c, endpoints: [127.0.0.1:1]}]\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    paths = {e.path for e in info.value.errors}
    assert {"listeners[0].limits.max_headers", "listeners[0].limits.max_request_line", "listeners[1].limits"} <= paths


def test_every_yaml_example_in_the_readme_is_valid():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert blocks
    for block in blocks:
        parse_config(block, source="README.md")
