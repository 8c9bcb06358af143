"""One contract for every Store backend: embedded SQLite, Milvus Lite (a test double), a real Milvus server.

Vectors are small random unit rows (no model). The Milvus backends share one collection per session and
each test works under its own tenant, which is also what keeps tests from seeing each other's groups.
Expected search results come from a brute-force numpy computation over the same vectors.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from tusou.store.base import (
    BadMarker,
    GroupExists,
    GroupNotFound,
    ImageNotFound,
    ItemError,
    NewImage,
    Store,
)

pytest_plugins = ["tests.store_backends"]

DIM = 64
BACKENDS = ["sqlite", "lite", "server"]
COLLECTION = "tusou_contract"


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def near(rng: np.random.Generator, centre: np.ndarray, n: int, spread: float) -> np.ndarray:
    """``n`` unit rows around ``centre``: cosines to it fall as ``spread`` grows."""
    v = centre[None, :] + spread * rng.standard_normal((n, centre.shape[0])).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def images(vectors: np.ndarray, prefix: str = "i", start: int = 0) -> list[NewImage]:
    return [
        NewImage(f"{prefix}{start + i}", f"label{start + i}", {"n": start + i}, None, vec)
        for i, vec in enumerate(vectors)
    ]


@dataclass
class Backend:
    name: str
    tenant: str
    store: Store
    make: Callable[[int], Store]  # another handle on the same data, with this group_max_images

    def flush(self) -> None:
        """On Milvus, seal the growing segments so reads cross sealed and growing data."""
        client = getattr(self.store, "client", None)
        if client is not None:
            client.flush(self.store.images)  # type: ignore[attr-defined]


_milvus_stores: dict[tuple[str, int], Store] = {}


@pytest.fixture(scope="session", autouse=True)
def _close_milvus_stores() -> Iterator[None]:
    yield
    for store in _milvus_stores.values():
        store.close()
    _milvus_stores.clear()


def _milvus_uri(request: pytest.FixtureRequest, name: str) -> str:
    if name == "server":
        return request.getfixturevalue("milvus_server").uri
    try:
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError as exc:
        print(f"\n[store contract] Milvus Lite backend skipped: {exc.name} is not installed")
        pytest.skip(f"Milvus Lite unavailable: {exc.name} is not installed (pip install milvus-lite)")
    base = request.config._tusou_lite_dir  # type: ignore[attr-defined]
    return str(base / "lite.db")


@pytest.fixture(scope="session", autouse=True)
def _lite_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    request.config._tusou_lite_dir = tmp_path_factory.mktemp("milvus-lite")  # type: ignore[attr-defined]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name = request.param
    tenant = "t-" + uuid.uuid4().hex[:12]
    if name == "sqlite":
        from tusou.store.sqlite import SQLiteStore

        opened: list[Store] = []

        def make_sqlite(group_max_images: int) -> Store:
            # The embedded store caches per instance: a second handle gets its own file.
            store = SQLiteStore(
                tmp_path / f"s{len(opened)}.db", model_id="m", dim=DIM, group_max_images=group_max_images
            )
            opened.append(store)
            return store

        yield Backend(name, tenant, make_sqlite(500_000), make_sqlite)
        for store in opened:
            store.close()
        return

    uri = _milvus_uri(request, name)

    def make_milvus(group_max_images: int) -> Store:
        from tests.milvus_lite import LiteMilvusStore
        from tusou.store.milvus import MilvusStore

        key = (name, group_max_images)
        if key not in _milvus_stores:
            store_class = LiteMilvusStore if name == "lite" else MilvusStore
            _milvus_stores[key] = store_class(
                uri, collection=COLLECTION, model_id="m", dim=DIM, group_max_images=group_max_images
            )
        return _milvus_stores[key]

    yield Backend(name, tenant, make_milvus(500_000), make_milvus)


def all_ids(store: Store, tenant: str, group: str, page: int = 1000) -> list[str]:
    ids, marker = [], ""
    while True:
        infos, marker = store.list_images(tenant, group, marker, page)
        ids += [info.id for info in infos]
        if not marker:
            return ids


def brute(
    vectors: dict[tuple[str, str], np.ndarray], queries: np.ndarray, limit: int, min_cosine: float
) -> list[tuple[str, str, float]]:
    """Expected hits: (group, id, cosine), best first, ties by insertion order."""
    rows = []
    for order, ((group, image_id), vec) in enumerate(vectors.items()):
        cosine = float((queries @ vec).max())
        if cosine >= min_cosine:
            rows.append((-cosine, order, group, image_id))
    rows.sort()
    if limit >= 0:
        rows = rows[:limit]
    return [(g, i, -c) for c, _, g, i in rows]


def assert_hits_match(hits: list, expected: list[tuple[str, str, float]]) -> None:
    assert len(hits) == len(expected)
    assert [h.cosine for h in hits] == sorted((h.cosine for h in hits), reverse=True)
    got = {(h.group, h.id): h.cosine for h in hits}
    want = {(g, i): c for g, i, c in expected}
    # Float rounding may swap near-equal neighbours at the cut; anything clearly inside must match.
    cut = expected[-1][2] if expected else 0.0
    for key, cosine in want.items():
        if cosine > cut + 1e-4:
            assert key in got, key
            assert abs(got[key] - cosine) < 1e-4
    for key in got:
        assert key in want or abs(got[key] - cut) < 1e-4, key


# --- groups ------------------------------------------------------------------------------------------


def test_create_exists_list_and_remove(backend: Backend) -> None:
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(1)
    assert s.list_groups(t) == []
    assert s.create_group(t, "g1", images(unit(rng, 2))) == [None, None]
    assert s.create_group(t, "empty", []) == []
    assert s.list_groups(t) == ["g1", "empty"]
    assert s.count(t, "empty") == 0 and s.count(t, "g1") == 2
    with pytest.raises(GroupExists):
        s.create_group(t, "g1", [])
    s.remove_group(t, "g1")
    assert s.list_groups(t) == ["empty"]
    for call in (
        lambda: s.count(t, "g1"),
        lambda: s.remove_group(t, "g1"),
        lambda: s.list_images(t, "g1", "", 10),
        lambda: s.get_image(t, "g1", "i0"),
        lambda: s.get_vector(t, "g1", "i0"),
        lambda: s.add_images(t, "g1", images(unit(rng, 1))),
        lambda: s.delete_images(t, "g1", ["i0"]),
        lambda: s.search(t, ["g1"], unit(rng, 1), 10, -1.0),
        lambda: s.search(t, ["empty", "g1"], unit(rng, 1), 10, -1.0),
    ):
        with pytest.raises(GroupNotFound):
            call()
    # A group made again under the same name starts empty: nothing of the removed one comes back.
    assert s.create_group(t, "g1", []) == []
    assert s.count(t, "g1") == 0 and all_ids(s, t, "g1") == []
    assert s.search(t, ["g1"], unit(rng, 1), -1, -1.0) == []


def test_names_with_quotes_and_unicode(backend: Backend) -> None:
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(2)
    group = "q\"uo\\te' 组 😀 or 1==1"
    image_id = 'id" || seq > 0 \\ 图'
    vec = unit(rng, 1)
    assert s.create_group(t, group, [NewImage(image_id, "标签", {"k": "值"}, "http://x/y?z=1", vec[0])]) == [
        None
    ]
    assert s.list_groups(t) == [group]
    info = s.get_image(t, group, image_id)
    assert (info.id, info.label, info.desc, info.uri) == (image_id, "标签", {"k": "值"}, "http://x/y?z=1")
    hits = s.search(t, [group], vec, 1, 0.5)
    assert [(h.group, h.id) for h in hits] == [(group, image_id)]
    assert s.delete_images(t, group, [image_id]) == 1 and s.count(t, group) == 0


# --- writes ------------------------------------------------------------------------------------------


def test_repeated_ids_are_per_image_errors(backend: Backend) -> None:
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(3)
    v = unit(rng, 5)
    batch = [NewImage("a", "", None, None, v[0]), NewImage("b", "", None, None, v[1])]
    batch.append(NewImage("a", "", None, None, v[2]))  # repeated inside one batch
    assert s.create_group(t, "g", batch) == [None, None, ItemError(400, "id already exists")]
    result = s.add_images(t, "g", [NewImage("b", "", None, None, v[3]), NewImage("c", "", None, None, v[4])])
    assert result == [ItemError(400, "id already exists"), None]
    assert s.count(t, "g") == 3 and all_ids(s, t, "g") == ["a", "b", "c"]
    # The first "a" kept its vector.
    assert np.allclose(s.get_vector(t, "g", "a"), v[0], atol=1e-6)


def test_group_full_is_a_per_image_error(backend: Backend) -> None:
    s, t = backend.make(3), backend.tenant
    rng = np.random.default_rng(4)
    assert s.create_group(t, "small", images(unit(rng, 2))) == [None, None]
    full = ItemError(406, "group is full")
    assert s.add_images(t, "small", images(unit(rng, 3), start=2)) == [None, full, full]
    assert s.count(t, "small") == 3
    assert s.add_images(t, "small", images(unit(rng, 1), start=9)) == [full]
    s.delete_images(t, "small", ["i0"])
    assert s.add_images(t, "small", images(unit(rng, 1), start=10)) == [None]


def test_tenants_are_isolated(backend: Backend) -> None:
    s, alice = backend.store, backend.tenant
    bob = alice + "-bob"
    rng = np.random.default_rng(5)
    va, vb = unit(rng, 3), unit(rng, 3)
    s.create_group(alice, "shared", images(va, "a"))
    assert s.list_groups(bob) == []
    for call in (
        lambda: s.count(bob, "shared"),
        lambda: s.get_image(bob, "shared", "a0"),
        lambda: s.list_images(bob, "shared", "", 10),
        lambda: s.search(bob, ["shared"], va[:1], 10, -1.0),
        lambda: s.delete_images(bob, "shared", ["a0"]),
        lambda: s.remove_group(bob, "shared"),
    ):
        with pytest.raises(GroupNotFound):
            call()
    s.create_group(bob, "shared", images(vb, "b"))
    assert {h.id for h in s.search(bob, ["shared"], va, -1, -1.0)} == {"b0", "b1", "b2"}
    assert {h.id for h in s.search(alice, ["shared"], vb, -1, -1.0)} == {"a0", "a1", "a2"}
    assert s.delete_images(bob, "shared", ["a0", "a1"]) == 0
    assert s.count(alice, "shared") == 3 and s.count(bob, "shared") == 3
    s.remove_group(bob, "shared")
    assert s.count(alice, "shared") == 3


def test_delete_never_comes_back(backend: Backend) -> None:
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(6)
    v = unit(rng, 20)
    s.create_group(t, "d", images(v))
    gone = [f"i{i}" for i in range(0, 20, 2)]
    assert s.delete_images(t, "d", [*gone, "never-existed", gone[0]]) == 10
    assert s.count(t, "d") == 10
    assert all_ids(s, t, "d") == [f"i{i}" for i in range(1, 20, 2)]
    found = {h.id for h in s.search(t, ["d"], v, -1, -1.0)}
    assert found == {f"i{i}" for i in range(1, 20, 2)}
    with pytest.raises(ImageNotFound):
        s.get_image(t, "d", "i0")
    with pytest.raises(ImageNotFound):
        s.get_vector(t, "d", "i0")
    assert s.delete_images(t, "d", gone) == 0
    # A deleted id may be used again.
    assert s.add_images(t, "d", images(v[:1])) == [None]
    assert s.count(t, "d") == 11


def test_read_your_writes(backend: Backend) -> None:
    """Each read right after a write sees it: no settling time, no retries."""
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(7)
    s.create_group(t, "rw", [])
    for i in range(4):
        vec = unit(rng, 1)
        assert s.add_images(t, "rw", [NewImage(f"x{i}", "", None, None, vec[0])]) == [None]
        assert [h.id for h in s.search(t, ["rw"], vec, 1, 0.99)] == [f"x{i}"]
        assert s.count(t, "rw") == 1
        assert all_ids(s, t, "rw") == [f"x{i}"]
        assert s.delete_images(t, "rw", [f"x{i}"]) == 1
        assert s.search(t, ["rw"], vec, -1, -1.0) == []
        assert s.count(t, "rw") == 0 and all_ids(s, t, "rw") == []
    s.remove_group(t, "rw")
    assert "rw" not in s.list_groups(t)


# --- reads -------------------------------------------------------------------------------------------


def test_get_image_and_vector(backend: Backend) -> None:
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(8)
    v = unit(rng, 2)
    s.create_group(
        t,
        "g",
        [
            NewImage("u", "shoe", {"price": 12, "tags": ["x"]}, "http://img/u.jpg", v[0]),
            NewImage("n", "", None, None, v[1]),
        ],
    )
    info = s.get_image(t, "g", "u")
    assert (info.id, info.label, info.desc, info.uri) == (
        "u",
        "shoe",
        {"price": 12, "tags": ["x"]},
        "http://img/u.jpg",
    )
    bare = s.get_image(t, "g", "n")
    assert (bare.label, bare.desc, bare.uri) == ("", "", None)
    got = s.get_vector(t, "g", "u")
    assert got.dtype == np.float32 and got.shape == (DIM,) and np.allclose(got, v[0], atol=1e-6)
    with pytest.raises(ImageNotFound):
        s.get_image(t, "g", "nope")


def test_list_pages_in_insertion_order_with_markers(backend: Backend) -> None:
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(9)
    s.create_group(t, "p", images(unit(rng, 10)))
    backend.flush()  # part of the group in sealed segments, the rest growing
    s.add_images(t, "p", images(unit(rng, 10), start=10))
    s.add_images(t, "p", images(unit(rng, 5), start=20))
    expected = [f"i{i}" for i in range(25)]
    assert all_ids(s, t, "p") == expected
    first, marker = s.list_images(t, "p", "", 4)
    assert [i.id for i in first] == expected[:4] and marker

    # Another client adds and deletes while this one pages: every image that exists throughout the
    # listing is seen exactly once, in order; the newcomers come after it.
    seen, marker, extra = [], "", 100
    while True:
        page, marker = s.list_images(t, "p", marker, 4)
        seen += [i.id for i in page]
        if not marker:
            break
        s.delete_images(t, "p", [seen[-1]])  # the last one shown
        s.add_images(t, "p", images(unit(rng, 1), start=extra))
        extra += 1
    survivors = [i for i in seen if i in expected]
    assert survivors == expected
    assert [i for i in seen if i not in expected] == sorted(
        (i for i in seen if i not in expected), key=lambda x: int(x[1:])
    )
    for bad in ("garbage!", "AAAA", "x", "////////////"):
        with pytest.raises(BadMarker):
            s.list_images(t, "p", bad, 10)
    # A marker past the end is an empty page, not an error.
    last, _ = s.list_images(t, "p", "", 1000)
    assert last


def test_search_two_groups_merged_and_sorted(backend: Backend) -> None:
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(10)
    q = unit(rng, 1)[0]
    va, vb = near(rng, q, 30, 0.15), near(rng, q, 30, 0.15)
    s.create_group(t, "a", images(va, "a"))
    s.create_group(t, "b", images(vb, "b"))
    vectors = {("a", f"a{i}"): va[i] for i in range(30)} | {("b", f"b{i}"): vb[i] for i in range(30)}
    queries = np.stack([q, unit(rng, 1)[0]])  # two views: an image scores its best over them
    for limit in (1, 7, 60, -1):
        hits = s.search(t, ["a", "b"], queries, limit, -1.0)
        assert_hits_match(hits, brute(vectors, queries, limit, -1.0))
    hits = s.search(t, ["a", "b"], queries, 60, -1.0)
    assert {h.group for h in hits} == {"a", "b"}
    top = hits[0]
    assert top.label == f"label{top.id[1:]}" and top.desc == {"n": int(top.id[1:])} and top.uri is None


def test_threshold_filters(backend: Backend) -> None:
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(11)
    q = unit(rng, 1)
    v = np.concatenate([near(rng, q[0], 40, 0.1), near(rng, q[0], 40, 0.6), unit(rng, 40)])
    s.create_group(t, "th", images(v))
    vectors = {("th", f"i{i}"): v[i] for i in range(len(v))}
    cosines = np.sort(v @ q[0])
    for floor in (0.95, 0.7, 0.3, 0.0):
        # Thresholds in a gap between scores, so float rounding cannot move an image across.
        idx = np.searchsorted(cosines, floor)
        if 0 < idx < len(cosines):
            floor = float((cosines[idx - 1] + cosines[idx]) / 2)
        hits = s.search(t, ["th"], q, -1, floor)
        assert all(h.cosine >= floor for h in hits)
        assert_hits_match(hits, brute(vectors, q, -1, floor))
        assert_hits_match(s.search(t, ["th"], q, 5, floor), brute(vectors, q, 5, floor))
    assert s.search(t, ["th"], q, -1, 1.01) == []


@pytest.fixture
def big_group(backend: Backend) -> tuple[Backend, np.ndarray, np.ndarray]:
    """12000 images all close to one query (cosine > ~0.8), added in batches of 1000."""
    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(12)
    q = unit(rng, 1)
    v = near(rng, q[0], 12_000, 0.06)
    s.create_group(t, "big", [])
    for start in range(0, len(v), 1000):
        assert s.add_images(t, "big", images(v[start : start + 1000], start=start)) == [None] * 1000
    return backend, q, v


def test_limit_10000_and_all(big_group: tuple[Backend, np.ndarray, np.ndarray]) -> None:
    backend, q, v = big_group
    s, t = backend.store, backend.tenant
    vectors = {("big", f"i{i}"): v[i] for i in range(len(v))}
    assert s.count(t, "big") == 12_000
    hits = s.search(t, ["big"], q, 10_000, 0.0)
    assert len(hits) == 10_000
    assert_hits_match(hits, brute(vectors, q, 10_000, 0.0))
    assert len({h.id for h in hits}) == 10_000
    everything = s.search(t, ["big"], q, -1, 0.0)
    assert len(everything) == 12_000 and len({h.id for h in everything}) == 12_000
    cosines = np.sort(v @ q[0])
    floor = float((cosines[5999] + cosines[6000]) / 2)  # between the 6000th and 6001st best from below
    assert len(s.search(t, ["big"], q, -1, floor)) == 6000


@pytest.mark.parametrize("backend", ["lite", "server"], indirect=True)
def test_limit_beyond_the_engine_top_k_cap(
    big_group: tuple[Backend, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Milvus caps top-k (16384); with the cap lowered, -1 and large limits must still see everything."""
    backend, q, v = big_group
    import tusou.store.milvus as milvus_store

    monkeypatch.setattr(milvus_store, "TOPK_CAP", 1500)
    s, t = backend.store, backend.tenant
    vectors = {("big", f"i{i}"): v[i] for i in range(len(v))}
    hits = s.search(t, ["big"], q, 10_000, 0.0)
    assert len(hits) == 10_000 and len({h.id for h in hits}) == 10_000
    assert_hits_match(hits, brute(vectors, q, 10_000, 0.0))
    assert len(s.search(t, ["big"], q, -1, 0.0)) == 12_000


