"""The use cases without HTTP and without the model: typed requests in, domain objects out.

A fake :class:`tusou.embed.base.Embedder` (a colour thumbnail as the vector) stands in for the CNN, so
these tests need no model; the store is the real SQLite one, the images are the real test photos.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PHOTOS
from tusou.config import Settings
from tusou.domain import (
    DeleteImages,
    ImageRef,
    ItemError,
    ListImages,
    Match,
    NewImages,
    NewItem,
    SearchQuery,
    UpdateImage,
)
from tusou.errors import GroupExists, GroupNotFound, ImageNotFound
from tusou.fetch import Fetcher
from tusou.images import ImageError
from tusou.service import Observer, Service
from tusou.store.sqlite import SQLiteStore

PHOTO_FILES = sorted(PHOTOS.glob("*.jpg"))


class ThumbnailEmbedder:
    """An 8x8 colour thumbnail, centred and normalised: near-duplicates are close, other photos are not.

    Score is (cosine + 1) / 2, so the inverse map is exact.
    """

    model_id = "fake-thumbnail"
    dim = 8 * 8 * 3
    default_threshold = 0.9
    min_short = 8
    min_short = 8

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def _vector(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32).ravel()
        pixels -= pixels.mean()
        return pixels / (np.linalg.norm(pixels) or 1.0)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.calls.append(("index", len(images)))
        return np.stack([self._vector(image) for image in images])

    def embed_queries(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.calls.append(("query", len(images)))
        return np.stack([self._vector(image) for image in images])[:, None, :]

    def score(self, cosine: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(cosine, dtype=np.float32) + 1) / 2, 0, 1)

    def cosine_for_score(self, score: float) -> float:
        return 2 * score - 1


def photo_uri(index: int) -> str:
    return (
        "data:application/octet-stream;base64," + base64.b64encode(PHOTO_FILES[index].read_bytes()).decode()
    )


def near_duplicate_uri(index: int) -> str:
    out = io.BytesIO()
    Image.open(PHOTO_FILES[index]).convert("RGB").resize((200, 150)).save(out, "JPEG", quality=50)
    return "data:application/octet-stream;base64," + base64.b64encode(out.getvalue()).decode()


def item(index: int, image_id: str | None, label: str = "", desc: object = None) -> NewItem:
    return NewItem(image_id, label, desc, photo_uri(index))  # type: ignore[arg-type]


class Recorder(Observer):
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.embedded_counts: list[tuple[str, int]] = []

    def embedded(self, purpose: str, count: int, seconds: float) -> None:
        self.embedded_counts.append((purpose, count))

    def image_failed(self, error: ImageError) -> None:
        self.failed.append(error.kind)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    settings = Settings(data=tmp_path)
    embedder = ThumbnailEmbedder()
    store = SQLiteStore(tmp_path / "tusou.db", model_id=embedder.model_id, dim=embedder.dim)
    running = Service(settings, store, embedder, Fetcher(settings))
    yield running
    running.close()


def test_batch_keeps_refused_items_in_place_and_generates_missing_ids(service: Service) -> None:
    recorder = Recorder()
    service.observer = recorder
    refused = ItemError(400, "empty uri")
    broken = NewItem("bad", "", None, "data:application/octet-stream;base64,bm90IGFuIGltYWdl")
    result = service.new_group(
        "t", NewImages("g", [item(0, "a", "x", {"k": 1}), refused, broken, item(1, None)])
    )
    assert result.images[:3] == ["a", "", ""] and len(result.images[3]) == 32
    assert result.errors == [None, refused, ItemError(415, "not an image: unknown format"), None]
    # Each image is embedded as soon as it is decoded: calls may or may not have merged them.
    assert recorder.failed == ["image_unrecognized"]
    assert {p for p, _ in recorder.embedded_counts} == {"index"}
    assert sum(n for _, n in recorder.embedded_counts) == 2
    assert service.group_count("t", "g") == 2
    # A repeated id is the store's per-image error, in place too.
    again = service.add_images("t", NewImages("g", [item(2, "a"), item(3, "b")]))
    assert again.images == ["", "b"] and again.errors == [ItemError(400, "id already exists"), None]


def test_group_existence_errors_are_typed(service: Service) -> None:
    service.new_group("t", NewImages("g", []))
    with pytest.raises(GroupExists):
        service.new_group("t", NewImages("g", []))
    with pytest.raises(GroupNotFound) as missing:
        service.add_images("t", NewImages("other", [item(0, "a")]))
    assert (missing.value.status, missing.value.message) == (400, "group other not exists")
    with pytest.raises(GroupNotFound):  # tenants do not see each other's groups
        service.group_count("someone-else", "g")
    service.remove_group("t", "g")
    assert service.list_groups("t") == []


def test_search_returns_matches_with_scores(service: Service) -> None:
    service.new_group(
        "t", NewImages("g", [item(i, f"p{i}", "even" if i % 2 == 0 else "odd") for i in range(6)])
    )
    query = SearchQuery(["g"], limit=3, threshold=None, uri=photo_uri(4))
    matches = service.search("t", query)
    assert matches[0] == Match("g", "p4", "even", "", None, pytest.approx(1.0, abs=1e-5))
    assert all(m.score >= service.default_threshold for m in matches)
    # A threshold below the system default is raised to it; one above it is kept.
    assert service.search("t", SearchQuery(["g"], 10, 0.0, uri=photo_uri(4))) == matches[:10]
    # The label filter applies before the limit: a near-duplicate labelled "copy" ranks below p4.
    service.add_images("t", NewImages("g", [NewItem("dup", "copy", None, near_duplicate_uri(4))]))
    assert [m.id for m in service.search("t", SearchQuery(["g"], 2, None, uri=photo_uri(4)))] == ["p4", "dup"]
    copies = service.search("t", SearchQuery(["g"], 1, None, uri=photo_uri(4), labels=frozenset({"copy"})))
    assert [m.id for m in copies] == ["dup"]
    # A stored image's vector is a query too.
    by_id = service.search("t", SearchQuery(["g"], 1, None, by_id=ImageRef("g", "p2")))
    assert [m.id for m in by_id] == ["p2"]
    with pytest.raises(ImageNotFound):
        service.search("t", SearchQuery(["g"], 1, None, by_id=ImageRef("g", "nope")))
    with pytest.raises(GroupNotFound):
        service.search("t", SearchQuery(["g", "zz"], 1, None, uri=photo_uri(4)))


def test_search_with_a_bad_image_raises_its_image_error(service: Service) -> None:
    service.new_group("t", NewImages("g", []))
    with pytest.raises(ImageError) as bad:
        service.search("t", SearchQuery(["g"], 1, None, uri="data:application/octet-stream;base64,AAAA"))
    assert bad.value.status >= 400


def test_a_missing_group_outranks_a_bad_query_image(service: Service) -> None:
    # The store checks groups inside the search, after the image is loaded; a request wrong twice still
    # gets the group error first, as it did when the service checked the groups beforehand.
    service.new_group("t", NewImages("g", []))
    bad = "data:application/octet-stream;base64,bm90IGFuIGltYWdl"
    with pytest.raises(GroupNotFound) as missing:
        service.search("t", SearchQuery(["g", "zz"], 1, None, uri=bad))
    assert missing.value.message == "group zz not exists"
    with pytest.raises(GroupNotFound):
        service.search("t", SearchQuery(["zz"], 1, None, by_id=ImageRef("g", "nope")))
    with pytest.raises(ImageError):
        service.search("t", SearchQuery(["g"], 1, None, uri=bad))


def test_list_get_update_delete(service: Service) -> None:
    service.new_group("t", NewImages("g", [item(i, f"p{i}", "l", {"n": i}) for i in range(5)]))
    first = service.list_images("t", ListImages("g", "", 2))
    assert [i.id for i in first.images] == ["p0", "p1"] and first.marker
    rest = service.list_images("t", ListImages("g", first.marker, 10))
    assert [i.id for i in rest.images] == ["p2", "p3", "p4"] and rest.marker == ""
    assert service.get_image("t", ImageRef("g", "p1")).desc == {"n": 1}
    kept = service.update_image("t", UpdateImage("g", "p1", "new", None, keep_desc=True))
    assert (kept.label, kept.desc) == ("new", {"n": 1})
    cleared = service.update_image("t", UpdateImage("g", "p1", None, None, keep_desc=False))
    assert cleared.label == "new" and cleared.desc in (None, "")
    assert service.delete_images("t", DeleteImages("g", ["p0", "p1", "never"])) == 2
    assert service.group_count("t", "g") == 3


class WatchedStore(SQLiteStore):
    """The real store, counting closes; ``down`` makes reads fail as an unreachable backend's would."""

    closes = 0
    down = False

    def close(self) -> None:
        self.closes += 1
        super().close()

    def list_groups(self, tenant: str) -> list[str]:
        if self.down:
            raise OSError("store unreachable")
        return super().list_groups(tenant)


