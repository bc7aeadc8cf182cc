"""SPIFFE IDs: `spiffe://trust-domain/path`, parsed strictly per the SPIFFE ID spec.

Pure: the CA uses it to validate the identity a token is bound to, sidecars to name peers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PREFIX = "spiffe://"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_LENGTH = 2048  # the longest URI SAN the spec lets a verifier expect


@dataclass(frozen=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" for the trust domain itself, else "/seg/seg"

    def __str__(self) -> str:
        return f"{_PREFIX}{self.trust_domain}{self.path}"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Raise ValueError naming the rule `text` breaks."""
        if len(text) > MAX_LENGTH:
            raise ValueError(f"a SPIFFE ID is at most {MAX_LENGTH} characters")
        if not text.startswith(_PREFIX):
            raise ValueError(f"a SPIFFE ID starts with {_PREFIX!r}, got {text!r}")
        domain, slash, path = text[len(_PREFIX):].partition("/")
        check_trust_domain(domain)
        if slash:
            for segment in path.split("/"):
                if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
                    raise ValueError(
                        f"{text!r}: path segments are non-empty, not '.' or '..', "
                        "and use only letters, digits, '.', '-' and '_'"
                    )
        return cls(domain, slash + path)

    @classmethod
    def parse_workload(cls, text: str, trust_domain: str) -> SpiffeId:
        """A workload's ID: has a path and belongs to `trust_domain`."""
        spiffe_id = cls.parse(text)
        if not spiffe_id.path:
            raise ValueError(f"{text!r} names a trust domain, not a workload (add a path)")
        if spiffe_id.trust_domain != trust_domain:
            raise ValueError(f"{text!r} is not in the trust domain {trust_domain!r}")
        return spiffe_id


def check_trust_domain(name: str) -> str:
    """A trust domain name: lowercase letters, digits, '.', '-' and '_' (no port, no user)."""
    if not _TRUST_DOMAIN.fullmatch(name):
        raise ValueError(
            f"trust domain {name!r}: use 1-255 lowercase letters, digits, '.', '-' or '_'"
        )
    return name
