"""One group's search cache: an HNSW graph over int8 copies of the vectors (usearch), derived from SQLite.

Why this shape (numbers from ``bench/scale.py`` and docs/index.md, 500k x 1280-d on 2 cores):

* int8 storage: 500k float32 rows are 2.56 GB, float16 1.28 GB, int8 640 MB; only int8 leaves room for
  the graph, the model and the server under the 1.5 GB RSS target. Each row is scaled by its own largest
  component before rounding, so the 127 levels cover the row's real range (usearch's own float->int8
  cast assumes components near +-1, which 1280-d unit vectors never reach). Cosine is scale-invariant, so
  the int8 cosine approximates the float one to ~1e-3.
* Every answer is re-ranked with the exact float32 vectors read back from SQLite for the few candidates
  that matter (``fetch``), so reported cosines, the threshold cut and the order are float32-exact.
* usearch, not FAISS: real deletes, int8 + cosine kernels (AVX-512 VNNI here), one copy of the vectors
  that serves both the graph and the brute-force scan (``exact=True``), and a plain file snapshot.

Search paths: small groups, large limits and "every match" scan all rows (exact, int8 then float32 on
the survivors); otherwise the graph proposes candidates (approximate, recall measured >= 0.99).

Snapshots: ``save`` writes ``<name>.<seq>.<generation>.usearch`` beside the previous one (temp file,
fsync, rename) and then a ``.json`` with its size and CRC; ``load`` takes the newest snapshot whose JSON
and CRC check out. The owner replays the live rows the snapshot lacks from the record of truth.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

try:
    # Load order matters: importing onnxruntime (the embedder) after usearch segfaults (usearch 2.26.6,
    # onnxruntime 1.x: clashing bundled native libraries); onnxruntime first is fine.
    import onnxruntime  # noqa: F401
except ImportError:  # a store-only process without the model stack
    pass
from usearch.index import Index  # noqa: E402

from tusou.files import FILE_MODE, fsync_dir, private_dir  # noqa: E402

log = logging.getLogger(__name__)

# Below this many rows a full scan costs a few ms and is exact: no graph is consulted.
EXACT_BELOW = 20_000
# Above this limit the graph would need an enormous candidate list; a scan is cheaper and exact.
ANN_MAX_LIMIT = 1000
# Candidates whose int8 cosine is within this of the threshold are re-checked in float32. The int8
# error measured on real embeddings is < 0.005 (docs/index.md); 0.02 leaves a wide margin.
SCREEN_MARGIN = 0.02
# Rows asked of the first full scan, and of the first one when many rows are expected to pass. At 500k x
# 1280 (4 views, 2 cores) usearch's exact search costs ~63 ms for up to ~1k rows per view, 77 ms for 4k,
# 98 ms for 8k and 152 ms for 16k (its sorted top-k grows, not the scan), so the scan widens by steps
# only while its last row still passes.
SCAN_FIRST = 1024
SCAN_LONG = 4096
# Rows of the graph probe that chooses between the two.
SCAN_PROBE = 256
# A graph answer with at least this many rows above the threshold is replaced by an exact scan (limit > 1).
DENSE_MATCHES = 8
CONNECTIVITY = 16
EXPANSION_ADD = 128
# The graph's search breadth for small limits; recall@10 vs exact f32 >= 0.99 at 500k (bench/scale.py).
EXPANSION_SEARCH = 128
SNAPSHOT_FORMAT = 1

# keys (int64) -> (keys that still exist, their float32 rows); rows deleted meanwhile are left out.
Fetch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def quantize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled by their own largest |component| to int8 (cosine ignores the per-row scale)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    scale = np.abs(vectors).max(axis=1, keepdims=True)
    scale[scale == 0] = 1.0
    return np.rint(vectors * (127.0 / scale)).astype(np.int8)


class _RWLock:
    """Many searches (and a snapshot write) at once, adds and deletes alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        # Writers waiting: new readers hold back for them, or a steady stream of searches would keep an
        # add or delete (and the store's write lock behind it) waiting forever. No path nests reads.
        self._waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _new_index(dim: int) -> Index:
    return Index(
        ndim=dim,
        metric="cos",
        dtype="i8",
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


class VectorIndex:
    def __init__(self, dim: int, fetch: Fetch | None = None, *, _index: Index | None = None) -> None:
        self.dim = dim
        self.fetch = fetch
        self._index = _index if _index is not None else _new_index(dim)
        self._lock = _RWLock()
        # The highest seq added; a snapshot holds exactly the adds up to it.
        self.last_seq = 0
        # Changes since the last snapshot, and when the first of them happened (monotonic seconds).
        self.dirty = 0
        self.dirty_since = 0.0
        self.exact_below = EXACT_BELOW
        self.threads = os.cpu_count() or 1

    def __len__(self) -> int:
        return int(self._index.size)

    def _touch(self, changed: int) -> None:
        if changed:
            if not self.dirty:
                self.dirty_since = time.monotonic()
            self.dirty += changed

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return
        codes = quantize(np.asarray(vectors, dtype=np.float32).reshape(len(keys), self.dim))
        with self._lock.write():
            self._index.add(keys.astype(np.uint64), codes, threads=self.threads)
            self.last_seq = max(self.last_seq, int(keys.max()))
            self._touch(len(keys))

    def remove(self, keys: list[int] | np.ndarray) -> int:
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return 0
        with self._lock.write():
            removed = self._index.remove(keys.astype(np.uint64))
            count = int(np.sum(removed))
            self._touch(count)
        return count

    def keys(self) -> np.ndarray:
        with self._lock.read():
            return np.asarray(self._index.keys, dtype=np.uint64).astype(np.int64)

    # --- search ------------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, limit: int, min_cosine: float, *, exact: bool | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and cosines of the best ``limit`` rows (all when limit < 0) at or above ``min_cosine``.

        ``queries`` holds the views of one query; a row scores its best cosine over them. ``exact``
        forces (True) or forbids (False) the full scan (False: the graph's own answer, for measuring it);
        by default the scan is used when the group is small, the request wants many rows, or the graph
        finds a dense neighbourhood above the threshold.
        """
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        empty = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if limit == 0:
            return empty
        floor = min_cosine - SCREEN_MARGIN
        codes = quantize(queries)
        at_least = 0
        while True:
            # ``bound``: no row left out of the candidates has an int8 cosine above it (-inf: none left).
            with self._lock.read():
                n = len(self)
                if n == 0:
                    return empty
                auto = exact is None
                scan = exact if not auto else n < self.exact_below or limit < 0 or limit > ANN_MAX_LIMIT
                if scan:
                    keys, approx, bound, want = self._scan(codes, n, limit, floor, at_least)
                else:
                    # usearch widens its search breadth to ``count`` when that is larger.
                    count = min(n, max(32, 2 * limit))
                    keys, approx = self._best_over_views(self._index.search(codes, count, threads=1))
                    bound, want = -np.inf, n  # the graph's answer is approximate by design
                    if auto and limit > 1 and np.count_nonzero(approx >= floor) >= DENSE_MATCHES:
                        # Many rows pass the threshold around this query: a dense neighbourhood, where the
                        # graph is known to skip some (bench/scale.py: 42 of 55 matches at limit=100). A
                        # search that can return several matches then gets the exact scan's answer.
                        keys, approx, bound, want = self._scan(codes, n, limit, floor, at_least)
            keys, cosines = self._rerank(keys, approx, queries, min_cosine, floor)
            if limit >= 0:
                keys, cosines = keys[:limit], cosines[:limit]
            # A scan that stopped at ``want`` rows while still above the floor is exact only if no row it
            # left out could beat the answer: their float cosines are below ``bound + SCREEN_MARGIN``
            # (int8 error < margin), so they cannot enter once the limit-th answer is above that.
            full = limit >= 0 and len(cosines) >= limit
            if bound < floor or (full and cosines[-1] > bound + SCREEN_MARGIN) or want >= n:
                return keys, cosines
            at_least = want * 4

    def search_among(
        self, queries: np.ndarray, among: np.ndarray, limit: int, min_cosine: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` restricted to the rows ``among`` (a filter's matches), exact: their int8 codes are
        scored in numpy, the candidates that may make the answer are re-ranked in float32.

        Costs one pass over ``among`` (about 1 ms per 5k rows and view), whatever the group's size.
        """
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        among = np.unique(np.asarray(among, dtype=np.int64))
        empty = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if limit == 0 or not len(among):
            return empty
        floor = min_cosine - SCREEN_MARGIN
        q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        keys_out: list[np.ndarray] = []
        approx_out: list[np.ndarray] = []
        for start in range(0, len(among), 16_384):
            chunk = among[start : start + 16_384]
            with self._lock.read():
                got: Any = self._index.get(chunk.astype(np.uint64), dtype=np.int8)  # type: ignore[arg-type]
            if not isinstance(got, tuple):
                got = tuple(got) if len(chunk) > 1 else (got,)
            present = [i for i, row in enumerate(got) if row is not None]  # deleted meanwhile: skipped
            if not present:
                continue
            codes = np.stack([got[i] for i in present]).astype(np.float32)
            codes /= np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12)
            cos = (codes @ q.T).max(axis=1)
            keep = cos >= floor
            keys_out.append(chunk[present][keep])
            approx_out.append(cos[keep].astype(np.float32))
        if not keys_out:
            return empty
        keys, approx = np.concatenate(keys_out), np.concatenate(approx_out)
        if limit > 0 and len(keys) > limit:
            # Rows whose int8 cosine is below the limit-th best by more than the int8 error cannot enter.
            kth = float(np.partition(approx, len(approx) - limit)[len(approx) - limit])
            keep = approx >= kth - 2 * SCREEN_MARGIN
            keys, approx = keys[keep], approx[keep]
        keys, cosines = self._rerank(keys, approx, queries, min_cosine, floor)
        if limit >= 0:
            keys, cosines = keys[:limit], cosines[:limit]
        return keys, cosines

    def _rerank(
        self, keys: np.ndarray, approx: np.ndarray, queries: np.ndarray, min_cosine: float, floor: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The candidates that pass ``min_cosine`` in float32, best first (ties in seq order)."""
        keep = approx >= floor
        keys, approx = keys[keep], approx[keep]
        if self.fetch is None:
            cosines = approx
        else:
            keys, rows = self.fetch(keys)
            cosines = (rows @ queries.T).max(axis=1) if len(keys) else np.zeros(0, dtype=np.float32)
        passing = np.flatnonzero(cosines >= min_cosine)
        # Best first; equal cosines in seq (insertion) order so answers are repeatable.
        order = passing[np.lexsort((keys[passing], -cosines[passing]))]
        return keys[order], cosines[order].astype(np.float32)

    def _scan(
        self, codes: np.ndarray, n: int, limit: int, floor: float, at_least: int = 0
    ) -> tuple[np.ndarray, np.ndarray, float, int]:
        """Every row (int8) against the views: the rows that may pass ``floor``, up to what ``limit`` needs.

        Returns the candidates (key, best int8 cosine), the bound above which no row was left out (-inf
        when none was), and the number of rows per view asked for (``want``).

        usearch's brute force keeps a sorted top-``count`` per view, which costs far more than the scan
        itself when ``count`` is in the thousands; with a real threshold few rows pass, so ask for a
        short list first and widen only while the last row returned for some view still passes ``floor``.
        """
        # A little more than ``limit`` so that the float re-rank can reorder the border.
        want = n if limit < 0 else min(n, max(at_least, limit + max(32, limit // 8)))
        count = min(want, SCAN_FIRST)
        if count < want:
            # A graph search (a few ms) predicts whether the first scan's rows will do. When most of its
            # candidates pass, that scan would only be thrown away: start with a longer one. The answer
            # stays exact either way; only the number of scans changes.
            probe_count = min(want, SCAN_PROBE)
            _, probe = self._best_over_views(self._index.search(codes, probe_count, threads=1))
            if np.count_nonzero(probe >= floor) >= probe_count // 2:
                count = min(want, SCAN_LONG)
        while True:
            rows = self._view_rows(self._index.search(codes, count, exact=True, threads=self.threads))
            cut = [float(cos[-1]) for keys, cos in rows if len(keys) == count and count < n]
            bound = max(cut) if cut else -np.inf
            if count >= want or bound < floor:
                return (*self._best_per_key(rows), bound, want)
            count = min(want, count * 4)

    @staticmethod
    def _view_rows(matches: object) -> list[tuple[np.ndarray, np.ndarray]]:
        """(keys, cosines) of each view's matches, best first."""
        keys = np.asarray(matches.keys)  # type: ignore[attr-defined]
        dist = np.asarray(matches.distances)  # type: ignore[attr-defined]
        if keys.ndim == 1:  # usearch answers one query with Matches, several with BatchMatches
            return [(keys.astype(np.int64), 1.0 - dist.astype(np.float32))]
        counts = np.asarray(matches.counts)  # type: ignore[attr-defined]
        return [
            (keys[v, :c].astype(np.int64), 1.0 - dist[v, :c].astype(np.float32)) for v, c in enumerate(counts)
        ]

    @staticmethod
    def _best_per_key(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """One (key, best cosine over views) per row found by any view."""
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        flat_keys = np.concatenate([k for k, _ in rows])
        flat_cos = np.concatenate([c for _, c in rows])
        if len(rows) > 1 and len(flat_keys):
            order = np.lexsort((-flat_cos, flat_keys))
            flat_keys, flat_cos = flat_keys[order], flat_cos[order]
            first = np.ones(len(flat_keys), dtype=bool)
            first[1:] = flat_keys[1:] != flat_keys[:-1]
            flat_keys, flat_cos = flat_keys[first], flat_cos[first]
        return flat_keys, flat_cos

    def _best_over_views(self, matches: object) -> tuple[np.ndarray, np.ndarray]:
        """Flatten (views x count) matches to one (key, best cosine) per row."""
        return self._best_per_key(self._view_rows(matches))

    # --- snapshots ---------------------------------------------------------------------------------
    def save(self, folder: Path, name: str) -> int | None:
        """Write a snapshot if anything changed since the last one; returns its seq (None if clean).

        Searches go on meanwhile; adds and deletes wait only while usearch serialises into the page
        cache. fsync, CRC and renames happen after the lock is released.
        """
        private_dir(folder)
        with self._lock.read():
            if not self.dirty:
                return None
            seq, count, dirty = self.last_seq, len(self), self.dirty
            # A generation in the name as well: after deletes alone the seq is unchanged, and replacing
            # the live file under its old name would leave no valid snapshot until the new JSON lands.
            stem = f"{name}.{seq}.{time.time_ns()}"
            tmp = folder / f"{stem}.usearch.tmp"
            self._index.save(str(tmp))
            # No writer can run while we hold the read lock, so nothing changed since ``dirty``.
            self.dirty = 0
        try:
            with open(tmp, "rb+") as f:
                # Every tenant's vectors: as private as the databases.
                os.fchmod(f.fileno(), FILE_MODE)
                os.fsync(f.fileno())
            final = folder / f"{stem}.usearch"
            os.replace(tmp, final)
            meta = {
                "format": SNAPSHOT_FORMAT,
                "dim": self.dim,
                "seq": seq,
                "count": count,
                "size": final.stat().st_size,
                "crc32": _crc32(final),
            }
            meta_tmp = folder / f"{stem}.json.tmp"
            with open(os.open(meta_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(meta_tmp, folder / f"{stem}.json")
            fsync_dir(folder)
        except BaseException:
            with self._lock.write():
                self._touch(dirty)
            tmp.unlink(missing_ok=True)
            raise
        # Only now, with the new snapshot durable, may older ones go.
        for old in snapshot_files(folder, name):
            if not old.name.startswith(f"{stem}."):
                old.unlink(missing_ok=True)
        return seq

    @classmethod
    def load(cls, folder: Path, name: str, dim: int, fetch: Fetch | None = None) -> VectorIndex | None:
        """The newest valid snapshot of ``name`` in ``folder``, or None when there is none."""
        metas: list[tuple[int, int, Path]] = []
        for path in folder.glob(f"{name}.*.json"):
            try:
                seq_text, gen_text = path.name[len(name) + 1 : -len(".json")].split(".")
                metas.append((int(seq_text), int(gen_text), path))
            except ValueError:
                continue
        for seq, gen, meta_path in sorted(metas, reverse=True):
            data = folder / f"{name}.{seq}.{gen}.usearch"
            try:
                meta = json.loads(meta_path.read_text())
                if meta.get("format") != SNAPSHOT_FORMAT or meta["dim"] != dim or meta["seq"] != seq:
                    raise ValueError("snapshot of another format or model")
                if data.stat().st_size != meta["size"] or _crc32(data) != meta["crc32"]:
                    raise ValueError("snapshot size or checksum does not match")
                index = Index.restore(str(data))
                if index is None or index.ndim != dim or len(index) != meta["count"]:
                    raise ValueError("snapshot does not hold what its metadata says")
            except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
                log.warning("ignoring snapshot %s: %s", data, exc)
                continue
            out = cls(dim, fetch, _index=index)
            out.last_seq = seq
            return out
        return None


def snapshot_files(folder: Path, name: str) -> list[Path]:
    """Every file (complete or not) belonging to ``name``'s snapshots."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.startswith(f"{name}.")]
