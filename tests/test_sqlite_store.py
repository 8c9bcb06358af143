"""The embedded store across restarts: snapshots, replay of what they lack, rebuilds, model checks."""

from __future__ import annotations

import logging
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import tusou.store.vector_index as vi
from tusou.store.base import ModelMismatch, NewImage
from tusou.store.sqlite import SQLiteStore

DIM = 64


def vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def images(prefix: str, vecs: np.ndarray) -> list[NewImage]:
    return [NewImage(f"{prefix}{i}", "l", {"i": i}, None, v) for i, v in enumerate(vecs)]


def open_store(folder: Path, model_id: str = "m1") -> SQLiteStore:
    # Background snapshots off: the tests decide when one is written.
    return SQLiteStore(
        folder / "tusou.db", model_id=model_id, dim=DIM, snapshot_every_writes=10**9, snapshot_every_s=1e9
    )


def state(store: SQLiteStore, queries: np.ndarray) -> dict:
    out: dict = {"groups": store.list_groups("t")}
    for group in out["groups"]:
        page, marker, listed = None, "", []
        while page is None or marker:
            page, marker = store.list_images("t", group, marker, 100)
            listed += [(i.id, i.desc) for i in page]
        out[group] = (store.count("t", group), listed)
    out["search"] = [
        [(h.group, h.id, round(h.cosine, 5)) for h in store.search("t", out["groups"], q[None], limit, 0.1)]
        for q in queries
        for limit in (1, 20, -1)
    ]
    return out


def crash(store: SQLiteStore) -> None:
    """Leave without close(): no final snapshot, as after kill -9."""
    store._stop.set()
    store._snapshotter.join()
    store._writer.close()
    store._unlock()  # the kernel releases a dead process's lock


def fill(store: SQLiteStore) -> np.ndarray:
    a, b = vectors(600, 1), vectors(300, 2)
    store.create_group("t", "a", images("a", a))
    store.create_group("t", "b", images("b", b))
    store.delete_images("t", "a", [f"a{i}" for i in range(0, 600, 7)])
    return np.concatenate([a[:5], b[:5], vectors(5, 3)])


