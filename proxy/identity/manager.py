"""This sidecar's SVID, kept fresh: the supervisor's identity task.

    identity = IdentityManager(config.identity, publish)   # publish(WorkloadSvid), async
    nursery.start_soon(identity.run)
    await identity.loaded.wait()                            # /ready waits for the first SVID

- The first SVID: a new P-256 key (it never leaves memory, except to the workers over the
  control channel), a CSR and the bootstrap token from `token_file`, sent to the CA.
- Rotation at half the lifetime left when it was issued, +/-10% so sidecars started together
  do not renew together: a new key, renewed with the current SVID as the TLS client
  certificate; if the CA refuses that (or the SVID has run out) the token file is read again.
- While the CA is unreachable or refuses: retries with exponential backoff and jitter (never
  more than a quarter of the current certificate's remaining life apart), a warning per
  failure and `failures` counted; the workers keep serving with the current certificate until
  it expires (an error is logged when it does).
- The trust bundle file is polled every BUNDLE_POLL seconds; a changed one (that parses) is
  published with the current certificate, so new connections trust the new roots.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..config import Identity
from .csr import Svid, SvidRequestError, generate_key, renew_svid, request_svid
from .tls import svid_id

log = logging.getLogger("meshproxy.identity")

REQUEST_TIMEOUT = 10.0  # one exchange with the CA
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
ROTATE_AT = 0.5  # of the lifetime left at issuance
ROTATE_JITTER = 0.1
MIN_ROTATE_DELAY = 1.0
RENEW_MARGIN = 1.0  # an SVID closer than this to its expiry is not used to renew
BUNDLE_POLL = 2.0

# What a failed attempt can raise: unreachable, TLS or HTTP broken, refused, too slow, bad files.
_FAILURES = (OSError, trio.BrokenResourceError, trio.TooSlowError, SvidRequestError, ValueError)


@dataclass(frozen=True)
class WorkloadSvid:
    """What the workers need to speak mTLS as this sidecar."""

    spiffe_id: str
    cert_chain_pem: bytes  # the leaf, then the intermediates
    key_pem: bytes
    bundle_pem: bytes  # from the trust bundle file
    not_after: float  # unix time
    serial: int

    def __repr__(self) -> str:  # never log a key
        return f"WorkloadSvid({self.spiffe_id!r}, serial={self.serial:x}, not_after={self.not_after})"


RequestSvid = Callable[..., Awaitable[Svid]]


class IdentityManager:
    def __init__(self, config: Identity, publish: Callable[[WorkloadSvid], Awaitable[None]], *,
                 request: RequestSvid = request_svid, renew: RequestSvid = renew_svid,
                 wall_clock: Callable[[], float] = time.time, rng: random.Random | None = None) -> None:
        self.config = config
        self._publish = publish
        self._request = request
        self._renew = renew
        self._now = wall_clock
        self._random = rng or random.Random()
        self.loaded = trio.Event()  # the first SVID was published
        self.current: WorkloadSvid | None = None
        self.rotations = 0  # SVIDs that replaced an earlier one
        self.failures = 0  # attempts that got no SVID
        self._key: ec.EllipticCurvePrivateKey | None = None  # the current SVID's
        self._bundle: bytes | None = None
        self._bundle_stamp: tuple[int, int, int] | None = None
        self._expiry_reported = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_bundle)
            task_status.started()
            await self._keep_fresh()

    # -- certificates ---------------------------------------------------------------------
    async def _keep_fresh(self) -> None:
        failed_in_a_row = 0
        while True:
            try:
                svid, key = await self._obtain()
            except _FAILURES as exc:
                self.failures += 1
                failed_in_a_row += 1
                delay = self._retry_delay(failed_in_a_row)
                log.warning("identity: no certificate from the CA at %s: %s; retrying in %.1fs%s",
                            self.config.ca, _describe(exc), delay, self._validity_note())
                await trio.sleep(delay)
                continue
            failed_in_a_row = 0
            await self._install(svid, key)
            await trio.sleep(self._rotation_delay())

    async def _obtain(self) -> tuple[Svid, ec.EllipticCurvePrivateKey]:
        if self._bundle is None:
            self._reload_bundle()
        assert self._bundle is not None
        key = generate_key()
        current, current_key = self.current, self._key
        with trio.fail_after(REQUEST_TIMEOUT):
            if current is not None and current_key is not None and \
                    current.not_after - self._now() > RENEW_MARGIN:
                try:
                    return await self._renew(self.config.ca, self._bundle, current.cert_chain_pem,
                                             current_key, key, self.config.ttl), key
                except (SvidRequestError, trio.BrokenResourceError) as exc:
                    log.warning("identity: renewal refused (%s); using the token in %s",
                                _describe(exc), self.config.token_file)
            return await self._request(self.config.ca, self._read_token(), self._bundle, key,
                                       self.config.ttl), key

    def _read_token(self) -> str:
        token = Path(self.config.token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"token file {self.config.token_file} is empty")
        return token

    async def _install(self, svid: Svid, key: ec.EllipticCurvePrivateKey) -> None:
        assert self._bundle is not None
        leaf = x509.load_pem_x509_certificate(svid.cert_pem)
        spiffe_id = svid_id(leaf, None)
        previous = self.current
        if previous is not None and previous.spiffe_id != spiffe_id:
            log.warning("identity changed from %s to %s", previous.spiffe_id, spiffe_id)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self.current = WorkloadSvid(spiffe_id, svid.cert_pem + b"".join(svid.chain_pems), key_pem,
                                    self._bundle, svid.not_after.timestamp(), leaf.serial_number)
        self._key = key
        self._expiry_reported = False
        if previous is not None:
            self.rotations += 1
        log.info("identity %s: certificate serial %x valid until %s", spiffe_id, leaf.serial_number,
                 svid.not_after.isoformat(timespec="seconds"))
        await self._publish(self.current)
        self.loaded.set()

    def _rotation_delay(self) -> float:
        assert self.current is not None
        left = self.current.not_after - self._now()
        share = ROTATE_AT * self._random.uniform(1 - ROTATE_JITTER, 1 + ROTATE_JITTER)
        return max(MIN_ROTATE_DELAY, left * share)

    def _retry_delay(self, failed_in_a_row: int) -> float:
        delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** (failed_in_a_row - 1))
        delay *= self._random.uniform(0.5, 1.0)
        if self.current is not None:
            left = self.current.not_after - self._now()
            if left > 0:
                delay = min(delay, max(BACKOFF_START, left / 4))
        return delay

    def _validity_note(self) -> str:
        if self.current is None:
            return " (no certificate yet)"
        left = self.current.not_after - self._now()
        expiry = datetime.fromtimestamp(self.current.not_after, UTC).isoformat(timespec="seconds")
        if left > 0:
            return f" (serving with the current certificate until {expiry})"
        if not self._expiry_reported:
            self._expiry_reported = True
            log.error("identity %s: the certificate expired at %s; peers refuse new mTLS "
                      "connections until the CA issues a new one", self.current.spiffe_id, expiry)
        return f" (the certificate expired at {expiry})"

    # -- the trust bundle -------------------------------------------------------------------
    async def _watch_bundle(self) -> None:
        reported: str | None = None
        while True:
            await trio.sleep(BUNDLE_POLL)
            try:
                changed = self._reload_bundle()
            except (OSError, ValueError) as exc:
                if str(exc) != reported:
                    reported = str(exc)
                    log.error("identity: keeping the trust bundle in use: %s", exc)
                continue
            reported = None
            if changed and self.current is not None:
                log.info("identity: trust bundle %s changed; new connections use it",
                         self.config.trust_bundle)
                self.current = replace(self.current, bundle_pem=self._bundle)
                await self._publish(self.current)

    def _reload_bundle(self) -> bool:
        """Read the trust bundle file if it changed since the last read; True when its content
        did. Raises OSError or ValueError (and keeps the bundle in use) for a bad file."""
        path = self.config.trust_bundle
        status = os.stat(path)
        stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        if stamp == self._bundle_stamp:
            return False
        data = Path(path).read_bytes()
        try:
            x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ValueError(f"trust bundle {path} holds no PEM certificates") from None
        self._bundle_stamp = stamp
        if data == self._bundle:
            return False
        self._bundle = data
        return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {REQUEST_TIMEOUT:g}s"
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return f"TLS failed: {exc.__cause__}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
