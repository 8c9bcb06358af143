"""Re-embed a data folder's images from their stored URIs with the running model (``tusou reembed``).

For a folder whose vectors the running model cannot convert (another model: tusou/upgrade.py converts the
ones it can). The folder keeps one vector format throughout, so no group ever mixes two:

- the new vectors go into a side table, ``reembed`` (seq -> vector), committed batch by batch with meta
  ``reembed_to`` naming their model; the folder's own ``vectors`` and ``model_id`` stay the old ones, so the
  folder still refuses this release (and still opens with the release that wrote it) until the end;
- a run skips the images that already have a new vector: an interrupted run (even kill -9) is simply
  started again, and a failed fetch is retried by the next run;
- the switch is one transaction, once every image of the folder has a new vector: the old vectors are
  replaced by the new ones and ``model_id``/``dim`` become the running model's. The index snapshots (old
  width) are deleted after it; the store rebuilds them from SQLite.

An image whose URI cannot be fetched or decoded, or that has none (added from a ``data:`` URI, which tusou
does not keep), is never dropped silently: each run lists those (group, id, label, desc, uri, reason) in a
JSON-lines file, and the folder is not switched while any remains. ``drop_failed`` switches without them:
they are deleted from the folder, and the same file, whose lines are an import manifest (uri, id, label,
desc), says so; add them again from their sources with ``tusou import GROUP FILE`` once the URIs are fixed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from tusou.images import ImageError
from tusou.store.base import ModelMismatch
from tusou.store.sqlite import lock_folder
from tusou.upgrade import (
    UPGRADING,
    FolderInUse,
    drop_snapshots,
    ensure_not_in_use,
    forget_reembedding,
    put_meta,
    release_free_pages,
    transaction,
)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS reembed (
    seq INTEGER PRIMARY KEY REFERENCES images (seq) ON DELETE CASCADE,
    vector BLOB NOT NULL
);
"""
NO_URI = "no stored uri: added from a data: URI, which tusou does not keep; add it again from its source"
#: Images fetched and embedded per committed batch.
BATCH = 32


class IndexEmbedder(Protocol):
    model_id: str
    dim: int

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@dataclass
class Failure:
    access_key: str
    group: str
    id: str
    label: str
    desc: Any
    uri: str | None
    reason: str


@dataclass
class ReembedResult:
    target: str
    embedded: int = 0  # by this run
    earlier: int = 0  # by earlier runs (skipped now)
    failed: list[Failure] = field(default_factory=list)
    remaining: int = 0  # images of the folder still without a new vector after this run
    switched: bool = False
    dropped: int = 0
    current: bool = False  # the folder already held the target's vectors: nothing was done


#: ``progress(done, total, failed)`` after each batch, over the images this run looks at.
Progress = Callable[[int, int, int], None]


