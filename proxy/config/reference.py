"""The config reference (docs/config-reference.md), generated from the config model itself.

    python -m proxy.config.reference > docs/config-reference.md

It walks the pydantic models from `Config` down: every field with its YAML name, its type
(read from the annotation as written in model.py, so `Duration` reads "duration" rather
than "float"), its default (serialized as a config file would write it) and its
description: the model's docstring, the comment on the field's line (or the comment lines
right above it), and a note from NOTES below for fields whose line carries no comment.
A test regenerates the file and compares it with the committed one, so the reference
changes with the model or the build fails; a NOTES entry for a field that no longer exists
is an error too.
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import tokenize
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic_core import PydanticUndefined

from . import model

ROOT = model.Config

# Type names of model.py as a user reads them.
ALIASES = {
    "Name": "name",
    "ListenAddress": "host:port",
    "UpstreamAddress": "host:port",
    "Duration": "duration",
    "PositiveInt": "integer ≥ 1",
    "Percent": "percent (0–100)",
    "Count": "integer 1–1000000",
    "Fraction": "number 0–1",
    "Method": "HTTP method",
    "PathPattern": "path",
    "HostPattern": "host pattern",
    "HeaderName": "header name",
    "CookieName": "cookie name",
    "WorkloadId": "SPIFFE ID",
    "Principal": "SPIFFE ID, prefix/* or *",
    "RetryOn": "retry condition",
    "StrictStr": "string",
    "StrictInt": "integer",
    "StrictFloat": "number",
    "StrictBool": "boolean",
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
}

# Where the annotation does not show what a file holds: the validator accepts another shape.
SHAPES = {
    "RouteMatch.headers": "mapping of header name to value",
    "ClusterTls.identity": "SPIFFE ID or list of SPIFFE IDs",
}

# Descriptions for fields whose line in model.py carries no comment (or one that reads
# well only next to the code); each replaces the comment.
NOTES = {
    "Listener.splice": "tcp only: `false` copies with recv/send instead of splice(2).",
    "RouteMatch.prefix": "A plain string prefix: `/api` also matches `/apis`. With neither `prefix` "
    "nor `path`, the prefix is `/`.",
    "Listener.limits": "http only: bounds on request heads; left out, the defaults apply.",
    "Retry.per_try_timeout": "Bounds each try; left out, only the route's `timeout` bounds a try.",
    "FaultDelay.percent": "Share of the requests delayed.",
    "FaultAbort.percent": "Share of the requests answered `status` without reaching the cluster.",
    "OutlierDetection.consecutive_gateway_errors": "Ejects an endpoint after this many gateway "
    "errors in a row (502-504, or no answer); 0: off.",
    "Config.node": "This sidecar's name, used in metrics, logs and `x-forwarded-client-cert`.",
    "Config.admin": "The admin HTTP plane.",
    "Config.workers": "Data-plane worker processes; `auto` is one per core. Changing it needs a restart.",
    "Config.drain_timeout": "How long SIGTERM (or `POST /drain`) waits for open connections.",
    "Config.listeners": "Where traffic comes in.",
    "Config.clusters": "Where traffic goes: named groups of endpoints.",
    "Config.identity": "This sidecar's SPIFFE identity, needed by any `tls` section.",
    "Config.telemetry": "Access logs and tracing.",
    "Node.id": "The sidecar's name.",
    "Admin.address": "Where the admin plane listens; loopback unless `token_file` is set.",
    "Admin.token_file": "A file holding a bearer token every admin request must carry.",
    "Endpoint.address": "Upstream host:port; a name is resolved again every 30s.",
    "Endpoint.weight": "Share of the traffic relative to the other endpoints.",
    "HashOn.cookie": "Hash on this cookie's value.",
    "OutlierDetection.consecutive_5xx": "Ejects an endpoint after this many 5xx in a row (0: off).",
    "OutlierDetection.base_ejection_time": "An ejection lasts this long times the endpoint's ejection count.",
    "OutlierDetection.max_ejection_percent": "Never eject more than this share of the endpoints (one always may be).",
    "HealthCheck.path": "HTTP check: GET this path, expect 2xx.",
    "HealthCheck.interval": "Time between checks of one endpoint (jittered).",
    "HealthCheck.timeout": "A check not answered within this fails.",
    "HealthCheck.healthy_threshold": "Passes in a row that make an unhealthy endpoint healthy.",
    "HealthCheck.unhealthy_threshold": "Failures in a row that make a healthy endpoint unhealthy.",
    "ClusterTls.identity": "The SPIFFE IDs an upstream may present.",
    "Cluster.name": "Referenced by routes, splits, mirrors and tcp listeners.",
    "Cluster.endpoints": "`host:port` strings or `{address, weight}` mappings.",
    "Cluster.lb": "How an endpoint is picked for each request (or connection).",
    "Cluster.hash_on": "What `ring_hash` and `maglev` hash; required for them.",
    "Cluster.connect_timeout": "A connect not done within this moves on to the next endpoint.",
    "Cluster.circuit_breaker": "Limits on connections, pending and in-flight requests and retries.",
    "Cluster.outlier_detection": "Eject endpoints that keep failing.",
    "Cluster.health_check": "Active health checks.",
    "RouteMatch.path": "Match this exact path (instead of `prefix`).",
    "RouteMatch.headers": "Every header named must be present with exactly this value.",
    "RouteMatch.methods": "Match only these methods (empty: any).",
    "Backoff.base": "The first retry waits up to this long.",
    "Backoff.max": "No retry waits longer than this.",
    "RetryBudget.percent": "Retries allowed as a share of the requests over the last 10s.",
    "RetryBudget.min_per_second": "Retries allowed per second on top of `percent`.",
    "Retry.attempts": "Retries after the first try.",
    "Retry.on": "What makes a try worth retrying.",
    "Retry.retriable_status_codes": "The statuses `retriable-status-codes` retries.",
    "Retry.backoff": "How long to wait before each retry.",
    "Retry.budget": "Caps retries so they cannot multiply an overload.",
    "Retry.max_body_bytes": "A request body larger than this is not buffered, so not retried.",
    "FaultDelay.duration": "How long a delayed request waits.",
    "FaultAbort.status": "The status an aborted request is answered with.",
    "Fault.delay": "Delay a share of the requests.",
    "Fault.abort": "Answer a share of the requests locally with an error.",
    "RateLimit.rps": "Tokens added per second (per worker).",
    "RateLimit.burst": "Tokens the bucket holds at most.",
    "Mirror.cluster": "Where the copies go.",
    "Mirror.percent": "Share of the requests copied.",
    "WeightedCluster.cluster": "A cluster of this split.",
    "WeightedCluster.weight": "Its share, relative to the other entries' weights.",
    "Route.name": "Unique per listener; names the route in metrics, logs and `/stats/latency`.",
    "Route.match": "What requests this route takes; the first route that matches wins.",
    "Route.cluster": "Where matched requests go (or `split`).",
    "Route.split": "Weighted clusters (canary, A/B) instead of one `cluster`.",
    "Route.retry": "Retry policy.",
    "Route.fault": "Fault injection, for chaos testing.",
    "Route.rate_limit": "Local rate limit (per worker).",
    "Route.mirror": "Shadow traffic to another cluster.",
    "ListenerTls.mode": "`strict`: mTLS clients only; `permissive`: plaintext too.",
    "PolicyMatch.from_": "Peer identities: exact SPIFFE IDs, prefixes ending in `/*`, or `*` (any verified).",
    "PolicyMatch.methods": "HTTP methods (http listeners).",
    "PolicyMatch.prefix": "Path prefix (http listeners).",
    "PolicyRule.allow": "Allow what matches (once an allow rule exists, the rest is denied).",
    "PolicyRule.deny": "Deny what matches (deny rules win).",
    "Listener.name": "Unique; names the listener in metrics and logs.",
    "Listener.address": "Where it listens; port 0 lets the kernel pick one.",
    "Listener.protocol": "`http` (HTTP/1.1 and h2c) routes requests; `tcp` forwards bytes.",
    "Listener.cluster": "tcp only: where connections go.",
    "Listener.routes": "http only: first match wins.",
    "Listener.max_connections": "Connections open at once (split across workers); excess ones are closed.",
    "Listener.idle_timeout": "Close a connection after this long without a byte.",
    "Identity.ca": "Address of `meshproxy ca serve`.",
    "Identity.token_file": "The bootstrap token (`meshproxy ca token`); spent on the first certificate.",
    "Identity.trust_bundle": "Roots peers' certificates must chain to (`ca init` writes it).",
    "Identity.ttl": "Certificate lifetime asked for; renewed at about half of it.",
    "AccessLog.path": "`stdout` or a file path.",
    "AccessLog.format": "`json` or a template such as `{method} {path} {status}`.",
    "AccessLog.sample_rate": "Share of the requests logged.",
    "AccessLog.only": "`errors`: only 5xx, proxy-made errors and requests without a response.",
    "AccessLog.min_status": "Log only responses with at least this status.",
    "Tracing.propagation": "Trace context formats read and written.",
    "Tracing.otlp_endpoint": "OTLP/HTTP collector URL.",
    "Tracing.sample_rate": "Share of the requests sampled when the caller did not decide.",
    "Tracing.encoding": "OTLP body encoding.",
    "Telemetry.access_log": "One line per request or TCP connection.",
    "Telemetry.tracing": "Spans over OTLP/HTTP.",
}

INTRO = """\
# Config reference

