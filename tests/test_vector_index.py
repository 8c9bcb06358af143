"""The per-group index: graph recall against the exact scan, deletes, snapshots and their failure modes."""

from __future__ import annotations

import resource
from pathlib import Path

import numpy as np
import pytest

import tusou.store.vector_index as vi
from tusou.store.vector_index import SNAPSHOT_FORMAT, VectorIndex, quantize, snapshot_files

DIM = 96


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Photo-like: rows around a few hundred centres, not uniform noise (where neighbours are meaningless)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((200, DIM)))
    return unit(centres[rng.integers(0, 200, n)] + 0.4 * unit(rng.standard_normal((n, DIM))))


class Table:
    """A stand-in for SQLite: exact float32 rows by key, the index's ``fetch``."""

    def __init__(self) -> None:
        self.rows: dict[int, np.ndarray] = {}

    def fetch(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present = [int(k) for k in keys if int(k) in self.rows]
        rows = np.stack([self.rows[k] for k in present]) if present else np.zeros((0, DIM), np.float32)
        return np.asarray(present, dtype=np.int64), rows

    def brute(self, queries: np.ndarray, min_cosine: float) -> dict[int, float]:
        keys = np.asarray(sorted(self.rows))
        sims = (np.stack([self.rows[k] for k in keys]) @ queries.T).max(axis=1)
        return {int(k): float(c) for k, c in zip(keys, sims, strict=True) if c >= min_cosine}


def filled(n: int, seed: int = 0) -> tuple[VectorIndex, Table, np.ndarray]:
    table = Table()
    index = VectorIndex(DIM, table.fetch)
    vectors = clustered(n, seed)
    keys = np.arange(1, n + 1)
    for k, v in zip(keys.tolist(), vectors, strict=True):
        table.rows[k] = v
    for start in range(0, n, 500):  # incremental, as the write path adds
        index.add(keys[start : start + 500], vectors[start : start + 500])
    return index, table, vectors


def test_quantize_keeps_cosines_close() -> None:
    v = clustered(500)
    q = quantize(v).astype(np.float32)
    approx = unit(q) @ unit(q[:5]).T
    assert np.abs(approx - v @ v[:5].T).max() < 0.01


def test_graph_recall_against_exact_scan() -> None:
    index, _, vectors = filled(4000)
    index.exact_below = 0  # use the graph although the group is small
    rng = np.random.default_rng(1)
    queries = unit(vectors[rng.integers(0, 4000, 50)] + 0.3 * unit(rng.standard_normal((50, DIM))))
    hits = 0
    for q in queries:
        exact, _ = index.search(q[None], 10, -1.0, exact=True)
        approx, cos = index.search(q[None], 10, -1.0, exact=False)
        assert np.all(np.diff(cos) <= 0)
        hits += len(set(exact.tolist()) & set(approx.tolist()))
    assert hits / 500 >= 0.97


def test_every_match_above_threshold_for_large_limits() -> None:
    index, table, vectors = filled(3000)
    queries = np.stack([vectors[7], vectors[7][::-1].copy()])  # two views
    for threshold in (0.3, 0.6):
        truth = table.brute(queries, threshold)
        for limit in (-1, 10_000):
            keys, cos = index.search(queries, limit, threshold)
            assert dict(zip(keys.tolist(), cos.tolist(), strict=True)) == pytest.approx(truth)
            assert np.all(np.diff(cos) <= 0)
    # A limit cuts the same ranking: the best ``limit`` of the full answer.
    everything = index.search(queries, -1, 0.0)[0]
    assert index.search(queries, 50, 0.0)[0].tolist() == everything[:50].tolist()


def test_dense_neighbourhoods_get_every_match_even_on_the_graph_path(embedder, photos) -> None:
    """Where many rows pass the threshold the graph skips some; a limit > 1 must still see all of them.

    Rows as bench/scale.py makes them: real photo embeddings mixed pairwise plus noise. On this data the
    graph alone missed ~15% of the matches at limit=100.
    """
    base = embedder.embed_images(photos)
    rng = np.random.default_rng(0)
    n = 6000
    mix = rng.uniform(0, 0.7, (n, 1)).astype(np.float32)
    noise = rng.standard_normal((n, base.shape[1])).astype(np.float32)
    noise *= rng.uniform(0.3, 0.8, (n, 1)).astype(np.float32) / np.linalg.norm(noise, axis=1, keepdims=True)
    vectors = unit(base[rng.integers(0, len(base), n)] + mix * base[rng.integers(0, len(base), n)] + noise)
    table = Table()
    index = VectorIndex(base.shape[1], table.fetch)
    index.exact_below = 0  # the graph path, as for a large group
    keys = np.arange(1, n + 1)
    table.rows.update(zip(keys.tolist(), vectors, strict=True))
    for start in range(0, n, 500):
        index.add(keys[start : start + 500], vectors[start : start + 500])
    floor = embedder.cosine_for_score(embedder.default_threshold)
    for query in embedder.embed_queries(photos):
        truth = table.brute(query, floor)
        # Small limits too: the scan's floor is raised to the lists' limit-th best less twice the margin.
        for limit in (2, 10, 100):
            best = dict(sorted(truth.items(), key=lambda kv: -kv[1])[:limit])
            found, cos = index.search(query, limit, floor)
            assert dict(zip(found.tolist(), cos.tolist(), strict=True)) == pytest.approx(best)


def test_deleted_rows_never_come_back(tmp_path: Path) -> None:
    index, table, vectors = filled(2000)
    gone = list(range(1, 2001, 3))
    assert index.remove(gone) == len(gone)
    assert index.remove(gone) == 0  # twice is a no-op
    assert len(index) == 2000 - len(gone)
    index.save(tmp_path, "g1")
    loaded = VectorIndex.load(tmp_path, "g1", DIM, table.fetch)
    assert loaded is not None and len(loaded) == len(index)
    for candidate in (index, loaded):
        for exact in (True, False):
            for k in gone[:40]:
                keys, _ = candidate.search(vectors[k - 1][None], 20, -1.0, exact=exact)
                assert not set(keys.tolist()) & set(gone)
    # Re-adding a deleted key is a new row, not a resurrection of the old one.
    table.rows[gone[0]] = vectors[1]
    index.add(np.asarray([gone[0]]), vectors[1][None])
    assert index.search(vectors[1][None], 2, 0.99)[0].tolist() == [gone[0], 2]  # equal cosines: seq order


def test_snapshot_is_written_beside_the_old_one_and_replaced(tmp_path: Path) -> None:
    index, table, vectors = filled(500)
    assert index.save(tmp_path, "g3") == 500
    assert index.save(tmp_path, "g3") is None  # nothing changed
    index.add(np.asarray([501]), vectors[:1])
    # A snapshot interrupted midway leaves only a temp file; the previous one still loads.
    (tmp_path / "g3.501.ivf.tmp").write_bytes(b"partial")
    (tmp_path / "g3.502.1.ivf").write_bytes(b"no metadata: never renamed into place")
    loaded = VectorIndex.load(tmp_path, "g3", DIM, table.fetch)
    assert loaded is not None and loaded.last_seq == 500 and len(loaded) == 500
    assert index.save(tmp_path, "g3") == 501
    names = sorted(p.name for p in snapshot_files(tmp_path, "g3"))
    assert [n.rsplit(".", 1)[1] for n in names] == ["ivf", "json"]
    assert all(n.startswith("g3.501.") for n in names)
    # Deletes alone keep the seq: the next snapshot gets a new generation beside the old, never the old
    # file's name (replacing it in place left no valid snapshot until the new JSON landed).
    index.remove([7])
    assert index.save(tmp_path, "g3") == 501
    newer = sorted(p.name for p in snapshot_files(tmp_path, "g3"))
    assert len(newer) == 2 and newer != names
    reloaded = VectorIndex.load(tmp_path, "g3", DIM, table.fetch)
    assert reloaded is not None and len(reloaded) == 500 and 7 not in reloaded.keys().tolist()


def test_blocks_read_from_a_snapshot_file_outlive_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full blocks of a loaded snapshot are its file's pages (memory-mapped, never copied); after the next
    snapshot they are the new file's, and the old file, deleted, is no longer needed: adds past them, deletes
    and a compaction still answer exactly, before and after a reload."""
    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "BLOCK", 256)
    index, table, vectors = filled(1000)
    index.save(tmp_path, "g4")
    loaded = VectorIndex.load(tmp_path, "g4", DIM, table.fetch)
    assert loaded is not None
    assert [b.flags.writeable for b in loaded._heads + loaded._tails] == [
        False,
        False,
        False,
        True,
    ] * 2  # 3 full, 1 partial

    def answers(ix: VectorIndex) -> list[list[int]]:
        return [ix.search(v[None], -1, 0.8, exact=True)[0].tolist() for v in vectors[:40:4]]

    want = answers(index)
    assert answers(loaded) == want
    more = clustered(300, seed=5)
    for k, v in zip(range(1001, 1301), more, strict=True):
        table.rows[k] = v
    for ix in (index, loaded):
        ix.add(np.arange(1001, 1301), more)  # fills the partial block, starts new ones
        ix.remove(np.arange(2, 200, 3))
    for k in range(2, 200, 3):
        del table.rows[k]
    want = answers(index)
    assert answers(loaded) == want
    first = set(snapshot_files(tmp_path, "g4"))
    loaded.save(tmp_path, "g4")
    assert not (first & set(snapshot_files(tmp_path, "g4")))  # the old snapshot is gone
    assert all(
        not b.flags.writeable for b in loaded._heads[:5] + loaded._tails[:5]
    )  # now the new file's pages
    assert answers(loaded) == want
    loaded.add(np.asarray([1301]), vectors[:1])
    index.add(np.asarray([1301]), vectors[:1])
    table.rows[1301] = vectors[0]
    loaded.remove(np.arange(300, 1000))  # more than half deleted: compacted into fresh blocks
    index.remove(np.arange(300, 1000))
    for k in range(300, 1000):
        table.rows.pop(k, None)
    assert loaded._layout == 1  # compacted
    want = answers(index)
    assert answers(loaded) == want
    loaded.save(tmp_path, "g4")
    again = VectorIndex.load(tmp_path, "g4", DIM, table.fetch)
    assert again is not None and answers(again) == want and len(again) == len(index)
    brute = table.brute(vectors[:1], 0.8)
    assert sorted(again.search(vectors[:1], -1, 0.8)[0].tolist()) == sorted(brute)


def test_a_snapshot_of_the_previous_format_is_read_and_rewritten(tmp_path: Path) -> None:
    """Format 3 (whole rows per block, no tail norms) loads with the same answers; the next snapshot is
    written in the current format."""
    import json
    import zlib

    index, table, vectors = filled(900)
    index.remove([5, 6])
    n = index._n
    body = (
        b"TUSOU-IVF-3\n"
        + json.dumps({"dim": DIM, "count": len(index), "slots": n, "nlist": 0, "trained": 0}).encode()
        + b"\n"
    )
    body += index._keys[:n].tobytes() + index._inv[:n].tobytes() + index._assign[:n].tobytes()
    body += index._gather_codes(np.arange(n)).tobytes()
    (tmp_path / "g5.900.1.ivf").write_bytes(body)
    meta = {"format": 3, "dim": DIM, "seq": 900, "count": len(index), "floats": 0}
    meta |= {"size": len(body), "crc32": zlib.crc32(body)}
    (tmp_path / "g5.900.1.json").write_text(json.dumps(meta))
    old = VectorIndex.load(tmp_path, "g5", DIM, table.fetch)
    assert old is not None and len(old) == 898 and old.dirty
    for exact in (True, False):
        for v in vectors[:30:3]:
            assert (
                old.search(v[None], 50, 0.5, exact=exact)[0].tolist()
                == index.search(v[None], 50, 0.5, exact=exact)[0].tolist()
            )
    assert old.save(tmp_path, "g5") == 900
    assert json.loads(next(tmp_path.glob("g5.900.*.json")).read_text())["format"] == SNAPSHOT_FORMAT
    new = VectorIndex.load(tmp_path, "g5", DIM, table.fetch)
    assert new is not None and not new.dirty
    assert np.array_equal(new._tail_norm[:n], index._tail_norm[:n])
    assert new.search(vectors[:1], -1, 0.5)[0].tolist() == index.search(vectors[:1], -1, 0.5)[0].tolist()


def side_filled(folder: Path, n: int, seed: int = 0) -> tuple[VectorIndex, Table, np.ndarray]:
    """An index with its float32 side file in ``folder`` (as the SQLite store makes them), trained."""
    table = Table()
    index = VectorIndex(DIM, table.fetch, folder, "g7")
    vectors = clustered(n, seed)
    keys = np.arange(1, n + 1)
    table.rows.update(zip(keys.tolist(), vectors, strict=True))
    for start in range(0, n, 500):
        index.add(keys[start : start + 500], vectors[start : start + 500])
    return index, table, vectors


def test_the_side_file_in_list_order_answers_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``relayout`` rewrites the side file with each list's rows together: the answers (keys, float32
    cosines) are the same before and after, through adds, deletes, a compaction, snapshots and reloads; the
    old side file goes once a snapshot names the new one."""
    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "TRAIN_AT", 1000)
    monkeypatch.setattr(vi, "RELAYOUT_MIN", 500)
    monkeypatch.setattr(vi, "BLOCK", 256)  # several blocks, and a compaction below
    index, table, vectors = side_filled(tmp_path, 3000)
    index.exact_below = 0
    assert index._centroids is not None and index.relayout_due()

    def answers(ix: VectorIndex) -> list:
        out = []
        for v in vectors[:60:6]:
            for limit, exact in ((-1, None), (10, False), (50, None)):
                keys, cos = ix.search(v[None], limit, 0.7, exact=exact)
                out.append((keys.tolist(), cos.tolist()))
        return out

    want = answers(index)
    index.save(tmp_path, "g7")
    first = index._floats.path if index._floats else None
    assert index.relayout() and not index.relayout_due()
    # Each list's rows are consecutive in the new file, lists one after another.
    upto = index._flisted
    assert upto == 3000 and index._fpos[np.argsort(index._assign[:upto], kind="stable")].tolist() == list(
        range(upto)
    )
    assert index._floats is not None and first is not None and index._floats.path != first
    rows = vi._read_rows(index._floats, index._fpos[:upto])
    assert np.array_equal(rows, np.stack([table.rows[int(k)] for k in index._keys[:upto]]))
    assert answers(index) == want
    assert first.exists()  # the last snapshot still names it
    index.save(tmp_path, "g7")
    assert not first.exists() and len(list(tmp_path.glob("g7.*.f32"))) == 1
    loaded = VectorIndex.load(tmp_path, "g7", DIM, table.fetch)
    assert loaded is not None
    loaded.exact_below = 0
    assert answers(loaded) == want
    more = clustered(400, seed=9)
    for ix in (index, loaded):
        ix.add(np.arange(3001, 3401), more)  # appended behind the listed rows
        ix.remove(np.arange(2, 400, 5))
    table.rows.update(zip(range(3001, 3401), more, strict=True))
    for k in range(2, 400, 5):
        del table.rows[k]
    want = answers(index)
    assert answers(loaded) == want
    brute = table.brute(vectors[:1], 0.7)
    keys, cos = loaded.search(vectors[:1], -1, 0.7)
    assert dict(zip(keys.tolist(), cos.tolist(), strict=True)) == pytest.approx(brute)
    loaded.remove(np.arange(400, 2800))  # more than half deleted: compacted, the side file by slot again
    for k in range(400, 2800):
        table.rows.pop(k, None)
    assert loaded._layout == 1 and loaded._flisted == 0
    keys, cos = loaded.search(vectors[2900][None], -1, 0.7)
    assert dict(zip(keys.tolist(), cos.tolist(), strict=True)) == pytest.approx(
        table.brute(vectors[2900][None], 0.7)
    )
    loaded.save(tmp_path, "g7")
    again = VectorIndex.load(tmp_path, "g7", DIM, table.fetch)
    assert again is not None
    assert again.search(vectors[2900][None], -1, 0.7)[0].tolist() == keys.tolist()


