"""A search on the Milvus store reads as little as it can, counted at the Milvus client, at the store's level.

Under ``Strong`` consistency every Milvus read waits until the server has applied all earlier writes (up to
about two time ticks, 200 ms by default); under ``Session`` (the default) a read waits only for this
process's own last write. The service's search must not check its groups in calls of their own before
searching: the existence check is folded into the search (rows found of a group show that it exists), and
only a group the search found nothing of is looked up in the registry, once per request, and once more
with Strong before "not exists" is answered.

The Milvus client is wrapped so that every read is recorded, in order, with its consistency level. Runs on
the Milvus Lite test double and, where it starts, a real Milvus server.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PHOTOS
from tests.test_store_contract import DIM, unit
from tusou.config import Settings
from tusou.domain import ImageRef, SearchQuery
from tusou.errors import GroupNotFound
from tusou.fetch import Fetcher
from tusou.service import Service
from tusou.store.base import NewImage

pytest_plugins = ["tests.store_backends"]

COLLECTION = "tusou_rounds"
READS = ("query", "search")


class VectorEmbedder:
    """Stands in for the model: every image becomes ``vector`` (one view); score is the cosine."""

    model_id = "m"
    default_threshold = 0.0
    min_short = 8

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector
        self.dim = len(vector)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([self.vector] * len(images))

    def embed_queries(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([self.vector[None, :]] * len(images))

    def score(self, cosine: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(cosine, dtype=np.float32), 0, 1)

    def cosine_for_score(self, score: float) -> float:
        return score


class ReadRecorder:
    """Wraps a MilvusClient: records every read, in order."""

    def __init__(self, client: Any) -> None:
        self._client = client
        #: (method, collection, consistency level, guarantee timestamp) of every read
        self.reads: list[tuple[str, str, str | None, int | None]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if name not in READS:
            return method

        def read(collection: str, *args: Any, **kwargs: Any) -> Any:
            # The store's count of the collection's groups (MilvusStore._alone) is refreshed in the
            # background, off every request's path: not one of the request's reads.
            if not (collection.endswith("_groups") and kwargs.get("output_fields") == ["count(*)"]):
                with self._lock:
                    self.reads.append(
                        (name, collection, kwargs.get("consistency_level"), kwargs.get("guarantee_timestamp"))
                    )
            return method(collection, *args, **kwargs)

        return read


@pytest.fixture(params=["lite", "server-Session", "server-Strong"])
def milvus_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.milvus_lite import LiteMilvusStore
    from tusou.store.milvus import MilvusStore

    if request.param.startswith("server"):
        store = MilvusStore(
            request.getfixturevalue("milvus_server").uri,
            collection=COLLECTION,
            model_id="m",
            dim=DIM,
            consistency=request.param.split("-")[1],
        )
    else:
        pytest.importorskip("milvus_lite")
        lite = str(tmp_path_factory.mktemp("milvus-lite") / "rounds.db")
        store = LiteMilvusStore(lite, collection=COLLECTION, model_id="m", dim=DIM)
    # The collection's groups counted as unknown for the test's length: reads keep the group filter
    # (without it, another test's group scoring above the threshold adds a search; that path has its own
    # test below).
    store._groups_seen = (-1, time.monotonic() + 3600)
    yield store
    store.close()


def read_level_of(store: Any) -> str:
    """The level the store's reads carry: Strong, or for Session a guarantee timestamp of this process's
    last write, which Milvus calls Customized (a server without a timestamp oracle: Strong)."""
    level = store._read_level(store.images)["consistency_level"]
    if store.consistency == "Strong":
        assert level == "Strong"
    elif store.uri.startswith("http"):
        assert level == "Customized"
    return level


def search_level_of(store: Any) -> str:
    """The level of a search's reads: the store's, except under Strong on a server, where the service's
    search pins one timestamp from the oracle for all of them (MilvusStore.read_snapshot): Customized."""
    level = read_level_of(store)
    return "Customized" if store.consistency == "Strong" and store.uri.startswith("http") else level


def photo_uri() -> str:
    data = sorted(PHOTOS.glob("*.jpg"))[0].read_bytes()
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("groups", [["r1"], ["r1", "r2"]])
def test_a_search_that_finds_its_groups_is_one_read(
    milvus_store: Any, tmp_path: Path, groups: list[str]
) -> None:
    store, tenant = milvus_store, "t-" + uuid.uuid4().hex[:12]
    vectors = unit(np.random.default_rng(3), 6)
    for g, group in enumerate(groups):
        # Each group holds the query's own vector: the search finds rows of every group.
        rows = [vectors[0], *vectors[g * 3 + 1 : g * 3 + 3]]
        store.create_group(
            tenant, group, [NewImage(f"{group}-{i}", "", None, None, v) for i, v in enumerate(rows)]
        )
    settings = Settings(data=tmp_path)
    service = Service(settings, store, VectorEmbedder(vectors[0]), Fetcher(settings))
    counter = ReadRecorder(store.client)
    store.client = counter
    try:
        matches = service.search(tenant, SearchQuery(groups, 10, 0.5, uri=photo_uri()))
    finally:
        store.client = counter._client
        service.close()
    assert {m.id for m in matches if m.score > 0.999} == {f"{group}-0" for group in groups}
    # The groups' existence is folded into the search: rows found of a group show that it exists, so no
    # registry read. With verification on, a search whose answer has fewer than verify.CANDIDATES hits asks
    # the store once more, down to verify.LOW (Service._scored): a second search. Every read is at the
    # store's level (Session by default: no wait for other processes' writes; under Strong the service pins
    # one timestamp for the whole request), so the request pays at most one consistency wait.
    level = search_level_of(store)
    names = [name for name, _, _, _ in counter.reads]
    assert names in (["search"], ["search"] * 2), counter.reads
    assert [read_level for _, _, read_level, _ in counter.reads] == [level] * len(counter.reads)
    stamps = {stamp for _, _, _, stamp in counter.reads}
    assert len(stamps) == 1 or store.consistency != "Strong", stamps  # one pinned timestamp under Strong
    print(f"\n[milvus rounds] {len(groups)} group(s): {len(counter.reads)} {level} reads")


def test_a_group_without_hits_is_checked_after_the_search(milvus_store: Any, tmp_path: Path) -> None:
    store, tenant = milvus_store, "t-" + uuid.uuid4().hex[:12]
    vectors = unit(np.random.default_rng(7), 3)
    store.create_group(tenant, "far", [NewImage("f", "", None, None, vectors[1])])
    settings = Settings(data=tmp_path)
    service = Service(settings, store, VectorEmbedder(vectors[0]), Fetcher(settings))
    counter = ReadRecorder(store.client)
    store.client = counter
    try:
        # A threshold no row of "far" reaches: the search returns nothing, then the group is looked up.
        matches = service.search(tenant, SearchQuery(["far"], 10, 0.999, uri=photo_uri()))
    finally:
        store.client = counter._client
        service.close()
    assert matches == []
    names = [(name, collection) for name, collection, _, _ in counter.reads]
    assert names[0] == ("search", store.images), counter.reads
    # The group's registry row was read (once per request, however many searches followed).
    assert names.count(("query", store.groups)) == 1, counter.reads
    assert {name for name, _ in names[1:]} <= {"search", "query"}


def test_a_missing_group_is_found_after_the_search(milvus_store: Any, tmp_path: Path) -> None:
    store, tenant = milvus_store, "t-" + uuid.uuid4().hex[:12]
    vector = unit(np.random.default_rng(4), 1)[0]
    store.create_group(tenant, "here", [NewImage("a", "", None, None, vector)])
    settings = Settings(data=tmp_path)
    service = Service(settings, store, VectorEmbedder(vector), Fetcher(settings))
    counter = ReadRecorder(store.client)
    store.client = counter
    try:
        with pytest.raises(GroupNotFound) as missing:
            service.search(tenant, SearchQuery(["here", "gone"], 10, None, uri=photo_uri()))
    finally:
        store.client = counter._client
        service.close()
    assert missing.value.message == "group gone not exists"
    # The search (it finds "here"'s image: "here" needs no check), then "gone" in the registry; under
    # Session, a group that was not found is looked up once more with Strong (another process may have
    # just created it) before "not exists" is answered. (Under Strong, the search's pinned timestamp is
    # already as fresh as a Strong read: no second look.)
    level = search_level_of(store)
    fresh = level == "Strong" or store.consistency == "Strong"
    reads = [(name, collection, lv) for name, collection, lv, _ in counter.reads]
    assert reads == [("search", store.images, level), ("query", store.groups, level)] + (
        [] if fresh else [("query", store.groups, "Strong")]
    ), reads


def test_a_search_by_stored_id_waits_once(milvus_store: Any, tmp_path: Path) -> None:
    """A search by a stored image's id reads its vector, then searches: two reads one after the other, but
    one consistency wait. Under Strong, every read of the request carries one guarantee timestamp taken
    from the server's oracle when the search began (so the second read finds it reached and sees exactly
    what the first saw); under Session, this process's last write's timestamp, as every read."""
    store, tenant = milvus_store, "t-" + uuid.uuid4().hex[:12]
    vectors = unit(np.random.default_rng(6), 3)
    store.create_group(tenant, "r1", [NewImage(f"r1-{i}", "", None, None, v) for i, v in enumerate(vectors)])
    settings = Settings(data=tmp_path)
    service = Service(settings, store, VectorEmbedder(vectors[0]), Fetcher(settings))
    counter = ReadRecorder(store.client)
    store.client = counter
    try:
        matches = service.search(tenant, SearchQuery(["r1"], 10, 0.5, by_id=ImageRef("r1", "r1-2")))
    finally:
        store.client = counter._client
        service.close()
    assert [m.id for m in matches][:1] == ["r1-2"] and matches[0].score == pytest.approx(1.0, abs=1e-4)
    # The vector's row (found: its group exists), then the search (it finds the image: no group check).
    assert [(name, c) for name, c, _, _ in counter.reads] == [
        ("query", store.images),
        ("search", store.images),
    ]
    levels = {(level, stamp) for _, _, level, stamp in counter.reads}
    if store.uri.startswith("http") and store.consistency == "Strong":
        assert len(levels) == 1, levels  # one guarantee timestamp for both reads: one wait
        ((level, stamp),) = levels
        assert level == "Customized" and stamp is not None and stamp > 1  # from the oracle
    elif store.uri.startswith("http"):
        # Session: both carry this process's last write to the images' collection: the second finds it
        # reached.
        assert len(levels) == 1 and next(iter(levels))[0] == "Customized", levels
    print(f"\n[milvus rounds] search by id ({store.consistency}): {len(counter.reads)} reads, {levels}")


@pytest.mark.parametrize("backend", ["lite", "server"])
def test_a_search_without_the_group_filter_falls_back_when_another_group_scores(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, backend: str
) -> None:
    """A collection holding only the searched group is searched without the ``gkey`` filter (Milvus
    evaluates it on every row of the partition). Another group made since the store last counted them
    (here: a count made stale on purpose) returns rows at or above the threshold: the search asks again
    with the filter, and the answer is the group's own, for every limit. A lookup by id without the filter
    keeps only the group's row of that id."""
    from tests.milvus_lite import LiteMilvusStore
    from tusou.store.milvus import MilvusStore

    collection = "alone_" + uuid.uuid4().hex[:8]
    if backend == "server":
        uri = request.getfixturevalue("milvus_server").uri
        store: Any = MilvusStore(uri, collection=collection, model_id="m", dim=DIM)
    else:
        pytest.importorskip("milvus_lite")
        lite = str(tmp_path_factory.mktemp("milvus-lite") / "alone.db")
        store = LiteMilvusStore(lite, collection=collection, model_id="m", dim=DIM)
    try:
        rng = np.random.default_rng(9)
        query, noise = unit(rng, 2)
        near = (query + 0.15 * noise) / np.linalg.norm(query + 0.15 * noise)  # cosine ~0.99 to the query
        store.create_group(
            "t", "a", [NewImage("x", "", None, None, near), NewImage("y", "", None, None, noise)]
        )
        store._count_groups()
        assert store._alone(1)
        filters: list[str] = []
        search = store.client.search

        def recording(collection: str, *args: Any, **kwargs: Any) -> Any:
            filters.append(kwargs.get("filter", ""))
            return search(collection, *args, **kwargs)

        store.client.search = recording
        assert [h.id for h in store.search("t", ["a"], query[None, :], 1, 0.5)] == ["x"]
        assert filters == [""]  # alone: no group filter
        # Another tenant's group, holding the query itself and an image with the same id: made after the
        # count (as by another process), which still says one group.
        store.create_group("u", "b", [NewImage("x", "", None, None, query)])
        store._groups_seen = (1, time.monotonic())
        filters.clear()
        for limit in (1, 10, -1):
            hits = store.search("t", ["a"], query[None, :], limit, 0.5)
            assert [(h.group, h.id) for h in hits] == [("a", "x")], limit
        # Each: first without the filter (another group's row scored), then again with it.
        assert [bool(f) for f in filters] == [False, True] * 3, filters
        assert all(f.startswith("gkey in [") for f in filters[1::2]), filters
        assert np.allclose(store.get_vector("t", "a", "x"), near, atol=1e-6)
        assert np.allclose(store.get_vector("u", "b", "x"), query, atol=1e-6)
        store.client.search = search
    finally:
        store.close()
