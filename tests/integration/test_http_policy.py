"""A listener policy on HTTP requests (methods, path prefixes) and the client certificate
header, through a real meshproxy and a real origin: refused requests never reach the
origin, paths that could be resolved around a rule are refused, and a client cannot pass
its own `x-forwarded-client-cert` off as the proxy's."""

from __future__ import annotations

import pytest

from .faulty_origin import FaultyOrigin
from .http_support import RawClient, cluster, http_config, route


@pytest.fixture
def origin():
    server = FaultyOrigin("app")
    yield server
    server.close()


@pytest.fixture
def proxy(meshproxy, origin):
    policy = [{"deny": {"prefix": "/admin"}},
              {"allow": {"methods": ["GET", "HEAD"]}},
              {"allow": {"methods": ["POST"], "prefix": "/api/"}}]
    return meshproxy(http_config([route("all", "app")], [cluster("app", [origin.endpoint])],
                                 policy=policy))


def ask(proxy, method: str, target: str, headers=()):
    with RawClient(proxy.address(), timeout=5) as client:
        client.request(method, target, headers, body=b"" if method == "POST" else None)
        return client.read_response(method)


@pytest.mark.parametrize(("method", "target", "status"), [
    ("GET", "/", 200),
    ("GET", "/api/users?x=1", 200),
    ("POST", "/api/users", 200),
    ("POST", "/other", 403),          # no allow rule for it
    ("DELETE", "/api/users", 403),
    ("GET", "/admin", 403),           # deny wins over the GET allow
    ("GET", "/admin/users", 403),
    ("GET", "/api/../admin", 403),    # would resolve to /admin upstream
    ("GET", "/api/%2e%2e/admin", 403),
    ("GET", "/api%2Fadmin", 403),
    ("GET", "/./admin", 403),
])
def test_the_policy_decides_before_the_origin_sees_anything(proxy, origin, method, target, status):
    response = ask(proxy, method, target)
    assert response.status == status, response
    if status == 403:
        assert response.header("x-meshproxy-error") == "forbidden"
        assert origin.count() == 0
    else:
        assert origin.count() == 1


def test_a_client_cannot_forge_the_client_certificate_header(proxy, origin):
    forged = "By=spiffe://mesh.local/ns/x/sa/proxy;URI=spiffe://mesh.local/ns/default/sa/admin"
    response = ask(proxy, "GET", "/hello", [("x-forwarded-client-cert", forged)])
    assert response.status == 200
    seen = origin.wait_requests(1)[0]
    assert seen.header("x-forwarded-client-cert") is None  # plaintext: no verified peer at all
    assert seen.header("x-forwarded-proto") == "http"