def test_a_snapshot_of_format_4_opens_with_its_side_file_by_slot(tmp_path: Path) -> None:
    """Format 4 (the side file's rows by slot, no positions) loads with the same answers and is rewritten
    in the current format by the next snapshot."""
    import json
    import zlib

    import tusou.store.vector_index as vi

    index, table, vectors = side_filled(tmp_path, 1200)
    index.remove([3, 4])
    index.save(tmp_path, "g7")
    meta_path = next(tmp_path.glob("g7.*.json"))
    meta = json.loads(meta_path.read_text())
    data = meta_path.with_suffix(".ivf")
    body = data.read_bytes()
    end = body.index(b"\n", len(vi._MAGIC))
    header = json.loads(body[len(vi._MAGIC) : end])
    n = header.pop("slots")
    header = {**header, "slots": n}
    del header["float_rows"], header["float_listed"]
    at = end + 1 + n * (8 + 4 + 2 + 4)  # keys, inverse norms, lists, tail norms; then positions, angles
    old = vi._MAGIC_4 + json.dumps(header).encode() + b"\n" + body[end + 1 : at] + body[at + 12 * n :]
    data.write_bytes(old)
    meta |= {"format": 4, "size": len(old), "crc32": zlib.crc32(old)}
    meta_path.write_text(json.dumps(meta))
    loaded = VectorIndex.load(tmp_path, "g7", DIM, table.fetch)
    assert loaded is not None and len(loaded) == 1198 and not loaded.dirty
    for v in vectors[:40:4]:
        keys, cos = loaded.search(v[None], -1, 0.6)
        assert dict(zip(keys.tolist(), cos.tolist(), strict=True)) == pytest.approx(table.brute(v[None], 0.6))
        assert keys.tolist() == index.search(v[None], -1, 0.6)[0].tolist()
    loaded.add(np.asarray([1201]), vectors[:1])
    table.rows[1201] = vectors[0]
    loaded.save(tmp_path, "g7")
    assert json.loads(next(tmp_path.glob("g7.*.json")).read_text())["format"] == SNAPSHOT_FORMAT
    again = VectorIndex.load(tmp_path, "g7", DIM, table.fetch)
    assert again is not None and 1201 in again.search(vectors[:1], 5, 0.6)[0].tolist()


