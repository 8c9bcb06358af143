"""Moving a group from the embedded store to another store keeps ids, metadata, vectors and order."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tusou.store.base import NewImage
from tusou.store.migrate import migrate
from tusou.store.sqlite import SQLiteStore


def test_migrate_group_between_stores(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1203, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    src = SQLiteStore(tmp_path / "src.db", model_id="m", dim=16)
    dst = SQLiteStore(tmp_path / "dst.db", model_id="m", dim=16)
    images = [
        NewImage(f"i{i}", f"l{i}", {"n": i} if i % 2 else None, "http://x/" + str(i) if i % 3 else None, v)
        for i, v in enumerate(vectors)
    ]
    src.create_group("t", "g", images)
    src.create_group("t", "other", images[:1])
    src.delete_images("t", "g", ["i5"])
    dst.create_group("t", "g", images[:2])  # a previous, interrupted run

    calls: list[tuple[int, int]] = []
    result = migrate(src, dst, "t", "g", lambda done, total: calls.append((done, total)), batch=500)
    assert (result.copied, result.skipped) == (1200, 2)
    assert calls[-1] == (1202, 1202) and len(calls) == 3
    assert dst.count("t", "g") == 1202 and dst.list_groups("t") == ["g"]
    listed, _ = dst.list_images("t", "g", "", 1000)
    assert [i.id for i in listed[:6]] == ["i0", "i1", "i2", "i3", "i4", "i6"]
    for i in (1, 3, 4, 1202):
        got, want = dst.get_image("t", "g", f"i{i}"), src.get_image("t", "g", f"i{i}")
        assert got == want
        assert np.array_equal(dst.get_vector("t", "g", f"i{i}"), vectors[i])
    hits = dst.search("t", ["g"], vectors[7][None], 1, 0.99)
    assert [h.id for h in hits] == ["i7"]
    # Repeating is harmless.
    assert migrate(src, dst, "t", "g").copied == 0
    src.close()
    dst.close()
