"""The identity manager on a fake clock against a fake CA: first SVID, rotation at half life,
renewal with the current SVID, the token as fallback, backoff while the CA is down, and a
trust bundle that changes on disk."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from integration.svid_certs import MemoryCa, pem

from proxy.config import Address, Identity
from proxy.identity import Svid, SvidRequestError
from proxy.identity import manager as manager_module
from proxy.identity.manager import IdentityManager, WorkloadSvid

WEB = "spiffe://mesh.local/ns/default/sa/web"
CA = MemoryCa("mesh.local")
START = time.time()


def wall() -> float:
    return START + trio.current_time()


class FakeCa:
    """Issues like `meshproxy ca serve` would, on the fake clock; `down` makes it unreachable."""

    def __init__(self) -> None:
        self.down = False
        self.refuse_renewals = False
        self.calls: list[tuple[str, float]] = []  # (kind, time)
        self.tokens: list[str] = []

    def _issue(self, key, ttl: float) -> Svid:
        now = datetime.fromtimestamp(wall(), UTC)
        cert = CA.leaf(WEB, key.public_key(), ttl=timedelta(seconds=ttl), now=now)
        return Svid(pem(cert), [pem(CA.intermediate.cert)], CA.bundle_pem, cert.not_valid_after_utc)

    async def request(self, ca, token, bundle, key, ttl):
        self.calls.append(("token", trio.current_time()))
        self.tokens.append(token)
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return self._issue(key, ttl)

    async def renew(self, ca, bundle, chain, current_key, key, ttl):
        self.calls.append(("renew", trio.current_time()))
        assert x509.load_pem_x509_certificate(chain).public_key() == current_key.public_key()
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        if self.refuse_renewals:
            raise SvidRequestError("the CA refused: 401", 401)
        return self._issue(key, ttl)


@pytest.fixture
def files(tmp_path: Path) -> Identity:
    (tmp_path / "token").write_text("secret-token\n")
    (tmp_path / "bundle.pem").write_bytes(CA.bundle_pem)
    return Identity(ca=Address("127.0.0.1", 15012), token_file=str(tmp_path / "token"),
                    trust_bundle=str(tmp_path / "bundle.pem"), ttl=100.0)


async def start(nursery, config: Identity, ca: FakeCa) -> tuple[IdentityManager, list[WorkloadSvid]]:
    published: list[WorkloadSvid] = []

    async def publish(svid: WorkloadSvid) -> None:
        published.append(svid)

    manager = IdentityManager(config, publish, request=ca.request, renew=ca.renew, wall_clock=wall)
    await nursery.start(manager.run)
    return manager, published


async def test_first_svid_by_token_then_renewals_at_half_life(nursery, files, autojump_clock):
    ca = FakeCa()
    manager, published = await start(nursery, files, ca)
    await manager.loaded.wait()
    first = published[0]
    assert first.spiffe_id == WEB and b"PRIVATE KEY" in first.key_pem
    assert first.cert_chain_pem.count(b"BEGIN CERTIFICATE") == 2
    assert first.bundle_pem == CA.bundle_pem
    assert abs(first.not_after - (wall() + 100)) < 2
    assert ca.tokens == ["secret-token"]

    await trio.sleep(200)
    kinds = [kind for kind, _ in ca.calls]
    assert kinds[0] == "token" and set(kinds[1:]) == {"renew"}
    # Each renewal comes at about half the lifetime left: 50s apart, +/- 10%.
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(ca.calls)]
    assert len(gaps) >= 3 and all(44 <= gap <= 56 for gap in gaps), gaps
    assert manager.rotations == len(published) - 1 >= 3
    assert len({svid.serial for svid in published}) == len(published)
    assert len({svid.key_pem for svid in published}) == len(published)  # a new key each time
    assert manager.failures == 0


async def test_a_refused_renewal_falls_back_to_the_token(nursery, files, autojump_clock):
    ca = FakeCa()
    manager, published = await start(nursery, files, ca)
    await manager.loaded.wait()
    ca.refuse_renewals = True
    Path(files.token_file).write_text("fresh-token")
    await trio.sleep(60)
    assert [kind for kind, _ in ca.calls] == ["token", "renew", "token"]
    assert ca.tokens == ["secret-token", "fresh-token"]
    assert manager.rotations == 1 and len(published) == 2


async def test_while_the_ca_is_down_it_backs_off_keeps_the_svid_and_recovers(
        nursery, files, autojump_clock, caplog):
    ca = FakeCa()
    manager, published = await start(nursery, files, ca)
    await manager.loaded.wait()
    serving = published[-1]
    ca.down = True
    await trio.sleep(45)  # the renewal (at ~50s) starts failing
    while manager.failures < 4:
        await trio.sleep(1)
    assert manager.current is serving and len(published) == 1
    assert "serving with the current certificate until" in caplog.text
    failed = [when for _, when in ca.calls[1:]]
    gaps = [b - a for a, b in itertools.pairwise(failed)]
    assert gaps and all(gap >= manager_module.BACKOFF_START * 0.5 for gap in gaps)
    # Retries never wait longer than a quarter of the life left, so they come before expiry.
    ca.down = False
    await trio.sleep(30)
    assert len(published) == 2 and manager.rotations == 1
    assert published[-1].not_after > serving.not_after
    assert wall() < serving.not_after  # renewed before the old certificate ran out


async def test_without_a_first_svid_it_retries_and_is_not_loaded(nursery, files, autojump_clock):
    ca = FakeCa()
    ca.down = True
    manager, published = await start(nursery, files, ca)
    await trio.sleep(100)
    assert not manager.loaded.is_set() and published == []
    delays = [b - a for (_, a), (_, b) in itertools.pairwise(ca.calls)]
    assert max(delays) <= manager_module.BACKOFF_MAX
    assert delays[-1] > delays[0]  # backing off
    ca.down = False
    with trio.fail_after(manager_module.BACKOFF_MAX + 1):
        await manager.loaded.wait()


async def test_a_changed_trust_bundle_is_published_with_the_same_certificate(
        nursery, files, autojump_clock):
    ca = FakeCa()
    manager, published = await start(nursery, files, ca)
    await manager.loaded.wait()
    other = MemoryCa("mesh.local")
    Path(files.trust_bundle).write_bytes(CA.bundle_pem + other.bundle_pem)
    await trio.sleep(manager_module.BUNDLE_POLL + 0.5)
    assert len(published) == 2
    assert published[1].bundle_pem == CA.bundle_pem + other.bundle_pem
    assert published[1].serial == published[0].serial
    # A broken file is ignored; the bundle in use stays.
    Path(files.trust_bundle).write_text("not a certificate")
    await trio.sleep(manager_module.BUNDLE_POLL * 2)
    assert len(published) == 2
    assert manager.current is not None and manager.current.bundle_pem == published[1].bundle_pem
