"""Bootstrap tokens: minted by `ca token`, redeemed by `ca serve`, kept in one JSON file.

Only each token's SHA-256 is stored, with the identity it grants, its expiry and the uses
left. Both processes change the file under an exclusive flock on a separate lock file (the
data file is replaced whole, so locking it would lock a file about to be unlinked), and
write it by rename, so a crash leaves the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..identity.spiffe import SpiffeId

TOKEN_BYTES = 32
MAX_TOKEN_LENGTH = 256  # a token longer than any we mint is not worth hashing


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, path: Path, lock_path: Path) -> None:
        self.path = path
        self.lock_path = lock_path

    def mint(self, identity: SpiffeId, ttl: timedelta, uses: int, now: datetime) -> str:
        """A new random token granting `identity` `uses` times until now + ttl."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        entry = {"sha256": _digest(token), "identity": str(identity),
                 "expires": (now + ttl).isoformat(), "uses": uses}
        with self._locked():
            self._write([*self._live(now), entry])
        return token

    def redeem(self, token: str, now: datetime) -> SpiffeId | None:
        """Spend one use of `token`: the identity it grants, or None if it grants nothing."""
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        digest = _digest(token).encode()
        with self._locked():
            entries = self._live(now)
            found = None
            # Compare against every entry in constant time, without stopping at a match.
            for entry in entries:
                if hmac.compare_digest(entry["sha256"].encode(), digest):
                    found = entry
            if found is None:
                return None
            found["uses"] -= 1
            self._write(entries)
        return SpiffeId.parse(found["identity"])

    def _live(self, now: datetime) -> list[dict[str, Any]]:
        """Entries not yet expired nor used up; the rest are dropped at the next write."""
        try:
            entries = json.loads(self.path.read_text())["tokens"]
        except FileNotFoundError:
            return []
        return [e for e in entries if e["uses"] > 0 and datetime.fromisoformat(e["expires"]) > now]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, entries: list[dict[str, Any]]) -> None:
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as file:
                json.dump({"tokens": entries}, file, indent=1)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