# --- several writers ---------------------------------------------------------------------------------


def _race(fns: list[Callable[[], object]]) -> list[object]:
    results: list[object] = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 (the outcome is what the test inspects)
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_racing_writers_never_duplicate(backend: Backend) -> None:
    """Two handles on the same data (two processes, for Milvus) create one group and one id at once."""
    s, t = backend.store, backend.tenant
    other = s if backend.name == "sqlite" else backend.make(400_000)  # a separate handle and lock
    rng = np.random.default_rng(13)
    for round_ in range(3):
        group = f"race{round_}"
        out = _race([partial(s.create_group, t, group, []), partial(other.create_group, t, group, [])])
        assert sum(r == [] for r in out) <= 1 and all(r == [] or isinstance(r, GroupExists) for r in out)
        assert s.list_groups(t).count(group) == (1 if any(r == [] for r in out) else 0)
        if group not in s.list_groups(t):
            s.create_group(t, group, [])
        vec = unit(rng, 2)
        out = _race(
            [
                partial(s.add_images, t, group, [NewImage("same", "s", None, None, vec[0])]),
                partial(other.add_images, t, group, [NewImage("same", "o", None, None, vec[1])]),
            ]
        )
        successes = sum(r == [None] for r in out)
        assert successes <= 1 and s.count(t, group) == successes
        assert all_ids(s, t, group) == ["same"] * successes


