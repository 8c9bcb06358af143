"""The embedded store: SQLite is the record of truth, an index per group is the search cache.

Durability: WAL journal with ``synchronous=FULL``, so a commit has reached the disk (fsync) before it
returns, and a write is acknowledged only after its commit. The index is updated after the commit.

Start-up: each group's index comes from its newest snapshot in ``<data>/index`` (see
``tusou.store.vector_index``), then rows the snapshot lacks (seq > its seq) are replayed from SQLite and
rows deleted since are dropped; with no usable snapshot the index is rebuilt from SQLite. A crash between
a commit and the index update, or between snapshots, therefore loses nothing and never re-embeds an image.
A background thread writes a snapshot of a group after ``snapshot_every_writes`` changes or when a change
is ``snapshot_every_s`` old, and ``close()`` writes the rest.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

from tusou import upgrade as upgrades
from tusou.store.base import (
    KEEP,
    GroupExists,
    GroupNotFound,
    Hits,
    ImageInfo,
    ImageNotFound,
    ItemError,
    ModelMismatch,
    NewImage,
    Store,
    gatherer,
    load_desc,
    load_tags,
)
from tusou.store.disk import disk_errors
from tusou.store.filters import Filter
from tusou.store.markers import MarkerCodec, new_marker_key
from tusou.store.vector_index import VectorIndex, snapshot_files
from tusou.upgrade import ConvertFrom, Progress

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    gid INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a removed group's id never names another
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    gid INTEGER NOT NULL REFERENCES groups (gid) ON DELETE CASCADE,
    image_id TEXT NOT NULL,
    label TEXT NOT NULL,
    desc TEXT,
    uri TEXT,
    created REAL NOT NULL,
    tags TEXT,  -- automatic tags, JSON [[class, p], ...]; NULL: none computed (tusou retag)
    UNIQUE (gid, image_id)
);
CREATE INDEX IF NOT EXISTS images_by_group ON images (gid, seq);
-- Vectors live apart from metadata so listing pages never read the (overflowing) vector blobs.
CREATE TABLE IF NOT EXISTS vectors (
    seq INTEGER PRIMARY KEY REFERENCES images (seq) ON DELETE CASCADE,
    vector BLOB NOT NULL
);
-- The automatic tags again, one row per (group, class, image): keyword search sums p over a word's
-- classes from the key instead of parsing every image's JSON (docs/words.md has the timings).
CREATE TABLE IF NOT EXISTS image_tags (
    gid INTEGER NOT NULL,
    class INTEGER NOT NULL,
    seq INTEGER NOT NULL REFERENCES images (seq) ON DELETE CASCADE,
    p REAL NOT NULL,
    PRIMARY KEY (gid, class, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS image_tags_by_seq ON image_tags (seq);
"""

# Ids of rows fetched per query when turning hits into records; below SQLite's variable limit.
_CHUNK = 900
# A search whose answer is drawn from at least this many rows reads their records in another thread while
# the index reads and scores their float32 rows; that thread's connection keeps a larger page cache (KiB;
# a 500k group's images table is ~20 MB: 16k records 15 -> 10 ms).
_PREFETCH_MIN = 2_000
_RECORDS_CACHE_KIB = 32_768
# Threads that read a large answer's records, each a share of the seqs (ascending ranges): the records were
# the long pole of a large search (16k records in one thread ~24-38 ms under load, the index's re-rank ~7).
_RECORDS_THREADS = 2
# The images table's warm-up after the store opens (``_warm_records``): this many rows per step, each step
# only after this long without a search, so that it never competes with searches for a core.
_WARM_ROWS = 5_000
_WARM_IDLE_S = 0.25
# Rows read per step when rebuilding or replaying an index (bounded memory: ~50 MB of blobs).
_LOAD_CHUNK = 10_000
# Seqs read per query when a group's index is reconciled with SQLite at start-up.
_SEQ_CHUNK = 1_000_000


class _Records(NamedTuple):
    """Columns of records, ascending by seq (``SQLiteStore._records``)."""

    seqs: np.ndarray  # int64
    ids: list[str]
    labels: list[str]
    descs: list[str | None]  # stored JSON text
    uris: list[str | None]
    tags: list[str | None]  # stored JSON text


def _joined(a: _Records, b: _Records) -> _Records:
    """Two record sets as one (each column's lists joined; seqs no longer in order: ``_hits_of`` sorts)."""
    return _Records(
        np.concatenate([a.seqs, b.seqs]),
        *(x + y for x, y in zip(a[1:], b[1:], strict=True)),  # type: ignore[operator]
    )


