"""Access keys: each key is a tenant that owns its groups.

Kept in their own SQLite file, readable by the owner only, so that ``tusou keys ...`` can run while the
server does; the server reads a key on first use and re-reads it after ``cache_s`` so a revocation takes
effect within seconds.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def _token() -> str:
    """40 URL-safe characters, never starting with "-": a key is typed as a command-line argument
    (``tusou keys revoke AK``), where a leading dash reads as an option."""
    while True:
        token = secrets.token_urlsafe(30)[:40]
        if not token.startswith("-"):
            return token


@dataclass(frozen=True)
class AccessKey:
    access_key: str
    secret_key: str
    name: str
    created: float
    revoked: bool


class KeyStore:
    def __init__(self, path: Path, cache_s: float = 2.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Create the file private before SQLite writes a secret into it.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS keys (access_key TEXT PRIMARY KEY, secret_key TEXT NOT NULL, "
            "name TEXT NOT NULL, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0)"
        )
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, str | None]] = {}
        self.cache_s = cache_s

    def create(self, name: str = "") -> AccessKey:
        key = AccessKey(
            access_key=_token(),
            secret_key=_token(),
            name=name,
            created=time.time(),
            revoked=False,
        )
        with self._lock:
            self._conn.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, 0)", (key.access_key, key.secret_key, name, key.created)
            )
        return key

    def list(self) -> list[AccessKey]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT access_key, secret_key, name, created, revoked FROM keys ORDER BY created"
            ).fetchall()
        return [AccessKey(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def revoke(self, access_key: str) -> bool:
        with self._lock:
            cur = self._conn.execute(
                "UPDATE keys SET revoked = 1 WHERE access_key = ? AND revoked = 0", (access_key,)
            )
            self._cache.pop(access_key, None)
            return cur.rowcount > 0

    def active_count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM keys WHERE revoked = 0").fetchone()[0]

    def is_revoked(self, access_key: str) -> bool:
        """Whether ``access_key`` exists and was revoked (for the log of a refused request)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT revoked FROM keys WHERE access_key = ?", (access_key,)
            ).fetchone()
        return bool(row and row[0])

    def secret_for(self, access_key: str) -> str | None:
        """The secret of an active key, or None; what the signature verifier asks."""
        now = time.monotonic()
        cached = self._cache.get(access_key)
        if cached and now - cached[0] < self.cache_s:
            return cached[1]
        with self._lock:
            row = self._conn.execute(
                "SELECT secret_key FROM keys WHERE access_key = ? AND revoked = 0", (access_key,)
            ).fetchone()
        secret = row[0] if row else None
        if secret is not None or len(self._cache) < 10_000:  # unknown keys must not grow the cache unbounded
            self._cache[access_key] = (now, secret)
        return secret

    def close(self) -> None:
        with self._lock:
            self._conn.close()