def test_update_image_changes_metadata_only(backend: Backend) -> None:
    from tusou.store.base import ImageNotFound

    s, t = backend.store, backend.tenant
    rng = np.random.default_rng(7)
    vectors = unit(rng, 3)
    s.create_group(t, "u", images(vectors))
    info = s.update_image(t, "u", "i1", label="new")
    assert (info.id, info.label, info.desc) == ("i1", "new", {"n": 1})
    info = s.update_image(t, "u", "i1", desc={"price": 3})
    assert (info.label, info.desc) == ("new", {"price": 3})
    assert s.update_image(t, "u", "i1", desc=None).desc == ""
    got = s.get_image(t, "u", "i1")
    assert (got.label, got.desc) == ("new", "")
    # Vector, listing position and count are untouched.
    assert np.allclose(s.get_vector(t, "u", "i1"), vectors[1], atol=1e-6)
    assert all_ids(s, t, "u") == ["i0", "i1", "i2"] and s.count(t, "u") == 3
    hits = s.search(t, ["u"], vectors[1][None, :], 1, 0.5)
    assert [(h.id, h.label) for h in hits] == [("i1", "new")]
    with pytest.raises(ImageNotFound):
        s.update_image(t, "u", "nope", label="x")
    with pytest.raises(GroupNotFound):
        s.update_image(t, "missing", "i1", label="x")


