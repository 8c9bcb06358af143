"""One group's search cache: int8 copies of the vectors in blocks we own, an inverted file over them,
derived from SQLite.

Why this shape (numbers from ``bench/scale.py`` and docs/index.md, 2 cores, AVX2):

* One int8 copy, ours: each row is scaled by its own largest |component| to +-127 (cosine ignores the
  per-row scale) and stored offset by 128 as uint8, in blocks of ``BLOCK`` rows that never move. The
  exact scan reads these blocks with ONNX Runtime's ``MatMulInteger`` (u8 rows x s8 queries, all query
  views in one pass, no sorted top-k: every row's score, then a threshold); queries are quantized to
  7 bits so that AVX2's u8 x s8 pair sums cannot saturate. 5M x 256-d rows are 1.28 GB.
* An inverted file (IVF) instead of a graph: rows are assigned to the nearest of up to ``NLIST_MAX``
  k-means centroids (trained once the group has ``TRAIN_AT`` rows, retrained at 4x growth up to the
  maximum); a small-limit search scans the ``NPROBE`` best lists per query view plus the rows added
  since the lists were last sorted. It costs 4 bytes a row (an HNSW graph costs ~150) and a row's add is
  one small matrix product (an HNSW insert is hundreds of distance computations at random addresses).
* Every answer is re-ranked with the exact float32 vectors read back from SQLite for the candidates that
  matter (``fetch``), so reported cosines, the threshold cut and the order are float32-exact.

Search paths: small groups, large limits and "every match" scan all rows (exact: int8 then float32 on
the survivors); otherwise the inverted file proposes candidates (approximate, recall measured), and a
dense neighbourhood (``DENSE_MATCHES`` rows above the threshold) gets the exact scan instead.

Snapshots (format 7: rows, lists, angles from the centroids): ``save`` writes
``<name>.<seq>.<generation>.ivf`` beside the previous one (temp file, fsync, rename) and then a ``.json``
with its size and CRC; ``load`` takes the newest snapshot whose JSON and CRC check out. The owner replays
the live rows the snapshot lacks from the record of truth.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tusou.files import FILE_MODE, fsync_dir, private_dir

log = logging.getLogger(__name__)

# Below this many rows a full scan costs a few ms and is exact: the lists are not consulted.
EXACT_BELOW = 20_000
# Above this limit the lists would need an enormous candidate list; a scan is cheaper and exact.
ANN_MAX_LIMIT = 1000
# Candidates whose int8 cosine is within this of the threshold are re-checked in float32. The int8
# error measured on real embeddings is < 0.005 (docs/index.md); 0.02 leaves a wide margin.
SCREEN_MARGIN = 0.02
# A list answer with at least this many rows above the threshold is replaced by an exact scan (limit > 1).
DENSE_MATCHES = 8
# Rows per storage block (never moved once allocated, so a scan can run on it while rows are appended).
BLOCK = 65_536
# The inverted file: trained at TRAIN_AT rows with ~ROWS_PER_LIST rows a list (NLIST_MIN..NLIST_MAX
# lists), retrained when the group has grown RETRAIN_GROWTH times since (while below NLIST_MAX).
TRAIN_AT = 20_000
ROWS_PER_LIST = 256
NLIST_MIN = 64
NLIST_MAX = 1024
RETRAIN_GROWTH = 4
KMEANS_SAMPLE = 32_768
KMEANS_ITERS = 8
# Lists scanned per query view; rows appended since the lists were sorted are always scanned, and the
# lists are re-sorted once there are more than TAIL_MAX of them.
NPROBE = 8
TAIL_MAX = 16_384
# Rows are stored in two parts: the leading HEAD dimensions and the rest. A scan reads the heads and
# each row's tail norm first (a bound, _Scorer.bound) and the tails only of rows the bound lets through.
HEAD = 64
# The bound is compared with the floor less this (float32 rounding of the bound's own arithmetic).
BOUND_SLACK = 1e-3
# A block where the bound lets more than this share of rows through is scored whole (the bound saves
# little there: vectors whose leading dimensions carry little of their length).
BOUND_GIVE_UP = 0.25
# The side file's rows are rewritten in list order (VectorIndex.relayout) once this many rows, and more
# than half as many as were in list order at the last rewrite, sit outside it (appended since).
RELAYOUT_MIN = 100_000
# Side-file reads (_Floats.gather): rows at most this many rows apart are read with one call.
READ_GAP = 4
# The angle bound (VectorIndex._angle_window): the angle between a query view q and a row x is at least
# |angle(q, c) - angle(x, c)| for x's list centroid c (the triangle inequality on the sphere), so
# q.x <= |q| |x| cos(|angle(q, c) - angle(x, c)|). Compared with the threshold less ANGLE_SLACK (float32
# rounding of the re-rank's products); angle(q, c) from float32 products widened by COS_ERROR.
ANGLE_SLACK = 1e-3
COS_ERROR = 1e-4
# A scan block where the angle bound lets more than this share of rows through runs the head bound
# over the whole block (gathering the survivors' heads would cost more than it saves).
ANGLE_GIVE_UP = 0.5
# The re-rank reads and scores its float32 rows in pieces of this many rows (_Floats.best), on two threads
# when it has more than one piece.
PIECE_ROWS = 2048
# A search for the single best row whose first scored rows hold one at this float32 cosine or more (a near
# copy of the query) scores the other probed rows only where the angle bound lets them reach it.
NEAR_COPY = 0.99
# A one-view search for the single best row first looks for a copy of the query at this float32 cosine or
# more among the probed rows the angle bound lets reach it (VectorIndex._copies).
COPY = 0.999
SNAPSHOT_FORMAT = 7
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_MAGIC = b"TUSOU-IVF-7\n"
_MAGIC_6 = b"TUSOU-IVF-6\n"  # residual norms (|x - c|) instead of angles: read, angles computed anew
_MAGIC_5 = b"TUSOU-IVF-5\n"  # no angles: computed in the background (fill_angles)
_MAGIC_4 = b"TUSOU-IVF-4\n"  # side-file rows by slot (no positions): read as is
_MAGIC_3 = b"TUSOU-IVF-3\n"  # whole rows per block, no tail norms: read and converted

# keys (int64) -> (keys that still exist, their float32 rows); rows deleted meanwhile are left out.
Fetch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
# Called with the keys a search's answer is drawn from, before their float32 rows are read (the SQLite store
# starts reading their records then, in another thread).
Prefetch = Callable[[np.ndarray], None]


def quantize(vectors: np.ndarray, levels: int = 127) -> np.ndarray:
    """Rows scaled by their own largest |component| to int8 in [-levels, levels] (cosine ignores scale)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    scale = np.abs(vectors).max(axis=1, keepdims=True)
    scale[scale == 0] = 1.0
    return np.rint(vectors * (levels / scale)).astype(np.int8)