<!-- Generated from proxy/config/model.py by `python -m proxy.config.reference`; do not edit.
     tests/unit/test_config_reference.py fails when this file and the model disagree. -->

A sidecar's config is one YAML (or JSON) file: `meshproxy --config FILE` runs it,
`meshproxy check --config FILE` validates it, `PUT /config` on the admin plane replaces it.

- **Durations** are strings with a unit: `250ms`, `5s`, `2m`, `1h`. A bare number is an error.
- **Addresses** are `host:port`; IPv6 in brackets: `[::1]:80`.
- **Unknown fields are errors**, and every error names its path, e.g.
  `listeners[1].routes[0].match.prefix: must start with "/"`.
- **Names** (listeners, routes, clusters, node id) are letters, digits, `.`, `_` and `-`.
- Across the file: listener, cluster and (per listener) route names are unique; two listeners
  cannot share an address; every cluster named must exist; `tls` sections need `identity`.
- *required* fields have no default; a field shown as optional may be left out (or `null`).

Sections below follow the file from the top; each names the paths where it appears.
"""


# -- reading model.py ------------------------------------------------------------------------


class _Source:
    """model.py's text, parsed: class definitions by name, comments by line."""

    def __init__(self) -> None:
        self.text = inspect.getsource(model)
        self.tree = ast.parse(self.text)
        self.classes = {node.name: node for node in self.tree.body if isinstance(node, ast.ClassDef)}
        self.comments: dict[int, str] = {}
        self.comment_only: set[int] = set()
        code_lines: set[int] = set()
        for token in tokenize.generate_tokens(io.StringIO(self.text).readline):
            if token.type == tokenize.COMMENT:
                self.comments[token.start[0]] = token.string.lstrip("#").strip()
            elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                code_lines.add(token.start[0])
        self.comment_only = set(self.comments) - code_lines

    def fields(self, cls: type[BaseModel]) -> dict[str, tuple[ast.expr, str]]:
        """field name -> (annotation node, comment) for the fields declared in `cls`."""
        node = self.classes[cls.__name__]
        found = {}
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                found[statement.target.id] = (statement.annotation, self._comment(statement))
        return found

    def _comment(self, statement: ast.stmt) -> str:
        above = []
        line = statement.lineno - 1
        while line in self.comment_only:
            above.insert(0, self.comments[line])
            line -= 1
        end = statement.end_lineno or statement.lineno
        inline = [self.comments[n] for n in range(statement.lineno, end + 1) if n in self.comments]
        return " ".join(above + inline)


