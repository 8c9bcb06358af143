"""Filters on label and desc keys (tusou.store.filters) and keyword search in the SQLite store."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tusou.errors import QiniuError
from tusou.store.base import NewImage
from tusou.store.filters import Filter, parse_filter
from tusou.store.sqlite import SQLiteStore

DESCS: list[Any] = [
    {"brand": "acme", "price": 10, "ok": True},
    {"brand": "acme", "price": 25.5, "ok": False},
    {"brand": "bolt", "price": 3, "ok": None},
    {"brand": "bolt", "price": "3"},
    {"brand": 1, "price": -1},
    {"brand": True},
    {"price": 100, "nested": {"brand": "acme"}},
    "acme",
    None,
    ["brand", "acme"],
    {"brand": 'it\'s "quoted"', "we ird.x": 5},
    {"brand": "ACME", "price": 1e3},
]

FILTERS: list[dict[str, Any]] = [
    {"desc.brand": "acme"},
    {"desc.brand": {"in": ["acme", "bolt"]}},
    {"desc.brand": {"in": [1, True]}},
    {"desc.brand": 1},
    {"desc.brand": True},
    {"desc.brand": {"eq": 'it\'s "quoted"'}},
    {"desc.we ird.x": {"gte": 5}},
    {"desc.price": {"gte": 10}},
    {"desc.price": {"gt": 3, "lte": 100}},
    {"desc.price": {"lt": 0}},
    {"desc.price": 3},
    {"desc.price": "3"},
    {"desc.ok": None},
    {"desc.ok": False},
    {"desc.missing": None},
    {"label": "a"},
    {"label": {"in": ["a", "c"]}, "desc.brand": "acme"},
    {"label": "b", "desc.price": {"gte": 0}},
]


def rows() -> list[tuple[str, Any]]:
    return [(("a", "b", "c")[i % 3], d) for i, d in enumerate(DESCS)]


@pytest.mark.parametrize("spec", FILTERS)
def test_sql_agrees_with_python(spec: dict[str, Any]) -> None:
    f = parse_filter(spec)
    assert f is not None
    db = sqlite3.connect(":memory:")
    db.execute('CREATE TABLE images (seq INTEGER PRIMARY KEY, label TEXT, "desc" TEXT)')
    for i, (label, desc) in enumerate(rows()):
        text = None if desc is None else json.dumps(desc, ensure_ascii=False, separators=(",", ":"))
        db.execute("INSERT INTO images VALUES (?, ?, ?)", (i, label, text))
    sql, params = f.sql()
    got = sorted(r[0] for r in db.execute(f"SELECT seq FROM images WHERE {sql}", params))
    want = [i for i, (label, desc) in enumerate(rows()) if f.matches(label, "" if desc is None else desc)]
    assert got == want


def test_python_semantics() -> None:
    def m(spec: dict[str, Any], label: str, desc: Any) -> bool:
        f = parse_filter(spec)
        assert f is not None
        return f.matches(label, desc)

    assert m({"desc.brand": "acme"}, "", {"brand": "acme"})
    assert not m({"desc.brand": "acme"}, "", "acme")  # a string desc has no keys
    assert m({"desc.price": 3}, "", {"price": 3.0})  # JSON numbers: 3 == 3.0
    assert not m({"desc.price": 3}, "", {"price": "3"})
    assert not m({"desc.flag": 1}, "", {"flag": True})  # booleans are not numbers
    assert not m({"desc.price": {"gte": 1}}, "", {"price": True})
    assert m({"desc.x": None}, "", {"x": None}) and not m({"desc.x": None}, "", {})
    assert m({"label": {"in": ["a", "b"]}}, "b", None)


@pytest.mark.parametrize(
    "spec",
    [
        "brand=acme",
        [],
        {"brand": "acme"},
        {"desc.": 1},
        {"desc.price": {"between": [1, 2]}},
        {"desc.price": {"gte": "10"}},
        {"desc.price": {"gte": True}},
        {"desc.price": {"gte": float("nan")}},
        {"desc.brand": {"in": []}},
        {"desc.brand": {"in": "acme"}},
        {"desc.brand": {"in": [{"a": 1}]}},
        {"desc.brand": {}},
        {"desc.brand": {"eq": [1]}},
        {"label": {"gte": 1}},
        {f"desc.k{i}": i for i in range(17)},
        {"desc." + "k" * 129: 1},
        {'desc.we"ird': 1},
        {"desc.back\\slash": 1},
    ],
)
def test_bad_filters_are_406(spec: Any) -> None:
    with pytest.raises(QiniuError) as err:
        parse_filter(spec)
    assert err.value.status == 406 and err.value.message.startswith("invalid filter")


def test_no_filter() -> None:
    assert parse_filter(None) is None and parse_filter({}) is None
    f = parse_filter({"label": {"in": ["a", "b"]}, "desc.x": 1})
    assert isinstance(f, Filter) and f.labels == frozenset({"a", "b"})


# --- inside the search (SQLite store) ----------------------------------------------------------------

DIM = 16


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# The case is 100k images (-m slow: building the vector graph takes ~35 s on 2 cores); by
# default the same tests run on 20k.
@pytest.fixture(scope="module", params=[20_000, pytest.param(100_000, marks=pytest.mark.slow)])
def big(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SQLiteStore, np.ndarray]]:
    """One group of N images; 1 % (every 100th) has desc.shard == 7 and label "rare"."""
    N = request.param
    folder = tmp_path_factory.mktemp("big")
    store = SQLiteStore(folder / "t.db", model_id="m", dim=DIM)
    rng = np.random.default_rng(3)
    vecs = _unit(rng.normal(size=(N, DIM)))
    store.create_group("t", "g", [])
    batch = 5000
    for start in range(0, N, batch):
        imgs = [
            NewImage(
                f"i{i}",
                "rare" if i % 100 == 7 else "common",
                {"shard": i % 100, "n": i},
                None,
                vecs[i],
                [[i % 1000, 0.6], [(i + 1) % 1000, 0.3]],
            )
            for i in range(start, start + batch)
        ]
        store.add_images("t", "g", imgs)
    yield store, vecs
    store.close()


def test_limit_counts_filtered_images_in_a_big_group(big: tuple[SQLiteStore, np.ndarray]) -> None:
    store, vecs = big
    q = vecs[5][None, :]  # image 5 is not in the 1 %
    passing = np.arange(7, len(vecs), 100)
    want = passing[np.argsort(-(vecs[passing] @ q[0]), kind="stable")][:25]
    for spec in ({"desc.shard": 7}, {"label": "rare"}, {"desc.shard": {"gte": 7, "lt": 8}}):
        where = parse_filter(spec)
        started = time.perf_counter()
        hits = store.search("t", ["g"], q, 25, -1.0, where)
        elapsed = time.perf_counter() - started
        assert [h.id for h in hits] == [f"i{i}" for i in want], spec
        assert all(h.desc["shard"] == 7 for h in hits)
        cos = [h.cosine for h in hits]
        assert cos == sorted(cos, reverse=True)
        print(f"filtered search {spec}: {1000 * elapsed:.0f} ms")
    # Unfiltered, the same query's top 25 holds (almost) none of them: the filter did the work.
    top = {h.id for h in store.search("t", ["g"], q, 25, -1.0)}
    assert len(top & {f"i{i}" for i in want}) < 5


def test_filter_with_threshold_and_no_match(big: tuple[SQLiteStore, np.ndarray]) -> None:
    store, vecs = big
    q = vecs[107][None, :]  # itself in the 1 %
    hits = store.search("t", ["g"], q, 10, 0.999, parse_filter({"desc.shard": 7}))
    assert [h.id for h in hits] == ["i107"]
    assert store.search("t", ["g"], q, 10, -1.0, parse_filter({"desc.shard": 1000})) == []


def test_search_tags_ranks_by_evidence(big: tuple[SQLiteStore, np.ndarray]) -> None:
    store, _ = big
    # Class 7 is image i's first tag (0.6) when i % 1000 == 7, its second (0.3) when i % 1000 == 6.
    k = len(big[1]) // 1000
    hits = store.search_tags("t", ["g"], [7], 1000, 0.1)
    assert len(hits) == 2 * k
    assert all(h.cosine == pytest.approx(0.6) for h in hits[:k])
    assert all(h.cosine == pytest.approx(0.3) for h in hits[k:])
    assert [h.id for h in hits[:3]] == ["i7", "i1007", "i2007"]  # ties in insertion order
    assert len(store.search_tags("t", ["g"], [7], 1000, 0.5)) == k
    assert len(store.search_tags("t", ["g"], [6, 7], 5, 0.8)) == 5  # 0.6 + 0.3 on i % 1000 == 6
    assert store.search_tags("t", ["g"], [6, 7], 5, 0.8)[0].cosine == pytest.approx(0.9)
    f = parse_filter({"desc.n": {"lt": 3000}})
    assert [h.id for h in store.search_tags("t", ["g"], [7], -1, 0.5, f)] == ["i7", "i1007", "i2007"]
    assert store.search_tags("t", ["g"], [7], 3, 0.1)[0].tags == [[7, 0.6], [8, 0.3]]


def test_tags_survive_and_old_folders_open(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    old = sqlite3.connect(db)
    old.executescript(
        """
        CREATE TABLE groups (gid INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL,
            name TEXT NOT NULL, created REAL NOT NULL, UNIQUE (tenant, name));
        CREATE TABLE images (seq INTEGER PRIMARY KEY AUTOINCREMENT, gid INTEGER NOT NULL,
            image_id TEXT NOT NULL, label TEXT NOT NULL, desc TEXT, uri TEXT, created REAL NOT NULL,
            UNIQUE (gid, image_id));
        CREATE TABLE vectors (seq INTEGER PRIMARY KEY, vector BLOB NOT NULL);
        INSERT INTO groups VALUES (1, 't', 'g', 0);
        INSERT INTO images VALUES (1, 1, 'old', '', NULL, 'http://x/1.jpg', 0);
        """
    )
    old.execute("INSERT INTO vectors VALUES (1, ?)", (_unit(np.ones((1, DIM)))[0].tobytes(),))
    old.commit()
    old.close()
    store = SQLiteStore(db, model_id="m", dim=DIM)
    assert store.get_image("t", "g", "old").tags is None
    store.add_images("t", "g", [NewImage("new", "", None, None, _unit(np.ones((1, DIM)))[0], [[3, 0.9]])])
    assert store.get_image("t", "g", "new").tags == [[3, 0.9]]
    assert store.set_tags("t", "g", {"old": [[4, 0.5]], "gone": [[1, 1.0]]}) == 1
    store.close()
    store = SQLiteStore(db, model_id="m", dim=DIM)
    assert store.get_image("t", "g", "old").tags == [[4, 0.5]]
    page, _ = store.list_images("t", "g", "", 10)
    assert [(i.id, i.tags) for i in page] == [("old", [[4, 0.5]]), ("new", [[3, 0.9]])]
    assert [h.id for h in store.search_tags("t", ["g"], [3, 4], 10, 0.1)] == ["new", "old"]
    store.close()

    # Tags stored before the image_tags table existed are copied into it on open.
    raw = sqlite3.connect(db)
    raw.execute("DELETE FROM image_tags")
    raw.execute("DELETE FROM meta WHERE key = 'tag_rows'")
    raw.commit()
    raw.close()
    store = SQLiteStore(db, model_id="m", dim=DIM)
    assert [h.id for h in store.search_tags("t", ["g"], [3, 4], 10, 0.1)] == ["new", "old"]
    # A deleted image leaves no evidence behind.
    store.delete_images("t", "g", ["new"])
    assert [h.id for h in store.search_tags("t", ["g"], [3, 4], 10, 0.1)] == ["old"]
    remaining = sqlite3.connect(db).execute("SELECT class FROM image_tags").fetchall()
    assert remaining == [(4,)]
    store.close()


def test_milvus_expressions_hold_no_user_text() -> None:
    from tusou.store.milvus import _expr

    f = parse_filter(
        {
            "label": {"in": ['x" or 1==1 or "', "ok"]},
            "desc.brand": 'acme" ) or (1 == 1',
            "desc.price": {"gte": 1e-7, "lt": 1e20},
            "desc.flag": {"in": [True, 3]},
            "desc.gone": None,
        }
    )
    assert f is not None
    expr = _expr(f)
    assert "acme" not in expr and "or 1==1" not in expr and "e-" not in expr and "e+" not in expr
    assert "0.0000001" in expr and "100000000000000000000" in expr and "== true" in expr
    assert expr.count(" and ") == 4  # the null condition has no expression (checked exactly afterwards)