# --- automatic tags and filters (docs/words.md) ------------------------------------------------------


def test_tags_filters_and_keyword_search(backend: Backend) -> None:
    from tusou.store.filters import parse_filter

    store, t = backend.store, backend.tenant
    rng = np.random.default_rng(11)
    vecs = unit(rng, 6)
    imgs = [
        NewImage(f"i{k}", "a" if k % 2 else "b", {"n": k, "kind": "x" if k < 3 else "y"}, None, vecs[k])
        for k in range(6)
    ]
    imgs[0].desc["flag"] = True  # type: ignore[index]
    imgs[4].desc["flag"] = 1  # type: ignore[index]
    for k, img in enumerate(imgs):
        img.tags = [[k % 3, 0.7], [9, 0.2]] if k != 5 else None
    store.create_group(t, "g", imgs)
    assert store.get_image(t, "g", "i1").tags == [[1, 0.7], [9, 0.2]]
    assert store.get_image(t, "g", "i5").tags is None
    page, _ = store.list_images(t, "g", "", 10)
    assert [i.tags for i in page][:2] == [[[0, 0.7], [9, 0.2]], [[1, 0.7], [9, 0.2]]]

    # Filtered vector search: the limit counts passing images.
    where = parse_filter({"desc.kind": "y", "label": "a"})
    hits = store.search(t, ["g"], vecs[0][None, :], 2, -1.0, where)
    assert {h.id for h in hits} == {"i3", "i5"} and all(h.desc["kind"] == "y" for h in hits)
    assert store.search(t, ["g"], vecs[0][None, :], 5, -1.0, parse_filter({"desc.n": {"gte": 4}}))[0].id in (
        "i4",
        "i5",
    )

    # true is not 1 (Milvus's JSON comparison would say it is; the exact check keeps them apart).
    hits = store.search(t, ["g"], vecs[0][None, :], 1, -1.0, parse_filter({"desc.flag": 1}))
    assert [h.id for h in hits] == ["i4"]
    hits = store.search(t, ["g"], vecs[0][None, :], 1, -1.0, parse_filter({"desc.flag": True}))
    assert [h.id for h in hits] == ["i0"]
    assert store.search(t, ["g"], vecs[0][None, :], 5, -1.0, parse_filter({"label": {"in": ["c"]}})) == []
    # Labels and desc changed by update_image are filtered by their new values.
    store.update_image(t, "g", "i2", label="c", desc={"kind": "z"})
    backend.flush()
    hits = store.search(t, ["g"], vecs[0][None, :], 5, -1.0, parse_filter({"label": "c", "desc.kind": "z"}))
    assert [h.id for h in hits] == ["i2"]
    store.update_image(t, "g", "i2", label="b", desc={"n": 2, "kind": "x"})
    backend.flush()

    # Keyword evidence: summed tag probabilities over the classes, best first, ties in insertion order.
    found = store.search_tags(t, ["g"], [0, 9], 10, 0.1)
    assert [(h.id, round(h.cosine, 4)) for h in found] == [
        ("i0", 0.9),
        ("i3", 0.9),
        ("i1", 0.2),
        ("i2", 0.2),
        ("i4", 0.2),
    ]
    assert [h.id for h in store.search_tags(t, ["g"], [0, 9], 1, 0.1)] == ["i0"]
    assert [h.id for h in store.search_tags(t, ["g"], [0], 10, 0.5, parse_filter({"label": "a"}))] == ["i3"]
    assert found[0].tags == [[0, 0.7], [9, 0.2]]

    # Retag replaces tags (and keeps everything else).
    assert store.set_tags(t, "g", {"i5": [[2, 0.95]], "missing": [[1, 1.0]]}) == 1
    backend.flush()
    assert store.get_image(t, "g", "i5").tags == [[2, 0.95]]
    assert store.get_image(t, "g", "i5").desc == {"n": 5, "kind": "y"}
    assert [h.id for h in store.search_tags(t, ["g"], [2], 10, 0.9)] == ["i5"]
    np.testing.assert_allclose(store.get_vector(t, "g", "i5"), vecs[5], atol=1e-6)