def test_service_owns_its_store_and_answers_health(tmp_path: Path) -> None:
    settings = Settings(data=tmp_path)
    embedder = ThumbnailEmbedder()
    store = WatchedStore(tmp_path / "tusou.db", model_id=embedder.model_id, dim=embedder.dim)
    service = Service(settings, store, embedder, Fetcher(settings))
    service.health()
    store.down = True
    with pytest.raises(OSError):
        service.health()
    service.close()
    assert store.closes == 1


def test_a_large_delete_gives_its_pages_back_to_the_file_system(service: Service, tmp_path: Path) -> None:
    """The service deletes 1000 ids at a time; the store still hands the freed pages back (incremental
    vacuum, stepped to its end) once more than 1000 rows went, across those calls, and after a group's
    removal: deletes free disk space (they had freed one page each)."""
    import sqlite3

    from tusou.domain import DeleteImages
    from tusou.store.base import NewImage

    rng = np.random.default_rng(0)
    dim = service.embedder.dim
    images = [
        NewImage(f"i{k}", "", None, None, v / np.linalg.norm(v))
        for k, v in enumerate(rng.standard_normal((2600, dim)).astype(np.float32))
    ]
    service.store.create_group("ak", "g", images)
    # Chunks of 1000, 1000 and 1: the second call passes 1000 rows and releases; the last row's page stays.
    assert service.delete_images("ak", DeleteImages("g", [f"i{k}" for k in range(2001)])) == 2001
    with sqlite3.connect(tmp_path / "tusou.db") as conn:
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] < 10  # ~400 pages when none went back
        service.store.remove_group("ak", "g")  # the rest of the group, as one removal
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