def _positions(have: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    """Where each of ``seqs`` is in ``have`` (distinct seqs, in any order), -1 where it is not. A table over
    the span of ``have`` where that is at most 32 slots a seq (a large answer's records: 16.5k seqs of a
    500k group, 2 MB for ~0.3 ms), else a binary search (16.5k unsorted keys ~1.5 ms)."""
    if not len(have) or not len(seqs):
        return np.full(len(seqs), -1, dtype=np.intp)
    low, high = int(have.min()), int(have.max())
    inside = (seqs >= low) & (seqs <= high)
    where = np.full(len(seqs), -1, dtype=np.intp)
    if high - low < 32 * len(have):
        table = np.full(high - low + 1, -1, dtype=np.intp)
        table[have - low] = np.arange(len(have))
        where[inside] = table[seqs[inside] - low]
        return where
    ranks = np.argsort(have, kind="stable")
    at = ranks[np.minimum(np.searchsorted(have[ranks], seqs[inside]), len(have) - 1)]
    where[inside] = np.where(have[at] == seqs[inside], at, -1)
    return where


def _int_array(text: str) -> np.ndarray:
    """SQLite's JSON array of integers (``json_group_array`` of seqs: ``[1,5,9]``) as an int64 array, parsed
    by numpy (16.5k seqs: 0.3 ms; ``json.loads`` and a conversion: 1.4 ms)."""
    inner = text[1:-1]
    if not inner:
        return np.zeros(0, dtype=np.int64)
    values = np.fromstring(inner, dtype=np.int64, sep=",")
    if len(values) != inner.count(",") + 1:  # not the plain array expected: the general parser
        return np.asarray(json.loads(text), dtype=np.int64)
    return values


def folder_in_use(path: Path) -> bool:
    """Whether another store holds the folder of the database at ``path`` (a running server)."""
    fd = lock_folder(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def lock_folder(path: Path) -> int | None:
    """An exclusive lock on ``<db>.lock`` (kept open as long as the store is), or None when another store
    holds it: a server, or a command on the folder of a running server. The lock goes with the process,
    kill -9 included."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _dump_desc(desc: object) -> str | None:
    return None if desc is None else json.dumps(desc, ensure_ascii=False, separators=(",", ":"))


def _dump_tags(tags: list[list[float]] | None) -> str | None:
    return None if tags is None else json.dumps(tags, separators=(",", ":"))


def _insert_tag_rows(conn: sqlite3.Connection, gid: int, seq: int, tags: list[list[float]]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO image_tags (gid, class, seq, p) VALUES (?, ?, ?, ?)",
        [(gid, int(c), seq, float(p)) for c, p in tags],
    )


class SQLiteStore(Store):
    def __init__(
        self,
        path: Path,
        *,
        model_id: str,
        dim: int,
        group_max_images: int = 500_000,
        snapshot_dir: Path | None = None,
        snapshot_every_writes: int = 20_000,
        snapshot_every_s: float = 60.0,
        convert_from: ConvertFrom | None = None,
        upgrade: bool = False,
        upgrade_progress: Progress | None = None,
        upgrade_batch: int = upgrades.BATCH,
    ) -> None:
        """``convert_from`` (the embedder's): how vectors stored under an older model id convert to
        ``model_id``'s. A folder holding such vectors is refused (ModelMismatch naming ``tusou upgrade``)
        unless ``upgrade`` is set, which converts them in place first (tusou/upgrade.py); an upgrade that
        was interrupted is always finished."""
        self.path = Path(path)
        self.dim = dim
        self.group_max_images = group_max_images
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else self.path.parent / "index"
        self.snapshot_every_writes = snapshot_every_writes
        self.snapshot_every_s = snapshot_every_s
        self._closed = False
        self._deleted_since_release = 0  # rows deleted since freed pages were last handed back
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The snapshots and side files in ``snapshot_dir`` belong to one store at a time: another process
        # appending to a side file writes its rows into the slots of the owner's (searches then score one
        # image with another's vector), and its snapshots and clean-up delete the owner's files. A store
        # that finds the folder taken is ``shared``: its indexes live in memory only (re-ranked from SQLite),
        # and it writes and deletes no file in ``snapshot_dir``. `tusou serve` refuses such a folder.
        self._lock_fd = lock_folder(self.path)
        self.shared = self._lock_fd is None
        try:
            self._open(model_id, convert_from, upgrade, upgrade_progress, upgrade_batch)
        except BaseException:
            self._unlock()  # a store that failed to open leaves the folder free
            raise

    def _open(
        self,
        model_id: str,
        convert_from: ConvertFrom | None,
        upgrade: bool,
        upgrade_progress: Progress | None,
        upgrade_batch: int,
    ) -> None:
        new_file = not self.path.exists()
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []  # every thread's, closed by close()
        if new_file:
            # Must precede the journal mode and the first table (either fixes the file's layout); lets
            # deletes hand pages back to the file system.
            fresh = sqlite3.connect(self.path)
            fresh.execute("PRAGMA auto_vacuum=INCREMENTAL")
            fresh.execute("VACUUM")
            fresh.close()
            os.chmod(self.path, 0o600)
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)
        columns = {row[1] for row in self._writer.execute("PRAGMA table_info(images)")}
        if "tags" not in columns:  # a data folder from before tags: the column is added, rows keep NULL
            self._writer.execute("ALTER TABLE images ADD COLUMN tags TEXT")
        if self._writer.execute("SELECT value FROM meta WHERE key = 'tag_rows'").fetchone() is None:
            # Tags stored before image_tags existed: copied into it once.
            with self._write_lock, self._transaction() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO image_tags (gid, class, seq, p) "
                    "SELECT images.gid, json_extract(t.value, '$[0]'), images.seq, "
                    "json_extract(t.value, '$[1]') "
                    "FROM images, json_each(images.tags) AS t WHERE images.tags IS NOT NULL"
                )
                conn.execute("INSERT INTO meta VALUES ('tag_rows', '1')")
        #: What ``upgrade`` converted when this store opened (None: nothing).
        self.upgraded: upgrades.UpgradeResult | None = None
        try:
            self._upgrade_vectors(model_id, convert_from, upgrade, upgrade_progress, upgrade_batch)
            self._check_model(model_id)
        except BaseException:
            self._writer.close()  # a refused folder is left closed: `tusou upgrade`/`reembed` may take it
            raise
        self._gids: dict[tuple[str, str], int] = {}
        self._indexes: dict[int, VectorIndex] = {}
        # Serialises snapshot writers (background thread, close, remove_group's file cleanup).
        self._snapshot_lock = threading.Lock()
        self._stop = threading.Event()
        self._records_lock = threading.Lock()
        self._records_executor: ThreadPoolExecutor | None = None
        self._records_busy = False
        self._records_pending = 0
        self._load()
        # time.monotonic() at a search's start and end; the warm-up waits for an idle moment after it.
        self._last_search = time.monotonic()
        self._snapshotter = threading.Thread(target=self._snapshot_loop, name="tusou-snapshot", daemon=True)
        self._snapshotter.start()
        self._warming: sqlite3.Connection | None = None
        self._warmer = threading.Thread(target=self._warm_records, name="tusou-warm-records", daemon=True)
        self._warmer.start()

    # --- connections -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            self._readers.append(conn)
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable write; callers hold ``_write_lock`` so post-commit cache updates stay ordered."""
        with disk_errors(self.path), upgrades.transaction(self._writer) as conn:
            yield conn

    def _release_pages(self) -> None:
        """Hand freed pages back to the file system: after a committed delete, so a failure (a full disk)
        only leaves them in the file, for the next time."""
        try:
            # executescript steps the pragma to its end; execute() (even with fetchall) freed one page only,
            # so deletes and group removals had handed back a page each (tusou/upgrade.py does the same).
            self._writer.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            log.warning("%s: freed pages not released: %s", self.path, exc)
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")

    def _upgrade_vectors(
        self,
        model_id: str,
        convert_from: ConvertFrom | None,
        allowed: bool,
        progress: Progress | None,
        batch: int,
    ) -> None:
        """Vectors stored under an older model id that ``convert_from`` maps to ``model_id``'s: converted
        in place when ``allowed`` or when an upgrade was interrupted, else refused with the way out."""
        try:
            source = upgrades.pending(self._writer, model_id, convert_from)
        except ModelMismatch as exc:
            raise ModelMismatch(f"{self.path}: {exc}") from None
        if source is None:
            return
        stored = self._writer.execute("SELECT value FROM meta WHERE key='model_id'").fetchone()[0]
        if not allowed and not stored.startswith(upgrades.UPGRADING):
            raise ModelMismatch(
                f"{self.path} holds vectors of model {source}; this release's model {model_id} converts "
                "them without re-embedding, which rewrites the folder for good: stop here, back up the "
                "folder (`tusou backup DEST --data DIR`), then run `tusou upgrade --data DIR` "
                "(docs/operations.md)"
            )
        convert = convert_from(source) if convert_from is not None else None
        if convert is None:
            raise ModelMismatch(f"{self.path}: this release cannot convert the vectors of model {source}")
        with self._write_lock:
            self.upgraded = upgrades.upgrade(
                self._writer, self.snapshot_dir, source, model_id, self.dim, convert, progress, batch
            )

    def _check_model(self, model_id: str) -> None:
        row = self._writer.execute("SELECT value FROM meta WHERE key='model_id'").fetchone()
        if row and row[0] != model_id:
            has_images = self._writer.execute("SELECT 1 FROM images LIMIT 1").fetchone()
            if has_images:
                raise ModelMismatch(
                    f"{self.path} was indexed with model {row[0]}, not {model_id}; "
                    "start with the same model or use a new data folder"
                )
        with self._write_lock, self._transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('model_id', ?)", (model_id,))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('dim', ?)", (str(self.dim),))
            # The key of this store's list markers (tusou.store.markers), kept for its lifetime and its
            # backups, so markers stay valid across restarts and restores.
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('marker_key', ?)", (new_marker_key().hex(),))
            key = conn.execute("SELECT value FROM meta WHERE key='marker_key'").fetchone()[0]
        self._markers = MarkerCodec(bytes.fromhex(key))

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _new_index(self, gid: int) -> VectorIndex:
        if not self.shared:
            # The float32 rows for the re-rank go to a side file beside the group's snapshots.
            try:
                return VectorIndex(self.dim, self._fetch_vectors, self.snapshot_dir, self._snapshot_name(gid))
            except OSError as exc:  # after the group's commit: an index without it (re-ranked from SQLite)
                log.error("group %d: no side file for its index: %s", gid, exc)
        return VectorIndex(self.dim, self._fetch_vectors)

    def _load(self) -> None:
        conn = self._writer
        groups = conn.execute("SELECT gid, tenant, name FROM groups").fetchall()
        for gid, tenant, name in groups:
            self._gids[(tenant, name)] = gid
            started = time.monotonic()
            name_ = self._snapshot_name(gid)
            index = VectorIndex.load(self.snapshot_dir, name_, self.dim, self._fetch_vectors)
            if index is not None and self.shared:
                index.detach()  # the owner's side file: never written from here
            live = self._group_seqs(conn, gid)
            if index is None:
                index = self._new_index(gid)
                missing = live
            else:
                held = index.keys()
                if len(held) <= len(live) and np.array_equal(held, live[: len(held)]):
                    # The usual case: nothing deleted since the snapshot, and it holds every row up to its
                    # own; the rows after it are the ones to add.
                    missing = live[len(held) :]
                else:
                    index.remove(np.setdiff1d(held, live, assume_unique=True))
                    # Every live row the snapshot lacks, not only those past its last seq: a row committed
                    # but never indexed (the index add failed after the commit) is caught up here too.
                    missing = np.setdiff1d(live, held, assume_unique=True)
            for start in range(0, len(missing), _LOAD_CHUNK):
                keys, vectors = self._fetch_vectors(missing[start : start + _LOAD_CHUNK], conn)
                index.add(keys, vectors)
            self._indexes[gid] = index
            if len(missing) > 1000:
                log.info(
                    "group %s: indexed %d rows from SQLite in %.1fs",
                    name,
                    len(missing),
                    time.monotonic() - started,
                )
        if self.shared:
            return
        for path in self.snapshot_dir.glob("g*"):
            # Left-overs: snapshots of removed groups, temp files of an interrupted snapshot.
            gid_text = path.name.split(".")[0][1:]
            if path.name.endswith(".tmp") or not gid_text.isdigit() or int(gid_text) not in self._indexes:
                path.unlink(missing_ok=True)

    @staticmethod
    def _group_seqs(conn: sqlite3.Connection, gid: int) -> np.ndarray:
        """The group's seqs, ascending, from the (gid, seq) index: a million at a time as one text value
        parsed by numpy (a cursor row per seq costs ~1 µs of Python each: 5.6 s for 5M rows, against
        ~0.7 s this way)."""
        parts: list[np.ndarray] = []
        after = 0
        while True:
            count, text, last = conn.execute(
                "SELECT count(*), group_concat(seq), max(seq) FROM "
                "(SELECT seq FROM images WHERE gid = ? AND seq > ? ORDER BY seq LIMIT ?)",
                (gid, after, _SEQ_CHUNK),
            ).fetchone()
            if not count:
                break
            seqs = np.fromstring(text, dtype=np.int64, sep=",")
            if len(seqs) != count:
                raise RuntimeError(f"group {gid}: read {len(seqs)} seqs of {count}")
            parts.append(seqs)
            after = last
        seqs = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if len(seqs) > 1 and not bool(np.all(seqs[1:] > seqs[:-1])):
            seqs = np.unique(seqs)  # group_concat's order follows the subquery's in practice, not by promise
        return seqs

    def _fetch_vectors(
        self, keys: np.ndarray, conn: sqlite3.Connection | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The float32 rows of ``keys`` that still exist, in the order of ``keys``."""
        conn = conn or self._reader()
        keys_list = [int(k) for k in keys]
        found: dict[int, bytes] = {}
        for start in range(0, len(keys_list), _CHUNK):
            chunk = keys_list[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(conn.execute(f"SELECT seq, vector FROM vectors WHERE seq IN ({marks})", chunk))
        present = [k for k in keys_list if k in found]
        rows = np.frombuffer(b"".join(found[k] for k in present), dtype=np.float32).reshape(-1, self.dim)
        return np.asarray(present, dtype=np.int64), rows

    # --- snapshots ---------------------------------------------------------------------------------
    @staticmethod
    def _snapshot_name(gid: int) -> str:
        return f"g{gid}"

    def _snapshot_loop(self) -> None:
        if self.shared:
            return
        while not self._stop.wait(1.0):
            now = time.monotonic()
            for gid, index in list(self._indexes.items()):
                if self._stop.is_set():
                    return
                if index.relayout_due():
                    self._relayout(gid, index)
                if index.angles_due():  # a snapshot of an earlier format: its rows' angles
                    self._relayout(gid, index, angles=True)
                # A snapshot writes the whole group (2 GB at 5M x 384): after a fixed number of changes it
                # would be rewritten over and over while a large group fills; an eighth of the group's size
                # bounds both the rewriting and what a crash leaves to replay from SQLite.
                if index.dirty >= max(self.snapshot_every_writes, len(index) // 8) or (
                    index.dirty and now - index.dirty_since >= self.snapshot_every_s
                ):
                    self._snapshot(gid, index)

    def _snapshot(self, gid: int, index: VectorIndex) -> None:
        if self.shared:
            return
        with self._snapshot_lock:
            if self._indexes.get(gid) is not index:  # removed meanwhile
                return
            try:
                started = time.monotonic()
                seq = index.save(self.snapshot_dir, self._snapshot_name(gid))
                if seq is not None:
                    log.info("snapshot of group %d at seq %d in %.1fs", gid, seq, time.monotonic() - started)
            except OSError:
                # The snapshot is only an accelerator: SQLite still has every row; try again later.
                log.exception("snapshot of group %d failed", gid)

    def _relayout(self, gid: int, index: VectorIndex, angles: bool = False) -> None:
        with self._snapshot_lock:
            if self._indexes.get(gid) is not index:  # removed meanwhile
                return
            try:
                # Marks the index changed: the next round writes a snapshot naming the new file (or holding
                # the angles). A close stops it between reads.
                if angles:
                    index.fill_angles(self._stop)
                else:
                    index.relayout(self._stop)
            except OSError:
                log.exception("background pass over the side file of group %d failed", gid)

    def snapshot(self) -> None:
        """Write a snapshot of every group changed since its last one (tests, clean shutdown)."""
        for gid, index in list(self._indexes.items()):
            self._snapshot(gid, index)

    # --- groups --------------------------------------------------------------------------------------
    def _gid(self, tenant: str, group: str) -> int:
        gid = self._gids.get((tenant, group))
        if gid is None:
            raise GroupNotFound(group)
        return gid

    def _index_of(self, tenant: str, group: str) -> VectorIndex:
        # One lookup that a concurrent remove_group cannot split into a KeyError.
        index = self._indexes.get(self._gid(tenant, group))
        if index is None:
            raise GroupNotFound(group)
        return index

    def create_group(self, tenant: str, group: str, images: Sequence[NewImage]) -> list[ItemError | None]:
        with self._write_lock:
            if (tenant, group) in self._gids:
                raise GroupExists(group)
            with self._transaction() as conn:
                gid = conn.execute(
                    "INSERT INTO groups (tenant, name, created) VALUES (?, ?, ?)",
                    (tenant, group, time.time()),
                ).lastrowid
                assert gid is not None
                results, added = self._insert(conn, gid, 0, images)
            self._indexes[gid] = self._new_index(gid)
            self._index_added(gid, added)
            self._gids[(tenant, group)] = gid
        return results

    def add_images(self, tenant: str, group: str, images: Sequence[NewImage]) -> list[ItemError | None]:
        with self._write_lock:
            gid = self._gid(tenant, group)
            with self._transaction() as conn:
                results, added = self._insert(conn, gid, len(self._indexes[gid]), images)
            # Rows are committed; the index catches up before the caller acknowledges.
            self._index_added(gid, added)
        return results

    def _insert(
        self, conn: sqlite3.Connection, gid: int, count: int, images: Sequence[NewImage]
    ) -> tuple[list[ItemError | None], list[tuple[int, np.ndarray]]]:
        results: list[ItemError | None] = []
        added: list[tuple[int, np.ndarray]] = []
        vector_rows: list[tuple[int, bytes]] = []
        now = time.time()
        for image in images:
            if count >= self.group_max_images:
                results.append(ItemError(406, "group is full"))
                continue
            vector = np.ascontiguousarray(image.vector, dtype=np.float32).reshape(self.dim)
            try:
                seq = conn.execute(
                    "INSERT INTO images (gid, image_id, label, desc, uri, created, tags) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        gid,
                        image.id,
                        image.label,
                        _dump_desc(image.desc),
                        image.uri,
                        now,
                        _dump_tags(image.tags),
                    ),
                ).lastrowid
            except sqlite3.IntegrityError:
                results.append(ItemError(400, "id already exists"))
                continue
            assert seq is not None
            vector_rows.append((seq, vector.tobytes()))
            if image.tags:
                _insert_tag_rows(conn, gid, seq, image.tags)
            results.append(None)
            added.append((seq, vector))
            count += 1
        conn.executemany("INSERT INTO vectors (seq, vector) VALUES (?, ?)", vector_rows)
        return results, added

    def _index_added(self, gid: int, added: list[tuple[int, np.ndarray]]) -> None:
        if added:
            keys = np.asarray([seq for seq, _ in added], dtype=np.int64)
            self._indexes[gid].add(keys, np.stack([vec for _, vec in added]))

    def remove_group(self, tenant: str, group: str) -> None:
        with self._write_lock:
            gid = self._gid(tenant, group)
            with self._transaction() as conn:
                conn.execute(
                    "DELETE FROM vectors WHERE seq IN (SELECT seq FROM images WHERE gid = ?)", (gid,)
                )
                conn.execute("DELETE FROM images WHERE gid = ?", (gid,))
                conn.execute("DELETE FROM groups WHERE gid = ?", (gid,))
            del self._gids[(tenant, group)]
            index = self._indexes.pop(gid, None)
            with self._snapshot_lock:
                if index is not None:
                    index.close()
                if not self.shared:
                    for path in snapshot_files(self.snapshot_dir, self._snapshot_name(gid)):
                        path.unlink(missing_ok=True)
            self._release_pages()

    def delete_images(self, tenant: str, group: str, ids: Sequence[str]) -> int:
        with self._write_lock:
            gid = self._gid(tenant, group)
            seqs = self._delete_rows(gid, ids)
            self._indexes[gid].remove(seqs)
            # Counted across calls: the service deletes a large request 1000 ids at a time.
            self._deleted_since_release += len(seqs)
            if self._deleted_since_release > 1000:
                self._release_pages()
                self._deleted_since_release = 0
        return len(seqs)

    def _delete_rows(self, gid: int, ids: Sequence[str]) -> list[int]:
        with self._transaction() as conn:
            seqs: list[int] = []
            for start in range(0, len(ids), _CHUNK):
                names = list(ids[start : start + _CHUNK])
                marks = ",".join("?" * len(names))
                seqs += [
                    row[0]
                    for row in conn.execute(
                        f"SELECT seq FROM images WHERE gid = ? AND image_id IN ({marks})", (gid, *names)
                    )
                ]
            for start in range(0, len(seqs), _CHUNK):
                chunk = seqs[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                conn.execute(f"DELETE FROM vectors WHERE seq IN ({marks})", chunk)
                conn.execute(f"DELETE FROM images WHERE seq IN ({marks})", chunk)
        return seqs

    # --- reads ---------------------------------------------------------------------------------------
    def list_groups(self, tenant: str) -> list[str]:
        rows = self._reader().execute("SELECT name FROM groups WHERE tenant = ? ORDER BY gid", (tenant,))
        return [row[0] for row in rows]

    def count(self, tenant: str, group: str) -> int:
        return len(self._index_of(tenant, group))

    def list_images(self, tenant: str, group: str, marker: str, limit: int) -> tuple[list[ImageInfo], str]:
        gid = self._gid(tenant, group)
        after = self._markers.decode(tenant, group, marker)
        rows = (
            self._reader()
            .execute(
                "SELECT seq, image_id, label, desc, uri, tags FROM images WHERE gid = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (gid, after, limit + 1),
            )
            .fetchall()
        )
        more = len(rows) > limit
        rows = rows[:limit]
        page = [ImageInfo(r[1], r[2], load_desc(r[3]), r[4], load_tags(r[5])) for r in rows]
        return page, (self._markers.encode(tenant, group, rows[-1][0]) if more else "")

    def _image_row(self, tenant: str, group: str, image_id: str) -> tuple:
        row = (
            self._reader()
            .execute(
                "SELECT seq, image_id, label, desc, uri, tags FROM images WHERE gid = ? AND image_id = ?",
                (self._gid(tenant, group), image_id),
            )
            .fetchone()
        )
        if row is None:
            raise ImageNotFound(image_id)
        return row

    def get_image(self, tenant: str, group: str, image_id: str) -> ImageInfo:
        row = self._image_row(tenant, group, image_id)
        return ImageInfo(row[1], row[2], load_desc(row[3]), row[4], load_tags(row[5]))

    def update_image(
        self, tenant: str, group: str, image_id: str, *, label: str | None = None, desc: Any = KEEP
    ) -> ImageInfo:
        with self._write_lock:
            gid = self._gid(tenant, group)
            with self._transaction() as conn:
                if label is not None:
                    conn.execute(
                        "UPDATE images SET label = ? WHERE gid = ? AND image_id = ?", (label, gid, image_id)
                    )
                if desc is not KEEP:
                    conn.execute(
                        "UPDATE images SET desc = ? WHERE gid = ? AND image_id = ?",
                        (_dump_desc(desc), gid, image_id),
                    )
                row = conn.execute(
                    "SELECT image_id, label, desc, uri, tags FROM images WHERE gid = ? AND image_id = ?",
                    (gid, image_id),
                ).fetchone()
                if row is None:
                    raise ImageNotFound(image_id)  # rolls the (empty) transaction back
        return ImageInfo(row[0], row[1], load_desc(row[2]), row[3], load_tags(row[4]))

    def get_vector(self, tenant: str, group: str, image_id: str) -> np.ndarray:
        seq = self._image_row(tenant, group, image_id)[0]
        _, rows = self._fetch_vectors(np.asarray([seq]))
        if not len(rows):
            raise ImageNotFound(image_id)
        return rows[0].copy()

    def search(
        self,
        tenant: str,
        groups: Sequence[str],
        queries: np.ndarray,
        limit: int,
        min_cosine: float,
        where: Filter | None = None,
    ) -> Hits:
        self._last_search = time.monotonic()
        try:
            return self._search(tenant, groups, queries, limit, min_cosine, where)
        finally:
            self._last_search = time.monotonic()

    def _search(
        self,
        tenant: str,
        groups: Sequence[str],
        queries: np.ndarray,
        limit: int,
        min_cosine: float,
        where: Filter | None,
    ) -> Hits:
        prefetched: list[Future] = []

        def prefetch(keys: np.ndarray) -> None:
            # A large answer's records are read in other threads while the index reads and scores the
            # candidates' float32 rows (both mostly outside the GIL: SQLite's step, preadv), each thread
            # an ascending range of the seqs. One search at a time does this; while the threads are busy
            # with another search's records, this search reads its own in line afterwards, as concurrent
            # searches did before (no queue behind them).
            if len(groups) == 1 and len(keys) >= _PREFETCH_MIN and not prefetched:
                pieces = np.array_split(np.sort(keys), _RECORDS_THREADS)
                with self._records_lock:
                    if self._records_busy:
                        return
                    self._records_busy = True
                    self._records_pending = len(pieces)
                pool = self._records_pool()
                for piece in pieces:
                    future = pool.submit(self._records, piece)
                    future.add_done_callback(self._records_done)
                    prefetched.append(future)

        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for group in groups:
            index = self._index_of(tenant, group)
            if where is None:
                parts.append(index.search(queries, limit, min_cosine, prefetch=prefetch))
            else:
                # Pre-filter: the matching rows come from SQL, only they are scored (limit counts them).
                among = self._filtered_seqs(self._gid(tenant, group), where)
                parts.append(index.search_among(queries, among, limit, min_cosine, prefetch=prefetch))
        if len(parts) == 1:  # one group's answer comes best first, ties in seq order, already
            keys, cosines = parts[0]
            at = np.zeros(len(keys), dtype=np.intp)
        else:
            keys = np.concatenate([k for k, _ in parts])
            cosines = np.concatenate([c for _, c in parts])
            at = np.repeat(np.arange(len(parts)), [len(k) for k, _ in parts])
            order = np.lexsort((keys, -cosines))  # best first, ties in seq order
            keys, cosines, at = keys[order], cosines[order], at[order]
        if limit >= 0:
            keys, cosines, at = keys[:limit], cosines[:limit], at[:limit]
        records = prefetched[0].result() if prefetched else None
        for future in prefetched[1:]:  # the next ranges of seqs: the records stay in ascending order
            records = _joined(records, future.result())  # type: ignore[arg-type]
        if records is not None:
            missing = keys[_positions(records.seqs, keys) < 0]
            if len(missing):  # answer rows the index read after the prefetched ones
                records = _joined(records, self._records(missing))
        return self._hits_of(list(groups), keys, cosines, at, records)

    def _hits(self, found: list[tuple[float, int, str]], limit: int) -> Hits:
        found.sort(key=lambda hit: (-hit[0], hit[1]))
        if limit >= 0:
            found = found[:limit]
        names = sorted({group for _, _, group in found})
        at = {name: i for i, name in enumerate(names)}
        seqs = np.asarray([seq for _, seq, _ in found], dtype=np.int64)
        scores = np.asarray([c for c, _, _ in found], dtype=np.float64)
        return self._hits_of(names, seqs, scores, np.asarray([at[g] for _, _, g in found], dtype=np.intp))

    def _hits_of(
        self,
        groups: list[str],
        seqs: np.ndarray,
        scores: np.ndarray,
        at: np.ndarray,
        records: _Records | None = None,
    ) -> Hits:
        """The hits of ``seqs`` (in that order) with their ``scores``, ``groups[at[i]]`` the i-th's group;
        ``records``: :meth:`_records` of (a superset of) ``seqs``, read already (in any seq order). A row
        deleted between the index scan and this read is left out. The answer stays in columns (``Hits``): no
        object per hit (16.5k ``Hit`` objects with their descs and tags parsed took ~10 ms)."""
        if not len(seqs):
            return Hits.empty()
        found, ids, labels, descs, uris, tags = records if records is not None else self._records(seqs)
        if not len(found):
            return Hits.empty()
        where = _positions(found, seqs)
        there = where >= 0
        if not there.all():  # rows deleted meanwhile
            kept = np.flatnonzero(there)
            where, scores, at = where[kept], scores[kept], at[kept]
        pick = where.tolist()
        n = len(pick)
        names = [groups[g] for g in at.tolist()] if len(groups) > 1 else [groups[0]] * n
        # A column of NULLs only (uris, tags, as usual) is not gathered.
        get = gatherer(pick)

        def column(values: list[Any]) -> Sequence[Any]:
            return get(values) if any(values) else [None] * n

        return Hits(
            names,
            get(ids),
            get(labels),
            get(descs),  # the stored JSON text (Hits.json)
            column(uris),
            scores,
            column(tags),
            json=True,
        )

    def _filtered_seqs(self, gid: int, where: Filter) -> np.ndarray:
        sql, params = where.sql()
        rows = self._reader().execute(f"SELECT seq FROM images WHERE gid = ? AND {sql}", (gid, *params))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def search_tags(
        self,
        tenant: str,
        groups: Sequence[str],
        classes: Sequence[int],
        limit: int,
        min_evidence: float,
        where: Filter | None = None,
    ) -> Hits:
        wanted = json.dumps(sorted({int(c) for c in classes}))
        found: list[tuple[float, int, str]] = []
        extra, params = where.sql() if where is not None else ("1", [])
        for group in groups:
            gid = self._gid(tenant, group)
            # Summed in SQLite over each image's stored tags (json_each): no row leaves the database
            # unless it has evidence; the threshold applies to the sum.
            # The sums first, from the (gid, class, seq) key alone; then the filter on the images they found.
            # Sums are rounded before ordering so that equal evidence keeps insertion order whatever order
            # the floats were added in.
            rows = self._reader().execute(
                "SELECT x.seq, x.ev FROM (SELECT seq, ROUND(SUM(p), 6) AS ev FROM image_tags "
                "WHERE gid = ? AND class IN (SELECT value FROM json_each(?)) GROUP BY seq) AS x "
                f"JOIN images ON images.seq = x.seq WHERE x.ev >= ? AND {extra} "
                "ORDER BY x.ev DESC, x.seq" + (" LIMIT ?" if limit >= 0 else ""),
                (gid, wanted, min_evidence, *params, *([limit] if limit >= 0 else [])),
            )
            found += [(min(1.0, float(ev)), int(seq), group) for seq, ev in rows]
        return self._hits(found, limit)

    def set_tags(self, tenant: str, group: str, tags: dict[str, list[list[float]]]) -> int:
        with self._write_lock:
            gid = self._gid(tenant, group)
            with self._transaction() as conn:
                n = 0
                for image_id, t in tags.items():
                    row = conn.execute(
                        "SELECT seq FROM images WHERE gid = ? AND image_id = ?", (gid, image_id)
                    ).fetchone()
                    if row is None:
                        continue
                    conn.execute("UPDATE images SET tags = ? WHERE seq = ?", (_dump_tags(t), row[0]))
                    conn.execute("DELETE FROM image_tags WHERE seq = ?", (row[0],))
                    _insert_tag_rows(conn, gid, row[0], t)
                    n += 1
        return n

    def totals(self) -> tuple[int, int]:
        indexes = list(self._indexes.values())  # a snapshot: writers may add or remove groups meanwhile
        return len(indexes), sum(len(index) for index in indexes)

    def _warm_records(self) -> None:
        """Read the images table once, in the background, so that its pages are in the page cache: a large
        answer's records are then page-cache reads, not a random disk read each (f12 measured a 5M group's
        limit=10000 answer with tusou.db evicted: ~790 ms in the records). Its own connection, interrupted
        by :meth:`close`; SQLite does the reading outside the GIL. 500k rows: ~20 MB, ~0.1 s.

        In idle moments only: steps of ``_WARM_ROWS`` rows (about a millisecond each), taken while no search
        ran for ``_WARM_IDLE_S``. Read at once when the store opened, it competed with the first searches
        for the two cores (500k sparse, limit=1 right after the open: 2.4-4.3 -> 6.6-7.0 ms)."""
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False)
        except sqlite3.Error:
            return
        with self._records_lock:
            if self._closed:
                conn.close()
                return
            self._warming = conn
        after: int | None = 0
        try:
            while after is not None and not self._stop.is_set():
                quiet = time.monotonic() - self._last_search
                if quiet < _WARM_IDLE_S:  # searched lately (or just opened): wait for an idle moment
                    self._stop.wait(min(_WARM_IDLE_S, _WARM_IDLE_S - quiet))
                    continue
                after = self._warm_step(conn, after)
        except sqlite3.Error:
            pass  # interrupted by close(), or a busy file: only a warm-up
        finally:
            with self._records_lock:
                self._warming = None
            conn.close()

    @staticmethod
    def _warm_step(conn: sqlite3.Connection, after: int) -> int | None:
        """Read the images table's next ``_WARM_ROWS`` rows after seq ``after``; their last seq (None: no
        rows left)."""
        last: int | None = conn.execute(
            "SELECT max(seq), sum(length(image_id)) FROM "
            "(SELECT seq, image_id FROM images WHERE seq > ? ORDER BY seq LIMIT ?)",
            (after, _WARM_ROWS),
        ).fetchone()[0]
        return last

    def _records_done(self, _: Future) -> None:
        with self._records_lock:
            self._records_pending -= 1
            if not self._records_pending:
                self._records_busy = False

    def _records_pool(self) -> ThreadPoolExecutor:
        """The threads that read large answers' records (:meth:`search`), made on first use. Their
        connections keep a larger page cache (``_RECORDS_CACHE_KIB``): theirs, not every reader thread's."""
        with self._records_lock:
            if self._records_executor is None:
                self._records_executor = ThreadPoolExecutor(
                    _RECORDS_THREADS,
                    thread_name_prefix="tusou-records",
                    initializer=lambda: self._reader().execute(f"PRAGMA cache_size=-{_RECORDS_CACHE_KIB}"),
                )
            return self._records_executor

    def _records(self, seqs: np.ndarray) -> _Records:
        """Columns of the rows of ``seqs`` that exist (in ascending seq order as SQLite reads them; callers
        do not rely on it): seqs, image ids, labels, desc (its stored JSON text), uris, tags (JSON text).

        One statement over the seqs in ascending order (a JSON array read by ``json_each``, each looked up
        by rowid in that order: ``CROSS JOIN`` keeps json_each outside; ``seq IN (SELECT ...)`` built a
        temporary index of them first, 25 % slower), and each column comes back as one JSON array built by
        SQLite and parsed by ``json.loads``: no Python row per record. (16k rows of a 500k group, chunks of
        ``IN (?, ...)`` in hit order with a tuple per row: 78 ms; this: ~11-29 ms.)"""
        # The seqs as a JSON array (orjson writes int64 arrays directly: 16.5k seqs 3 -> 0.2 ms).
        ordered = np.sort(np.asarray(seqs, dtype=np.int64))
        wanted = orjson.dumps(ordered, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        row = (
            self._reader()
            .execute(
                "SELECT json_group_array(i.seq), json_group_array(image_id), json_group_array(label), "
                "json_group_array(desc), json_group_array(uri), json_group_array(tags) "
                "FROM json_each(?) AS j CROSS JOIN images AS i ON i.seq = j.value",
                (wanted,),
            )
            .fetchone()
        )
        ids, labels, descs, uris, tags = (json.loads(column) for column in row[1:])
        return _Records(_int_array(row[0]), ids, labels, descs, uris, tags)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._snapshotter.join()
        with self._records_lock:
            if self._warming is not None:
                self._warming.interrupt()
        self._warmer.join()
        if self._records_executor is not None:
            self._records_executor.shutdown()
        with self._write_lock:
            self.snapshot()
            for index in self._indexes.values():
                index.close()
            self._writer.close()
            # The readers too: the folder is then free for another process (`tusou upgrade` checks that).
            for conn in self._readers:
                conn.close()
        self._unlock()
