"""Config for identity, mTLS and authorization: what parses, what it means, and every error
named by its field path."""

import json
import pickle
from pathlib import Path

import pytest

from proxy.config import ConfigError, config_to_dict, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "configs/examples/mtls.yaml"
WEB = "spiffe://mesh.local/ns/default/sa/web"

IDENTITY = "identity: {ca: 127.0.0.1:15012, token_file: /run/token, trust_bundle: /etc/bundle.pem}"
LOCAL = "{name: local, endpoints: [127.0.0.1:9001]}"


def http_listener(extra: str = "") -> str:
    return ("  - {name: in, address: 127.0.0.1:15006, protocol: http,"
            f" routes: [{{name: app, match: {{prefix: /}}, cluster: local}}]{extra}}}\n")


def tcp_listener(extra: str = "") -> str:
    return f"  - {{name: db, address: 127.0.0.1:15432, protocol: tcp, cluster: local{extra}}}\n"


def config(listeners: str, clusters: str = f"  - {LOCAL}\n", identity: str = IDENTITY) -> str:
    return f"{identity}\nlisteners:\n{listeners}clusters:\n{clusters}"


def errors(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return {error.path: error.message for error in info.value.errors}


def test_the_shipped_example_means_what_it_says():
    example = load_config(EXAMPLE)
    assert example.identity is not None and example.identity.ttl == 86400.0
    assert str(example.identity.ca) == "127.0.0.1:15012"
    inbound = example.listener("inbound")
    assert inbound.tls is not None and inbound.tls.mode == "strict"
    deny, web, monitoring = inbound.policy
    assert deny.deny is not None and deny.deny.prefix == "/admin" and deny.deny.from_ is None
    assert web.allow is not None and web.allow.from_ == (WEB,) and web.allow.methods == ("GET", "POST")
    assert monitoring.allow is not None and monitoring.allow.from_ == ("spiffe://mesh.local/ns/monitoring/*",)
    assert example.listener("inbound-grpc-tcp").tls.mode == "permissive"
    orders = example.cluster("orders")
    assert orders.tls is not None and len(orders.tls.identity) == 2
    assert example.cluster("local-app").tls is None and example.listener("outbound-orders").tls is None


def test_defaults_one_identity_as_a_string_and_the_round_trip():
    parsed = parse_config(config(
        http_listener(", tls: {}, policy: [{allow: {from: ['*'], methods: [get]}}]"),
        f"  - {LOCAL}\n  - {{name: api, endpoints: [127.0.0.1:9002], tls: {{identity: {WEB}}}}}\n",
    ))
    assert parsed.identity.ttl == 86400.0
    listener = parsed.listener("in")
    assert listener.tls.mode == "strict"
    assert listener.policy[0].allow.methods == ("GET",)
    assert parsed.cluster("api").tls.identity == (WEB,)
    data = config_to_dict(parsed)
    assert data["listeners"][0]["policy"] == [{"allow": {"from": ["*"], "methods": ["GET"]}}]
    assert data["clusters"][1]["tls"] == {"identity": [WEB]}
    assert data["identity"]["ttl"] == "24h"
    assert parse_config(json.dumps(data)) == parsed
    assert pickle.loads(pickle.dumps(parsed)) == parsed


def test_tls_needs_an_identity_section():
    found = errors(config(http_listener(", tls: {mode: strict}"),
                          f"  - {LOCAL}\n  - {{name: api, endpoints: [127.0.0.1:9002], tls: {{identity: {WEB}}}}}\n",
                          identity=""))
    assert found == {
        "listeners[0].tls": "needs the top-level identity section (this sidecar's certificate)",
        "clusters[1].tls": "needs the top-level identity section (this sidecar's certificate)",
    }


@pytest.mark.parametrize(("identity", "path", "message"), [
    ("{ca: 127.0.0.1:0, token_file: /t, trust_bundle: /b}", "identity.ca", "port must be a number from 1"),
    ("{ca: 127.0.0.1:15012, token_file: '', trust_bundle: /b}", "identity.token_file", "must not be empty"),
    ("{ca: 127.0.0.1:15012, token_file: /t}", "identity.trust_bundle", "required field missing"),
    ("{ca: 127.0.0.1:15012, token_file: /t, trust_bundle: /b, ttl: 1s}", "identity.ttl",
     "must be from 2s to 168h, got 1s"),
    ("{ca: 127.0.0.1:15012, token_file: /t, trust_bundle: /b, ttl: 8d}", "identity.ttl", "duration string"),
    ("{ca: 127.0.0.1:15012, token_file: /t, trust_bundle: /b, tll: 1h}", "identity.tll",
     "unknown field; did you mean 'ttl'?"),
])
def test_identity_errors(identity, path, message):
    found = errors(config(http_listener(), identity=f"identity: {identity}"))
    assert message in found[path], found


@pytest.mark.parametrize(("extra", "path", "message"), [
    (", tls: {mode: loose}", "listeners[0].tls.mode", "must be 'strict' or 'permissive', got 'loose'"),
    (", tls: {mode: strict, verify: no}", "listeners[0].tls.verify", "unknown field"),
    (", tls: {}, policy: [{allow: {from: [spiffe://mesh.local]}}]", "listeners[0].policy[0].allow.from[0]",
     "names a trust domain, not a workload"),
    (", tls: {}, policy: [{allow: {from: ['spiffe://Mesh.local/x']}}]", "listeners[0].policy[0].allow.from[0]",
     "trust domain 'Mesh.local'"),
    (", tls: {}, policy: [{allow: {from: ['spiffe://mesh.local/ns/web*']}}]",
     "listeners[0].policy[0].allow.from[0]", "'*' is only allowed alone or as a final '/*'"),
    (", tls: {}, policy: [{allow: {from: ['https://web/*']}}]", "listeners[0].policy[0].allow.from[0]",
     "a prefix is a SPIFFE ID followed by '/*'"),
    (", tls: {}, policy: [{allow: {from: []}}]", "listeners[0].policy[0].allow.from", "must not be empty"),
    (", policy: [{deny: {methods: ['GE T']}}]", "listeners[0].policy[0].deny.methods[0]", "HTTP method"),
    (", policy: [{deny: {prefix: api}}]", "listeners[0].policy[0].deny.prefix", 'must start with "/"'),
    (", policy: [{deny: {frm: [x]}}]", "listeners[0].policy[0].deny.frm", "unknown field; did you mean 'from'?"),
    (", policy: [{allow: {}, deny: {}}]", "listeners[0].policy[0]", "set exactly one of allow or deny"),
    (", policy: [{}]", "listeners[0].policy[0]", "set exactly one of allow or deny"),
    (", policy: [{allow: {from: ['*']}}]", "listeners[0].policy[0].allow.from",
     "needs tls on this listener: without mTLS no client has an identity"),
])
def test_listener_tls_and_policy_errors(extra, path, message):
    found = errors(config(http_listener(extra)))
    assert message in found.get(path, ""), found


def test_methods_and_prefix_are_for_http_listeners_only():
    found = errors(config(tcp_listener(", tls: {}, policy: [{allow: {from: ['*'], methods: [GET], prefix: /x}}]")))
    assert found == {"listeners[0].policy[0].allow.methods": "only for http listeners",
                     "listeners[0].policy[0].allow.prefix": "only for http listeners"}
    ok = parse_config(config(tcp_listener(", tls: {mode: permissive}, policy: [{deny: {from: [spiffe://mesh.local/*]}}]")))
    assert ok.listener("db").policy[0].deny.from_ == ("spiffe://mesh.local/*",)


@pytest.mark.parametrize(("tls", "path", "message"), [
    ("{}", "clusters[0].tls.identity", "required field missing"),
    ("{identity: []}", "clusters[0].tls.identity", "must not be empty"),
    ("{identity: [spiffe://mesh.local/a, spiffe://mesh.local/a]}", "clusters[0].tls.identity[1]",
     "'spiffe://mesh.local/a' is listed twice"),
    ("{identity: web}", "clusters[0].tls.identity[0]", "starts with 'spiffe://'"),
    ("{identity: 'spiffe://mesh.local/*'}", "clusters[0].tls.identity[0]", "path segments"),
])
def test_cluster_tls_errors(tls, path, message):
    found = errors(config(tcp_listener(), f"  - {{name: local, endpoints: [127.0.0.1:9001], tls: {tls}}}\n"))
    assert message in found.get(path, ""), found
