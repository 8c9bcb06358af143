"""Thumbnails kept per stored image (tusou/thumbs.py) and POST /v1/image/group/<id>/thumbs, over real HTTP."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from tests.conftest import MODEL_CACHE, ImageServer, QiniuClient, Tusou, data_uri, jpeg
from tusou.cli import main
from tusou.config import Settings
from tusou.embed.base import Embedder
from tusou.thumbs import MAX_BYTES, MAX_SIDE, ThumbStore


def decode(uri: str) -> Image.Image:
    head, _, payload = uri.partition(",")
    assert head == "data:image/jpeg;base64"
    raw = base64.b64decode(payload)
    assert len(raw) <= MAX_BYTES
    image = Image.open(io.BytesIO(raw))
    assert image.format == "JPEG"
    return image


def thumbs(client: QiniuClient, group: str, ids: list[str]) -> dict[str, str]:
    resp = client.post(f"/v1/image/group/{group}/thumbs", {"images": ids})
    assert resp.status_code == 200, resp.text
    return dict(resp.json()["thumbs"])


def test_every_stored_image_has_a_small_picture_until_it_is_deleted(
    tusou: Tusou, client: QiniuClient, photos: list[Image.Image], image_server: ImageServer
) -> None:
    big = photos[0].resize((2400, 1800))  # a large upload still gives a bounded thumbnail
    url = image_server.put("p2.jpg", jpeg(photos[2]))
    body = {
        "data": [
            {"uri": data_uri(jpeg(big)), "attribute": {"id": "big"}},
            {"uri": data_uri(jpeg(photos[1])), "attribute": {"id": "file"}},
            {"uri": url, "attribute": {"id": "url"}},
            {"uri": "data:application/octet-stream;base64,bm90IGFuIGltYWdl", "attribute": {"id": "junk"}},
        ]
    }
    resp = client.post("/v1/image/group/t/new", body)
    assert resp.json()["images"] == ["big", "file", "url", ""]

    got = thumbs(client, "t", ["big", "file", "url", "junk", "never"])
    assert set(got) == {"big", "file", "url"}  # a failed image and an unknown id have none
    for image_id, uri in got.items():
        picture = decode(uri)
        assert max(picture.size) == MAX_SIDE, image_id
    # The aspect ratio is kept: 4:3 photos give 128x96.
    assert decode(got["big"]).size == (MAX_SIDE, MAX_SIDE * 3 // 4)
    # The picture is of the image: the big upload's thumbnail looks like the photo, not like another one.
    small = decode(got["big"]).convert("L").resize((16, 12))
    ref = photos[0].convert("L").resize((16, 12))
    other = photos[5].convert("L").resize((16, 12))

    def distance(a: Image.Image, b: Image.Image) -> int:
        return sum(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes(), strict=True))

    assert distance(small, ref) * 3 < distance(small, other)

    # A repeated id does not replace the stored image, nor its picture.
    again = client.post("/v1/image/group/t/add", {"data": [{"uri": url, "attribute": {"id": "file"}}]})
    assert again.json()["errors"][0]["message"] == "id already exists"
    assert thumbs(client, "t", ["file"]) == {"file": got["file"]}

    # Deleted with the image, and with the group.
    assert client.post("/v1/image/group/t/delete", {"images": ["file"]}).status_code == 200
    assert set(thumbs(client, "t", ["big", "file", "url"])) == {"big", "url"}
    assert tusou.service.thumbs is not None
    assert tusou.service.thumbs.count(client.access_key, "t") == 2
    assert client.post("/v1/image/group/t/remove").status_code == 200
    assert tusou.service.thumbs.count(client.access_key, "t") == 0
    gone = client.post("/v1/image/group/t/thumbs", {"images": ["big"]})
    assert gone.status_code == 400 and gone.json() == {"error": "group t not exists"}


def test_thumbnails_belong_to_their_tenant(tusou: Tusou, photos: list[Image.Image]) -> None:
    alice, bob = tusou.client("alice"), tusou.client("bob")
    for who, photo in ((alice, photos[0]), (bob, photos[1])):
        body = {"data": [{"uri": data_uri(jpeg(photo)), "attribute": {"id": "same"}}]}
        assert who.post("/v1/image/group/g/new", body).status_code == 200
    assert thumbs(alice, "g", ["same"]) != thumbs(bob, "g", ["same"])
    assert bob.post("/v1/image/group/g/remove").status_code == 200
    assert set(thumbs(alice, "g", ["same"])) == {"same"}


def test_thumbs_requests_are_checked(client: QiniuClient) -> None:
    assert client.post("/v1/image/group/g/new", {"data": []}).status_code == 200
    for body, status, error in (
        ({"images": "x"}, 200, None),
        ({"images": [1, "2"]}, 200, None),
        ({"images": [None]}, 400, "invalid images"),
        ({"images": {"a": 1}}, 400, "invalid images"),
        ({"images": [str(i) for i in range(1001)]}, 400, "too many images, at most 1000"),
    ):
        resp = client.post("/v1/image/group/g/thumbs", body)
        assert resp.status_code == status, (body, resp.text)
        if error:
            assert resp.json() == {"error": error}
        else:
            assert resp.json() == {"thumbs": {}}
    unsigned = client.session.post(client.base + "/v1/image/group/g/thumbs", json={"images": ["a"]})
    assert unsigned.status_code == 401


@pytest.fixture
def no_thumbs(tmp_path: Path, embedder: Embedder) -> Iterator[Tusou]:
    running = Tusou(Settings(data=tmp_path / "data", thumbnails=False, fetch_allow=["127.0.0.1"]), embedder)
    running.server.__enter__()
    yield running
    running.close()


def test_thumbnails_can_be_turned_off(no_thumbs: Tusou, photos: list[Image.Image]) -> None:
    client = no_thumbs.client()
    body = {"data": [{"uri": data_uri(jpeg(photos[0])), "attribute": {"id": "a"}}]}
    assert client.post("/v1/image/group/g/new", body).status_code == 200
    assert thumbs(client, "g", ["a"]) == {}
    assert no_thumbs.service.thumbs is None
    assert not (no_thumbs.settings.data / "thumbs.db").exists()


def test_the_thumbs_command_makes_missing_pictures_from_stored_urls(
    no_thumbs: Tusou, photos: list[Image.Image], image_server: ImageServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stored while thumbnails were off: a URL image, a data-URI image, and a URL that is gone by now.
    client = no_thumbs.client()
    kept = image_server.put("kept.jpg", jpeg(photos[3]))
    gone = image_server.put("gone.jpg", jpeg(photos[4]))
    body = {
        "data": [
            {"uri": kept, "attribute": {"id": "url"}},
            {"uri": data_uri(jpeg(photos[1])), "attribute": {"id": "inline"}},
            {"uri": gone, "attribute": {"id": "gone"}},
        ]
    }
    assert client.post("/v1/image/group/old/new", body).json()["images"] == ["url", "inline", "gone"]
    del image_server.files["/gone.jpg"]

    monkeypatch.setenv(
        "TUSOU_MODEL_DIR", str(Settings(data=MODEL_CACHE.parent / "tusou-model-data").model_cache)
    )
    monkeypatch.setenv("TUSOU_FETCH_ALLOW", '["127.0.0.1"]')
    data = str(no_thumbs.settings.data)
    want = {"access_key": client.access_key, "group": "old", "no_uri": 1, "failed": 1}
    first = CliRunner().invoke(main, ["thumbs", "old", "--data", data], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {**want, "made": 1, "had": 0}
    again = CliRunner().invoke(main, ["thumbs", "old", "--data", data], catch_exceptions=False)
    assert json.loads(again.stdout) == {**want, "made": 0, "had": 1}

    store = ThumbStore(no_thumbs.settings.data / "thumbs.db")
    try:
        got = store.get(client.access_key, "old", ["url", "inline", "gone"])
    finally:
        store.close()
    assert set(got) == {"url"} and max(Image.open(io.BytesIO(got["url"])).size) == MAX_SIDE

    missing = CliRunner().invoke(main, ["thumbs", "nope", "--data", data])
    assert missing.exit_code == 1 and "no group 'nope'" in missing.output


def test_a_delete_racing_an_add_of_the_same_image_leaves_no_picture_behind(
    tusou: Tusou, client: QiniuClient, photos: list[Image.Image]
) -> None:
    """An add stores its image, then its pictures (thumbnail, keypoints); a delete of the same id drops the
    pictures, then the image. Interleaved (the delete between the add's commit and its pictures), the image
    was gone and its pictures stayed, for good: about 1 race in 12 here before the two were ordered."""
    adder = QiniuClient(client.base, client.access_key, client.secret_key)
    deleter = QiniuClient(client.base, client.access_key, client.secret_key)
    assert client.post("/v1/image/group/race/new", {"data": []}).status_code == 200
    add = {"data": [{"uri": data_uri(jpeg(photos[3].resize((120, 90)))), "attribute": {"id": "x"}}]}
    rng = random.Random(3)
    outcomes = set()
    for _ in range(60):
        threading.Event().wait(0.1)  # five requests a round: within the key's rate (50/s)
        pause = rng.uniform(0, 0.08)
        done: dict[str, int] = {}

        def do_add(done: dict[str, int] = done) -> None:
            done["add"] = adder.post("/v1/image/group/race/add", add).status_code

        def do_delete(done: dict[str, int] = done, pause: float = pause) -> None:
            threading.Event().wait(pause)
            done["delete"] = deleter.post("/v1/image/group/race/delete", {"images": ["x"]}).status_code

        threads = [threading.Thread(target=do_add), threading.Thread(target=do_delete)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert done == {"add": 200, "delete": 200}
        listed = [entry["id"] for entry in client.get("/v1/image/group/race").json()["result"]]
        pictures = thumbs(client, "race", ["x"])
        assert tusou.service.keypoints is not None
        points = tusou.service.keypoints.get(client.access_key, "race", ["x"])
        outcomes.add(bool(listed))
        # The image and its pictures go together (a crash alone may leave an image without pictures).
        assert bool(listed) == bool(pictures) == bool(points), (listed, set(pictures), set(points))
        assert client.post("/v1/image/group/race/delete", {"images": ["x"]}).status_code == 200
    assert outcomes == {True, False}  # both orders happened
