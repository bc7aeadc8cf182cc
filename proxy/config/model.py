"""The config as frozen, typed objects.

Each type validates its own fields; `Config` adds the checks that span the whole file
(unique names, free listen addresses, cluster references). Text-level concerns (YAML,
turning pydantic's errors into `path: message` lines) live in `load.py`.

Values parsed from text arrive with the validation context `FROM_TEXT`; there a bare
number for a duration is rejected (seconds? milliseconds?), while Python callers pass
float seconds.
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Annotated, Any, Literal, NamedTuple, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..identity.spiffe import SpiffeId

FROM_TEXT = {"from_text": True}

Problem = tuple[tuple[str | int, ...], str]  # (location, message)

# Error type of the whole-config checks; the loader uses it to tell whether they ran.
SEMANTIC = "semantic"

MAX_WORKERS = 256
# The lifetimes a sidecar may ask its certificates for (the CA caps them at 7 days).
MIN_SVID_TTL = 2.0
MAX_SVID_TTL = 7 * 86400.0
HASH_LB = ("ring_hash", "maglev")


def invalid(message: str, kind: str = "invalid") -> PydanticCustomError:
    """A validation error whose message is shown as is (no template expansion)."""
    return PydanticCustomError(kind, "{message}", {"message": message})


def _errors(title: str, problems: Iterable[Problem], kind: str = "invalid") -> ValidationError:
    """Several errors at locations relative to the value being validated. Raised inside a
    validator, pydantic merges them into the outer error with the full path."""
    details = [
        InitErrorDetails(type=invalid(msg, kind), loc=loc, input=None) for loc, msg in problems
    ]
    return ValidationError.from_exception_data(title, details)


def describe(value: Any) -> str:
    """How a value from the file is named in messages: scalars as written, containers by kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def suggest(word: str, options: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {match[0]!r}?" if match else ""


# -- names -----------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise invalid(f"must be a name of letters, digits, '.', '_' or '-', got {describe(value)}")
    return value


Name = Annotated[StrictStr, AfterValidator(_check_name)]


# -- addresses -------------------------------------------------------------------------------


class Address(NamedTuple):
    """A socket address; IPv6 hosts are stored without brackets and in canonical form."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def _canonical_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.split(".")
    # An all-numeric last label means a mistyped IP (e.g. 256.0.0.1), never a real name.
    valid = all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()
    if len(host) > 253 or not valid:
        raise ValueError(f"{host!r} is not a valid IP address or hostname")
    return host.lower()


def parse_address(value: str, min_port: int) -> Address:
    """Parse "host:port" or "[v6]:port"; raises ValueError with a message for the user."""
    if not isinstance(value, str):
        raise TypeError(f"must be a host:port string, got {describe(value)}")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"must be host:port, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            message = f"{host!r} in brackets must be an IPv6 address, got {value!r}"
            raise ValueError(message) from None
    elif ":" in host:
        raise ValueError(f"IPv6 addresses must be in brackets, e.g. '[::1]:80', got {value!r}")
    if not (port.isascii() and port.isdigit()) or not min_port <= int(port) <= 65535:
        raise ValueError(f"port must be a number from {min_port} to 65535, got {value!r}")
    return Address(_canonical_host(host), int(port))


def _address_validator(min_port: int) -> Callable[[Any], Address]:
    def validate(value: Any) -> Address:
        if isinstance(value, Address):
            value = str(value)  # Python callers: still check the host and port range
        try:
            return parse_address(value, min_port)
        except (TypeError, ValueError) as exc:
            raise invalid(str(exc)) from None

    return validate


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_AsString = PlainSerializer(str, when_used="json")
ListenAddress = Annotated[Address, PlainValidator(_address_validator(min_port=0)), _AsString]
UpstreamAddress = Annotated[Address, PlainValidator(_address_validator(min_port=1)), _AsString]


# -- durations -------------------------------------------------------------------------------

_UNITS = {"h": Decimal(3600), "m": Decimal(60), "s": Decimal(1), "ms": Decimal("0.001")}
_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_DURATION_HINT = "must be a duration string with a unit, e.g. '250ms' or '5s'"


def parse_duration(text: str) -> float:
    """'250ms' -> 0.25. Decimal arithmetic so that format_duration round-trips exactly."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"{_DURATION_HINT}, got {text!r}")
    return float(Decimal(match[1]) * _UNITS[match[2]])


def format_duration(seconds: float) -> str:
    """A whole number of the largest unit that fits ("2m", "250ms"), else decimal seconds."""
    exact = Decimal(repr(seconds))
    for unit, size in _UNITS.items():
        count = exact / size
        whole = count == count.to_integral_value()
        if whole and (unit != "ms" or exact < 1):  # "1.5s" rather than "1500ms"
            return f"{int(count)}{unit}"
    return f"{exact:f}s"


def _validate_duration(value: Any, info: ValidationInfo) -> float:
    from_text = bool(info.context and info.context.get("from_text"))
    if isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise invalid(str(exc)) from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not from_text:
        seconds = float(value)
    else:
        raise invalid(f"{_DURATION_HINT}, got {describe(value)}")
    if not seconds > 0:
        raise invalid(f"must be greater than 0, got {describe(value)}")
    if seconds == float("inf"):
        raise invalid(f"is too long, got {describe(value)}")
    return seconds


Duration = Annotated[
    float, PlainValidator(_validate_duration), PlainSerializer(format_duration, when_used="json")
]
PositiveInt = Annotated[StrictInt, Field(gt=0)]


# -- HTTP tokens -----------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_BAD_HEADER_VALUE = re.compile(r"[\x00\r\n]")


def _method(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise invalid(f"must be an HTTP method such as 'GET', got {describe(value)}")
    return value.upper()


def _path_like(value: str) -> str:
    if not value.startswith("/"):
        raise invalid('must start with "/"')
    if "?" in value or "#" in value:
        raise invalid("must be a path without '?' or '#' (query strings are not matched)")
    return value


def _host_pattern(value: str) -> str:
    """A host name (or IPv4 address), or `*.` and a domain for any name under it; stored
    lowercase. Requests are matched with their port removed, so none is allowed here."""
    name = value.removeprefix("*.")
    if ":" in name:  # a port, or an IPv6 literal
        raise invalid(f"must be a host name or IPv4 address without a port, got {describe(value)}")
    try:
        canonical = _canonical_host(name)
    except ValueError:
        hint = "must be a host name such as 'api.example.com' or '*.example.com'"
        raise invalid(f"{hint}, got {describe(value)}") from None
    return value[: len(value) - len(name)] + canonical


def _header_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise invalid(f"must be a header name, got {describe(value)}")
    return value.lower()


def _cookie_name(value: str) -> str:
    if not _TOKEN.fullmatch(value):  # RFC 6265: a token, and case-sensitive
        raise invalid(f"must be a cookie name, got {describe(value)}")
    return value


def _is_pair(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2


Method = Annotated[StrictStr, AfterValidator(_method)]
PathPattern = Annotated[StrictStr, AfterValidator(_path_like)]
HostPattern = Annotated[StrictStr, AfterValidator(_host_pattern)]
HeaderName = Annotated[StrictStr, AfterValidator(_header_name)]
CookieName = Annotated[StrictStr, AfterValidator(_cookie_name)]


# -- SPIFFE IDs ------------------------------------------------------------------------------


def _workload_id(value: str) -> str:
    """A workload's SPIFFE ID, e.g. spiffe://mesh.local/ns/default/sa/web."""
    try:
        spiffe_id = SpiffeId.parse(value)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if not spiffe_id.path:
        raise invalid(f"{value!r} names a trust domain, not a workload (add a path)")
    return value


def _principal(value: str) -> str:
    """Who a policy rule is about: an exact SPIFFE ID, every ID under a prefix
    ("spiffe://mesh.local/ns/default/*"), or "*" for any verified identity."""
    if value == "*":
        return value
    if value.endswith("/*"):
        try:
            SpiffeId.parse(value[:-2])
        except ValueError as exc:
            raise invalid(f"a prefix is a SPIFFE ID followed by '/*': {exc}") from None
        return value
    if "*" in value:
        raise invalid(f"'*' is only allowed alone or as a final '/*', got {describe(value)}")
    return _workload_id(value)


WorkloadId = Annotated[StrictStr, AfterValidator(_workload_id)]
Principal = Annotated[StrictStr, AfterValidator(_principal)]


# -- the model -------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Node(_Model):
    id: Name = "meshproxy"


class Admin(_Model):
    address: ListenAddress = Address("127.0.0.1", 15000)
    token_file: Annotated[StrictStr, Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _loopback_unless_token(self) -> Admin:
        if self.token_file is None and not _is_loopback(self.address.host):
            message = f"must be a loopback address unless token_file is set, got {self.address}"
            raise _errors("Admin", [(("address",), message)])
        return self


class Endpoint(_Model):
    address: UpstreamAddress
    weight: PositiveInt = 1

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # "host:port" is short for {address: "host:port"}; expanding it here keeps
        # the error for a bad address a single, plain one.
        if isinstance(data, str):
            return {"address": data}
        if not isinstance(data, (Mapping, Endpoint)):
            raise invalid(
                f"must be 'host:port' or a mapping with address and weight, got {describe(data)}"
            )
        return data


class HashOn(_Model):
    """What a hashing balancer (ring_hash, maglev) keys on; exactly one is set."""

    header: HeaderName | None = None  # stored lowercase
    cookie: CookieName | None = None
    source_ip: StrictBool | None = None  # only `true` selects it

    @model_validator(mode="after")
    def _exactly_one(self) -> HashOn:
        chosen = [f for f in ("header", "cookie", "source_ip") if getattr(self, f)]
        if len(chosen) != 1:
            found = " and ".join(chosen) if chosen else "none"
            message = f"set exactly one of header, cookie or source_ip: true (found {found})"
            raise _errors("HashOn", [((), message)])
        return self


# -- cluster resilience ----------------------------------------------------------------------

Percent = Annotated[StrictFloat, Field(ge=0, le=100)]
Count = Annotated[StrictInt, Field(ge=1, le=1_000_000)]


class CircuitLimits(_Model):
    """`clusters[].circuit_breaker`: beyond a limit a request is answered 503 `circuit_open`
    at once instead of queueing. Defaults are Envoy's."""

    max_connections: Count = 1024  # upstream connections open at once
    max_pending: Count = 1024  # requests waiting for a connection
    max_requests: Count = 1024  # requests in flight
    max_retries: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 3  # retries in flight


class OutlierDetection(_Model):
    """`clusters[].outlier_detection`: eject an endpoint after consecutive failures for
    base_ejection_time x times ejected; never more than max_ejection_percent of the endpoints
    (but always one, as Envoy does). A threshold of 0 turns that detector off."""

    consecutive_5xx: Annotated[StrictInt, Field(ge=0, le=1000)] = 5
    consecutive_gateway_errors: Annotated[StrictInt, Field(ge=0, le=1000)] = 5  # 502-504, no answer
    interval: Duration = 10.0  # how often ejections are reviewed and their multiplier decays
    base_ejection_time: Duration = 30.0
    max_ejection_percent: Annotated[StrictInt, Field(ge=0, le=100)] = 10


class HealthCheck(_Model):
    """`clusters[].health_check`: an active check per endpoint, every `interval` with jitter:
    an HTTP/1.1 GET of `path` answered 2xx within `timeout`, or (`tcp: true`) a connect.
    When fewer than `panic_threshold` percent of the endpoints are usable, all are used."""

    path: PathPattern | None = None
    tcp: StrictBool | None = None  # only `true` selects it
    interval: Duration = 5.0
    timeout: Duration = 1.0
    healthy_threshold: Annotated[StrictInt, Field(ge=1, le=100)] = 2
    unhealthy_threshold: Annotated[StrictInt, Field(ge=1, le=100)] = 3
    panic_threshold: Percent = 50.0  # 0 turns panic routing off

    @model_validator(mode="after")
    def _one_kind_in_time(self) -> HealthCheck:
        problems: list[Problem] = []
        if (self.path is None) == (not self.tcp):
            found = "path and tcp" if self.path is not None else "none"
            problems.append(((), f"set exactly one of path or tcp: true (found {found})"))
        if self.timeout > self.interval:
            interval = format_duration(self.interval)
            problems.append((("timeout",), f"must not be longer than interval ({interval})"))
        if problems:
            raise _errors("HealthCheck", problems)
        return self


class ClusterTls(_Model):
    """`clusters[].tls`: originate mTLS to every endpoint with this sidecar's SVID, and accept
    an upstream only if its SVID names one of `identity` (one ID or a list)."""

    identity: Annotated[tuple[WorkloadId, ...], Field(min_length=1)]

    @field_validator("identity", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("identity")
    @classmethod
    def _no_repeats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, name in enumerate(value):
            if name in value[:i]:
                raise _errors("ClusterTls", [((i,), f"{name!r} is listed twice")])
        return value


class Cluster(_Model):
    name: Name
    endpoints: Annotated[tuple[Endpoint, ...], Field(min_length=1)]
    lb: Literal["round_robin", "random", "least_request", "peak_ewma", "ring_hash", "maglev"] = (
        "round_robin"
    )
    hash_on: HashOn | None = None
    connect_timeout: Duration = 1.0
    circuit_breaker: CircuitLimits | None = None
    outlier_detection: OutlierDetection | None = None
    health_check: HealthCheck | None = None
    tls: ClusterTls | None = None  # needs the top-level `identity`
    protocol: Literal["http1", "http2"] = "http1"  # what is spoken to the endpoints (http listeners)

    @model_validator(mode="after")
    def _hash_on_for_hash_lb(self) -> Cluster:
        if self.lb in HASH_LB and self.hash_on is None:
            raise _errors("Cluster", [(("hash_on",), f"required for lb {self.lb!r}")])
        if self.lb not in HASH_LB and self.hash_on is not None:
            message = f"only used by lb 'ring_hash' or 'maglev', not {self.lb!r}"
            raise _errors("Cluster", [(("hash_on",), message)])
        return self


class RouteMatch(_Model):
    prefix: PathPattern | None = None  # a plain string prefix: "/api" also matches "/apis"
    path: PathPattern | None = None
    host: HostPattern | None = None  # "api.example.com" or "*.example.com"; any port
    headers: tuple[tuple[str, str], ...] = ()
    methods: tuple[Method, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _default_prefix(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("prefix") is None and data.get("path") is None:
            return {**data, "prefix": "/"}
        return data

    @field_validator("headers", mode="plain")
    @classmethod
    def _headers(cls, value: Any) -> tuple[tuple[str, str], ...]:
        """A mapping name -> exact value; stored as sorted (lowercase name, value) pairs."""
        if isinstance(value, Mapping):
            value = value.items()
        elif not (isinstance(value, tuple) and all(_is_pair(p) for p in value)):
            raise invalid(f"must be a mapping of header name to value, got {describe(value)}")
        pairs: list[tuple[str, str]] = []
        problems: list[Problem] = []
        for name, text in value:
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                problems.append(((str(name),), f"not a valid header name: {describe(name)}"))
            elif not isinstance(text, str):
                message = f"must be a string (quote numbers and booleans), got {describe(text)}"
                problems.append(((name,), message))
            elif _BAD_HEADER_VALUE.search(text):
                problems.append(((name,), "must not contain CR, LF or NUL"))
            elif any(seen == name.lower() for seen, _ in pairs):
                problems.append(((name,), "given twice (header names ignore case)"))
            else:
                pairs.append((name.lower(), text))
        if problems:
            raise _errors("RouteMatch", problems)
        return tuple(sorted(pairs))

    @field_serializer("headers", when_used="json")
    def _headers_as_mapping(self, headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
        return dict(headers)

    @model_validator(mode="after")
    def _one_of_prefix_or_path(self) -> RouteMatch:
        if self.prefix is not None and self.path is not None:
            raise _errors("RouteMatch", [(("path",), "set either prefix or path, not both")])
        return self


# -- route resilience ------------------------------------------------------------------------

RetryOn = Literal["connect-failure", "refused", "reset", "5xx", "gateway-error", "503",
                  "retriable-status-codes"]
RETRY_ON: tuple[str, ...] = get_args(RetryOn)
MAX_RETRY_BODY = 16 << 20


class Backoff(_Model):
    """Retry backoff, fully jittered exponential (Envoy's): retry n waits a random time
    below min(base x (2^n - 1), max)."""

    base: Duration = 0.025
    max: Duration = 0.25

    @model_validator(mode="after")
    def _max_not_below_base(self) -> Backoff:
        if self.max < self.base:
            message = f"must not be shorter than base ({format_duration(self.base)})"
            raise _errors("Backoff", [(("max",), message)])
        return self


class RetryBudget(_Model):
    """Retries allowed over a sliding 10 s window: `percent` of the requests plus
    `min_per_second` (Linkerd's retry budget)."""

    percent: Percent = 20.0
    min_per_second: Annotated[StrictInt, Field(ge=0, le=100_000)] = 10


class Retry(_Model):
    """`routes[].retry`. `attempts` counts retries after the first try (Envoy's num_retries).
    A request that is not idempotent (RFC 9110 9.2.2) is retried only when its connect
    failed; a body is replayable only up to `max_body_bytes`."""

    attempts: Annotated[StrictInt, Field(ge=0, le=10)] = 1
    on: Annotated[tuple[RetryOn, ...], Field(min_length=1)] = (
        "connect-failure", "refused", "reset", "gateway-error",
    )
    retriable_status_codes: tuple[Annotated[StrictInt, Field(ge=400, le=599)], ...] = ()
    per_try_timeout: Duration | None = None  # None: only the route's timeout bounds a try
    backoff: Backoff = Backoff()
    budget: RetryBudget = RetryBudget()
    max_body_bytes: Annotated[StrictInt, Field(ge=0, le=MAX_RETRY_BODY)] = 65536

    @field_validator("on", mode="before")
    @classmethod
    def _status_as_name(cls, value: Any) -> Any:
        """`on: [503]` in YAML is a number; it names the condition '503'."""
        if isinstance(value, (list, tuple)):
            return tuple("503" if item == 503 and type(item) is int else item for item in value)
        return value

    @model_validator(mode="after")
    def _codes_go_with_their_condition(self) -> Retry:
        problems: list[Problem] = []
        for i, name in enumerate(self.on):
            if name in self.on[:i]:
                problems.append((("on", i), f"{name!r} is listed twice"))
        for i, code in enumerate(self.retriable_status_codes):
            if code in self.retriable_status_codes[:i]:
                problems.append((("retriable_status_codes", i), f"{code} is listed twice"))
        wanted = "retriable-status-codes" in self.on
        if wanted and not self.retriable_status_codes:
            message = "required when on includes 'retriable-status-codes'"
            problems.append((("retriable_status_codes",), message))
        if self.retriable_status_codes and not wanted:
            message = "only used when on includes 'retriable-status-codes'"
            problems.append((("retriable_status_codes",), message))
        if problems:
            raise _errors("Retry", problems)
        return self


class FaultDelay(_Model):
    percent: Percent = 100.0  # of requests delayed
    duration: Duration


class FaultAbort(_Model):
    percent: Percent = 100.0  # of requests answered `status` without reaching the cluster
    status: Annotated[StrictInt, Field(ge=200, le=599)]


class Fault(_Model):
    """`routes[].fault`, for chaos testing: delay and/or abort a share of the requests
    (decided independently; a request may be delayed, then aborted)."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None

    @model_validator(mode="after")
    def _something(self) -> Fault:
        if self.delay is None and self.abort is None:
            raise _errors("Fault", [((), "set delay, abort or both")])
        return self


class RateLimit(_Model):
    """`routes[].rate_limit`: a local token bucket *per worker* (N workers admit up to N x rps),
    refilled at `rps`, holding up to `burst` tokens (default: rps rounded up). Over it: 429."""

    rps: Annotated[StrictFloat, Field(gt=0, le=1_000_000)]
    burst: Annotated[StrictInt, Field(ge=1, le=10_000_000)]

    @model_validator(mode="before")
    @classmethod
    def _default_burst(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "burst" not in data:
            rps = data.get("rps")
            number = isinstance(rps, (int, float)) and not isinstance(rps, bool)
            # A bad rps is reported on its own, not also as a missing burst.
            return {**data, "burst": max(1, math.ceil(rps)) if number and 0 < rps <= 1e6 else 1}
        return data


class Mirror(_Model):
    """`routes[].mirror`: a copy of `percent` of the requests goes to `cluster`; its
    responses are dropped and it never slows or fails the request it copies."""

    cluster: Name
    percent: Percent = 100.0


class WeightedCluster(_Model):
    cluster: Name
    weight: PositiveInt


class Route(_Model):
    name: Name
    match: RouteMatch
    cluster: Name | None = None
    split: tuple[WeightedCluster, ...] = ()
    timeout: Duration | None = None  # the whole request, retries included
    retry: Retry | None = None
    fault: Fault | None = None
    rate_limit: RateLimit | None = None
    mirror: Mirror | None = None

    @model_validator(mode="after")
    def _one_target(self) -> Route:
        if self.cluster is not None and self.split:
            raise _errors("Route", [(("split",), "set either cluster or split, not both")])
        if self.cluster is None and not self.split:
            raise _errors("Route", [(("cluster",), "required field missing (or set split)")])
        return self


class HttpLimits(_Model):
    """Bounds on what an HTTP/1.1 client may send in one request head."""

    max_request_line: Annotated[StrictInt, Field(ge=64, le=1 << 20)] = 8192  # over it: 414
    max_header_bytes: Annotated[StrictInt, Field(ge=256, le=1 << 20)] = 61440  # over it: 431
    max_headers: Annotated[StrictInt, Field(ge=1, le=10000)] = 100  # more fields: 431


class ListenerTls(_Model):
    """`listeners[].tls`: terminate mTLS with this sidecar's SVID. `strict` takes TLS clients
    only; `permissive` also takes plaintext on the same port, told apart by the first byte.
    A TLS client must present an SVID that chains to the trust bundle in either mode."""

    mode: Literal["strict", "permissive"] = "strict"


class PolicyMatch(_Model):
    """What one policy rule matches; every field given must match (none: everything).
    `from` lists SPIFFE IDs, prefixes ending in '/*', or '*' (any verified identity);
    `methods` and `prefix` (a plain path prefix, as in routes) are for http listeners."""

    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)

    from_: Annotated[tuple[Principal, ...], Field(min_length=1)] | None = Field(None, alias="from")
    methods: Annotated[tuple[Method, ...], Field(min_length=1)] | None = None
    prefix: PathPattern | None = None


class PolicyRule(_Model):
    """One entry of `listeners[].policy`: `{allow: {...}}` or `{deny: {...}}`."""

    allow: PolicyMatch | None = None
    deny: PolicyMatch | None = None

    @model_validator(mode="after")
    def _allow_or_deny(self) -> PolicyRule:
        if (self.allow is None) == (self.deny is None):
            raise _errors("PolicyRule", [((), "set exactly one of allow or deny")])
        return self

    @property
    def match(self) -> PolicyMatch:
        match = self.allow if self.allow is not None else self.deny
        assert match is not None  # the validator guarantees one
        return match


class Listener(_Model):
    name: Name
    address: ListenAddress
    protocol: Literal["http", "tcp"]
    cluster: Name | None = None
    routes: tuple[Route, ...] = ()
    max_connections: PositiveInt | None = None
    idle_timeout: Duration = 3600.0
    splice: StrictBool = True  # tcp only: False copies with recv/send instead of splice(2)
    limits: HttpLimits | None = None  # http only; None means the defaults
    tls: ListenerTls | None = None  # needs the top-level `identity`
    policy: tuple[PolicyRule, ...] = ()  # deny rules win; once one allow exists, the rest is denied

    @model_validator(mode="after")
    def _protocol_shape(self) -> Listener:
        problems: list[Problem] = []
        if self.protocol == "tcp":
            if self.cluster is None:
                problems.append((("cluster",), "required for tcp listeners"))
            if self.routes:
                problems.append((("routes",), "not allowed on tcp listeners (they use cluster)"))
            if self.limits is not None:
                problems.append((("limits",), "only for http listeners"))
        else:
            if self.cluster is not None:
                problems.append((("cluster",), "not allowed on http listeners (set it on a route)"))
            if not self.routes:
                problems.append((("routes",), "http listeners need at least one route"))
        problems += self._policy_problems()
        if problems:
            raise _errors("Listener", problems)
        return self

    def _policy_problems(self) -> list[Problem]:
        problems: list[Problem] = []
        for i, rule in enumerate(self.policy):
            kind = "allow" if rule.allow is not None else "deny"
            match = rule.match
            if self.protocol == "tcp":
                for name in ("methods", "prefix"):
                    if getattr(match, name) is not None:
                        problems.append((("policy", i, kind, name), "only for http listeners"))
            if match.from_ is not None and self.tls is None:
                message = "needs tls on this listener: without mTLS no client has an identity"
                problems.append((("policy", i, kind, "from"), message))
        return problems


class Identity(_Model):
    """`identity`: this sidecar's SPIFFE identity, issued by `meshproxy ca serve` at `ca`.

    The bootstrap token in `token_file` names the identity; `trust_bundle` holds the roots
    that peers' certificates (and the CA's) must chain to, re-read when the file changes.
    Certificates are asked for with lifetime `ttl` and renewed at about half of it."""

    ca: UpstreamAddress
    token_file: Annotated[StrictStr, Field(min_length=1)]
    trust_bundle: Annotated[StrictStr, Field(min_length=1)]
    ttl: Duration = 86400.0

    @field_validator("ttl")
    @classmethod
    def _ttl_range(cls, value: float) -> float:
        if not MIN_SVID_TTL <= value <= MAX_SVID_TTL:
            raise invalid(f"must be from {format_duration(MIN_SVID_TTL)} to "
                          f"{format_duration(MAX_SVID_TTL)}, got {format_duration(value)}")
        return value


def _workers(value: Any) -> int | Literal["auto"]:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value == "auto" or (is_int and 1 <= value <= MAX_WORKERS):
        return value
    raise invalid(f"must be an integer from 1 to {MAX_WORKERS} or 'auto', got {describe(value)}")


Fraction = Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)]


class AccessLog(_Model):
    """`telemetry.access_log`: one line per request (and per TCP connection), to `path`
    (`stdout` or a file, reopened on SIGUSR1 or POST /logs/reopen for rotation), as `json`
    or a template like "{method} {path} {status} {duration_ms}ms". `only: errors` or
    `min_status` keep some requests; `sample_rate` keeps a share of those."""

    path: Annotated[StrictStr, Field(min_length=1)] = "stdout"
    format: Annotated[StrictStr, Field(min_length=1)] = "json"
    sample_rate: Fraction = 1.0
    only: Literal["errors"] | None = None
    min_status: Annotated[StrictInt, Field(ge=0, le=599)] = 0

    @field_validator("format")
    @classmethod
    def _known_fields(cls, value: str) -> str:
        # Imported here: the telemetry package loads the compiled core, which `meshproxy
        # check` must not need.
        from ..telemetry.access_log import validate_format

        if value != "json":
            problems = validate_format(value)
            if problems:
                raise invalid("; ".join(problems))
        return value


class Tracing(_Model):
    """`telemetry.tracing`: trace context read and written in the `propagation` formats;
    spans exported as OTLP/HTTP to `otlp_endpoint`. Requests without a sampling decision
    from upstream are sampled at `sample_rate`."""

    propagation: Annotated[tuple[Literal["w3c", "b3", "b3multi"], ...], Field(min_length=1)] = ("w3c",)
    otlp_endpoint: StrictStr
    sample_rate: Fraction = 1.0
    service_name: Annotated[StrictStr, Field(min_length=1)] | None = None  # default: node.id
    encoding: Literal["protobuf", "json"] = "protobuf"

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        from ..tracing.endpoint import parse_otlp_endpoint  # as above: keeps imports light

        try:
            parse_otlp_endpoint(value)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        return value


class Telemetry(_Model):
    access_log: AccessLog | None = None
    tracing: Tracing | None = None


class Config(_Model):
    node: Node = Node()
    admin: Admin = Admin()
    workers: Annotated[int | Literal["auto"], PlainValidator(_workers)] = 1
    drain_timeout: Duration = 30.0
    listeners: Annotated[tuple[Listener, ...], Field(min_length=1)]
    clusters: tuple[Cluster, ...] = ()
    identity: Identity | None = None
    telemetry: Telemetry = Telemetry()

    @property
    def worker_count(self) -> int:
        if self.workers == "auto":
            return min(os.cpu_count() or 1, MAX_WORKERS)
        return self.workers

    def listener(self, name: str) -> Listener:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)

    def cluster(self, name: str) -> Cluster:
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        raise KeyError(name)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = semantic_problems(self.model_dump(mode="json"))
        if problems:
            raise _errors("Config", problems, kind=SEMANTIC)
        return self


# -- whole-config checks ---------------------------------------------------------------------
# They read plain data (the file as parsed, or a Config dumped back to it) and skip anything
# malformed, so the loader can run them even when some fields failed to validate.


def semantic_problems(data: Any) -> list[Problem]:
    """Duplicate names, clashing listen addresses, unknown clusters and tls without an
    identity, as (loc, message)."""
    listeners = _entries(data, "listeners")
    clusters = _entries(data, "clusters")
    problems = _duplicate_names(("listeners",), listeners, "listener")
    problems += _duplicate_names(("clusters",), clusters, "cluster")
    for i, listener in listeners:
        routes = _entries(listener, "routes")
        problems += _duplicate_names(("listeners", i, "routes"), routes, "route")
    problems += _address_clashes(listeners)
    known = {c["name"] for _, c in clusters if isinstance(c.get("name"), str)}
    for loc, name in _cluster_references(listeners):
        if isinstance(name, str) and name not in known:
            problems.append((loc, f"unknown cluster {name!r}{suggest(name, known)}"))
    if not (isinstance(data, Mapping) and data.get("identity") is not None):
        for what, entries in (("listeners", listeners), ("clusters", clusters)):
            for i, entry in entries:
                if entry.get("tls") is not None:
                    message = "needs the top-level identity section (this sidecar's certificate)"
                    problems.append(((what, i, "tls"), message))
    return problems


def _entries(data: Any, key: str) -> list[tuple[int, Mapping]]:
    """The well-formed (index, mapping) entries of the list at data[key]."""
    items = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(items, (list, tuple)):
        return []
    return [(i, item) for i, item in enumerate(items) if isinstance(item, Mapping)]


def format_path(loc: tuple) -> str:
    """('listeners', 1, 'routes', 0, 'match') -> 'listeners[1].routes[0].match'"""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _duplicate_names(loc: tuple, entries: list[tuple[int, Mapping]], what: str) -> list[Problem]:
    first: dict[str, int] = {}
    problems: list[Problem] = []
    for i, entry in entries:
        name = entry.get("name")
        if not isinstance(name, str):
            continue
        if name in first:
            also = format_path((*loc, first[name]))
            problems.append(((*loc, i, "name"), f"duplicate {what} name {name!r} (also {also})"))
        else:
            first[name] = i
    return problems


def _address_clashes(listeners: list[tuple[int, Mapping]]) -> list[Problem]:
    """The same host:port twice, or a wildcard host on a port another listener uses.
    Port 0 never clashes: the kernel picks a free port."""
    bound: list[tuple[int, Address]] = []
    problems: list[Problem] = []
    for i, listener in listeners:
        try:
            address = parse_address(listener.get("address"), min_port=0)
        except (ValueError, TypeError):
            continue  # field validation reports it
        if address.port == 0:
            continue
        for j, other in bound:
            if other.port == address.port and (
                other.host == address.host or _WILDCARD_HOSTS & {other.host, address.host}
            ):
                message = f"{address} clashes with listeners[{j}].address {other}"
                problems.append((("listeners", i, "address"), message))
                break
        bound.append((i, address))
    return problems


def _cluster_references(listeners: list[tuple[int, Mapping]]) -> Iterable[tuple[tuple, Any]]:
    """(loc, name) of every place a cluster is named: tcp listeners, routes, splits,
    mirrors."""
    for i, listener in listeners:
        if listener.get("cluster") is not None:
            yield ("listeners", i, "cluster"), listener["cluster"]
        for j, route in _entries(listener, "routes"):
            if route.get("cluster") is not None:
                yield ("listeners", i, "routes", j, "cluster"), route["cluster"]
            for k, part in _entries(route, "split"):
                yield ("listeners", i, "routes", j, "split", k, "cluster"), part.get("cluster")
            mirror = route.get("mirror")
            if isinstance(mirror, Mapping) and mirror.get("cluster") is not None:
                yield ("listeners", i, "routes", j, "mirror", "cluster"), mirror["cluster"]