def test_the_head_bound_rules_rows_out_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan's head bound (Cauchy-Schwarz on the tail) never drops a row the whole-row scan keeps, at
    any threshold; with the bound off (every block scored whole) the answers are the same."""
    import tusou.store.vector_index as vi

    # PCA-like rows (variance decaying along the dimensions), where the bound rules most rows out.
    decay = np.exp(-np.arange(DIM) / 24.0).astype(np.float32)
    table = Table()
    index = VectorIndex(DIM, table.fetch)
    vectors = unit(clustered(3000, seed=3) * decay)
    for k, v in enumerate(vectors, start=1):
        table.rows[k] = v
    index.add(np.arange(1, 3001), vectors)
    index.exact_below = 0
    queries = unit(vectors[:12] + 0.3 * unit(np.random.default_rng(4).standard_normal((12, DIM)) * decay))
    query = vi._Query(queries[:1], index.head)
    bound = query.bounds(index._scorer, index._heads[0][:3000], index._tail_norm[:3000], index._inv[:3000])
    assert np.mean(bound < 0.8 - vi.SCREEN_MARGIN) > 0.5  # the pruned path is the one under test
    for threshold in (0.2, 0.5, 0.8):
        got = [index.search(q[None], -1, threshold, exact=True)[0].tolist() for q in queries]
        monkeypatch.setattr(vi, "BOUND_GIVE_UP", -1.0)
        want = [index.search(q[None], -1, threshold, exact=True)[0].tolist() for q in queries]
        monkeypatch.undo()
        assert got == want
        brute = [sorted(table.brute(q[None], threshold)) for q in queries]
        assert [sorted(g) for g in got] == brute
    # The probe's search for the best few scores only rows whose bound reaches the count-th best cosine
    # found: the same best rows as scoring every row whose bound passes the floor.
    slots = np.arange(3000)
    for q in queries:
        query = vi._Query(q[None], index.head)
        for count in (1, 8, 32):
            for floor in (0.2, 0.6):
                pruned = index._best_above(query, slots, floor, count)
                full = index._cosines_above(query, slots, floor)
                assert np.count_nonzero(np.isfinite(pruned)) < len(slots)  # some rows were never scored
                top = np.argsort(-full, kind="stable")[:count]
                top = top[full[top] >= floor]
                assert np.array_equal(pruned[top], full[top])
                assert np.sort(pruned)[::-1][: len(top)].tolist() == full[top].tolist()


@pytest.mark.parametrize("damage", ["flip", "truncate", "json"])
def test_damaged_snapshot_is_refused(tmp_path: Path, damage: str) -> None:
    index, table, _ = filled(800)
    index.save(tmp_path, "g2")
    (data,) = tmp_path.glob("g2.800.*.ivf")
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(bytes(raw[: len(raw) // 3]))
    else:
        data.with_suffix(".json").write_text("{not json")
    assert VectorIndex.load(tmp_path, "g2", DIM, table.fetch) is None
    assert VectorIndex.load(tmp_path, "g2", DIM + 1, table.fetch) is None


@pytest.mark.slow
def test_graph_recall_at_1280d_50k() -> None:
    global DIM
    saved, DIM = DIM, 1280
    try:
        index, _, vectors = filled(50_000)
        index.exact_below = 0
        rng = np.random.default_rng(2)
        queries = unit(vectors[rng.integers(0, 50_000, 100)] + 0.3 * unit(rng.standard_normal((100, DIM))))
        hits = sum(
            len(
                set(index.search(q[None], 10, -1.0, exact=True)[0].tolist())
                & set(index.search(q[None], 10, -1.0, exact=False)[0].tolist())
            )
            for q in queries
        )
        assert hits / 1000 >= 0.99
    finally:
        DIM = saved


def test_exact_scan_is_exact_when_many_rows_sit_just_under_the_threshold() -> None:
    """3000 rows just below the threshold in float, one just above: int8 rounding ranks it ~100th, so a
    scan cut by int8 rank alone returned nothing for limit 1 (found in review)."""
    rng = np.random.default_rng(0)
    dim, threshold = 1280, 0.80
    query = unit(rng.standard_normal((1, dim)))[0]

    def at_cosine(c: float) -> np.ndarray:
        r = rng.standard_normal(dim)
        r -= (r @ query) * query
        return (c * query + np.sqrt(1 - c * c) * r / np.linalg.norm(r)).astype(np.float32)

    cosines = np.r_[rng.uniform(threshold - 0.0015, threshold - 0.0001, 3000), [threshold + 0.0002]]
    vectors = unit(np.stack([at_cosine(c) for c in cosines]))
    table = Table()
    index = VectorIndex(dim, table.fetch)
    keys = np.arange(1, len(vectors) + 1)
    table.rows.update(zip(keys.tolist(), vectors, strict=True))
    index.add(keys, vectors)
    for limit in (1, 5, 10, -1):
        found, _ = index.search(query[None], limit, threshold)
        assert found.tolist() == [len(vectors)], limit


def test_adds_are_not_starved_by_a_stream_of_searches() -> None:
    """Liveness, not speed: with searches running back to back, an add still gets the write lock."""
    import threading

    index, _, vectors = filled(2000)
    stop = threading.Event()

    def search_forever() -> None:
        while not stop.is_set():
            index.search(vectors[:1], 10, 0.0)

    threads = [threading.Thread(target=search_forever) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        added = threading.Thread(target=index.add, args=(np.asarray([10_001]), vectors[:1]))
        added.start()
        added.join(timeout=30)
        assert not added.is_alive()
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_side_file_reads_return_the_rows_asked_for(tmp_path: Path) -> None:
    """Rows read in runs, runs close together in one call (the rows between skipped), more runs than one
    call takes: each row asked for comes back, in order."""
    import tusou.store.vector_index as vi

    rows = np.random.default_rng(2).standard_normal((6000, DIM)).astype(np.float32)
    floats = vi._Floats(tmp_path / "g9.1.f32", DIM)
    floats.write(0, rows)
    rng = np.random.default_rng(3)
    for want in (
        np.arange(6000),
        np.sort(rng.choice(6000, 4000, replace=False)),  # gaps of a few rows: shared calls
        np.arange(0, 6000, vi.READ_GAP + 2),  # every gap just over: one call per row
        np.arange(0, 6000, 2),  # 3000 runs in shared calls: more than one call's buffers
        np.asarray([5999]),
    ):
        assert np.array_equal(floats.gather(want), rows[want])
    floats.close()


def test_no_match_from_the_lists_is_checked_by_the_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A match may sit in a list the query is far from (a lone photo among another item's crowd: on the
    dense 500k bench catalogue 7 of 120 JPEG queries with a match got none from the lists). When the lists
    find fewer matches than the limit, the answer is the scan's: "that is all" only when it is."""
    index, table, vectors = filled(4000)
    index.exact_below = 0  # the lists' path, as for a large group
    missed = []

    def lists_find_nothing(*args: object) -> tuple[np.ndarray, np.ndarray]:
        missed.append(1)
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)

    probe = index._probe

    def lists_find_one(*args: object) -> tuple[np.ndarray, np.ndarray]:
        missed.append(1)
        slots, cos = probe(*args)  # type: ignore[arg-type]
        best = np.argsort(-cos)[:1]
        return slots[best], cos[best]

    for v in vectors[:20:4]:  # the lists give one of the matches: a limit above 1 gets the scan's answer
        truth = table.brute(v[None], 0.6)
        want = dict(sorted(truth.items(), key=lambda kv: -kv[1])[:5])
        monkeypatch.setattr(index, "_probe", lists_find_one)
        keys, cos = index.search(v[None], 5, 0.6)
        assert len(want) > 1 and dict(zip(keys.tolist(), cos.tolist(), strict=True)) == pytest.approx(want)
    missed.clear()
    monkeypatch.setattr(index, "_probe", lists_find_nothing)
    for v in vectors[:20:4]:
        for threshold in (0.6, 0.99, 1.01):
            truth = table.brute(v[None], threshold)
            for limit in (1, 5):
                want = dict(sorted(truth.items(), key=lambda kv: -kv[1])[:limit])
                keys, cos = index.search(v[None], limit, threshold)
                assert dict(zip(keys.tolist(), cos.tolist(), strict=True)) == pytest.approx(want)
    assert len(missed) == 30  # every search asked the lists first


