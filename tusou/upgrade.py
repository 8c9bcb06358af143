"""Upgrade a data folder's stored vectors to the running model's vector space (``tusou upgrade``).

A release that changes the vector space (a new projection, say) gives its embedder a
``convert_from(model_id)``: a map from unit rows stored under an older identity to its own unit rows, or
None when no such map exists (other weights, other views). When one exists, the stored vectors are
rewritten in place, no image is fetched or embedded again; otherwise the folder has to be re-embedded from
its stored URIs (``tusou reembed``, tusou/reembed.py).

Crash safety. The rewrite is a sequence of SQLite transactions, each durable when it returns:

1. the start: meta ``model_id`` becomes ``upgrading:<from> -> <to>`` and ``upgrade_from``, ``upgrade_to``,
   ``upgrade_seq`` (0) are written. From here no release opens the folder as a normal one: an older release
   sees a model id that is not its own and refuses, and this one resumes the upgrade;
2. the index snapshots (derived data, of the old width) are deleted;
3. batches: the rows with ``seq > upgrade_seq`` in seq order, ``batch`` at a time, are converted and written
   back, and ``upgrade_seq`` moves to the batch's last seq, in the same transaction;
4. the end: ``model_id`` and ``dim`` become the new ones and the ``upgrade_*`` keys go.

A kill at any point leaves either the old folder (before 1), a folder whose rows up to ``upgrade_seq`` are
converted and the rest are not, which no release serves and the next start (or ``tusou upgrade``) carries
on from ``upgrade_seq`` (between 1 and 4), or the new folder (after 4). No row is converted twice: its
conversion and the move of ``upgrade_seq`` past it commit together.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tusou.store.base import ModelMismatch

log = logging.getLogger(__name__)

#: A map from stored unit rows (n, old dim) to unit rows of the running model (n, dim).
Convert = Callable[[np.ndarray], np.ndarray]
#: ``Embedder.convert_from``: the map from vectors stored under a model id, or None when there is none.
ConvertFrom = Callable[[str], "Convert | None"]
#: ``progress(done, total)`` after each batch.
Progress = Callable[[int, int], None]

UPGRADING = "upgrading:"
#: Rows converted per transaction: ~5 MB of old 1280-d rows read and written per commit.
BATCH = 1000


@dataclass(frozen=True)
class UpgradeResult:
    source: str
    target: str
    rows: int
    seconds: float


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta"))


def pending(conn: sqlite3.Connection, model_id: str, convert_from: ConvertFrom | None) -> str | None:
    """The stored model id the folder has to be upgraded from to hold ``model_id``'s vectors, or None when
    it holds them already (or holds no image). Raises ModelMismatch, naming the way out, when its vectors
    cannot be converted."""
    meta = _meta(conn)
    stored = meta.get("model_id")
    if stored is None or stored == model_id:
        return None
    if stored.startswith(UPGRADING):
        source, target = meta.get("upgrade_from", "?"), meta.get("upgrade_to", "?")
        if target != model_id:
            raise ModelMismatch(
                f"an upgrade of this folder's vectors from {source} to {target} was interrupted; finish it "
                f"with the release whose model is {target} (`tusou upgrade`), or restore a backup"
            )
        return source
    if conn.execute("SELECT 1 FROM images LIMIT 1").fetchone() is None:
        return None  # nothing stored: the folder simply takes the new model
    convert = convert_from(stored) if convert_from is not None else None
    if convert is None:
        raise ModelMismatch(
            f"this folder was indexed with model {stored}, not {model_id}, and its vectors cannot be "
            "converted: re-embed its images from their stored URIs with `tusou reembed --data DIR` "
            "(see docs/operations.md), or start with the model it was indexed with, or use a new data folder"
        )
    return stored


def upgrade(
    conn: sqlite3.Connection,
    snapshot_dir: Path,
    source: str,
    target: str,
    dim: int,
    convert: Convert,
    progress: Progress | None = None,
    batch: int = BATCH,
) -> UpgradeResult:
    """Rewrite every stored vector from ``source``'s space to ``target``'s (width ``dim``), resuming an
    interrupted upgrade. ``conn`` is a connection in autocommit mode nothing else writes through."""
    started = time.monotonic()
    meta = _meta(conn)
    if not meta.get("model_id", "").startswith(UPGRADING):
        old_dim = int(meta["dim"]) if "dim" in meta else _blob_dim(conn)
        with transaction(conn):
            put_meta(conn, "model_id", f"{UPGRADING}{source} -> {target}")
            put_meta(conn, "upgrade_from", source)
            put_meta(conn, "upgrade_to", target)
            put_meta(conn, "upgrade_seq", "0")
            put_meta(conn, "upgrade_old_dim", str(old_dim))
        log.info("upgrading the stored vectors from %s to %s (no re-embedding)", source, target)
    else:
        log.info("finishing the interrupted upgrade of the stored vectors from %s to %s", source, target)
    drop_snapshots(snapshot_dir)
    meta = _meta(conn)
    old_dim, done_seq = int(meta["upgrade_old_dim"]), int(meta["upgrade_seq"])
    total = conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    done = conn.execute("SELECT COUNT(*) FROM vectors WHERE seq <= ?", (done_seq,)).fetchone()[0]
    converted = 0
    last_log = time.monotonic()
    while True:
        with transaction(conn):
            rows = conn.execute(
                "SELECT seq, vector FROM vectors WHERE seq > ? ORDER BY seq LIMIT ?", (done_seq, batch)
            ).fetchall()
            if not rows:
                break
            old = _rows(rows, old_dim)
            new = _checked(convert(old), len(rows), dim)
            conn.executemany(
                "UPDATE vectors SET vector = ? WHERE seq = ?",
                [(vec.tobytes(), seq) for (seq, _), vec in zip(rows, new, strict=True)],
            )
            done_seq = rows[-1][0]
            put_meta(conn, "upgrade_seq", str(done_seq))
        converted += len(rows)
        done += len(rows)
        if progress is not None:
            progress(done, total)
        if time.monotonic() - last_log >= 10:
            log.info("upgrade: %d/%d rows", done, total)
            last_log = time.monotonic()
    with transaction(conn):
        put_meta(conn, "model_id", target)
        put_meta(conn, "dim", str(dim))
        conn.execute("DELETE FROM meta WHERE key LIKE 'upgrade_%'")
        forget_reembedding(conn)
    release_free_pages(conn)
    seconds = time.monotonic() - started
    log.info("upgraded %d stored vectors to %s in %.1fs", converted, target, seconds)
    return UpgradeResult(source, target, converted, seconds)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One durable write on an autocommit connection (rolled back on any exception, kill -9 included)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # Also after a failed COMMIT: a transaction left open would refuse every later BEGIN.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def release_free_pages(conn: sqlite3.Connection) -> None:
    """Hand the pages that narrower (or fewer) rows left free back to the file system: a folder made with
    auto_vacuum=INCREMENTAL shrinks, and the WAL is emptied. ``executescript`` steps the pragma to its end;
    ``execute`` would run one step, which frees a single page."""
    conn.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")


class FolderInUse(Exception):
    """Another process has the database open: a server (of this release or an earlier one) is running."""


def ensure_not_in_use(path: Path) -> None:
    """Refuse to rewrite a folder that another process has open. A server of the earlier release would
    otherwise go on writing and reading rows of the old width into the converted folder. Any open SQLite
    connection, even an idle one, keeps this exclusive lock from being taken."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=1.0)
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
        raise FolderInUse(
            f"{path} is open in another process (is a tusou server running on this folder?): stop it first"
        ) from None
    finally:
        conn.close()