def _inv_norms(codes: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", codes.astype(np.float32), codes.astype(np.float32)))
    out = np.zeros(len(codes), dtype=np.float32)
    np.divide(1.0, norms, out=out, where=norms > 0)
    return out


class _Scorer:
    """Int8 scores in ONNX Runtime graphs (numpy does the same, slower, when ONNX Runtime is missing).

    Rows are stored in two parts, the leading ``head`` dimensions and the rest (the tail), as uint8 codes
    (int8 + 128, zero point 128); queries are 7-bit int8 columns, one per view (u8 x s8 kernels: AVX2,
    VNNI where the CPU has it).

    * ``best``: each row's best cosine over the views, from both parts (``MatMulInteger`` of each part,
      summed: the same integer dot products as one product over the whole row), scaled by the views' and
      the rows' inverse norms.
    * ``bound``: an upper bound of that from the head alone. By Cauchy-Schwarz the tail's dot product is at
      most |row tail| x |query tail|, so ``(head dot + |row tail| |query tail|) / (|row| |query|)`` is >= the
      cosine. The lite models' vectors are PCA-projected (leading dimensions carry most of the variance):
      scanning a sixth of each row rules most rows out exactly.
    """

    def __init__(self) -> None:
        self._best: Any = None
        self._best1: Any = None
        self._bound: Any = None
        try:
            import onnxruntime as ort

            from tusou import onnx_graph as g

            def session(nodes: list[bytes], inputs: list[bytes]) -> Any:
                model = g.model(
                    nodes,
                    inputs,
                    [g.value_info("best", g.FLOAT, [None])],
                    [g.tensor("zero", np.array(128, dtype=np.uint8))],
                    name="scan",
                )
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1  # blocks run in parallel from our own pool
                options.inter_op_num_threads = 1
                return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

            rows = [g.value_info("head", g.UINT8, [None, None]), g.value_info("hcols", g.INT8, [None, None])]
            tail = [g.value_info("tail", g.UINT8, [None, None]), g.value_info("tcols", g.INT8, [None, None])]
            norms = [g.value_info("qinv", g.FLOAT, [1, None]), g.value_info("rinv", g.FLOAT, [None])]
            finish = [
                g.node("Cast", ["dots"], ["fdots"], to=g.FLOAT),
                g.node("Mul", ["fdots", "qinv"], ["scaled"]),
                g.node("ReduceMax", ["scaled"], ["rowmax"], axes=[1], keepdims=0),
                g.node("Mul", ["rowmax", "rinv"], ["best"]),
            ]
            self._best = session(
                [
                    g.node("MatMulInteger", ["head", "hcols", "zero"], ["hdots"]),
                    g.node("MatMulInteger", ["tail", "tcols", "zero"], ["tdots"]),
                    g.node("Add", ["hdots", "tdots"], ["dots"]),
                    *finish,
                ],
                rows + tail + norms,
            )
            self._best1 = session(
                [g.node("MatMulInteger", ["head", "hcols", "zero"], ["dots"]), *finish], rows + norms
            )
            # The bound's per-view arithmetic as one small product: [head dots, |row tail|] (m, v + 1) by
            # [diag(1/|view|); |view tail|/|view|] (v + 1, v). ORT's broadcast Mul and Add over (m, v) took
            # twice the MatMulInteger's time (65,536 rows x 4 views: 3.1 -> 1.7 ms a block).
            self._bound = session(
                [
                    g.node("MatMulInteger", ["head", "hcols", "zero"], ["hdots"]),
                    g.node("Cast", ["hdots"], ["fdots"], to=g.FLOAT),
                    g.node("Concat", ["fdots", "rtail"], ["parts"], axis=1),
                    g.node("MatMul", ["parts", "weights"], ["bounds"]),
                    g.node("ReduceMax", ["bounds"], ["rowmax"], axes=[1], keepdims=0),
                    g.node("Mul", ["rowmax", "rinv"], ["best"]),
                ],
                rows
                + norms[1:]
                + [g.value_info("rtail", g.FLOAT, [None, 1]), g.value_info("weights", g.FLOAT, [None, None])],
            )
        except Exception:  # noqa: BLE001 - any failure: the numpy path is exact too, only slower
            self._best = self._best1 = self._bound = None
            log.warning("ONNX Runtime MatMulInteger unavailable; int8 scans run in numpy", exc_info=True)

    def best(
        self,
        head: np.ndarray,
        hcols: np.ndarray,
        tail: np.ndarray | None,
        tcols: np.ndarray | None,
        qinv: np.ndarray,
        rinv: np.ndarray,
    ) -> np.ndarray:
        """(m,) float32: head (m, h) and tail (m, d - h) uint8 codes (tail None: the head is the whole
        row), columns (h, v) and (d - h, v) int8, qinv (1, v), rinv (m,)."""
        if tail is None:
            if self._best1 is not None:
                out: np.ndarray = self._best1.run(
                    None, {"head": head, "hcols": hcols, "qinv": qinv, "rinv": rinv}
                )[0]
                return out
            dots = _dots(head, hcols)
        elif self._best is not None:
            out = self._best.run(
                None,
                {"head": head, "hcols": hcols, "tail": tail, "tcols": tcols, "qinv": qinv, "rinv": rinv},
            )[0]
            return out
        else:
            assert tcols is not None
            dots = _dots(head, hcols) + _dots(tail, tcols)
        return (dots.astype(np.float32) * qinv).max(axis=1) * rinv

    def bound(
        self,
        head: np.ndarray,
        hcols: np.ndarray,
        qinv: np.ndarray,
        rinv: np.ndarray,
        rtail: np.ndarray,
        qtail: np.ndarray,
    ) -> np.ndarray:
        """(m,) float32, >= ``best`` of the same rows: rtail (m, 1) the rows' tail norms, qtail (1, v) the
        views' tail norms times their inverse norms."""
        if self._bound is not None:
            weights = np.vstack([np.diag(qinv[0]), qtail]).astype(np.float32)
            out: np.ndarray = self._bound.run(
                None, {"head": head, "hcols": hcols, "rinv": rinv, "rtail": rtail, "weights": weights}
            )[0]
            return out
        return (_dots(head, hcols).astype(np.float32) * qinv + rtail * qtail).max(axis=1) * rinv


def _dots(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact int dot products of uint8 offset codes with int8 columns (numpy fallback)."""
    return (rows.astype(np.int32) - 128) @ cols.astype(np.int32)


_SCORER: _Scorer | None = None
_SCORER_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None


def _scorer() -> _Scorer:
    global _SCORER
    with _SCORER_LOCK:
        if _SCORER is None:
            _SCORER = _Scorer()
        return _SCORER


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _SCORER_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="tusou-scan")
        return _POOL


class _Query:
    """A query's views, quantized for the int8 scan, split like the rows at ``head`` dimensions."""

    def __init__(self, queries: np.ndarray, head: int) -> None:
        codes = quantize(queries, 63)
        self.inv_norm = _inv_norms(codes)[None, :]
        self.hcols = np.ascontiguousarray(codes[:, :head].T)
        self.tcols: np.ndarray | None = None
        self.qtail = np.zeros((1, len(codes)), dtype=np.float32)
        if head < codes.shape[1]:
            self.tcols = np.ascontiguousarray(codes[:, head:].T)
            self.qtail = (_tail_norms(codes[:, head:]) * self.inv_norm[0])[None, :].astype(np.float32)

    def cosines(
        self, scorer: _Scorer, head: np.ndarray, tail: np.ndarray | None, inv_norm: np.ndarray
    ) -> np.ndarray:
        """Best int8 cosine over the views for each row (0 for deleted rows, whose inv_norm is 0)."""
        return scorer.best(head, self.hcols, tail, self.tcols, self.inv_norm, np.ascontiguousarray(inv_norm))

    def bounds(
        self, scorer: _Scorer, head: np.ndarray, tail_norm: np.ndarray, inv_norm: np.ndarray
    ) -> np.ndarray:
        """An upper bound of :meth:`cosines` from the rows' heads and tail norms alone."""
        rtail = np.ascontiguousarray(tail_norm, dtype=np.float32).reshape(-1, 1)
        return scorer.bound(
            head, self.hcols, self.inv_norm, np.ascontiguousarray(inv_norm), rtail, self.qtail
        )


def _tail_norms(codes: np.ndarray) -> np.ndarray:
    """L2 norms of int8 rows (exact integer sums of squares, then one square root)."""
    wide = codes.astype(np.int32)
    return np.sqrt(np.einsum("ij,ij->i", wide, wide).astype(np.float64)).astype(np.float32)


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


def _grow(array: np.ndarray, need: int) -> np.ndarray:
    if need <= len(array):
        return array
    out = np.zeros(max(need, 2 * len(array), 1024), dtype=array.dtype)
    out[: len(array)] = array
    return out


class _Floats:
    """The float32 rows by slot in a file beside the snapshots (derived from SQLite like the index), read
    by the re-rank: a few thousand rows read from the file cost milliseconds, where SQLite needs a B-tree
    lookup per row. Written with ``pwrite`` as rows are added (no fsync: a snapshot fsyncs it before its
    metadata names it).

    Read with ``preadv`` (one call per run of consecutive slots, straight into the answer's array), not
    through a memory map: the kernel maps 16 neighbouring pages on each read fault of a mapping (fault
    around), so a 16k-row gather mapped most of a 500k group's 1 GB file into the server's RSS, and
    dropping the mapping again (``MADV_DONTNEED``) cost as much as reading the rows (measured at load 6:
    16k rows 71 ms mapped and dropped, 95 ms read; 1000 rows 3.9 / 4.2 ms). The file stays in the page
    cache, out of the process."""

    def __init__(self, path: Path, dim: int, rows: int = 0) -> None:
        self.path = path
        self.dim = dim
        self.row_bytes = 4 * dim
        existed = path.exists()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        self.cap = 0
        try:
            self.reserve(max(rows, 1024))
        except OSError:
            os.close(self.fd)
            if not existed:
                path.unlink(missing_ok=True)
            raise

    def reserve(self, rows: int) -> None:
        if rows <= self.cap:
            return
        cap = max(rows, 2 * self.cap)
        if os.fstat(self.fd).st_size < cap * self.row_bytes:
            os.ftruncate(self.fd, cap * self.row_bytes)  # sparse: no disk used until written
        self.cap = cap

    def write(self, slot: int, rows: np.ndarray) -> None:
        self.reserve(slot + len(rows))
        data = np.ascontiguousarray(rows, dtype=np.float32).tobytes()
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], slot * self.row_bytes + done)

    def gather(self, slots: np.ndarray) -> np.ndarray:
        """Rows at positions ``slots`` (sorted ascending), in that order: one ``preadv`` per run of
        consecutive rows, straight into the answer's array; runs at most ``READ_GAP`` rows apart share a
        call (the rows between go to a scratch buffer: copying them from the page cache costs less than a
        call). In a list-ordered file an answer's rows lie close together, and when they are not in the
        page cache the kernel reads them ahead in large reads."""
        out = np.empty((len(slots), self.dim), dtype=np.float32)
        if not len(slots):
            return out
        buf, size = out.data.cast("B"), self.row_bytes
        breaks = np.flatnonzero(np.diff(slots) != 1) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(slots)]])
        gaps = np.zeros(len(starts), dtype=np.int64)
        gaps[1:] = slots[starts[1:]] - slots[stops[:-1] - 1] - 1
        firsts = slots[starts]
        scratch = memoryview(bytearray(READ_GAP * size))
        parts: list[memoryview] = []
        at = 0
        for start, stop, gap, first in zip(
            starts.tolist(), stops.tolist(), gaps.tolist(), firsts.tolist(), strict=True
        ):
            if parts and (gap > READ_GAP or len(parts) >= _IOV_MAX - 1):
                self._read(parts, at)
                parts = []
            if not parts:
                at = first
            elif gap:
                parts.append(scratch[: gap * size])
            parts.append(buf[start * size : stop * size])
        self._read(parts, at)
        return out

    def best(self, places: np.ndarray, queries: np.ndarray, threads: int = 1) -> np.ndarray:
        """Each row at ``places`` (sorted ascending)'s best float32 cosine over ``queries``, in that order:
        the same ``_products`` of the same rows as a scan of every row, bit for bit (a row's products do not
        depend on the rows scored with it).

        Read and scored in pieces of ``PIECE_ROWS`` rows. With ``threads`` > 1 and more than one piece, a
        helper on the scan's pool takes pieces too (``preadv`` and the products release the GIL); pieces
        go to whichever thread asks first, and a helper that has not started when this thread runs out is
        cancelled: on busy cores this costs what a serial read does."""
        n = len(places)
        out = np.empty(n, dtype=np.float32)
        pieces = list(range(0, n, PIECE_ROWS))
        if threads < 2 or len(pieces) < 2:
            for a in pieces:
                self._best_of(places[a : a + PIECE_ROWS], queries, out[a : a + PIECE_ROWS])
            return out
        todo = iter(pieces)
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    a = next(todo, None)
                if a is None:
                    return
                self._best_of(places[a : a + PIECE_ROWS], queries, out[a : a + PIECE_ROWS])

        helper = _pool().submit(work)
        try:
            work()
        finally:
            if not helper.cancel():
                helper.result()
        return out

    def _best_of(self, places: np.ndarray, queries: np.ndarray, out: np.ndarray) -> None:
        np.max(_products(self.gather(places), queries), axis=1, out=out)

    def _read(self, parts: list[memoryview], slot: int) -> None:
        """Fill ``parts`` from the file at row ``slot`` on (one call; more only after a short read)."""
        _read_full(self.fd, parts, slot, self.row_bytes, self.path)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class VectorIndex:
    def __init__(
        self, dim: int, fetch: Fetch | None = None, folder: Path | None = None, name: str | None = None
    ) -> None:
        """``folder`` and ``name``: where the float32 side file lives (``<name>.<generation>.f32``) and
        the snapshots go; without them the re-rank reads rows through ``fetch``."""
        self.dim = dim
        self.fetch = fetch
        self.folder, self.name = folder, name
        self._floats: _Floats | None = None
        self._floats_gen = 0
        if folder is not None and name is not None:
            self._new_floats()
        self._lock = _RWLock()
        self._scorer = _scorer()
        # Slot-indexed storage: slot s lives in block s // BLOCK, row s % BLOCK; a block is two arrays,
        # the rows' first ``head`` dimensions and the rest (uint8 offset codes).
        self.head = min(HEAD, dim)
        self._heads: list[np.ndarray] = []
        self._tails: list[np.ndarray] = []
        self._tail_norm = np.zeros(0, dtype=np.float32)  # |int8 tail| of each slot
        self._n = 0  # slots used (live and deleted)
        self._live = 0
        self._keys = np.zeros(0, dtype=np.int64)
        self._inv = np.zeros(0, dtype=np.float32)  # 1 / |int8 row|, 0 for a deleted slot
        self._assign = np.zeros(0, dtype=np.int16)
        # The angle (radians) between each slot's float32 row and its list's centroid (the angle bound),
        # NaN where not known (no lists yet, or a snapshot of an earlier format until ``fill_angles``
        # has run), and a bound of the rows' norms (1 for unit rows; the bound scales with it).
        self._angle = np.zeros(0, dtype=np.float32)
        self._xmax = 0.0
        # The centroids' norms (float64) and the centroids array they are of (searches compute them once).
        self._cnorm: np.ndarray = np.zeros(0)
        self._cnorm_of: np.ndarray | None = None
        self._angle_stale = False  # some listed rows' angles are unknown (fill_angles is due)
        self._layout = 0  # bumped by a compaction (slots move)
        # Where each slot's float32 row lies in the side file (rows are appended there as they are added;
        # ``relayout`` rewrites them in list order), the rows the file holds, and how many of them (the
        # first) are in list order.
        self._fpos = np.zeros(0, dtype=np.int64)
        self._fnext = 0
        self._flisted = 0
        self._relayout_to: Path | None = None  # the side file a relayout is writing (kept by ``save``)
        self._keys_sorted = True  # keys increase with the slot (adds in seq order): lookups by bisection
        self._key_order: np.ndarray | None = None  # argsort of the keys when they are not sorted
        # The inverted file.
        self._centroids: np.ndarray | None = None
        self._trained_n = 0
        self._order = np.zeros(0, dtype=np.int64)  # slots < _sorted_upto, by list
        self._offsets = np.zeros(1, dtype=np.int64)
        self._sorted_upto = 0
        # The highest seq added; a snapshot holds exactly the adds up to it.
        self.last_seq = 0
        # Changes since the last snapshot, and when the first of them happened (monotonic seconds).
        self.dirty = 0
        self.dirty_since = 0.0
        self.exact_below = EXACT_BELOW
        self.threads = os.cpu_count() or 1

    def __len__(self) -> int:
        return self._live

    def _float_path(self, gen: int) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.name}.{gen}.f32"

    def _new_floats(self) -> None:
        """A fresh side file (a new generation: a snapshot names the one its slots belong to)."""
        assert self.folder is not None
        private_dir(self.folder)
        old = self._floats
        self._floats_gen = time.time_ns()
        self._floats = _Floats(self._float_path(self._floats_gen), self.dim)
        if old is not None:
            old.close()
            old.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the side file's mapping (the file stays for the next start)."""
        with self._lock.write():
            if self._floats is not None:
                self._floats.close()
                self._floats = None

    def detach(self) -> None:
        """Leave the side file and the folder alone from now on (a loaded snapshot of a folder another
        process owns): rows are added in memory only and the re-rank reads them through ``fetch``."""
        with self._lock.write():
            if self._floats is not None:
                self._floats.close()
                self._floats = None
            self.folder = None

    def _touch(self, changed: int) -> None:
        if changed:
            if not self.dirty:
                self.dirty_since = time.monotonic()
            self.dirty += changed

    # --- writes --------------------------------------------------------------------------------------
    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(keys), self.dim)
        codes = quantize(vectors)
        inv = _inv_norms(codes)
        tail_norm = _tail_norms(codes[:, self.head :])
        offset = (codes.view(np.uint8) ^ np.uint8(0x80)).reshape(len(keys), self.dim)
        with self._lock.write():
            present = self._slots_of(keys)
            dead = present[present >= 0]
            dead = dead[self._inv[dead] == 0]
            if len(dead):  # a deleted key added again is a new row: the old slot forgets it
                self._keys[dead] = -1
                self._keys_sorted, self._key_order = False, None
                present = self._slots_of(keys)
            fresh = present < 0
            if not fresh.all():  # already held (a replay overlapping the snapshot): keep the first copy
                keys, vectors, offset = keys[fresh], vectors[fresh], offset[fresh]
                inv, tail_norm = inv[fresh], tail_norm[fresh]
                if not len(keys):
                    return
            if self._floats is not None:
                try:
                    self._floats.write(self._fnext, vectors)
                except OSError as exc:
                    # The rows are committed already (a full disk): the index goes on without its side
                    # file, re-ranking through ``fetch``; the next snapshot names none.
                    log.error("%s: side file dropped: %s", self.name, exc)
                    self._floats.close()
                    self._floats = None
            assign = self._assign_rows(vectors)
            angle, top = self._angles(vectors, assign)
            self._xmax = max(self._xmax, top)
            self._append(keys, offset, inv, assign, tail_norm, angle)
            self.last_seq = max(self.last_seq, int(keys.max()))
            self._touch(len(keys))
            self._maybe_train()

    def _append(
        self,
        keys: np.ndarray,
        offset: np.ndarray,
        inv: np.ndarray,
        assign: np.ndarray,
        tail_norm: np.ndarray,
        angle: np.ndarray,
    ) -> None:
        """Rows (uint8 offset codes, whole) into the next slots; their float32 rows were written to the
        side file at ``_fnext`` onwards."""
        n, m = self._n, len(keys)
        self._fpos = _grow(self._fpos, n + m)
        self._fpos[n : n + m] = np.arange(self._fnext, self._fnext + m)
        self._fnext += m
        self._keys = _grow(self._keys, n + m)
        self._inv = _grow(self._inv, n + m)
        self._assign = _grow(self._assign, n + m)
        self._tail_norm = _grow(self._tail_norm, n + m)
        self._angle = _grow(self._angle, n + m)
        if self._keys_sorted and (n and keys[0] <= self._keys[n - 1] or np.any(np.diff(keys) <= 0)):
            self._keys_sorted = False
        self._key_order = None
        self._keys[n : n + m] = keys
        self._inv[n : n + m] = inv
        self._assign[n : n + m] = assign
        self._tail_norm[n : n + m] = tail_norm
        self._angle[n : n + m] = angle
        h = self.head
        done = 0
        while done < m:
            slot = n + done
            block, row = divmod(slot, BLOCK)
            if block == len(self._heads):
                self._heads.append(np.empty((BLOCK, h), dtype=np.uint8))
                self._tails.append(np.empty((BLOCK, self.dim - h), dtype=np.uint8))
            take = min(m - done, BLOCK - row)
            self._heads[block][row : row + take] = offset[done : done + take, :h]
            self._tails[block][row : row + take] = offset[done : done + take, h:]
            done += take
        self._n += m
        self._live += m
        if self._centroids is not None and self._n - self._sorted_upto > TAIL_MAX:
            self._sort_lists()

    def _assign_rows(self, vectors: np.ndarray) -> np.ndarray:
        if self._centroids is None:
            return np.zeros(len(vectors), dtype=np.int16)
        out = np.empty(len(vectors), dtype=np.int16)
        for start in range(0, len(vectors), 8192):
            sims = vectors[start : start + 8192] @ self._centroids.T
            out[start : start + 8192] = sims.argmax(axis=1)
        return out

    def _angles(
        self, vectors: np.ndarray, assign: np.ndarray, centroids: np.ndarray | None = None
    ) -> tuple[np.ndarray, float]:
        """The angles between float32 rows ``vectors`` and their lists' centroids (NaN without lists), in
        float64: a = x.c/|c|, b = |x - a c/|c||, atan2(b, a) (accurate near 0, where arccos is not); and
        the rows' largest norm (the caller raises ``_xmax`` to it under the write lock)."""
        centroids = self._centroids if centroids is None else centroids
        if centroids is None or not len(vectors):
            return np.full(len(vectors), np.nan, dtype=np.float32), 0.0
        out = np.empty(len(vectors), dtype=np.float32)
        top = 0.0
        for start in range(0, len(vectors), 8192):
            part = slice(start, start + 8192)
            x = vectors[part].astype(np.float64)
            c = centroids[assign[part]].astype(np.float64)
            c /= np.sqrt(np.einsum("ij,ij->i", c, c))[:, None]
            a = np.einsum("ij,ij->i", x, c)
            off = x - a[:, None] * c
            out[part] = np.arctan2(np.sqrt(np.einsum("ij,ij->i", off, off)), a)
            top = max(top, float(np.sqrt(np.einsum("ij,ij->i", x, x).max())))
        return out, top

    def _float_rows(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The live ``slots`` (sorted) that have a float32 row the re-rank reads, and those rows: from the
        side file, else through ``fetch`` (none without either: the re-rank then uses int8 cosines)."""
        slots = slots[self._inv[slots] > 0]
        if self._floats is not None:
            return slots, _read_rows(self._floats, self._fpos[slots])
        if self.fetch is None or not len(slots):
            return slots[:0], np.zeros((0, self.dim), dtype=np.float32)
        keys = self._keys[slots]
        got, rows = self.fetch(keys)
        at = {k: i for i, k in enumerate(keys.tolist())}  # live keys are unique
        return slots[np.asarray([at[k] for k in got.tolist()], dtype=np.int64)], rows

    def _maybe_train(self) -> None:
        if self._live < TRAIN_AT:
            return
        if self._centroids is not None and (
            len(self._centroids) >= NLIST_MAX or self._live < RETRAIN_GROWTH * self._trained_n
        ):
            return
        started = time.monotonic()
        nlist = int(min(NLIST_MAX, max(NLIST_MIN, self._live // ROWS_PER_LIST)))
        rng = np.random.default_rng(self._live)
        live_slots = np.flatnonzero(self._inv[: self._n] > 0)
        sample_slots = np.sort(rng.choice(live_slots, min(len(live_slots), KMEANS_SAMPLE), replace=False))
        sample = self._gather_float(sample_slots)
        centroids = sample[rng.choice(len(sample), nlist, replace=False)].copy()
        for _ in range(KMEANS_ITERS):
            nearest = np.empty(len(sample), dtype=np.int64)
            for start in range(0, len(sample), 8192):
                nearest[start : start + 8192] = (sample[start : start + 8192] @ centroids.T).argmax(axis=1)
            sums = np.zeros_like(centroids)
            np.add.at(sums, nearest, sample)
            norms = np.linalg.norm(sums, axis=1, keepdims=True)
            empty = norms[:, 0] == 0
            # An empty list takes a random sample row: every centroid stays a unit vector.
            sums[empty] = sample[rng.integers(0, len(sample), int(empty.sum()))]
            norms[empty] = 1.0
            centroids = (sums / norms).astype(np.float32)
        self._centroids = centroids
        self._trained_n = self._live
        self._angle[: self._n] = np.nan
        for start in range(0, self._n, BLOCK):
            slots = np.arange(start, min(self._n, start + BLOCK))
            self._assign[start : start + len(slots)] = self._assign_rows(self._gather_float(slots))
            held, rows = self._float_rows(slots)  # the angles of the rows the re-rank scores
            self._angle[held], top = self._angles(rows, self._assign[held])
            self._xmax = max(self._xmax, top)
        self._angle_stale = False
        self._sort_lists()
        log.info(
            "inverted file: %d lists over %d rows in %.1fs", nlist, self._live, time.monotonic() - started
        )

    def _gather_float(self, slots: np.ndarray) -> np.ndarray:
        """``slots`` (sorted ascending) as float32 rows of unit length (deleted rows come out zero)."""
        return (self._gather_codes(slots).astype(np.float32) - 128.0) * self._inv[slots, None]

    def _gather_codes(self, slots: np.ndarray) -> np.ndarray:
        """Whole uint8 rows of ``slots`` (sorted ascending), in that order."""
        heads, tails = self._gather_heads(slots), self._gather_tails(slots)
        return heads if tails is None else np.hstack([heads, tails])

    def _gather_heads(self, slots: np.ndarray) -> np.ndarray:
        return _gather(self._heads, slots, self.head)

    def _gather_tails(self, slots: np.ndarray) -> np.ndarray | None:
        """None when rows have no tail (``dim <= HEAD``)."""
        return _gather(self._tails, slots, self.dim - self.head) if self.dim > self.head else None

    def _sort_lists(self) -> None:
        assert self._centroids is not None
        assign = self._assign[: self._n]
        self._order = np.argsort(assign, kind="stable").astype(np.int64, copy=False)
        counts = np.bincount(assign, minlength=len(self._centroids))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._sorted_upto = self._n

    def _slots_of(self, keys: np.ndarray) -> np.ndarray:
        """The slot holding each key (live or deleted), -1 where none does."""
        held = self._keys[: self._n]
        if not self._n:
            return np.full(len(keys), -1, dtype=np.int64)
        if self._keys_sorted:
            pos = np.searchsorted(held, keys)
            pos_c = np.minimum(pos, self._n - 1)
            return np.where(held[pos_c] == keys, pos_c, -1)
        if self._key_order is None:
            self._key_order = np.argsort(held, kind="stable")
        sorted_keys = held[self._key_order]
        pos = np.minimum(np.searchsorted(sorted_keys, keys), self._n - 1)
        return np.where(sorted_keys[pos] == keys, self._key_order[pos], -1)

    def remove(self, keys: list[int] | np.ndarray) -> int:
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return 0
        with self._lock.write():
            slots = self._slots_of(np.unique(keys))
            slots = slots[slots >= 0]
            slots = slots[self._inv[slots] > 0]
            self._inv[slots] = 0.0
            count = len(slots)
            self._live -= count
            self._touch(count)
            if self._n - self._live > max(BLOCK, self._n // 2):
                self._compact()
        return count

    def _compact(self) -> None:
        """Drop deleted slots (order kept): storage, keys, lists and the side file are rebuilt block by
        block (the side file under a new generation; the next snapshot names it, and deletes the old)."""
        live = np.flatnonzero(self._inv[: self._n] > 0)
        self._layout += 1
        old_heads, old_tails, old_floats = self._heads, self._tails, self._floats
        keys, inv, assign = self._keys[live].copy(), self._inv[live].copy(), self._assign[live].copy()
        tail_norm, angle = self._tail_norm[live].copy(), self._angle[live].copy()
        self._heads, self._tails, self._n, self._live = [], [], 0, 0
        self._keys = np.zeros(0, dtype=np.int64)
        self._inv = np.zeros(0, dtype=np.float32)
        self._assign = np.zeros(0, dtype=np.int16)
        self._tail_norm = np.zeros(0, dtype=np.float32)
        self._angle = np.zeros(0, dtype=np.float32)
        self._keys_sorted, self._sorted_upto = True, 0
        old_fpos = self._fpos
        self._fpos, self._fnext, self._flisted = np.zeros(0, dtype=np.int64), 0, 0
        if old_floats is not None:
            self._floats = None
            self._floats_gen = time.time_ns()
            try:
                self._floats = _Floats(self._float_path(self._floats_gen), self.dim, len(live))
            except OSError as exc:  # after the delete's commit (a full disk): go on without a side file
                log.error("%s: side file dropped: %s", self.name, exc)
        src_blocks = live // BLOCK
        for b in range(len(old_heads)):
            sel = np.flatnonzero(src_blocks == b)
            if len(sel):
                at = live[sel] - b * BLOCK
                rows = np.hstack([old_heads[b][at], old_tails[b][at]])
                if self._floats is not None and old_floats is not None:
                    try:
                        self._floats.write(self._fnext, _read_rows(old_floats, old_fpos[live[sel]]))
                    except OSError as exc:
                        log.error("%s: side file dropped: %s", self.name, exc)
                        self._floats.close()
                        self._floats.path.unlink(missing_ok=True)
                        self._floats = None
                self._append(keys[sel], rows, inv[sel], assign[sel], tail_norm[sel], angle[sel])
            old_heads[b] = old_tails[b] = np.zeros((0, 0), dtype=np.uint8)  # freed as we go
        if old_floats is not None:
            # The file itself stays until a snapshot naming the new one is durable (``save`` deletes it):
            # the last snapshot names it, and a crash before the next must leave that snapshot usable.
            old_floats.close()
        if self._centroids is not None:
            self._sort_lists()
        self._touch(1)

    def relayout_due(self) -> bool:
        """Whether enough rows sit outside list order in the side file for :meth:`relayout` to pay."""
        return (
            self._floats is not None
            and self._centroids is not None
            and self._n - self._flisted > max(RELAYOUT_MIN, self._flisted // 2)
        )

    def relayout(self, stop: threading.Event | None = None) -> bool:
        """Rewrite the side file (a new generation) with the rows in list order, the rows of one list
        together: the matches of a query lie in a few lists, so a large answer's float32 rows are a few
        runs of the file instead of one random read each (5M sparse: 7,000-15,000 matches a query in 2-10
        lists, 25-40 MB of the file). Searches and adds go on meanwhile: rows in the side file never
        change once written, so the old file is read outside the lock; the rows added meanwhile are
        copied under the write lock, when the new file takes over. The old file stays until the next
        snapshot (which names the new one) is durable. Returns False when there was nothing to do, a
        compaction came first or ``stop`` was set (checked between reads of 64 MB: a shutdown does not
        wait for the rewrite)."""
        with self._lock.read():
            floats = self._floats
            if floats is None or self._centroids is None or not self.relayout_due():
                return False
            layout, n = self._layout, self._n
            order = np.argsort(self._assign[:n], kind="stable")  # by list, by slot within a list
            old = self._fpos[:n].copy()
            held = self._fnext
            source = os.open(floats.path, os.O_RDONLY)  # our own descriptor: a compaction may close theirs
        started = time.monotonic()
        gen = time.time_ns()
        self._relayout_to = self._float_path(gen)
        fresh = _Floats(self._relayout_to, self.dim, n)
        try:
            place = np.empty(n, dtype=np.int64)
            place[order] = np.arange(n)
            slot_at = np.full(held, -1, dtype=np.int64)
            slot_at[old] = np.arange(n)
            for slots, mine, got in _in_file_order(source, floats, slot_at, stop):
                dest = place[slots]
                by_dest = np.argsort(dest, kind="stable")
                dest, picked = dest[by_dest], got[mine[by_dest]]
                breaks = (np.flatnonzero(np.diff(dest) != 1) + 1).tolist()
                for a, b in zip([0, *breaks], [*breaks, len(dest)], strict=True):
                    if b > a:
                        fresh.write(int(dest[a]), picked[a:b])
        except BaseException as exc:
            fresh.close()
            fresh.path.unlink(missing_ok=True)
            self._relayout_to = None
            if isinstance(exc, _Abandoned):
                return False
            raise
        finally:
            os.close(source)
        with self._lock.write():
            self._relayout_to = None  # from here the file is current (or deleted)
            if self._layout != layout or self._floats is not floats:  # compacted meanwhile: slots moved
                fresh.close()
                fresh.path.unlink(missing_ok=True)
                return False
            if self._n > n:  # added meanwhile: appended behind, in slot order
                fresh.write(n, _read_rows(floats, self._fpos[n : self._n]))
            self._fpos[:n] = place
            self._fpos[n : self._n] = np.arange(n, self._n)
            self._fnext, self._flisted = self._n, n
            floats.close()  # the file itself stays: the last snapshot names it until the next is written
            self._floats, self._floats_gen = fresh, gen
            self._touch(1)
        log.info("side file of %s in list order: %d rows in %.1fs", self.name, n, time.monotonic() - started)
        return True

    def angles_due(self) -> bool:
        """Whether listed rows lack their angle from the centroid (a snapshot of an earlier format)."""
        return self._angle_stale and self._centroids is not None

    def fill_angles(self, stop: threading.Event | None = None) -> bool:
        """Compute the angles from the centroids that a snapshot of an earlier format lacks, from the
        float32 rows (read in file order, outside the lock: rows never change once written), and install
        them under the write lock unless the lists were retrained or the slots compacted meanwhile (rows
        added since have their own). Searches are exact meanwhile (an unknown angle bounds nothing).
        Marks the index changed: the next snapshot holds them. False when there was nothing to do or it
        gave up."""
        with self._lock.read():
            if not self.angles_due():
                return False
            centroids, layout, n = self._centroids, self._layout, self._n
            assert centroids is not None
            assign = self._assign[:n].copy()
            floats = self._floats
            if floats is not None:
                fpos, held = self._fpos[:n].copy(), self._fnext
                source = os.open(floats.path, os.O_RDONLY)  # ours: a compaction may close theirs
        started = time.monotonic()
        angle = np.full(n, np.nan, dtype=np.float32)
        xmax = 0.0
        if floats is None:  # rows through ``fetch`` (no side file), a chunk at a time under the read lock
            for start in range(0, n, 10_000):
                if stop is not None and stop.is_set():
                    return False
                with self._lock.read():
                    if self._layout != layout or self._centroids is not centroids:
                        return False
                    slots, rows = self._float_rows(np.arange(start, min(n, start + 10_000)))
                    angle[slots], top = self._angles(rows, assign[slots], centroids)
                    xmax = max(xmax, top)
        else:
            try:
                slot_at = np.full(held, -1, dtype=np.int64)
                slot_at[fpos] = np.arange(n)
                for slots, mine, got in _in_file_order(source, floats, slot_at, stop):
                    angle[slots], top = self._angles(got[mine], assign[slots], centroids)
                    xmax = max(xmax, top)
            except _Abandoned:
                return False
            finally:
                os.close(source)
        with self._lock.write():
            if self._layout != layout or self._centroids is not centroids:
                return False  # compacted (slots moved) or retrained (angles recomputed) meanwhile
            self._angle[:n] = angle
            self._xmax = max(self._xmax, xmax)
            self._angle_stale = False
            self._touch(1)
        log.info("angles to the centroids of %s: %d rows in %.1fs", self.name, n, time.monotonic() - started)
        return True

    def keys(self) -> np.ndarray:
        with self._lock.read():
            held = self._keys[: self._n]
            if self._live == self._n:  # nothing deleted: no mask to build over every slot
                return held.copy()
            return held[self._inv[: self._n] > 0]

    # --- search ------------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        limit: int,
        min_cosine: float,
        *,
        exact: bool | None = None,
        prefetch: Prefetch | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and cosines of the best ``limit`` rows (all when limit < 0) at or above ``min_cosine``.

        ``queries`` holds the views of one query; a row scores its best cosine over them. ``exact``
        forces (True) or forbids (False) the full scan (False: the lists' own answer, for measuring it);
        by default the scan is used when the group is small, the request wants many rows, or the lists
        find a dense neighbourhood above the threshold. ``prefetch`` is called with the keys the answer
        is drawn from (a superset), before their float32 rows are read (:meth:`_rerank`).
        """
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        empty = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if limit == 0:
            return empty
        floor = min_cosine - SCREEN_MARGIN
        query = _Query(queries, self.head)
        with self._lock.read():
            n = len(self)
            if n == 0:
                return empty
            auto = exact is None
            scan = exact if not auto else n < self.exact_below or limit < 0 or limit > ANN_MAX_LIMIT
            sims = None if self._centroids is None else _products(queries, self._centroids)
            # The angle bound serves the scans only: the probed lists are the query's neighbourhood, where
            # it rules few rows out (measured: the probe no faster with it, 500k and 5M).
            if scan:
                slots, approx = self._scan(query, limit, floor, self._angle_window(queries, sims, min_cosine))
            else:
                best_of = (queries, min_cosine) if limit == 1 else None
                slots, approx = self._probe(query, sims, min(n, max(32, 2 * limit)), floor, best_of)
                found = approx[approx >= floor]
                if auto and limit > 1 and len(found) >= DENSE_MATCHES:
                    # Many rows pass the threshold around this query: a dense neighbourhood, where the
                    # lists may miss some. A search that can return several matches gets the scan's answer.
                    # The lists' limit-th best int8 cosine is a real row's, so the scan's own limit-th best
                    # is at least that: rows more than twice the margin under it cannot enter (the scan
                    # drops them too), and the head bound rules most rows out against it.
                    least = floor
                    if len(found) >= limit:
                        least = float(np.partition(found, len(found) - limit)[len(found) - limit])
                        least -= 2 * SCREEN_MARGIN
                    # Rows whose float32 cosine is under the scan's floor less the int8 error cannot pass
                    # the floor in int8 either: the angle bound may rule them out too.
                    above = max(floor, least)
                    more = self._angle_window(queries, sims, max(min_cosine, above - SCREEN_MARGIN))
                    slots, approx = self._scan(query, limit, above, more)
            keys, cosines = self._rerank(slots, approx, queries, min_cosine, floor, prefetch, limit)
            if auto and not scan and len(keys) < limit:
                # Fewer matches than asked for in the lists: another may still sit in a list the query is
                # far from (a lone photo among another item's crowd: on the dense 500k bench catalogue, 7
                # of 120 JPEG queries with a match got none at limit=1, one got 1 of its 2 at limit=10).
                # An answer that says "that is all" (none, or fewer than the limit) is the scan's to give.
                slots, approx = self._scan(query, limit, floor, self._angle_window(queries, sims, min_cosine))
                keys, cosines = self._rerank(slots, approx, queries, min_cosine, floor, prefetch, limit)
        if limit >= 0:
            keys, cosines = keys[:limit], cosines[:limit]
        return keys, cosines

    def _angle_window(
        self, queries: np.ndarray, sims: np.ndarray | None, target: float
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Per list, the angles from its centroid (radians, ``lo`` to ``hi``) within which a row of that
        list may reach the float32 cosine ``target`` for some view; a row outside cannot be in the answer,
        whatever its int8 cosine.

        The angle between q and x is at least |angle(q, c) - angle(x, c)| (the triangle inequality on the
        sphere), so q.x <= |q| |x| cos(|angle(q, c) - angle(x, c)|) <= |q| xmax cos(...): a row can reach
        ``target`` (less ``ANGLE_SLACK``: the re-rank's float32 products) only if its angle lies within
        arccos(target / (|q| xmax)) of angle(q, c). angle(q, c) comes from the float32 products ``sims``
        (widened by ``COS_ERROR``). None when nothing can be ruled out: no lists, no float32 rows (the
        re-rank then answers int8 cosines, which this does not bound), a target at or under 0, or a zero
        view."""
        centroids = self._centroids
        if sims is None or centroids is None or (self._floats is None and self.fetch is None):
            return None
        reach = target - ANGLE_SLACK
        if reach <= 0 or self._xmax <= 0:
            return None
        q = queries.astype(np.float64)
        qnorm = np.sqrt(np.einsum("ij,ij->i", q, q))
        if not np.all(qnorm > 0):
            return None
        if self._cnorm_of is not centroids:
            c = centroids.astype(np.float64)
            self._cnorm, self._cnorm_of = np.sqrt(np.einsum("ij,ij->i", c, c)), centroids
        cos = sims.astype(np.float64) / self._cnorm[None, :] / qnorm[:, None]
        near = np.arccos(np.clip(cos + COS_ERROR, -1.0, 1.0))
        far = np.arccos(np.clip(cos - COS_ERROR, -1.0, 1.0))
        t = reach / (qnorm * self._xmax)
        spread = np.arccos(np.clip(t, -1.0, 1.0))[:, None]
        lo = np.where(t[:, None] > 1, np.inf, near - spread).min(axis=0) - 1e-6  # t > 1: out of reach
        hi = np.where(t[:, None] > 1, -np.inf, far + spread).max(axis=0) + 1e-6
        return lo.astype(np.float32), hi.astype(np.float32)

    def _within(self, start: int, stop: int, window: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Offsets (from ``start``) of the slots ``start:stop`` whose angle lies in their list's window
        (or is unknown)."""
        return np.flatnonzero(_in_window(self._angle[start:stop], self._assign[start:stop], window))

    def _scan(
        self,
        query: _Query,
        limit: int,
        floor: float,
        window: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every row's int8 score: the rows that may pass ``floor`` and may make the best ``limit``.
        ``window``: per list, the angles from the centroid outside which a row cannot be in the answer
        (:meth:`_angle_window`); those rows are not scored."""
        n = self._n

        def one(start: int) -> tuple[np.ndarray, np.ndarray]:
            stop = min(n, start + BLOCK)
            b, m = start // BLOCK, stop - start
            head, inv = self._heads[b][:m], self._inv[start:stop]
            if window is not None:
                sel = self._within(start, stop, window)
                if len(sel) <= ANGLE_GIVE_UP * m:
                    return self._score_some(query, b, start, sel, floor)
            if query.tcols is None:
                cos = query.cosines(self._scorer, head, None, inv)
                hit = np.flatnonzero(cos >= floor)
                return hit + start, cos[hit]
            # The heads first: rows whose bound is under the floor cannot pass it; the rest are scored
            # whole (the same integer dot products as a whole-row scan, so the same cosines).
            bound = query.bounds(self._scorer, head, self._tail_norm[start:stop], inv)
            cand = np.flatnonzero(bound >= floor - BOUND_SLACK)
            if len(cand) > BOUND_GIVE_UP * m:
                cos = query.cosines(self._scorer, head, self._tails[b][:m], inv)
                hit = np.flatnonzero(cos >= floor)
                return hit + start, cos[hit]
            cos = query.cosines(
                self._scorer, np.take(head, cand, axis=0), np.take(self._tails[b], cand, axis=0), inv[cand]
            )
            hit = np.flatnonzero(cos >= floor)
            return cand[hit] + start, cos[hit]

        starts = list(range(0, n, BLOCK))
        if len(starts) > 1 and self.threads > 1:
            parts = list(_pool().map(one, starts))
        else:
            parts = [one(s) for s in starts]
        slots = np.concatenate([p[0] for p in parts])
        approx = np.concatenate([p[1] for p in parts])
        live = self._inv[slots] > 0
        slots, approx = slots[live], approx[live]
        if limit > 0 and len(slots) > limit:
            # A row whose int8 cosine is below the limit-th best by more than twice the int8 error cannot
            # enter the answer; every row was scored, so nothing else can.
            kth = float(np.partition(approx, len(approx) - limit)[len(approx) - limit])
            keep = approx >= kth - 2 * SCREEN_MARGIN
            slots, approx = slots[keep], approx[keep]
        return slots, approx

    def _score_some(
        self, query: _Query, b: int, start: int, sel: np.ndarray, floor: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``sel`` (ascending, within block ``b`` at slot ``start``) that pass ``floor`` in int8, with
        their cosines: the head bound on their heads, whole rows where it passes."""
        if not len(sel):
            return sel, np.zeros(0, dtype=np.float32)
        # np.take, not fancy indexing: 4x faster for 64-byte rows (2x for the tails), measured.
        head, inv = np.take(self._heads[b], sel, axis=0), self._inv[start + sel]
        if query.tcols is None:
            cos = query.cosines(self._scorer, head, None, inv)
        else:
            bound = query.bounds(self._scorer, head, self._tail_norm[start + sel], inv)
            keep = np.flatnonzero(bound >= floor - BOUND_SLACK)
            if len(keep) < len(sel):
                sel, head, inv = sel[keep], np.take(head, keep, axis=0), inv[keep]
            cos = query.cosines(self._scorer, head, np.take(self._tails[b], sel, axis=0), inv)
        hit = np.flatnonzero(cos >= floor)
        return sel[hit] + start, cos[hit]

    def _probe(
        self,
        query: _Query,
        sims: np.ndarray | None,
        count: int,
        floor: float,
        best_of: tuple[np.ndarray, float] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``count`` best rows (int8) at or above ``floor`` among the lists nearest to each view and the
        unsorted tail (rows under the floor would be dropped by the re-rank anyway). ``sims``: the views'
        products with the centroids; ``best_of``: the float32 views and the threshold of a search for the
        single best row (:meth:`_best_above`)."""
        n = self._n
        if self._centroids is None or sims is None:
            slots = np.arange(n, dtype=np.int64)
        else:
            nprobe = min(NPROBE, len(self._centroids))
            lists = np.unique(np.argpartition(-sims, nprobe - 1, axis=1)[:, :nprobe])
            parts = [self._list(i) for i in lists]
            parts.append(np.arange(self._sorted_upto, n, dtype=np.int64))
            slots = np.sort(np.concatenate(parts))
        slots = slots[self._inv[slots] > 0]
        if best_of is not None and sims is not None and len(best_of[0]) == 1:
            copies = self._copies(query, slots, floor, count, best_of, sims)
            if copies is not None:
                return copies
        beat = None if best_of is None or sims is None else (*best_of, sims)
        cos = self._best_above(query, slots, floor, count, beat)
        keep = cos >= floor
        slots, cos = slots[keep], cos[keep]
        if len(cos) > count:
            top = np.argpartition(-cos, count - 1)[:count]
            slots, cos = slots[top], cos[top]
        return slots, cos

    def _copies(
        self,
        query: _Query,
        slots: np.ndarray,
        floor: float,
        count: int,
        best_of: tuple[np.ndarray, float],
        sims: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """A one-view search for the single best row (a search by a stored image: the query is a stored
        row) looks for a copy first: only the probed rows inside the angle window at ``COPY`` can reach
        that cosine. When there are at most ``8 * count`` of them, they are scored, and when the best of
        them reaches ``COPY`` in float32, every row that could beat or tie it is among them: their best
        ``count`` (int8) are the candidates, and no other probed row is scored (not even its head bound).
        None (the probed rows scored as usual) otherwise. For a stored vector the window holds 1-9 of the
        ~16k probed rows (500k dense); for a JPEG query (not a copy) 600-6,800, where trying cost more than
        the probe itself (10.8 -> 27.5 ms when tried for every query): hence the cap, and one view only
        (the server's image queries have four)."""
        views, min_cosine = best_of
        target = max(min_cosine, COPY)
        window = self._angle_window(views, sims, target)
        if window is None:
            return None
        few = slots[_in_window(self._angle[slots], self._assign[slots], window)]
        if len(few) > 8 * count:
            return None
        cos = self._cosines_above(query, few, floor)
        keep = cos >= floor
        few, cos = few[keep], cos[keep]
        if not len(few) or float(self._exact(few, cos, views)[1].max(initial=-np.inf)) < target:
            return None
        if len(cos) > count:
            top = np.argpartition(-cos, count - 1)[:count]
            few, cos = few[top], cos[top]
        return few, cos

    def _list(self, i: int) -> np.ndarray:
        """The slots of list ``i`` sorted into the lists (ascending)."""
        return self._order[self._offsets[i] : self._offsets[i + 1]]

    def _best_above(
        self,
        query: _Query,
        slots: np.ndarray,
        floor: float,
        count: int,
        beat: tuple[np.ndarray, float, np.ndarray] | None = None,
    ) -> np.ndarray:
        """int8 cosines of ``slots`` (sorted), exact for the ``count`` best at or above ``floor``; -inf or
        a value under the floor for rows that cannot be among them.

        The probed lists are the query's neighbourhood, where the head bound lets most rows through (75-99 %
        at 5M): the rows with the best bounds are scored first, and then only rows whose bound reaches the
        count-th best cosine found (a row's cosine never exceeds its bound).

        ``beat`` (float32 views, threshold, their products with the centroids): a search for the single
        best row. When the first rows scored hold a near copy of the query (float32 cosine at least
        ``NEAR_COPY``: a search by a stored image finds the image itself), the other rows are scored only
        where the angle bound says they may reach its cosine (less the bound's slack: ties stay); the
        others cannot be the answer, whatever their int8 rank. 500k dense, by a stored image: 1-7 of the
        ~16k probed rows are left."""
        if query.tcols is None or len(slots) <= 4 * count:
            return self._cosines_above(query, slots, floor)
        heads, inv = self._gather_heads(slots), self._inv[slots]
        bound = query.bounds(self._scorer, heads, self._tail_norm[slots], inv)
        out = np.full(len(slots), -np.inf, dtype=np.float32)

        def score(rows: np.ndarray) -> None:
            if len(rows):
                tails = self._gather_tails(slots[rows])
                out[rows] = query.cosines(self._scorer, np.take(heads, rows, axis=0), tails, inv[rows])

        cand = np.flatnonzero(bound >= floor - BOUND_SLACK)
        if len(cand) <= 2 * count:
            score(cand)
            return out
        split = np.argpartition(-bound[cand], 2 * count - 1)
        first, rest = np.sort(cand[split[: 2 * count]]), cand[split[2 * count :]]
        score(first)
        if np.count_nonzero(out[first] >= floor) >= count:
            kth = float(np.partition(out[first], len(first) - count)[len(first) - count])
            rest = rest[bound[rest] >= kth - BOUND_SLACK]
        if beat is not None and len(rest) and float(out[first].max()) >= NEAR_COPY - SCREEN_MARGIN:
            views, min_cosine, sims = beat
            near = first[out[first] >= NEAR_COPY - SCREEN_MARGIN]
            cosines = self._exact(slots[near], out[near], views)[1]
            best = float(cosines.max()) if len(cosines) else -np.inf
            window = self._angle_window(views, sims, best) if best >= max(min_cosine, NEAR_COPY) else None
            if window is not None:
                rest = rest[_in_window(self._angle[slots[rest]], self._assign[slots[rest]], window)]
        score(np.sort(rest))
        return out

    def _cosines_above(self, query: _Query, slots: np.ndarray, floor: float) -> np.ndarray:
        """int8 cosines of ``slots`` (sorted), exact where they may reach ``floor``; rows the head bound
        rules out get their bound (under the floor) instead."""
        if not len(slots):
            return np.zeros(0, dtype=np.float32)
        heads, inv = self._gather_heads(slots), self._inv[slots]
        if query.tcols is None:
            return query.cosines(self._scorer, heads, None, inv)
        bound = query.bounds(self._scorer, heads, self._tail_norm[slots], inv)
        cand = np.flatnonzero(bound >= floor - BOUND_SLACK)
        if len(cand):
            tails = self._gather_tails(slots[cand])
            bound[cand] = query.cosines(self._scorer, heads[cand], tails, inv[cand])
        return bound

    def search_among(
        self,
        queries: np.ndarray,
        among: np.ndarray,
        limit: int,
        min_cosine: float,
        *,
        prefetch: Prefetch | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` restricted to the rows ``among`` (a filter's matches), exact: their int8 codes are
        scored, the candidates that may make the answer are re-ranked in float32.

        Costs one pass over ``among``, whatever the group's size.
        """
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        among = np.unique(np.asarray(among, dtype=np.int64))
        empty = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if limit == 0 or not len(among):
            return empty
        floor = min_cosine - SCREEN_MARGIN
        query = _Query(queries, self.head)
        with self._lock.read():
            slots = self._slots_of(among)
            slots = np.sort(slots[slots >= 0])
            slots = slots[self._inv[slots] > 0]  # deleted meanwhile: skipped
            if not len(slots):
                return empty
            approx = self._cosines_above(query, slots, floor)
            keep = approx >= floor
            slots, approx = slots[keep], approx[keep]
            if limit > 0 and len(slots) > limit:
                # Rows whose int8 cosine is below the limit-th best by more than the int8 error cannot enter.
                kth = float(np.partition(approx, len(approx) - limit)[len(approx) - limit])
                keep = approx >= kth - 2 * SCREEN_MARGIN
                slots, approx = slots[keep], approx[keep]
            keys, cosines = self._rerank(slots, approx, queries, min_cosine, floor, prefetch, limit)
        if limit >= 0:
            keys, cosines = keys[:limit], cosines[:limit]
        return keys, cosines

    def _rerank(
        self,
        slots: np.ndarray,
        approx: np.ndarray,
        queries: np.ndarray,
        min_cosine: float,
        floor: float,
        prefetch: Prefetch | None = None,
        limit: int = -1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The candidates that pass ``min_cosine`` in float32, best first (ties in seq order): keys, cosines.
        Runs under the read lock (slots are stable). ``prefetch`` gets the candidates' keys first (the
        caller may start reading their records while the float32 rows are read and scored); with more
        candidates than ``limit``, only the keys of the ``limit`` best by int8: nearly all of the answer
        (500k dense, limit=10000: 10,000 of ~14,300 candidates; the caller reads the few others after).

        (Scoring the ``limit`` best by int8 first and then only the rows near the least of their float32
        cosines read ~10,000 rows instead of ~13,900 for a 500k dense ``limit=10000``, but two reads of a
        list-ordered side file cost more than one: measured slower, not used.)"""
        keep = approx >= floor
        slots, approx = slots[keep], approx[keep]
        if prefetch is not None:
            likely = slots
            if 0 < limit < len(slots):
                likely = slots[np.argpartition(-approx, limit - 1)[:limit]]
            prefetch(self._keys[likely])
        keys, cosines = self._exact(slots, approx, queries)
        passing = np.flatnonzero(cosines >= min_cosine)
        order = passing[_best_first(keys[passing], cosines[passing], limit)]
        return keys[order], cosines[order].astype(np.float32, copy=False)

    def _exact(
        self, slots: np.ndarray, approx: np.ndarray, queries: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and float32 cosines of ``slots`` (``approx``: their int8 cosines, the answer when there
        are no float32 rows to read), in no particular order."""
        keys = self._keys[slots]
        if self._floats is not None:
            # Read in side-file order (a list's rows lie together there); the keys follow that order.
            places = self._fpos[slots]
            order = np.argsort(places)
            keys = keys[order]
            cosines = self._floats.best(places[order], queries, self.threads)
        elif self.fetch is None:
            cosines = approx
        else:
            keys, rows = self.fetch(keys)
            cosines = _products(rows, queries).max(axis=1) if len(keys) else np.zeros(0, dtype=np.float32)
        return keys, cosines

    # --- snapshots ---------------------------------------------------------------------------------
    def _write(self, f: BinaryIO) -> tuple[int, int, int]:
        """Every slot (deleted ones too, with a zero norm: slots must stay those of the side file) into
        ``f``; returns (live rows, crc32 of what was written, offset of the first int8 row)."""
        crc = 0
        written = 0

        def put(data: bytes | memoryview) -> None:
            nonlocal crc, written
            crc = zlib.crc32(data, crc)
            f.write(data)
            written += len(data)

        n = self._n
        header = {
            "dim": self.dim,
            "count": self._live,
            "slots": n,
            "nlist": 0 if self._centroids is None else len(self._centroids),
            "trained": self._trained_n,
            "head": self.head,
            "float_rows": self._fnext,
            "float_listed": self._flisted,
            "xmax": self._xmax,
        }
        put(_MAGIC)
        put(json.dumps(header).encode() + b"\n")
        put(self._keys[:n].tobytes())
        put(self._inv[:n].tobytes())
        put(self._assign[:n].tobytes())
        put(self._tail_norm[:n].tobytes())
        put(self._fpos[:n].tobytes())
        put(self._angle[:n].tobytes())
        codes_at = written
        for start in range(0, n, BLOCK):  # a block: its rows' heads, then their tails
            rows = min(BLOCK, n - start)
            for part in (self._heads[start // BLOCK][:rows], self._tails[start // BLOCK][:rows]):
                if part.size:
                    put(np.ascontiguousarray(part).reshape(-1).data)
        if self._centroids is not None:
            put(self._centroids.tobytes())
        return self._live, crc, codes_at

    def save(self, folder: Path, name: str) -> int | None:
        """Write a snapshot if anything changed since the last one; returns its seq (None if clean).

        Searches go on meanwhile; adds and deletes wait while the rows are written into the page cache.
        fsync and renames happen after the lock is released.
        """
        private_dir(folder)
        with self._lock.read():
            if not self.dirty:
                return None
            seq, dirty, slots, layout = self.last_seq, self.dirty, self._n, self._layout
            # A generation in the name as well: after deletes alone the seq is unchanged, and replacing
            # the live file under its old name would leave no valid snapshot until the new JSON lands.
            stem = f"{name}.{seq}.{time.time_ns()}"
            tmp = folder / f"{stem}.ivf.tmp"
            floats_gen = self._floats_gen if self._floats is not None else 0
            try:
                with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "wb") as f:
                    count, crc, codes_at = self._write(f)
                if self._floats is not None:
                    self._floats.sync()  # the rows the snapshot's slots name are durable before it is
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            # No writer can run while we hold the read lock, so nothing changed since ``dirty``.
            self.dirty = 0
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            final = folder / f"{stem}.ivf"
            os.replace(tmp, final)
            meta = {
                "format": SNAPSHOT_FORMAT,
                "dim": self.dim,
                "seq": seq,
                "count": count,
                "floats": floats_gen,
                "size": final.stat().st_size,
                "crc32": crc,
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
        # The full blocks now come from the new file: their pages live once, in the page cache (the kernel
        # may drop them under pressure and read them back), and the old file, if the blocks came from it,
        # is no longer held open.
        try:
            mapped = _map_file(final)
        except (OSError, ValueError):
            mapped = None
        if mapped is not None:
            with self._lock.write():
                if self._layout == layout:  # not compacted meanwhile: the file's slots are ours
                    for b in range(slots // BLOCK):
                        at = codes_at + b * BLOCK * self.dim
                        self._heads[b], self._tails[b] = _block_views(mapped, at, self.dim, self.head)
        # Only now, with the new snapshot durable, may older ones go.
        keep = f"{name}.{floats_gen}.f32"
        for old in snapshot_files(folder, name):
            if not old.name.startswith(f"{stem}.") and old.name != keep and not self._is_current_floats(old):
                old.unlink(missing_ok=True)
        return seq

    def _is_current_floats(self, path: Path) -> bool:
        floats = self._floats  # compaction may have started a newer generation since the snapshot
        return floats is not None and path == floats.path or path == self._relayout_to

    @classmethod
    def _read(cls, path: Path, dim: int, meta: dict, fetch: Fetch | None) -> VectorIndex:
        """The snapshot at ``path``, memory-mapped: its full blocks are used where they lie in the file
        (no copy; the page cache holds them), the rest is copied. The whole file's CRC is checked first."""
        mm = _map_file(path, populate=True)
        size = len(mm)
        if size != meta["size"]:
            raise ValueError("snapshot size does not match")
        if zlib.crc32(mm) != meta["crc32"]:  # one pass over the mapping, no copy
            raise ValueError("snapshot checksum does not match")
        # The pages stay in the page cache; the process maps again only what searches read (a scan reads
        # the heads, a sixth of each block, and the tails of the rows its bound lets through).
        mm.madvise(mmap.MADV_DONTNEED)
        magic = mm[: len(_MAGIC)]
        if magic not in (_MAGIC, _MAGIC_6, _MAGIC_5, _MAGIC_4, _MAGIC_3):
            raise ValueError("not a snapshot of this format")
        end = mm.find(b"\n", len(_MAGIC), len(_MAGIC) + 4096)
        if end < 0:
            raise ValueError("snapshot header is missing")
        header = json.loads(mm[len(_MAGIC) : end + 1])
        pos = end + 1
        n, nlist = int(header["slots"]), int(header["nlist"])
        if header["dim"] != dim or header["count"] != meta["count"]:
            raise ValueError("snapshot does not hold what its metadata says")

        def take(count: int, dtype: type) -> np.ndarray:
            nonlocal pos
            width = count * np.dtype(dtype).itemsize
            if pos + width > size:
                raise ValueError("snapshot is truncated")
            part: np.ndarray = np.frombuffer(mm, dtype=dtype, count=count, offset=pos)
            pos += width
            return part

        out = cls(dim, fetch)
        out._keys = take(n, np.int64).copy()
        out._inv = take(n, np.float32).copy()
        out._assign = take(n, np.int16).copy()
        h = out.head
        if magic == _MAGIC_3:  # whole rows: split into heads and tails, tail norms computed (once)
            for start in range(0, n, BLOCK):
                rows = min(BLOCK, n - start)
                whole = take(rows * dim, np.uint8).reshape(rows, dim)
                tails = np.empty((BLOCK, dim - h), dtype=np.uint8)
                tails[:rows] = whole[:, h:]
                heads = np.empty((BLOCK, h), dtype=np.uint8)
                heads[:rows] = whole[:, :h]
                out._heads.append(heads)
                out._tails.append(tails)
            out._tail_norm = (
                np.concatenate(
                    [
                        _tail_norms(t[: min(BLOCK, n - b * BLOCK)].view(np.int8) ^ np.int8(-128))
                        for b, t in enumerate(out._tails)
                    ]
                )
                if n
                else np.zeros(0, dtype=np.float32)
            )
            out._touch(1)  # written again in this format by the next snapshot
        else:
            if int(header.get("head", -1)) != h:
                raise ValueError("snapshot splits its rows elsewhere")
            out._tail_norm = take(n, np.float32).copy()
            if magic in (_MAGIC, _MAGIC_6, _MAGIC_5):
                out._fpos = take(n, np.int64).copy()
                out._fnext, out._flisted = int(header["float_rows"]), int(header["float_listed"])
                if n and (out._fpos.min() < 0 or out._fpos.max() >= out._fnext):
                    raise ValueError("snapshot places rows outside its side file")
            if magic == _MAGIC:
                out._angle = take(n, np.float32).copy()
                out._xmax = float(header["xmax"])
            elif magic == _MAGIC_6:
                take(n, np.float32)  # residual norms |x - c|: the angles are computed anew
            for start in range(0, n, BLOCK):
                rows = min(BLOCK, n - start)
                if rows == BLOCK:
                    heads, tails = _block_views(mm, pos, dim, h)
                    take(BLOCK * dim, np.uint8)
                else:  # the last, partial block takes appends: a copy of our own
                    heads = np.empty((BLOCK, h), dtype=np.uint8)
                    heads[:rows] = take(rows * h, np.uint8).reshape(rows, h)
                    tails = np.empty((BLOCK, dim - h), dtype=np.uint8)
                    tails[:rows] = take(rows * (dim - h), np.uint8).reshape(rows, dim - h)
                out._heads.append(heads)
                out._tails.append(tails)
        if nlist:
            out._centroids = take(nlist * dim, np.float32).reshape(nlist, dim).copy()
            out._trained_n = int(header["trained"])
        if pos != size:
            raise ValueError("snapshot has trailing data")
        out._n = n
        if magic in (_MAGIC_4, _MAGIC_3):  # the side file holds the rows by slot
            out._fpos, out._fnext = np.arange(n, dtype=np.int64), n
        if magic != _MAGIC:  # formats 3-6: no angles; the store's snapshot thread computes them
            out._angle = np.full(n, np.nan, dtype=np.float32)
            out._angle_stale = out._centroids is not None
        out._live = int(np.count_nonzero(out._inv[:n] > 0))
        if out._live != meta["count"]:
            raise ValueError("snapshot does not hold what its metadata says")
        out._keys_sorted = bool(n < 2 or np.all(np.diff(out._keys) > 0))
        if out._centroids is not None:
            out._sort_lists()
        return out

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
            data = folder / f"{name}.{seq}.{gen}.ivf"
            try:
                meta = json.loads(meta_path.read_text())
                known = meta.get("format") in (3, 4, 5, 6, SNAPSHOT_FORMAT)
                if not known or meta["dim"] != dim or meta["seq"] != seq:
                    raise ValueError("snapshot of another format or model")
                out = cls._read(data, dim, meta, fetch)
                out.folder, out.name = folder, name
                if meta.get("floats"):
                    path = out._float_path(int(meta["floats"]))
                    if not path.is_file() or path.stat().st_size < out._fnext * 4 * dim:
                        raise ValueError("the snapshot's float side file is missing or short")
                    out._floats_gen = int(meta["floats"])
                    out._floats = _Floats(path, dim, out._fnext)
                    _warm(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring snapshot %s: %s", data, exc)
                continue
            out.last_seq = seq
            return out
        return None


def _products(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """rows @ queries.T in float32, on this thread: numpy's own loop, not BLAS. OpenBLAS spreads even these
    small products over every core and took 58-93 ms for what this does in 1-16 ms on the loaded 2-core
    machine; each product is also summed in the same order whatever the rows around it (the re-rank's
    cosine of a row is the one an einsum scan of every row gives, bit for bit)."""
    return np.einsum("ij,kj->ik", rows, queries)


def _warm(path: Path) -> None:
    """Read a side file once, in the background, so that it is in the page cache, when it takes at most a
    quarter of the memory available: the first large answers after a start otherwise read each row from
    disk (200-300 µs a row here; 10,000 rows took seconds). Bigger files are left to the searches.
    (``posix_fadvise(WILLNEED)`` read only the first 8 MB here.)"""

    def run() -> None:
        try:
            with open("/proc/meminfo") as f:
                lines = [line for line in f if line.startswith("MemAvailable:")]
            available = int(lines[0].split()[1]) * 1024
            size = path.stat().st_size
            if size > available // 4:
                return
            buf = bytearray(4 << 20)
            fd = os.open(path, os.O_RDONLY)
            try:
                offset = 0
                while offset < size:
                    got = os.preadv(fd, [buf], offset)
                    if not got:
                        break
                    offset += got
            finally:
                os.close(fd)
        except (OSError, IndexError, ValueError):
            pass  # only a warm-up

    threading.Thread(target=run, name="tusou-warm", daemon=True).start()


class _Abandoned(Exception):
    """A relayout stopped midway (shutdown)."""


def _read_full(fd: int, parts: list[memoryview], row: int, row_bytes: int, path: Path) -> None:
    """Fill ``parts`` from a side file at row ``row`` on: one ``preadv``, more only after a short read."""
    offset = row * row_bytes
    got = os.preadv(fd, parts, offset)
    want = sum(len(p) for p in parts)
    while got < want:  # short reads happen only at the end of the file (a bug) or on signals
        skip = got
        rest = []
        for p in parts:
            if skip >= len(p):
                skip -= len(p)
                continue
            rest.append(p[skip:])
            skip = 0
        more = os.preadv(fd, rest, offset + got)
        if not more:
            raise OSError(f"{path}: rows missing at position {row + got // row_bytes}")
        got += more


def _best_first(keys: np.ndarray, cosines: np.ndarray, limit: int = -1) -> np.ndarray:
    """Indices of the best ``limit`` (all when < 0) by cosine, best first, equal cosines in key (seq,
    insertion) order so that answers are repeatable: ``np.lexsort((keys, -cosines))[:limit]``.

    Keys from 0 to 2**32 - 1 (seqs) and float32 cosines are one uint64 each (the cosine's bits made to sort
    descending above the key), sorted in one pass; the best ``limit`` picked first (keys are unique, so the
    sort keys are). 16k rows: 2.7 -> 0.8 ms."""
    n = len(keys)
    if not n or cosines.dtype != np.float32 or keys.min() < 0 or keys.max() >= 1 << 32:
        order = np.lexsort((keys, -cosines))
        return order[:limit] if limit >= 0 else order
    bits = (cosines + np.float32(0.0)).view(np.uint32)  # -0.0 as 0.0
    # Ascending order of the float is ascending order of these (negative floats: every bit flipped).
    rising = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
    sort_keys = (~rising).astype(np.uint64) << np.uint64(32) | keys.astype(np.uint64)
    if 0 <= limit < n:
        top = np.argpartition(sort_keys, limit - 1)[:limit] if limit else np.zeros(0, dtype=np.intp)
        return top[np.argsort(sort_keys[top])]
    return np.argsort(sort_keys)


def _in_window(angle: np.ndarray, assign: np.ndarray, window: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Which rows (their angles to their centroids and their lists) lie inside their list's angle window
    (:meth:`VectorIndex._angle_window`), or have no angle yet (NaN compares false: never ruled out)."""
    lo, hi = window
    return ~((angle < np.take(lo, assign)) | (angle > np.take(hi, assign)))


def _in_file_order(
    source: int, floats: _Floats, slot_at: np.ndarray, stop: threading.Event | None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The side file read front to back through ``source``, 64 MB at a time (``slot_at``: each file row's
    slot, -1 where none holds it): per read, the slots it holds, where they lie in it, and the rows read
    (one buffer, reused by the next read). Raises ``_Abandoned`` when ``stop`` is set, checked before each
    read: a shutdown does not wait for a whole pass over the file."""
    held = len(slot_at)
    chunk = max(1, (64 << 20) // floats.row_bytes)
    rows = np.empty((chunk, floats.dim), dtype=np.float32)
    for start in range(0, held, chunk):
        if stop is not None and stop.is_set():
            raise _Abandoned
        end = min(held, start + chunk)
        got = rows[: end - start]
        _read_full(source, [got.data.cast("B")], start, floats.row_bytes, floats.path)
        mine = np.flatnonzero(slot_at[start:end] >= 0)
        yield slot_at[start:end][mine], mine, got


def _read_rows(floats: _Floats, places: np.ndarray) -> np.ndarray:
    """The side file's rows at ``places`` (any order), in that order."""
    order = np.argsort(places, kind="stable")
    out = np.empty((len(places), floats.dim), dtype=np.float32)
    out[order] = floats.gather(places[order])
    return out


def _gather(parts: list[np.ndarray], slots: np.ndarray, width: int) -> np.ndarray:
    """Rows ``slots`` (sorted ascending) of blocks ``parts`` (each (BLOCK, width)), in that order."""
    out = np.empty((len(slots), width), dtype=np.uint8)
    cuts = np.searchsorted(slots, np.arange(len(parts) + 1) * BLOCK)
    for b in range(len(parts)):
        lo, hi = int(cuts[b]), int(cuts[b + 1])
        if hi > lo:
            np.take(parts[b], slots[lo:hi] - b * BLOCK, axis=0, out=out[lo:hi])
    return out


def _map_file(path: Path, populate: bool = False) -> mmap.mmap:
    """``path`` mapped read-only (the mapping outlives the descriptor and the file's name: a snapshot
    deleted after a newer one is written stays readable until its blocks are let go)."""
    with open(path, "rb") as f:
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        return mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)


def _block_views(mm: mmap.mmap, offset: int, dim: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """A full block's heads and tails (uint8 offset codes) where they lie in a mapped snapshot (read-only)."""
    heads = np.frombuffer(mm, dtype=np.uint8, count=BLOCK * head, offset=offset).reshape(BLOCK, head)
    tail = dim - head
    if not tail:
        return heads, np.zeros((BLOCK, 0), dtype=np.uint8)
    at = offset + BLOCK * head
    tails = np.frombuffer(mm, dtype=np.uint8, count=BLOCK * tail, offset=at).reshape(BLOCK, tail)
    return heads, tails


def snapshot_files(folder: Path, name: str) -> list[Path]:
    """Every file (complete or not) belonging to ``name``'s snapshots."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.startswith(f"{name}.")]