def old_format(folder: Path, name: str, n: int, version: int) -> None:
    """Rewrite ``name``'s snapshot in ``folder`` as format 5 (no angles) or 6 (residual norms |x - c| in
    their place, here zeros: never to be used as angles), as those releases wrote them."""
    import json
    import zlib

    import tusou.store.vector_index as vi

    (meta_path,) = folder.glob(f"{name}.*.json")
    meta = json.loads(meta_path.read_text())
    data = meta_path.with_suffix(".ivf")
    body = data.read_bytes()
    end = body.index(b"\n", len(vi._MAGIC))
    header = json.loads(body[len(vi._MAGIC) : end])
    del header["xmax"]
    at = end + 1 + n * (8 + 4 + 2 + 4 + 8)  # keys, inverse norms, lists, tail norms, positions; the angles
    rest = body[at + 4 * n :] if version == 5 else bytes(4 * n) + body[at + 4 * n :]
    magic = vi._MAGIC_5 if version == 5 else vi._MAGIC_6
    old = magic + json.dumps(header).encode() + b"\n" + body[end + 1 : at] + rest
    data.write_bytes(old)
    meta |= {"format": version, "size": len(old), "crc32": zlib.crc32(old)}
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("version", [5, 6])
def test_the_angle_bound_keeps_a_match_far_from_its_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """The scan and the probe skip rows whose angle from their list's centroid is too far from the query's
    (q.x <= |q| |x| cos(angle(q, c) - angle(x, c))). Rows made so that the bound is tight (q in the plane
    of x and c, beyond x: q.x equals the bound) must still be found, alone in lists the query is far from:
    rows added before the lists were trained, after, after a compaction, through a snapshot of the current
    format and one of an earlier format (no angles: computed by ``fill_angles``), with one or two views."""
    import json

    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "TRAIN_AT", 1000)
    monkeypatch.setattr(vi, "BLOCK", 256)  # several blocks
    rng = np.random.default_rng(11)
    centres = unit(rng.standard_normal((40, DIM)))  # fewer centres than lists: rows near their centroids

    def clustered(n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return unit(centres[rng.integers(0, 40, n)] + 0.4 * unit(rng.standard_normal((n, DIM))))

    lone = unit(rng.standard_normal((6, DIM)))  # near no centre: far from their lists' centroids
    table = Table()
    index = VectorIndex(DIM, table.fetch, tmp_path, "g8")
    rows = clustered(3000, seed=12)
    keys = np.arange(1, 3001)
    rows[[100, 600, 1500, 1700, 2500, 2900]] = lone  # before training (at 1000 rows) and after
    table.rows.update(zip(keys.tolist(), rows, strict=True))
    for start in range(0, 3000, 250):
        index.add(keys[start : start + 250], rows[start : start + 250])
    index.exact_below = 0
    assert index._centroids is not None and not np.isnan(index._angle[: index._n]).any()
    lone_keys = [101, 601, 1501, 1701, 2501, 2901]

    def tight(ix: VectorIndex) -> list[tuple[int, np.ndarray, float]]:
        """For each lone row x (at angle phi from its list's centroid c): the queries at phi + 50 and
        phi - 50 degrees from c in the plane of c and x (50 degrees from x: the bound is q.x), and q.x less
        a hair."""
        out = []
        for key in lone_keys:
            slot = int(ix._slots_of(np.asarray([key]))[0])
            x = table.rows[key].astype(np.float64)
            c = ix._centroids[ix._assign[slot]].astype(np.float64)
            c /= np.linalg.norm(c)
            side = x - (x @ c) * c
            side /= np.linalg.norm(side)
            for turn in (50, -50):
                psi = np.arctan2(x @ side, x @ c) + np.radians(turn)
                q = (np.cos(psi) * c + np.sin(psi) * side).astype(np.float32)[None]
                out.append((key, q, float((table.rows[key] @ q.T)[0]) - 1e-5))
        return out

    def check(ix: VectorIndex, pruning: bool) -> None:
        for i, (key, q, threshold) in enumerate(tight(ix)):
            assert 0.6 < threshold < 0.7  # a real match
            other = rows[(7 * i) % 3000][None]
            for views in (q, np.vstack([other, q])):
                truth = table.brute(views, threshold)
                assert key in truth
                for limit, exact in ((1, None), (1, True), (5, None), (-1, None)):
                    want = dict(sorted(truth.items(), key=lambda kv: -kv[1])[: limit if limit > 0 else None])
                    found, cos = ix.search(views, limit, threshold, exact=exact)
                    assert dict(zip(found.tolist(), cos.tolist(), strict=True)) == pytest.approx(want)
            window = ix._angle_window(q, vi._products(q, ix._centroids), threshold)
            if pruning:  # the bound under test does rule rows out
                assert window is not None and len(ix._within(0, ix._n, window)) < 0.5 * ix._n
            elif window is not None:  # rows whose angle is unknown pass
                unknown = np.flatnonzero(np.isnan(ix._angle[: ix._n]))
                assert len(unknown) and np.isin(unknown, ix._within(0, ix._n, window)).all()

    check(index, True)
    gone = np.setdiff1d(np.arange(2, 2000, 3), lone_keys)
    index.remove(gone)  # deleted rows: skipped either way
    for k in gone.tolist():
        del table.rows[k]
    check(index, True)
    index.remove(np.setdiff1d(np.arange(1, 2700), lone_keys))  # more than half deleted: compacted
    for k in np.setdiff1d(np.arange(1, 2700), lone_keys).tolist():
        table.rows.pop(k, None)
    assert index._layout == 1
    more = clustered(800, seed=13)
    more[400] = unit(rng.standard_normal((1, DIM)))[0]
    table.rows.update(zip(range(3001, 3801), more, strict=True))
    index.add(np.arange(3001, 3801), more)  # added after the compaction
    lone_keys.append(3401)
    check(index, True)
    index.save(tmp_path, "g8")
    loaded = VectorIndex.load(tmp_path, "g8", DIM, table.fetch)
    assert loaded is not None and not loaded.angles_due()
    loaded.exact_below = 0
    n = index._n
    assert np.array_equal(loaded._angle[:n], index._angle[:n], equal_nan=True) and loaded._xmax == index._xmax
    check(loaded, True)
    # The same snapshot in an earlier format: exact without the angles, then filled in.
    old_format(tmp_path, "g8", n, version)
    old = VectorIndex.load(tmp_path, "g8", DIM, table.fetch)
    assert old is not None and old.angles_due() and not old.dirty
    old.exact_below = 0
    check(old, False)
    late = unit(rng.standard_normal((1, DIM)))  # rows with angles beside rows without
    table.rows[3801] = late[0]
    old.add(np.asarray([3801]), late)
    index.add(np.asarray([3801]), late)
    lone_keys.append(3801)
    check(old, False)
    assert old.fill_angles() and not old.angles_due() and old.dirty
    assert np.allclose(old._angle[:n], index._angle[:n], rtol=0, atol=1e-6, equal_nan=True)
    check(old, True)
    old.save(tmp_path, "g8")
    assert json.loads(next(tmp_path.glob("g8.*.json")).read_text())["format"] == SNAPSHOT_FORMAT
    again = VectorIndex.load(tmp_path, "g8", DIM, table.fetch)
    assert again is not None and not again.angles_due()
    again.exact_below = 0
    check(again, True)


def einsum_scan(table: Table, queries: np.ndarray, min_cosine: float, among: set[int] | None = None) -> tuple:
    """What an exact float32 scan of every row answers (the bench's brute force): each row's best cosine
    over the views as einsum computes it, rows at or above ``min_cosine``, best first, ties in key order."""
    keys = np.asarray(sorted(k for k in table.rows if among is None or k in among), dtype=np.int64)
    rows = np.stack([table.rows[int(k)] for k in keys])
    best = np.einsum("ij,kj->ik", rows, np.asarray(queries, dtype=np.float32)).max(axis=1)
    keep = np.flatnonzero(best >= min_cosine)
    order = keep[np.lexsort((keys[keep], -best[keep]))]
    return keys[order], best[order]


@pytest.mark.parametrize("views", [1, 4])
def test_large_answers_equal_an_exact_float_scan_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, views: int
) -> None:
    """A dense catalogue (hundreds of matches a query, read in pieces from the side file by two threads):
    keys, order and float32 cosines are those of an einsum scan of every row, bit for bit, at limits 1, 100,
    10000 and every match, for one and four query views; with the side file by slot, in list order, with
    rows added since, after deletes, a compaction, a snapshot and a reload, and among a filter's rows."""
    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "TRAIN_AT", 1000)
    monkeypatch.setattr(vi, "RELAYOUT_MIN", 500)
    monkeypatch.setattr(vi, "BLOCK", 512)
    monkeypatch.setattr(vi, "PIECE_ROWS", 37)  # many pieces, shared by two threads
    rng = np.random.default_rng(5)
    centres = unit(rng.standard_normal((6, DIM)))

    def rows(n: int) -> np.ndarray:
        return unit(centres[rng.integers(0, len(centres), n)] + 0.45 * unit(rng.standard_normal((n, DIM))))

    table = Table()
    index = VectorIndex(DIM, table.fetch, tmp_path, "g8")
    index.threads = 2
    vectors = rows(3000)
    vectors[1500:1520] = vectors[1400]  # equal cosines: seq order decides
    keys = np.arange(1, 3001)
    table.rows.update(zip(keys.tolist(), vectors, strict=True))
    for start in range(0, 3000, 500):
        index.add(keys[start : start + 500], vectors[start : start + 500])
    queries = [unit(v + 0.2 * unit(rng.standard_normal((views, DIM)))) for v in vectors[1390:1420:6]]

    def check(ix: VectorIndex) -> None:
        matches = []
        for q in queries:
            want_keys, want_cos = einsum_scan(table, q, 0.6)
            matches.append(len(want_keys))
            for limit in (1, 100, 10_000, -1):
                got_keys, got_cos = ix.search(q, limit, 0.6)
                end = len(want_keys) if limit < 0 else limit
                assert np.array_equal(got_keys, want_keys[:end]) and np.array_equal(got_cos, want_cos[:end])
            among = set(range(1, 4000, 3))
            want_keys, want_cos = einsum_scan(table, q, 0.6, among)
            for limit in (100, -1):
                got_keys, got_cos = ix.search_among(q, np.asarray(sorted(among)), limit, 0.6)
                end = len(want_keys) if limit < 0 else limit
                assert np.array_equal(got_keys, want_keys[:end]) and np.array_equal(got_cos, want_cos[:end])
        assert min(matches) > 120  # large answers: several pieces each

    check(index)  # the side file by slot
    assert index.relayout()
    check(index)  # in list order
    more = rows(600)
    index.add(np.arange(3001, 3601), more)  # appended behind the listed rows
    table.rows.update(zip(range(3001, 3601), more, strict=True))
    check(index)
    gone = np.arange(2, 3601, 7)
    index.remove(gone)
    for k in gone.tolist():
        del table.rows[k]
    check(index)
    index.save(tmp_path, "g8")
    loaded = VectorIndex.load(tmp_path, "g8", DIM, table.fetch)
    assert loaded is not None
    loaded.threads = 2
    check(loaded)
    gone = np.arange(1, 2600)
    loaded.remove(gone)  # more than half deleted: compacted, a new side file
    for k in gone.tolist():
        table.rows.pop(k, None)
    assert loaded._layout == 1
    check(loaded)