# -- types -----------------------------------------------------------------------------------


def _models() -> dict[str, type[BaseModel]]:
    return {name: value for name, value in vars(model).items()
            if inspect.isclass(value) and issubclass(value, BaseModel) and value.__module__ == model.__name__}


def _bounds(call: ast.Call) -> str:
    words = {keyword.arg: _value(keyword.value) for keyword in call.keywords
             if keyword.arg in ("ge", "gt", "le", "lt")}
    if "ge" in words and "le" in words:
        return f" {words['ge']:,}–{words['le']:,}".replace(",", "")
    parts = []
    for key, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        if key in words:
            parts.append(f"{sign} {words[key]}")
    return (" " + ", ".join(parts)) if parts else ""


def _value(node: ast.expr) -> Any:
    """A bound as written in model.py: a number, `1 << 20` or a constant of the module."""
    return eval(compile(ast.Expression(node), "<bound>", "eval"), dict(vars(model)))


def render_type(node: ast.expr, models: dict[str, type[BaseModel]]) -> str:
    """An annotation as the reference names it, e.g. `list of [Route](#route)`."""
    if isinstance(node, ast.Constant) and node.value is None:
        return "null"
    if isinstance(node, ast.Name):
        if node.id in models:
            return f"[{node.id}](#{node.id.lower()})"
        return ALIASES.get(node.id, node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        parts = [render_type(side, models) for side in _union(node)]
        return " or ".join(part for part in parts if part != "null")
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        kind = node.value.id
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if kind == "Literal":
            return " | ".join(f"`{ast.literal_eval(arg)}`" for arg in args)
        if kind == "tuple":
            if len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis:
                return f"list of {render_type(args[0], models)}"
            return "(" + ", ".join(render_type(arg, models) for arg in args) + ")"
        if kind == "Annotated":
            base = render_type(args[0], models)
            for extra in args[1:]:
                if isinstance(extra, ast.Call) and isinstance(extra.func, ast.Name) and extra.func.id == "Field":
                    if base.startswith("list of ") and _has_min_length(extra):
                        return f"{base} (at least one)"
                    if base == "string" and _has_min_length(extra):
                        return "non-empty string"
                    return base + _bounds(extra)
            return base
    raise ValueError(f"cannot render the annotation {ast.unparse(node)!r}")


def _has_min_length(call: ast.Call) -> bool:
    return any(keyword.arg == "min_length" for keyword in call.keywords)


def _union(node: ast.expr) -> Iterator[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        yield from _union(node.left)
        yield from _union(node.right)
    else:
        yield node


def _model_names(node: ast.expr, models: dict[str, type[BaseModel]]) -> list[str]:
    """The models an annotation mentions, in order."""
    return [sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name) and sub.id in models]


# -- defaults --------------------------------------------------------------------------------


def render_default(cls: type[BaseModel], name: str) -> str:
    field = cls.model_fields[name]
    default = field.default
    if default is PydanticUndefined:
        return "*required*"
    if default is None:
        return "—"
    if isinstance(default, BaseModel):
        return "its defaults"
    if default == ():
        return "`[]`"
    annotated = Any if field.annotation is None else field.annotation
    adapter: TypeAdapter[Any] = TypeAdapter(annotated if not field.metadata else
                                            _with_metadata(annotated, field.metadata))
    value = adapter.dump_python(default, mode="json")
    return f"`{_yaml_scalar(value)}`"


def _with_metadata(annotation: Any, metadata: list[Any]) -> Any:
    from typing import Annotated

    return Annotated[(annotation, *metadata)]


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_scalar(item) for item in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- the document ----------------------------------------------------------------------------


def _walk(models: dict[str, type[BaseModel]], source: _Source) -> list[tuple[type[BaseModel], list[str]]]:
    """(model, the paths where it appears) in the order a reader meets them from the top."""
    order: list[type[BaseModel]] = []
    paths: dict[str, list[str]] = {}

    def visit(cls: type[BaseModel], path: str) -> None:
        if cls.__name__ not in paths:
            order.append(cls)
            paths[cls.__name__] = []
        if path and path not in paths[cls.__name__]:
            paths[cls.__name__].append(path)
        for name, (annotation, _) in source.fields(cls).items():
            key = cls.model_fields[name].alias or name
            for child in _model_names(annotation, models):
                is_list = ast.unparse(annotation).find(f"tuple[{child}, ...]") >= 0
                child_path = f"{path}.{key}" if path else key
                visit(models[child], child_path + ("[]" if is_list else ""))

    visit(ROOT, "")
    return [(cls, paths[cls.__name__]) for cls in order]


def _sentence(comment: str) -> str:
    """A field comment as a table cell: capitalized (unless it starts with a keyword such as
    `tcp`), ending with a full stop."""
    if not comment:
        return ""
    first = comment.split(" ", 1)[0].rstrip(":;,")
    if first not in ("tcp", "http") and not first.startswith(("`", '"')):
        comment = comment[0].upper() + comment[1:]
    return comment if comment.endswith(".") else comment + "."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def generate() -> str:
    source = _Source()
    models = _models()
    used_notes: set[str] = set()
    out = [INTRO]
    for cls, paths in _walk(models, source):
        out.append(f"\n## {cls.__name__}\n")
        if paths:
            out.append("\nAt " + ", ".join(f"`{path}`" for path in paths) + ".\n")
        else:
            out.append("\nThe top level of the file.\n")
        doc = inspect.getdoc(cls)
        if doc and cls.__doc__ is not None and "__doc__" in cls.__dict__:
            out.append("\n" + " ".join(doc.split()) + "\n")
        out.append("\n| field | type | default | description |\n|---|---|---|---|\n")
        for name, (annotation, comment) in source.fields(cls).items():
            key = f"{cls.__name__}.{name}"
            yaml_name = cls.model_fields[name].alias or name
            kind = SHAPES.get(key) or render_type(annotation, models)
            optional = cls.model_fields[name].default is None
            if optional:
                kind += " (optional)"
            if key in NOTES:
                used_notes.add(key)
                description = NOTES[key]
            else:
                description = _sentence(comment)
            out.append(f"| `{yaml_name}` | {_cell(kind)} | {render_default(cls, name)} | "
                       f"{_cell(description)} |\n")
    stale = sorted(set(NOTES) - used_notes) + sorted(
        key for key in SHAPES if key.split(".")[1] not in models[key.split(".")[0]].model_fields)
    if stale:
        raise ValueError(f"notes for fields the model no longer has: {', '.join(stale)}")
    return "".join(out)


def main() -> None:
    sys.stdout.write(generate())


if __name__ == "__main__":
    main()