def forget_reembedding(conn: sqlite3.Connection) -> None:
    """Drop what an unfinished ``tusou reembed`` kept aside (tusou/reembed.py): the folder now holds vectors
    of the running model by other means, and those rows would only take disk."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reembed'").fetchone():
        conn.execute("DELETE FROM reembed")
    conn.execute("DELETE FROM meta WHERE key IN ('reembed_to', 'reembed_dim')")


def put_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _blob_dim(conn: sqlite3.Connection) -> int:
    """The width of the stored rows, for a folder whose meta does not say (float32 blobs)."""
    row = conn.execute("SELECT length(vector) FROM vectors LIMIT 1").fetchone()
    return int(row[0]) // 4 if row else 0


def _rows(rows: list[tuple[int, bytes]], dim: int) -> np.ndarray:
    for seq, blob in rows:
        if len(blob) != dim * 4:
            raise ModelMismatch(
                f"stored vector {seq} has {len(blob)} bytes, not {dim * 4}: not an upgradable folder"
            )
    return np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), dim)


def _checked(new: np.ndarray, n: int, dim: int) -> np.ndarray:
    new = np.ascontiguousarray(new, dtype=np.float32)
    if new.shape != (n, dim) or not np.isfinite(new).all():
        raise ValueError(f"the model's conversion gave {new.shape} rows, not ({n}, {dim}) finite ones")
    norms = np.linalg.norm(new, axis=1, keepdims=True)
    return np.ascontiguousarray(new / np.maximum(norms, 1e-12), dtype=np.float32)


def drop_snapshots(folder: Path) -> None:
    """The index snapshots hold the old rows: the store rebuilds its index from SQLite on its next load."""
    if folder.is_dir():
        for path in folder.glob("g*"):
            path.unlink(missing_ok=True)