def test_side_file_scores_equal_every_row_scored_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_Floats.best``, in pieces on one or two threads, gives each row asked for the cosine that scoring
    every row of the file at once gives, bit for bit, in the order asked."""
    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "PIECE_ROWS", 100)
    rows = unit(np.random.default_rng(6).standard_normal((5000, DIM)))
    queries = unit(np.random.default_rng(7).standard_normal((4, DIM)))
    floats = vi._Floats(tmp_path / "g9.1.f32", DIM)
    floats.write(0, rows)
    every = np.einsum("ij,kj->ik", rows, queries).max(axis=1)
    rng = np.random.default_rng(8)
    for want in (
        np.arange(5000),
        np.sort(rng.choice(5000, 777, replace=False)),
        np.asarray([4999]),
        np.zeros(0, int),
    ):
        for threads in (1, 2):
            assert np.array_equal(floats.best(want, queries, threads), every[want])
            assert np.array_equal(
                floats.best(want, queries[:1], threads),
                np.einsum("ij,kj->ik", rows[want], queries[:1]).max(axis=1),
            )
    floats.close()


def test_best_first_is_the_lexsort_of_cosines_then_keys() -> None:
    """The answer's order (one sort of cosine bits and key packed in a uint64, the best ``limit`` first)
    is ``lexsort((keys, -cosines))``: best first, equal cosines (0.0 and -0.0 too) in key order, negative
    cosines below positive ones; keys outside 0..2**32-1 take lexsort itself."""
    import tusou.store.vector_index as vi

    rng = np.random.default_rng(9)
    for n in (0, 1, 7, 3000):
        cosines = rng.choice(np.float32([-0.7, -0.2, -0.0, 0.0, 1e-30, 0.3, 0.5, 0.9, 1.0]), n)
        cosines[: n // 2] = rng.uniform(-1, 1, n // 2).astype(np.float32)
        for keys in (rng.permutation(10 * n + 1)[:n], rng.permutation(n) + (1 << 32) - n // 2):
            keys = keys.astype(np.int64)
            want = np.lexsort((keys, -cosines))
            for limit in (-1, 0, 1, 5, n, n + 3):
                got = vi._best_first(keys, cosines, limit)
                assert np.array_equal(got, want if limit < 0 else want[:limit])


def test_the_best_row_beyond_the_nearest_list_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search for the single best row whose first scored rows hold a near copy of the query scores the
    other probed rows only where the angle bound lets a row reach it. A row in another list that beats
    the copy (the query on the border of two lists, the row just across) must still be the answer, and an
    exact copy of it added earlier wins the tie (seq order); likewise without a near copy. A search by a
    stored row finds that row."""
    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "TRAIN_AT", 1000)
    index, table, vectors = side_filled(tmp_path, 3000, seed=21)
    index.exact_below = 0
    centroids = index._centroids.astype(np.float64)
    closeness = centroids @ centroids.T
    np.fill_diagonal(closeness, -2)
    rng = np.random.default_rng(22)
    tried = 0
    for a in np.argsort(-closeness.max(axis=1))[:10].tolist():  # pairs of near centroids
        b = int(closeness[a].argmax())
        for near_copy in (True, False):
            q = unit((0.505 * centroids[a] + 0.495 * centroids[b])[None])
            z = unit((0.495 * centroids[a] + 0.505 * centroids[b])[None])  # across the border
            side = unit(rng.standard_normal((1, DIM)))
            y = unit(q + (0.08 if near_copy else 0.5) * unit(side - (side @ q.T) * q))  # in the near list
            if (
                int(vi._products(q, index._centroids).argmax()) != a
                or int(index._assign_rows(z)[0]) != b
                or int(index._assign_rows(y)[0]) != a
            ):
                continue
            assert (float(y[0] @ q[0]) >= vi.NEAR_COPY) == near_copy
            assert float(z[0] @ q[0]) > float(y[0] @ q[0])
            key = 10_000 + 10 * tried
            rows = np.vstack([y, z, z])  # the copy of z first (the lower seq), then z itself
            table.rows.update(zip(range(key, key + 3), rows, strict=True))
            index.add(np.asarray([key]), y)
            index._sort_lists()  # y in the nearest list; z and its copy in the unsorted tail, then in theirs
            index.add(np.arange(key + 1, key + 3), rows[1:])
            for views, in_list in ((q, False), (np.vstack([q, unit(vectors[:1] + 0.5)]), False), (q, True)):
                if in_list:  # added rows sit in an unsorted tail until the lists are sorted again
                    index._sort_lists()
                    assert int(index._slots_of(np.asarray([key + 2]))[0]) in index._list(b)
                truth = table.brute(views, 0.5)
                # Equal rows tie (BLAS may round the brute force's products of equal rows apart).
                want = sorted(truth.items(), key=lambda kv: (-round(kv[1], 5), kv[0]))[0]
                found, cos = index.search(views, 1, 0.5)
                assert (found.tolist(), cos.tolist()) == ([want[0]], [pytest.approx(want[1])])
                assert want[0] == key + 1
            index.remove(np.arange(key, key + 3))  # the next case on its own
            for k in range(key, key + 3):
                del table.rows[k]
            tried += 1
    assert tried >= 4
    for k in (5, 700, 2999):  # by a stored row: itself (or an earlier exact copy)
        found, cos = index.search(vectors[k - 1][None], 1, 0.5)
        assert found.tolist() == [k] and cos[0] == pytest.approx(1.0)


