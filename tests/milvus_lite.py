"""Milvus Lite (a local file) as a test double of :class:`tusou.store.milvus.MilvusStore`.

Lite runs the same client API in-process, so the store contract runs without a server, but it differs
where the production class relies on the server: ``query(limit=)`` answers in insertion order rather than
with the smallest primary keys, and a range search is "top-k, then filter", so a band below the first
comes back short. This subclass covers exactly those two places; it is never served from.
"""

from __future__ import annotations

import numpy as np

import tusou.store.milvus as milvus
from tusou.store.milvus import MilvusStore


class LiteMilvusStore(MilvusStore):
    @classmethod
    def _check_uri(cls, uri: str) -> None:
        if uri.startswith(cls.SERVER_SCHEMES):
            raise ValueError("LiteMilvusStore is for Milvus Lite files only")

    def _query_all(self, flt: str, fields: list[str]) -> list[dict]:
        """Every matching row (Lite has no result window to respect)."""
        return list(self.client.query(self.images, filter=flt, output_fields=fields))

    def _page_rows(self, flt: str, limit: int) -> list[dict]:
        # Lite answers query(limit=) in insertion order: pick the page from every later key.
        seqs = sorted(r["seq"] for r in self._query_all(flt, ["seq"]))[:limit]
        return self._query(self.images, milvus._in("seq", seqs), self._fields) if seqs else []

    def _search_view(
        self, view: np.ndarray, flt: str, limit: int, min_cosine: float
    ) -> list[tuple[float, dict]]:
        # The first band is a real range search; when more would be needed, score every row instead.
        want = milvus.TOPK_CAP if limit < 0 or limit > milvus.TOPK_CAP else max(limit, 1)
        if min_cosine >= 1.0 + 1e-3:
            return []
        hits = self._range_search(view, flt, want, min_cosine, 1.0 + 1e-3)
        if len(hits) < want or 0 <= limit <= len(hits) or min((c for c, _ in hits), default=0) < min_cosine:
            found = sorted(
                ((c, e) for c, e in hits if c >= min_cosine), key=lambda item: (-item[0], item[1]["seq"])
            )
            return found if limit < 0 else found[:limit]
        rows = self._query_all(flt, [*self._fields, "vec"])
        if not rows:
            return []
        cosines = np.asarray([r["vec"] for r in rows], dtype=np.float32) @ view
        found = sorted(
            ((float(c), r) for c, r in zip(cosines, rows, strict=True) if c >= min_cosine),
            key=lambda item: (-item[0], item[1]["seq"]),
        )
        return found if limit < 0 else found[:limit]
