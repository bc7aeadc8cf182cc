"""The CA's HTTP API, HTTP aside: a request's method, path, body and caller in, a reply out.

    POST /v1/sign   {"csr": PEM, "token": "...", "ttl": "24h"?}
                    -> {"certificate", "chain", "trust_bundle", "expires"}
    POST /v1/renew  {"csr": PEM, "ttl": "24h"?}, over TLS with the caller's current SVID as
                    its client certificate -> the same, for the identity that SVID names
    GET  /v1/bundle -> the trust bundle (PEM)

A sign request is checked in order: caller not rate limited (429), well-formed JSON (400), a
CSR signed by a key we certify (400), then the token (401). The token is spent last, so a
malformed request does not burn a one-use token. A renewal needs no token: the TLS handshake
verified the client certificate against the trust bundle (and its validity period); it must
be a workload SVID of this trust domain (401 otherwise). So a sidecar spends its bootstrap
token once and renews with its key until it lets its certificate expire.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..config import Address
from ..config.model import parse_duration
from ..identity.spiffe import SpiffeId
from ..identity.tls import svid_id
from .directory import SigningCa
from .failures import FailureLimiter
from .svid import CsrError, SvidPublicKey, checked_public_key, issue_svid, svid_lifetime
from .tokens import TokenStore

log = logging.getLogger("meshproxy.ca")

PEM_TYPE = "application/x-pem-file"
SIGN_FIELDS = {"csr", "token", "ttl"}
RENEW_FIELDS = {"csr", "ttl"}


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    body: bytes
    client: tuple[str, int]
    client_cert: bytes | None = None  # DER, verified against the trust bundle in the handshake


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def json(cls, status: int, value: object, headers: tuple[tuple[str, str], ...] = ()) -> ApiResponse:
        return cls(status, json.dumps(value, indent=1).encode() + b"\n", headers=headers)

    @classmethod
    def error(cls, status: int, code: str, message: str,
              headers: tuple[tuple[str, str], ...] = ()) -> ApiResponse:
        return cls.json(status, {"error": code, "message": message}, headers)


class BadRequest(ValueError):
    """The body is not a sign request: answered 400 with the reason."""


@dataclass(frozen=True)
class SignRequest:
    csr: str
    token: str
    ttl: timedelta | None

    @classmethod
    def parse(cls, body: bytes, *, renewal: bool = False) -> SignRequest:
        """A sign request, or with `renewal` a renew request (no token; `token` is "")."""
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the body is not JSON") from None
        if not isinstance(value, dict):
            raise BadRequest("the body must be a JSON object")
        unknown = sorted(set(value) - (RENEW_FIELDS if renewal else SIGN_FIELDS))
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
        for name in ("csr",) if renewal else ("csr", "token"):
            if not isinstance(value.get(name), str) or not value[name]:
                raise BadRequest(f"{name!r} must be a non-empty string")
        token = "" if renewal else value["token"]
        ttl = value.get("ttl")
        if ttl is None:
            return cls(value["csr"], token, None)
        if not isinstance(ttl, str):
            raise BadRequest("'ttl' must be a duration string such as '24h'")
        try:
            seconds = parse_duration(ttl)
        except ValueError as exc:
            raise BadRequest(f"'ttl' {exc}") from None
        if seconds <= 0:
            raise BadRequest("'ttl' must be greater than 0")
        return cls(value["csr"], token, timedelta(seconds=seconds))


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class CaApi:
    def __init__(self, ca: SigningCa, tokens: TokenStore, failures: FailureLimiter) -> None:
        self._ca = ca
        self._tokens = tokens
        self._failures = failures
        self._routes: dict[str, dict[str, Callable[[ApiRequest], Awaitable[ApiResponse]]]] = {
            "/v1/sign": {"POST": self._sign},
            "/v1/renew": {"POST": self._renew},
            "/v1/bundle": {"GET": self._bundle},
        }

    async def dispatch(self, request: ApiRequest) -> ApiResponse:
        methods = self._routes.get(request.path)
        if methods is None:
            return ApiResponse.error(404, "not_found", f"no endpoint {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            return ApiResponse.error(405, "method_not_allowed", f"use {allowed}",
                                     (("allow", allowed),))
        return await handler(request)

    async def _bundle(self, request: ApiRequest) -> ApiResponse:
        return ApiResponse(200, self._ca.trust_bundle_pem, PEM_TYPE)

    async def _sign(self, request: ApiRequest) -> ApiResponse:
        ip = request.client[0]
        wait = self._failures.retry_after(ip, time.monotonic())
        if wait:
            return ApiResponse.error(429, "too_many_failures",
                                     "too many failed token attempts; retry later",
                                     (("retry-after", str(int(wait) + 1)),))
        try:
            sign = SignRequest.parse(request.body)
            key = checked_public_key(sign.csr)
        except BadRequest as exc:
            return ApiResponse.error(400, "bad_request", str(exc))
        except CsrError as exc:
            return ApiResponse.error(400, "bad_csr", str(exc))

        identity = await trio.to_thread.run_sync(self._tokens.redeem, sign.token, datetime.now(UTC))
        if identity is None:
            self._failures.record(ip, time.monotonic())
            return ApiResponse.error(401, "bad_token", "the token is unknown, expired or used up")

        return self._issue(key, identity, sign.ttl, request, "")

    async def _renew(self, request: ApiRequest) -> ApiResponse:
        if request.client_cert is None:
            return ApiResponse.error(401, "no_client_certificate",
                                     "renewal needs the current SVID as the TLS client certificate")
        try:
            identity = SpiffeId.parse(svid_id(x509.load_der_x509_certificate(request.client_cert),
                                              self._ca.trust_domain))
        except ValueError as exc:
            return ApiResponse.error(401, "bad_client_certificate", str(exc))
        try:
            renew = SignRequest.parse(request.body, renewal=True)
            key = checked_public_key(renew.csr)
        except BadRequest as exc:
            return ApiResponse.error(400, "bad_request", str(exc))
        except CsrError as exc:
            return ApiResponse.error(400, "bad_csr", str(exc))
        return self._issue(key, identity, renew.ttl, request, " (renewal)")

    def _issue(self, key: SvidPublicKey, identity: SpiffeId, ttl: timedelta | None,
               request: ApiRequest, note: str) -> ApiResponse:
        issuer = self._ca.intermediate
        cert = issue_svid(issuer, key, identity, svid_lifetime(ttl), datetime.now(UTC))
        expires = cert.not_valid_after_utc.isoformat().replace("+00:00", "Z")
        log.info("issued %s serial=%x expires=%s caller=%s%s", identity, cert.serial_number,
                 expires, Address(*request.client), note)
        return ApiResponse.json(200, {
            "certificate": _pem(cert),
            "chain": [_pem(issuer.cert)],
            "trust_bundle": self._ca.trust_bundle_pem.decode(),
            "expires": expires,
        })