def test_a_near_copy_found_first_does_not_hide_a_closer_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows scored first (the best head bounds) are near copies of the query, each with the query's own
    leading dimensions and its other dimensions turned a little (bound 1, cosine ~0.992); a closer row
    (cosine ~0.996) has a lower bound, so it is scored after them, where the angle bound at the copies'
    best cosine must let it through: it is the answer."""
    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "TRAIN_AT", 1000)
    index, table, vectors = side_filled(tmp_path, 3000, seed=31)
    index.exact_below = 0
    rng = np.random.default_rng(32)
    h = index.head
    hits = 0
    for k in (11, 1200, 2500):
        q = unit(vectors[k - 1][None] + 0.3 * unit(rng.standard_normal((1, DIM)))).astype(np.float64)
        copies = []
        for _ in range(80):  # same head, tail turned by ~10 degrees: bound 1, cosine ~0.993
            turn = rng.standard_normal(DIM - h)
            tail = q[0, h:]
            turn -= (turn @ tail) / (tail @ tail) * tail
            turn *= np.linalg.norm(tail) / np.linalg.norm(turn)
            copies.append(np.concatenate([q[0, :h], np.cos(0.18) * tail + np.sin(0.18) * turn]))
        nudge = np.zeros(DIM)
        nudge[:h] = rng.standard_normal(h)
        closer = unit(q + 0.09 * unit(nudge[None])).astype(np.float64)  # tail along the query's
        rows = unit(np.vstack([*copies, closer]).astype(np.float32))
        key = 20_000 + 100 * hits
        keys = np.arange(key, key + len(rows))
        table.rows.update(zip(keys.tolist(), rows, strict=True))
        index.add(keys, rows)
        index._sort_lists()
        cos = rows @ q[0].astype(np.float32)
        assert cos[:-1].max() < cos[-1] < 0.998 and cos[:-1].max() >= vi.NEAR_COPY
        query = vi._Query(q.astype(np.float32), h)
        slots = np.sort(index._slots_of(keys))
        bound = query.bounds(
            index._scorer, index._gather_heads(slots), index._tail_norm[slots], index._inv[slots]
        )
        assert np.sum(bound > bound[-1]) >= 64  # the closer row (the last slot) is scored after the copies
        truth = table.brute(q.astype(np.float32), 0.5)
        want = max(truth.items(), key=lambda kv: kv[1])
        found, got = index.search(q.astype(np.float32), 1, 0.5)
        assert found.tolist() == [want[0]] == [keys[-1]] and got[0] == pytest.approx(want[1])
        hits += 1


def test_angles_computed_in_the_background_give_way_to_a_compaction_and_keep_rows_added_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fill_angles`` reads the side file outside the lock: rows added meanwhile keep the angles their add
    computed, and a compaction meanwhile (slots moved) makes it give up, leaving the angles unknown (every
    row passes the bound) until the next try; the answers equal brute force throughout."""
    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "TRAIN_AT", 1000)
    monkeypatch.setattr(vi, "BLOCK", 256)  # a compaction below (more than a block deleted)
    index, table, vectors = side_filled(tmp_path, 3000, seed=41)
    index.save(tmp_path, "g7")
    old_format(tmp_path, "g7", index._n, 5)
    loaded = VectorIndex.load(tmp_path, "g7", DIM, table.fetch)
    assert loaded is not None and loaded.angles_due()
    loaded.exact_below = 0

    def exact(ix: VectorIndex) -> None:
        for v in vectors[:50:10]:
            for limit in (1, -1):
                truth = sorted(table.brute(v[None], 0.6).items(), key=lambda kv: (-round(kv[1], 5), kv[0]))
                keys, cos = ix.search(v[None], limit, 0.6)
                want = truth[:limit] if limit > 0 else truth
                assert keys.tolist() == [k for k, _ in want] and cos == pytest.approx([c for _, c in want])

    read_full = vi._read_full
    more = clustered(200, seed=42)

    def add_meanwhile(*args: object) -> None:
        read_full(*args)  # type: ignore[arg-type]
        if 3001 not in table.rows:
            table.rows.update(zip(range(3001, 3201), more, strict=True))
            loaded.add(np.arange(3001, 3201), more)

    monkeypatch.setattr(vi, "_read_full", add_meanwhile)
    assert loaded.fill_angles() and not loaded.angles_due()
    assert not np.isnan(loaded._angle[: loaded._n]).any()  # the added rows' own angles kept
    fresh, _ = loaded._angles(more, loaded._assign[3000:3200])
    assert np.array_equal(loaded._angle[3000:3200], fresh)
    exact(loaded)
    loaded.save(tmp_path, "g7")
    old_format(tmp_path, "g7", loaded._n, 5)
    again = VectorIndex.load(tmp_path, "g7", DIM, table.fetch)
    assert again is not None and again.angles_due()
    again.exact_below = 0
    gone = np.arange(1, 2500)

    def compact_meanwhile(*args: object) -> None:
        read_full(*args)  # type: ignore[arg-type]
        if again._layout == 0:
            again.remove(gone)  # more than half deleted: compacted, slots move
            for k in gone.tolist():
                table.rows.pop(k, None)

    monkeypatch.setattr(vi, "_read_full", compact_meanwhile)
    assert not again.fill_angles() and again._layout == 1 and again.angles_due()
    exact(again)
    monkeypatch.setattr(vi, "_read_full", read_full)
    assert again.fill_angles() and not again.angles_due()
    exact(again)


