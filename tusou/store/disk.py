"""A write that the disk refused, as the client's error: shared by the store and the pictures' files."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tusou.errors import StoreError

log = logging.getLogger(__name__)


@contextmanager
def disk_errors(what: Path) -> Iterator[None]:
    """A write that the disk under ``what`` refused (full, read-only, failing) as the client's error instead
    of an unexpected one: 507 "disk full" or 503 "storage unavailable". SQLite has rolled it back."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
        if code == sqlite3.SQLITE_FULL:
            log.error("%s: %s", what, exc)
            raise StoreError("disk full", 507) from exc
        if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
            log.error("%s: %s", what, exc)
            raise StoreError("storage unavailable", 503) from exc
        raise
