"""Verification of search candidates with keypoints (TUSOU_VERIFY, on by default), through real HTTP with
real photos; each test compares a server with it on and one with it off."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageEnhance

from tests.conftest import QiniuClient, Tusou, data_uri, jpeg
from tusou.config import Settings
from tusou.embed.base import Embedder


def combo(image: Image.Image) -> str:
    """The dev set's hardest edit: crop, downscale to ~150 px, brighten, caption, JPEG quality 30."""
    w, h = image.size
    part = image.crop((int(w * 0.12), int(h * 0.1), int(w * 0.88), int(h * 0.92)))
    size = (
        (160, part.height * 160 // part.width)
        if part.width >= part.height
        else (part.width * 140 // part.height, 140)
    )
    part = ImageEnhance.Brightness(part.resize(size)).enhance(1.3)
    ImageDraw.Draw(part).text((5, part.height - 15), "watermark", fill=(255, 255, 255))
    return data_uri(jpeg(part, 30))


@pytest.fixture
def verified(tmp_path: Path, embedder: Embedder) -> Iterator[Tusou]:
    running = Tusou(Settings(data=tmp_path / "verified", fetch_allow=["127.0.0.1"], verify=True), embedder)
    running.server.__enter__()
    yield running
    running.close()


@pytest.fixture
def client(tmp_path: Path, embedder: Embedder) -> Iterator[QiniuClient]:
    """A client of a server with verification off (TUSOU_VERIFY=false)."""
    running = Tusou(Settings(data=tmp_path / "plain", fetch_allow=["127.0.0.1"], verify=False), embedder)
    running.server.__enter__()
    yield running.client("plain")
    running.close()


def test_verification_is_on_by_default(tmp_path: Path) -> None:
    assert Settings(data=tmp_path).verify


def new_group(client: QiniuClient, photos: list[Image.Image], keep: list[int]) -> None:
    body = {"data": [{"uri": data_uri(jpeg(photos[i])), "attribute": {"id": f"p{i}"}} for i in keep]}
    assert client.post("/v1/image/group/g/new", body).json()["errors"] == [None] * len(keep)


def search(
    client: QiniuClient, uri: str, threshold: float | None = None, limit: int = 3
) -> list[tuple[str, float]]:
    params: dict = {"groups": ["g"], "limit": limit}
    if threshold is not None:
        params["threshold"] = threshold
    resp = client.post("/v1/image/groups/search", {"data": {"uri": uri}, "params": params})
    assert resp.status_code == 200, resp.text
    return [(hit["id"], hit["score"]) for hit in resp.json()["result"]]


# Photos whose combo copy scores below the near-duplicate band without verification (8, 9), or even below
# the default threshold (11: not found at all).
HARD = [8, 9, 11]


def test_a_verified_copy_scores_in_the_near_duplicate_band(
    verified: Tusou, client: QiniuClient, photos: list[Image.Image]
) -> None:
    everything = list(range(len(photos)))
    plain = client
    new_group(plain, photos, everything)
    checked = verified.client("v")
    new_group(checked, photos, everything)
    assert search(plain, combo(photos[11])) == []
    for i in HARD:
        before = search(plain, combo(photos[i]), 0.85)
        assert before == [], (i, before)
        after = search(checked, combo(photos[i]), 0.85)
        assert [hit for hit, _ in after] == [f"p{i}"] and after[0][1] >= 0.85, (i, after)
    # A copy that already scores in the band keeps its own score: verification only ever raises one.
    assert search(checked, combo(photos[4])) == search(plain, combo(photos[4]))


def test_a_small_limit_answers_as_if_every_candidate_was_checked(
    verified: Tusou, photos: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    """limit=1 or 2 (under verify.CANDIDATES): when the hits asked for already score in the near-duplicate
    band, the store is asked once, without the other candidates (verification raises one to 0.85 at most,
    never past them); otherwise the candidates are fetched and checked. Either way the answer is the first
    hits of a search that checked every candidate (limit=3)."""
    client = verified.client("v")
    new_group(client, photos, list(range(len(photos))))
    store = verified.service.store
    asked: list[int] = []
    real_search = store.search

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(args[3])  # the limit the store was asked for
        return real_search(*args, **kwargs)

    monkeypatch.setattr(store, "search", counted)
    answered_at_once = widened = 0
    for i in [0, 4, *HARD]:
        for uri in (data_uri(jpeg(photos[i])), combo(photos[i])):
            # A low threshold keeps the hard copies' unverified scores (under 0.85) in the answer.
            every_candidate = search(client, uri, 0.4, limit=3)
            for limit in (1, 2):
                asked.clear()
                got = search(client, uri, 0.4, limit=limit)
                assert got == every_candidate[:limit], (i, limit, got, every_candidate)
                if asked == [limit]:
                    assert len(got) == limit and min(score for _, score in got) >= 0.85, (i, got)
                    answered_at_once += 1
                else:
                    assert asked[:2] == [limit, 3], asked
                    widened += 1
    assert answered_at_once and widened, (answered_at_once, widened)


def test_no_copy_in_the_group_nothing_is_verified(verified: Tusou, photos: list[Image.Image]) -> None:
    client = verified.client("v")
    new_group(client, photos, [i for i in range(len(photos)) if i not in HARD])
    for i in HARD:
        assert search(client, combo(photos[i])) == [], i
        assert search(client, data_uri(jpeg(photos[i]))) == [], i


def test_keypoints_follow_the_images(verified: Tusou, photos: list[Image.Image]) -> None:
    client = verified.client("v")
    tenant = client.access_key
    new_group(client, photos, [0, 1, 2])
    points = verified.service.keypoints
    assert points is not None and points.count(tenant, "g") == 3
    assert client.post("/v1/image/group/g/delete", {"images": ["p1"]}).status_code == 200
    assert points.count(tenant, "g") == 2
    assert client.post("/v1/image/group/g/remove").status_code == 200
    assert points.count(tenant, "g") == 0


def test_duplicate_detection_on_add_uses_verification(
    verified: Tusou, client: QiniuClient, photos: list[Image.Image]
) -> None:
    keep = [i for i in range(len(photos)) if i != 10]
    checked = verified.client("v")
    for api in (client, checked):
        new_group(api, photos, keep)
    copies = [{"uri": combo(photos[i]), "attribute": {"id": f"copy{i}"}} for i in HARD]
    copies.append({"uri": combo(photos[10]), "attribute": {"id": "new10"}})  # its original is not stored
    body = {"data": copies, "params": {"duplicates": "refuse"}}
    plain = client.post("/v1/image/group/g/add", body).json()
    assert plain["duplicates"] == [None] * 4 and plain["images"] == ["copy8", "copy9", "copy11", "new10"]
    out = checked.post("/v1/image/group/g/add", body).json()
    assert out["duplicates"] == [{"id": f"p{i}", "score": 0.85} for i in HARD] + [None]
    assert out["images"] == ["", "", "", "new10"]
    assert out["errors"][:3] == [{"code": 409, "message": f"near-duplicate of image p{i}"} for i in HARD]


TOWERS = Path(__file__).resolve().parent / "data" / "towers"
# Parts of a photo of the Burj Khalifa that the CNN scores close to a photo of another tower, the Qutub Minar.
BURJ_CROPS = [(0, 0, 199, 224), (0, 48, 219, 200), (0, 16, 199, 256), (20, 0, 199, 288)]


def test_an_unverified_candidate_in_the_ambiguous_band_is_pushed_down(
    verified: Tusou, client: QiniuClient, photos: list[Image.Image], tmp_path: Path, embedder: Embedder
) -> None:
    tower = Image.open(TOWERS / "kutubMinar.jpg").convert("RGB")
    burj = Image.open(TOWERS / "burj.jpg").convert("RGB")
    body = {"data": [{"uri": data_uri(jpeg(tower)), "attribute": {"id": "qutub"}}]}
    body["data"] += [{"uri": data_uri(jpeg(p)), "attribute": {"id": f"p{i}"}} for i, p in enumerate(photos)]
    # An operator who wants "similar images" lowers the default: the pushed-down candidate is then visible.
    similar = Tusou(
        Settings(data=tmp_path / "similar", fetch_allow=["127.0.0.1"], verify=True, default_threshold=0.5),
        embedder,
    )
    similar.server.__enter__()
    try:
        checked, loose = verified.client("v"), similar.client("v")
        for api in (client, checked, loose):
            assert api.post("/v1/image/group/g/new", body).json()["errors"] == [None] * len(body["data"])
        ambiguous = 0
        for box in BURJ_CROPS:
            uri = data_uri(jpeg(burj.crop(box)))
            plain = search(client, uri)
            if not plain or not 0.70 <= plain[0][1] < 0.85:
                continue
            ambiguous += 1
            assert plain[0][0] == "qutub", (box, plain)
            # Not a copy: no keypoints agree, so the candidate drops by the band's width, below the default.
            assert search(checked, uri) == [], box
            pushed = dict(search(loose, uri))
            assert pushed["qutub"] == pytest.approx(plain[0][1] - 0.15, abs=1e-4), (box, pushed)
    finally:
        similar.close()
    assert ambiguous >= 2, "the towers no longer score in the ambiguous band: pick other crops"


def test_a_search_with_labels_checks_the_hits_above_the_default(
    verified: Tusou, client: QiniuClient, photos: list[Image.Image]
) -> None:
    checked = verified.client("v")
    uris = [data_uri(jpeg(p)) for p in photos]
    body = {"data": [{"uri": u, "attribute": {"id": f"p{i}", "label": "photo"}} for i, u in enumerate(uris)]}
    for api in (client, checked):
        assert api.post("/v1/image/group/g/new", body).json()["errors"] == [None] * len(photos)

    def labelled(api: QiniuClient, uri: str, threshold: float) -> list[tuple[str, float]]:
        params = {"groups": ["g"], "limit": 3, "labels": ["photo"], "threshold": threshold}
        resp = api.post("/v1/image/groups/search", {"data": {"uri": uri}, "params": params})
        assert resp.status_code == 200, resp.text
        return [(hit["id"], hit["score"]) for hit in resp.json()["result"]]

    # A copy above the default threshold is checked, and verified up to the near-duplicate band ...
    inside = [i for i in HARD if search(client, combo(photos[i]))]
    assert inside
    for i in inside:
        assert labelled(checked, combo(photos[i]), 0.85) == [(f"p{i}", 0.85)], i
    # ... one below it is not (a search with labels asks the store for every hit above its cut), though a
    # search without labels finds it.
    below = [i for i in HARD if not search(client, combo(photos[i]))]
    assert below
    for i in below:
        assert labelled(checked, combo(photos[i]), 0.85) == [], i
        assert [hit for hit, _ in search(checked, combo(photos[i]), 0.85)] == [f"p{i}"], i
