"""Small JPEG thumbnails of stored images, so the web page can show every hit and browsed image.

One SQLite file (``thumbs.db`` in the data folder) beside whichever store holds the vectors, keyed by
(access key, group, image id). A thumbnail is at most :data:`MAX_SIDE` pixels on its longer side and at most
:data:`MAX_BYTES` bytes, made from the decoded image the service already has (no second fetch). It is written
after the image is stored and removed before the image is deleted, so a crash can leave an image without a
thumbnail (the page then shows the image's URL, or nothing) but never a thumbnail without its image.
``Settings.thumbnails = false`` stores none.
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from tusou.errors import StoreError
from tusou.store.disk import disk_errors

log = logging.getLogger(__name__)

MAX_SIDE = 128
MAX_BYTES = 16 * 1024
_QUALITIES = (80, 60, 40)


def make_thumbnail(image: Image.Image) -> bytes | None:
    """``image`` as a JPEG of at most MAX_SIDE px a side and MAX_BYTES bytes (None if it cannot be)."""
    small = image.convert("RGB")
    small.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    for quality in _QUALITIES:
        out = io.BytesIO()
        small.save(out, "JPEG", quality=quality, optimize=True)
        if out.tell() <= MAX_BYTES:
            return out.getvalue()
    return None


class ThumbStore:
    """Thumbnails by (tenant, group, image id) in one SQLite file; safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Thumbnails are tenant data: the file is private like the store's.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # a lost thumbnail is harmless; a lost image is not
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS thumbs (tenant TEXT NOT NULL, grp TEXT NOT NULL, id TEXT NOT NULL, "
            "jpeg BLOB NOT NULL, PRIMARY KEY (tenant, grp, id)) WITHOUT ROWID"
        )
        self._lock = threading.Lock()

    def _many(self, sql: str, rows: list[tuple[str | bytes, ...]]) -> None:
        if not rows:
            return
        with self._lock, disk_errors(self.path):
            self._conn.execute("BEGIN")
            try:
                self._conn.executemany(sql, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT (a full disk): left open, the transaction would refuse every
                # later BEGIN of this connection.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def put(self, tenant: str, group: str, thumbs: Iterable[tuple[str, bytes]]) -> None:
        """Keep these pictures; a disk that refuses them raises StoreError (507/503), nothing kept."""
        rows = [(tenant, group, image_id, jpeg) for image_id, jpeg in thumbs]
        self._many("INSERT OR REPLACE INTO thumbs VALUES (?, ?, ?, ?)", rows)  # type: ignore[arg-type]

    def put_after_images(self, tenant: str, group: str, thumbs: Iterable[tuple[str, bytes]]) -> None:
        """:meth:`put` for pictures of images already stored: a disk that refuses them leaves those images
        without one (logged), and the request that stored them still succeeds."""
        rows = list(thumbs)
        try:
            self.put(tenant, group, rows)
        except StoreError as exc:
            log.warning("%s: %d pictures not kept (%s)", self.path, len(rows), exc.message)

    def get(self, tenant: str, group: str, ids: Iterable[str]) -> dict[str, bytes]:
        wanted = list(dict.fromkeys(ids))
        found: dict[str, bytes] = {}
        with self._lock:
            for start in range(0, len(wanted), 500):  # under SQLite's bound-parameter limit
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT id, jpeg FROM thumbs WHERE tenant = ? AND grp = ? AND id IN ({marks})",
                    (tenant, group, *chunk),
                ).fetchall()
                found.update((row[0], bytes(row[1])) for row in rows)
        return found

    def delete(self, tenant: str, group: str, ids: Iterable[str]) -> None:
        rows = [(tenant, group, image_id) for image_id in ids]
        self._many("DELETE FROM thumbs WHERE tenant = ? AND grp = ? AND id = ?", rows)  # type: ignore[arg-type]

    def drop_group(self, tenant: str, group: str) -> None:
        with self._lock, disk_errors(self.path):
            self._conn.execute("DELETE FROM thumbs WHERE tenant = ? AND grp = ?", (tenant, group))

    def count(self, tenant: str, group: str) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM thumbs WHERE tenant = ? AND grp = ?", (tenant, group)
            ).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