def _connect(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such database")
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def reembed(
    db_path: Path,
    snapshot_dir: Path,
    embedder: IndexEmbedder,
    load: Callable[[str], Image.Image],
    *,
    groups: Iterable[tuple[str, str]] | None = None,
    progress: Progress | None = None,
    drop_failed: bool = False,
    drop: Callable[[list[Failure]], None] | None = None,
    batch: int = BATCH,
    workers: int = 4,
) -> ReembedResult:
    """Re-embed the images of ``groups`` ((access key, group) pairs; None: every group) from their URIs with
    ``embedder``, ``load`` turning a URI into an image (raising ImageError), then switch the folder when
    every image has its new vector. ``drop(failures)`` runs before a switch that drops failed images (the
    caller removes what it keeps beside the store, thumbnails for instance)."""
    target, dim = embedder.model_id, embedder.dim
    result = ReembedResult(target)
    if not db_path.is_file():
        raise FileNotFoundError(f"{db_path}: no such database")
    ensure_not_in_use(db_path)
    # Held until the folder has switched: a server started meanwhile would serve the old vectors from
    # memory over a database that changes under it (tusou serve refuses a folder whose lock is taken).
    lock = lock_folder(db_path)
    if lock is None:
        raise FolderInUse(f"{db_path} is in use by another tusou process (is a server running on it?)")
    conn = _connect(db_path)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        stored = meta.get("model_id")
        if stored is not None and stored.startswith(UPGRADING):
            raise ModelMismatch(
                f"{db_path}: an upgrade of its vectors to {meta.get('upgrade_to')} was interrupted; "
                "finish it with `tusou upgrade` first"
            )
        if stored is None or stored == target:
            if "reembed_to" in meta:  # left over from a run the folder no longer needs
                with transaction(conn):
                    forget_reembedding(conn)
            result.current = True  # nothing to re-embed: the folder holds this model's vectors
            return result
        conn.executescript(SCHEMA)
        with transaction(conn):
            if meta.get("reembed_to") not in (None, target):
                # Vectors of a third model from an abandoned run: they cannot go in with this one's.
                log.info("dropping the vectors of an earlier re-embedding to %s", meta["reembed_to"])
                conn.execute("DELETE FROM reembed")
            put_meta(conn, "reembed_to", target)
            put_meta(conn, "reembed_dim", str(dim))
        gids = _gids(conn, groups)
        total = sum(
            conn.execute("SELECT COUNT(*) FROM images WHERE gid = ?", (gid,)).fetchone()[0] for gid in gids
        )
        result.earlier = sum(
            conn.execute(
                "SELECT COUNT(*) FROM reembed JOIN images USING (seq) WHERE images.gid = ?", (gid,)
            ).fetchone()[0]
            for gid in gids
        )
        done = result.earlier
        if progress is not None:
            progress(done, total, 0)
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="tusou-reembed") as pool:
            for gid in gids:
                tenant, group = conn.execute(
                    "SELECT tenant, name FROM groups WHERE gid = ?", (gid,)
                ).fetchone()
                after = 0
                while True:
                    rows = conn.execute(
                        "SELECT seq, image_id, label, desc, uri FROM images WHERE gid = ? AND seq > ? "
                        "AND seq NOT IN (SELECT seq FROM reembed) ORDER BY seq LIMIT ?",
                        (gid, after, batch),
                    ).fetchall()
                    if not rows:
                        break
                    after = rows[-1][0]
                    vectors = list(pool.map(lambda row: _embed(row[4], embedder, load), rows))
                    ok = [
                        (row[0], v) for row, v in zip(rows, vectors, strict=True) if isinstance(v, np.ndarray)
                    ]
                    with transaction(conn):
                        conn.executemany(
                            "INSERT OR REPLACE INTO reembed (seq, vector) VALUES (?, ?)",
                            [(seq, _row(v, dim).tobytes()) for seq, v in ok],
                        )
                    for row, v in zip(rows, vectors, strict=True):
                        if isinstance(v, str):
                            desc = None if row[3] is None else json.loads(row[3])
                            result.failed.append(Failure(tenant, group, row[1], row[2], desc, row[4], v))
                    result.embedded += len(ok)
                    done += len(rows)
                    if progress is not None:
                        progress(done, total, len(result.failed))
        result.remaining = conn.execute(
            "SELECT COUNT(*) FROM images WHERE seq NOT IN (SELECT seq FROM reembed)"
        ).fetchone()[0]
        if result.remaining and drop_failed and result.remaining == len(result.failed):
            if drop is not None:
                drop(result.failed)
            result.dropped = len(result.failed)
        if result.remaining == result.dropped:
            _switch(conn, target, dim, result.failed if result.dropped else [])
            drop_snapshots(snapshot_dir)
            release_free_pages(conn)
            result.switched, result.remaining = True, 0
            log.info("re-embedded folder switched to %s", target)
        return result
    finally:
        conn.close()
        os.close(lock)  # releases the folder


def _gids(conn: sqlite3.Connection, groups: Iterable[tuple[str, str]] | None) -> list[int]:
    if groups is None:
        return [row[0] for row in conn.execute("SELECT gid FROM groups ORDER BY gid")]
    gids = []
    for tenant, name in groups:
        row = conn.execute("SELECT gid FROM groups WHERE tenant = ? AND name = ?", (tenant, name)).fetchone()
        if row is not None:
            gids.append(row[0])
    return gids


def _embed(uri: str | None, embedder: IndexEmbedder, load: Callable[[str], Image.Image]) -> np.ndarray | str:
    """The image's new vector, or why there is none."""
    if not uri:
        return NO_URI
    try:
        image = load(uri)
    except ImageError as exc:
        return f"{exc.code} {exc.message}"
    return np.asarray(embedder.embed_images([image])[0], dtype=np.float32)


def _row(vector: np.ndarray, dim: int) -> np.ndarray:
    row = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
    if row.shape != (dim,):
        raise ValueError(f"the model gave a vector of width {row.shape[0]}, not {dim}")
    return row


def _switch(conn: sqlite3.Connection, target: str, dim: int, dropped: list[Failure]) -> None:
    """One transaction: (the dropped images go,) every vector is replaced by its new one, the folder's
    model becomes ``target``. Nothing ever holds two formats: before it, the old; after it, the new."""
    with transaction(conn):
        for f in dropped:
            conn.execute(
                "DELETE FROM images WHERE image_id = ? AND gid = "
                "(SELECT gid FROM groups WHERE tenant = ? AND name = ?)",
                (f.id, f.access_key, f.group),
            )
        missing = conn.execute(
            "SELECT COUNT(*) FROM images WHERE seq NOT IN (SELECT seq FROM reembed)"
        ).fetchone()[0]
        if missing:  # cannot happen with the store closed; refuse rather than switch half the folder
            raise RuntimeError(f"{missing} images have no new vector; run tusou reembed again")
        conn.execute("DELETE FROM vectors")
        conn.execute("INSERT INTO vectors (seq, vector) SELECT seq, vector FROM reembed")
        conn.execute("DELETE FROM reembed")
        put_meta(conn, "model_id", target)
        put_meta(conn, "dim", str(dim))
        conn.execute("DELETE FROM meta WHERE key IN ('reembed_to', 'reembed_dim')")


def write_failures(path: Path, failures: list[Failure], dropped: bool) -> None:
    """The failures as JSON lines, an import manifest (uri, id, label, desc) with where and why."""
    with path.open("w", encoding="utf-8") as out:
        for f in failures:
            out.write(json.dumps({**asdict(f), "dropped": dropped}, ensure_ascii=False) + "\n")
