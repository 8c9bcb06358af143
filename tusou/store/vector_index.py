"""An in-memory exact index of one group's vectors: the search cache derived from the durable store.

Rows live in one growable float32 matrix so a query is a single matrix product; deleting swaps the last
row into the hole so the matrix stays dense.
"""

from __future__ import annotations

import threading

import numpy as np


class VectorIndex:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._keys = np.zeros(0, dtype=np.int64)
        self._row_of: dict[int, int] = {}
        self._n = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._n

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(keys), self.dim)
        with self._lock:
            need = self._n + len(keys)
            if need > len(self._vectors):
                # Doubling keeps appends amortised O(1) per row.
                cap = max(need, 2 * len(self._vectors), 64)
                grown = np.zeros((cap, self.dim), dtype=np.float32)
                grown[: self._n] = self._vectors[: self._n]
                grown_keys = np.zeros(cap, dtype=np.int64)
                grown_keys[: self._n] = self._keys[: self._n]
                self._vectors, self._keys = grown, grown_keys
            self._vectors[self._n : need] = vectors
            self._keys[self._n : need] = keys
            for offset, key in enumerate(keys.tolist()):
                self._row_of[key] = self._n + offset
            self._n = need

    def remove(self, keys: list[int]) -> None:
        with self._lock:
            for key in keys:
                row = self._row_of.pop(key, None)
                if row is None:
                    continue
                last = self._n - 1
                if row != last:
                    moved = int(self._keys[last])
                    self._vectors[row] = self._vectors[last]
                    self._keys[row] = moved
                    self._row_of[moved] = row
                self._n = last

    def get(self, key: int) -> np.ndarray | None:
        with self._lock:
            row = self._row_of.get(key)
            return None if row is None else self._vectors[row].copy()

    def search(self, queries: np.ndarray, limit: int, min_cosine: float) -> tuple[np.ndarray, np.ndarray]:
        """Keys and cosines of the best ``limit`` rows (all when limit < 0) at or above ``min_cosine``."""
        queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            if self._n == 0:
                return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
            sims = self._vectors[: self._n] @ queries.T
            keys = self._keys[: self._n].copy()
        best = sims.max(axis=1) if sims.shape[1] > 1 else sims[:, 0]
        passing = np.flatnonzero(best >= min_cosine)
        if limit >= 0 and len(passing) > limit:
            top = np.argpartition(-best[passing], limit - 1)[:limit]
            passing = passing[top]
        order = np.argsort(-best[passing], kind="stable")
        chosen = passing[order]
        return keys[chosen], best[chosen]