def test_restart_after_close_is_identical(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    queries = fill(store)
    before = state(store, queries)
    store.close()
    assert sorted(p.suffix for p in (tmp_path / "index").iterdir()) == [
        ".f32",
        ".f32",
        ".ivf",
        ".ivf",
        ".json",
        ".json",
    ]
    store = open_store(tmp_path)
    assert state(store, queries) == before
    store.close()


def test_crash_after_snapshot_replays_newer_rows_and_deletes(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    queries = fill(store)
    store.snapshot()
    # After the snapshot: more rows, deletes (of rows inside and outside the snapshot), a removed group.
    store.add_images("t", "a", images("late", vectors(200, 4)))
    store.delete_images("t", "a", ["a1", "a2", "late3"])
    store.remove_group("t", "b")
    store.create_group("t", "c", images("c", vectors(50, 5)))
    expected = state(store, queries)
    crash(store)
    store = open_store(tmp_path)
    snap_seq = store._indexes[store._gids[("t", "a")]].last_seq
    assert snap_seq > 900  # it started from the snapshot and replayed the rest
    assert state(store, queries) == expected
    hits = store.search("t", ["a"], vectors(600, 1)[1:3], -1, 0.999)
    assert [h.id for h in hits] == []  # deleted after the snapshot: gone
    store.close()


def test_a_crash_after_a_compaction_keeps_the_last_snapshot_usable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A compaction writes the side file anew (a new generation) while the last snapshot names the old one.
    The old file used to be deleted at once: after a crash before the next snapshot, the start ignored the
    snapshot ("side file is missing") and rebuilt the group from SQLite (minutes for millions of rows)."""
    monkeypatch.setattr(vi, "BLOCK", 256)
    store = open_store(tmp_path)
    vecs = vectors(1000, 7)
    store.create_group("t", "a", images("a", vecs))
    store.snapshot()
    store.delete_images("t", "a", [f"a{i}" for i in range(600)])  # more than half: compacted
    assert store._indexes[store._gids[("t", "a")]]._layout == 1
    queries = vecs[590:610]
    expected = state(store, queries)
    crash(store)
    with caplog.at_level(logging.WARNING, logger="tusou.store.vector_index"):
        store = open_store(tmp_path)
    assert "ignoring snapshot" not in caplog.text
    assert store._indexes[store._gids[("t", "a")]].last_seq == 1000  # the snapshot, then the deletes
    assert state(store, queries) == expected
    store.close()
    assert len(list((tmp_path / "index").glob("*.f32"))) == 1  # the next snapshot took the old file away


def test_bad_snapshot_means_rebuild_from_sqlite(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    queries = fill(store)
    expected = state(store, queries)
    store.close()
    for path in (tmp_path / "index").glob("*.ivf"):
        path.write_bytes(path.read_bytes()[:1000])
    store = open_store(tmp_path)
    assert state(store, queries) == expected
    store.close()


def test_vectors_come_back_exact(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    a = vectors(10, 6)
    store.create_group("t", "g", images("x", a))
    store.close()
    store = open_store(tmp_path)
    assert np.array_equal(store.get_vector("t", "g", "x3"), a[3])
    store.close()


def test_background_snapshot_after_enough_writes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "tusou.db", model_id="m1", dim=DIM, snapshot_every_writes=100)
    store.create_group("t", "g", images("x", vectors(150, 7)))
    for _ in range(50):
        if list((tmp_path / "index").glob("g*.json")):
            break
        store._stop.wait(0.1)
    assert [p.name.split(".")[:2] for p in (tmp_path / "index").glob("g*.json")] == [["g1", "150"]]
    store.close()


def test_model_mismatch_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.create_group("t", "g", images("x", vectors(3, 8)))
    store.close()
    with pytest.raises(ModelMismatch):
        open_store(tmp_path, model_id="m2")
    store = open_store(tmp_path)  # the data folder is untouched by the refusal
    assert store.count("t", "g") == 3
    store.close()


def test_missing_or_short_float_side_file_means_rebuild_from_sqlite(tmp_path: Path) -> None:
    """The re-rank's float32 rows come from a side file beside the snapshot; a snapshot whose side file is
    gone or shorter than its slots is refused, and the index is rebuilt with a new one."""
    store = open_store(tmp_path)
    queries = fill(store)
    expected = state(store, queries)
    store.close()
    side = sorted((tmp_path / "index").glob("*.f32"))
    assert len(side) == 2
    side[0].unlink()
    with open(side[1], "r+b") as f:
        f.truncate(100)
    store = open_store(tmp_path)
    assert state(store, queries) == expected
    store.close()
    assert len(list((tmp_path / "index").glob("*.f32"))) == 2  # new generations, the old ones gone


def test_a_large_answer_carries_each_hits_own_record(tmp_path: Path) -> None:
    """An answer drawn from thousands of rows has its records read in another thread while the rows are
    scored, and a small one in line: every hit carries its own id, label, desc, uri and tags, in the order
    of an exact scan, with deleted rows left out."""
    rng = np.random.default_rng(5)
    base = vectors(1, 9)[0]
    near = base + 0.8 * rng.standard_normal((3000, DIM)).astype(np.float32) / np.sqrt(DIM)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    store = open_store(tmp_path)

    def record(k: int) -> tuple:
        desc = {"k": k} if k % 5 == 0 else f'd"{k}'
        tags = [[k % 10, 0.5]] if k % 4 == 0 else None
        return f"l{k % 7}", desc, (f"http://x/{k}" if k % 3 else None), tags

    store.create_group(
        "t", "g", [NewImage(f"i{k}", *record(k)[:3], v, record(k)[3]) for k, v in enumerate(near)]
    )
    gone = {f"i{k}" for k in range(0, 3000, 11)}
    store.delete_images("t", "g", sorted(gone))
    cosines = near @ base
    for limit, floor in ((-1, 0.0), (2500, 0.0), (50, 0.0), (-1, 0.95)):
        hits = store.search("t", ["g"], base[None], limit, floor)
        want = [k for k in np.argsort(-cosines, kind="stable").tolist() if f"i{k}" not in gone]
        want = [k for k in want if cosines[k] >= floor - 1e-6][: limit if limit > 0 else None]
        assert [h.id for h in hits] == [f"i{k}" for k in want]
        assert all((h.label, h.desc, h.uri, h.tags) == record(int(h.id[1:])) for h in hits)
        assert all(h.group == "g" for h in hits)
    alone = store.search("t", ["g"], base[None], -1, 0.0)
    assert len(alone) > 2000  # the other thread's case
    # Searches at once: one has the records thread, the others read their records in line.
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda _: store.search("t", ["g"], base[None], -1, 0.0), range(8)))
    assert all(hits == alone for hits in together)
    store.close()


def test_the_side_file_is_put_in_list_order_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's snapshot thread rewrites a large group's side file in list order and snapshots it: the
    answers are the same before, after and across a restart (and after a crash that follows it), and only
    the new side file remains. A close stops a rewrite midway."""
    import tusou.store.vector_index as vi

    monkeypatch.setattr(vi, "TRAIN_AT", 1000)
    monkeypatch.setattr(vi, "RELAYOUT_MIN", 500)
    store = SQLiteStore(tmp_path / "tusou.db", model_id="m1", dim=DIM, snapshot_every_writes=100)
    rng = np.random.default_rng(8)
    centres = vectors(40, 9)
    rows = centres[rng.integers(0, 40, 3000)] + 0.5 * vectors(3000, 10)
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    store.create_group("t", "g", images("x", rows))
    queries = rows[:6]
    index = store._indexes[store._gids[("t", "g")]]
    for _ in range(300):
        if index._flisted and not index.dirty and len(list((tmp_path / "index").glob("*.f32"))) == 1:
            break
        store._stop.wait(0.1)
    assert index._flisted == 3000
    files = list((tmp_path / "index").glob("*.f32"))
    assert len(files) == 1 and files[0] == index._floats.path

    def exact(live: dict[str, np.ndarray]) -> None:
        for q in queries:  # every match, with its float32 cosine, as a scan of the rows gives it
            want = {k: float(v @ q) for k, v in live.items() if float(v @ q) >= 0.5}
            got = {h.id: h.cosine for h in store.search("t", ["g"], q[None], -1, 0.5)}
            assert got == pytest.approx(want, abs=1e-6)

    exact({f"x{i}": v for i, v in enumerate(rows)})
    store.add_images("t", "g", images("y", rows[:50]))  # appended behind the listed rows
    store.delete_images("t", "g", ["x1", "x2"])
    expected = state(store, queries)
    crash(store)
    store = open_store(tmp_path)
    assert state(store, queries) == expected
    exact({f"x{i}": v for i, v in enumerate(rows) if i not in (1, 2)} | {f"y{i}": rows[i] for i in range(50)})
    index = store._indexes[store._gids[("t", "g")]]
    index._flisted = 0  # due again; a set stop abandons the rewrite and leaves no file behind
    stop = threading.Event()
    stop.set()
    assert not index.relayout(stop)
    assert len(list((tmp_path / "index").glob("*.f32"))) == 1
    store.close()


def test_a_snapshot_without_angles_gets_them_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data folder whose snapshot is format 5 (written before the rows' angles from their centroids)
    opens and answers exactly at once; the store's snapshot thread computes the angles from the side file
    and the next snapshot holds them (the current format), with the same answers before, after and across
    a restart."""
    import json

    import tusou.store.vector_index as vi
    from tests.test_vector_index import old_format

    monkeypatch.setattr(vi, "TRAIN_AT", 1000)
    rng = np.random.default_rng(5)
    centres = vectors(40, 6)
    rows = centres[rng.integers(0, 40, 3000)] + 0.5 * vectors(3000, 7)
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    store = open_store(tmp_path)
    store.create_group("t", "g", images("x", rows))
    queries = np.concatenate([rows[:4], vectors(3, 8)])  # with matches, and far from everything
    expected = state(store, queries)
    want = store._indexes[store._gids[("t", "g")]]._angle[:3000].copy()
    store.close()
    old_format(tmp_path / "index", "g1", 3000, 5)
    store = SQLiteStore(tmp_path / "tusou.db", model_id="m1", dim=DIM, snapshot_every_s=0.5)
    index = store._indexes[store._gids[("t", "g")]]
    assert state(store, queries) == expected
    for _ in range(300):
        if not index.angles_due() and not index.dirty:
            break
        store._stop.wait(0.1)
    assert not index.angles_due() and not index.dirty
    assert np.allclose(index._angle[:3000], want, rtol=0, atol=1e-6)
    assert state(store, queries) == expected
    (meta_path,) = (tmp_path / "index").glob("g*.json")
    assert json.loads(meta_path.read_text())["format"] == vi.SNAPSHOT_FORMAT
    crash(store)
    store = open_store(tmp_path)
    index = store._indexes[store._gids[("t", "g")]]
    assert not index.angles_due() and state(store, queries) == expected
    store.close()


def test_the_images_table_is_warmed_in_idle_moments_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images table is read into the page cache in steps, only while no search ran lately (at the open,
    it competed with the first searches): none while searches keep coming, then every row, then the thread
    ends."""
    import time

    from tusou.store import sqlite

    store = open_store(tmp_path)
    fill(store)
    store.close()
    monkeypatch.setattr(sqlite, "_WARM_ROWS", 100)
    monkeypatch.setattr(sqlite, "_WARM_IDLE_S", 2.0)
    steps: list[int] = []
    step = SQLiteStore._warm_step

    def counted(conn: sqlite3.Connection, after: int) -> int | None:
        steps.append(after)
        return step(conn, after)

    monkeypatch.setattr(SQLiteStore, "_warm_step", staticmethod(counted))
    store = open_store(tmp_path)  # the warm-up waits for an idle moment after the open, as after a search
    try:
        store._last_search = time.monotonic() + 3600  # a search as good as running all along
        assert not store._warmer.join(1.0) and store._warmer.is_alive() and steps == []
        assert len(store.search("t", ["a"], vectors(1, 3), 5, -1.0)) == 5  # ends: the idle clock restarts
        store._warmer.join(30)
        assert not store._warmer.is_alive()
        seqs = [r[0] for r in store._reader().execute("SELECT seq FROM images ORDER BY seq")]
        # Every row once, in steps of _WARM_ROWS (814 rows: 8 full, one of 14), then a step that finds none.
        assert len(seqs) == 814 and steps == [0, *seqs[99::100], seqs[-1]]
    finally:
        store.close()


def test_a_store_that_fails_to_open_leaves_its_folder_free(tmp_path: Path) -> None:
    """The folder lock is taken first; a store whose database then cannot be read (here: not a database)
    lets it go, so that the next store in this process (a test, a command trying again) owns the folder
    instead of opening it as if another process held it."""
    from tusou.store.sqlite import folder_in_use

    path = tmp_path / "tusou.db"
    path.write_bytes(b"not a database, " * 1000)
    with pytest.raises(sqlite3.DatabaseError):
        SQLiteStore(path, model_id="m", dim=8)
    assert not folder_in_use(path)
    path.unlink()
    store = SQLiteStore(path, model_id="m", dim=8)
    try:
        assert not store.shared and folder_in_use(path)
    finally:
        store.close()
    assert not folder_in_use(path)