def test_a_search_by_a_stored_row_finds_a_copy_only_when_there_is_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-view search for the single best row first scores the probed rows at the query's own angle from
    their centroids (where a copy would be). A row there that is no copy (cosine 0.95: same angle from the
    centroid, another side) must not end the search: a closer row elsewhere in the list (0.98) is the
    answer. A stored row finds itself, and an earlier exact copy of it wins the tie."""
    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "TRAIN_AT", 1000)
    index, table, vectors = side_filled(tmp_path, 3000, seed=51)
    index.exact_below = 0
    rng = np.random.default_rng(52)
    done = 0
    for a in range(len(index._centroids)):
        c = index._centroids[a].astype(np.float64)
        c /= np.linalg.norm(c)
        u, u2 = unit(rng.standard_normal((2, DIM))).astype(np.float64)
        u -= (u @ c) * c
        u /= np.linalg.norm(u)
        u2 -= (u2 @ c) * c + (u2 @ u) * u
        u2 /= np.linalg.norm(u2)
        psi = np.radians(40)
        q = np.cos(psi) * c + np.sin(psi) * u
        along = (0.95 - np.cos(psi) ** 2) / np.sin(psi) ** 2  # u.u' for q.w = 0.95
        w = np.cos(psi) * c + np.sin(psi) * (along * u + np.sqrt(1 - along**2) * u2)  # q's angle from c
        turn = np.radians(np.degrees(np.arccos(0.98)))
        v = np.cos(psi - turn) * c + np.sin(psi - turn) * u  # closer to c: 0.98 from q
        q32, rows = q.astype(np.float32)[None], np.vstack([w, v]).astype(np.float32)
        if int(vi._products(q32, index._centroids).argmax()) != a or index._assign_rows(rows).tolist() != [
            a,
            a,
        ]:
            continue
        key = 30_000 + 10 * done
        table.rows.update({key: rows[0], key + 1: rows[1]})
        index.add(np.asarray([key, key + 1]), rows)
        truth = table.brute(q32, 0.5)
        assert max(truth, key=truth.get) == key + 1
        found, cos = index.search(q32, 1, 0.5)
        assert found.tolist() == [key + 1] and cos[0] == pytest.approx(0.98, abs=1e-4)
        index.remove([key, key + 1])
        del table.rows[key], table.rows[key + 1]
        done += 1
        if done == 5:
            break
    assert done >= 3
    table.rows[9_000] = vectors[99]
    index.add(np.asarray([9_000]), vectors[99][None])  # a later exact copy of row 100
    for k in (100, 2999):
        found, cos = index.search(vectors[k - 1][None], 1, 0.5)
        assert found.tolist() == [k] and cos[0] == pytest.approx(1.0)


def test_a_compaction_on_a_full_disk_keeps_every_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction runs after the delete that caused it was committed, and writes a new side file. When the
    disk refuses that file (here the file size limit: Python ignores SIGXFSZ), the index used to raise with
    its storage already emptied: every search of the group came back empty until a restart."""
    monkeypatch.setattr(vi, "BLOCK", 256)
    table = Table()
    index = VectorIndex(DIM, table.fetch, tmp_path, "g1")
    vectors = clustered(1000, 4)
    keys = np.arange(1, 1001)
    table.rows.update(zip(keys.tolist(), vectors, strict=True))
    index.add(keys, vectors)
    gone = keys[:700]
    for k in gone.tolist():
        del table.rows[k]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))  # the new side file's first size is 393 KB
    try:
        assert index.remove(gone) == 700  # more than half: compacted
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert index._layout == 1 and len(index) == 300
    for key, vector in zip(keys[700:].tolist(), vectors[700:], strict=True):
        got, cosines = index.search(vector[None, :], 1, 0.5)
        assert got.tolist() == [key] and abs(float(cosines[0]) - 1.0) < 1e-5
    index.add(np.arange(2001, 2011), clustered(10, 5))  # and it goes on
    assert len(index) == 310
    index.close()
