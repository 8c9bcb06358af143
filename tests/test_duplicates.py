"""Duplicate detection on new/add (beyond Qiniu), through real HTTP with real photos and edited copies."""

from __future__ import annotations

import json

from click.testing import CliRunner
from PIL import Image

from tests.conftest import QiniuClient, Tusou, data_uri, jpeg
from tusou.cli import main


def entry(image: Image.Image, image_id: str | None = None, quality: int = 90) -> dict:
    attribute = {"id": image_id} if image_id is not None else {}
    return {"uri": data_uri(jpeg(image, quality)), "attribute": attribute}


def crop(image: Image.Image, keep: float = 0.8) -> Image.Image:
    """The centre ``keep`` of each side (64 % of the area)."""
    w, h = image.size
    dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return image.crop((dx, dy, w - dx, h - dy))


def smaller(image: Image.Image) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)


def make_group(client: QiniuClient, photos: list[Image.Image]) -> None:
    body = {"data": [entry(photos[i], f"p{i}") for i in range(6)]}
    assert client.post("/v1/image/group/g/new", body).json()["errors"] == [None] * 6


def edited_batch(photos: list[Image.Image]) -> list[dict]:
    return [
        entry(crop(photos[1]), "crop1"),  # a crop of a stored photo
        entry(smaller(photos[2]), "small2", quality=40),  # downscaled and recompressed
        entry(photos[8], "cat"),  # unrelated to everything stored
        entry(photos[9], "ball"),
        entry(photos[9], "ball-again", quality=35),  # a re-encoded copy of the image just before it
        entry(photos[10], "spoons"),
    ]


def test_report_names_the_existing_image_and_stores_everything(
    client: QiniuClient, photos: list[Image.Image]
) -> None:
    make_group(client, photos)
    resp = client.post(
        "/v1/image/group/g/add", {"data": edited_batch(photos), "params": {"duplicates": "report"}}
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert list(out) == ["errors", "images", "duplicates"]
    assert out["errors"] == [None] * 6
    assert out["images"] == ["crop1", "small2", "cat", "ball", "ball-again", "spoons"]
    found = [d and d["id"] for d in out["duplicates"]]
    assert found == ["p1", "p2", None, None, "ball", None]
    for d in out["duplicates"]:
        assert d is None or 0.85 <= d["score"] <= 1.0
    assert client.get("/v1/image/group/g/info").json() == {"count": 12}


def test_refuse_stores_only_new_pictures(client: QiniuClient, photos: list[Image.Image]) -> None:
    make_group(client, photos)
    resp = client.post(
        "/v1/image/group/g/add", {"data": edited_batch(photos), "params": {"duplicates": "refuse"}}
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["images"] == ["", "", "cat", "ball", "", "spoons"]
    assert out["errors"][2:4] == [None, None] and out["errors"][5] is None
    assert out["errors"][0] == {"code": 409, "message": "near-duplicate of image p1"}
    assert out["errors"][1] == {"code": 409, "message": "near-duplicate of image p2"}
    assert out["errors"][4] == {"code": 409, "message": "near-duplicate of image ball"}
    assert [d and d["id"] for d in out["duplicates"]] == ["p1", "p2", None, None, "ball", None]
    assert client.get("/v1/image/group/g/info").json() == {"count": 9}
    listed = {img["id"] for img in client.get("/v1/image/group/g").json()["result"]}
    assert "crop1" not in listed and "ball-again" not in listed and "spoons" in listed


def test_new_group_refuses_copies_within_the_request(client: QiniuClient, photos: list[Image.Image]) -> None:
    data = [entry(photos[3], "a"), entry(photos[4], "b"), entry(smaller(photos[3]), "a-small", quality=50)]
    resp = client.post("/v1/image/group/n/new", {"data": data, "params": {"duplicates": "refuse"}})
    out = resp.json()
    assert out["images"] == ["a", "b", ""]
    assert out["errors"][2] == {"code": 409, "message": "near-duplicate of image a"}
    assert out["duplicates"][:2] == [None, None] and out["duplicates"][2]["id"] == "a"


def test_a_stricter_threshold_and_qiniu_answers_without_the_parameter(
    client: QiniuClient, photos: list[Image.Image]
) -> None:
    make_group(client, photos)
    # An unrelated photo is no duplicate even at the system default; a crop is, at the default band.
    body = {
        "data": [entry(photos[11], "bulb")],
        "params": {"duplicates": "report", "duplicate_threshold": 0.7},
    }
    assert client.post("/v1/image/group/g/add", body).json()["duplicates"] == [None]
    strict = {
        "data": [entry(crop(photos[1], 0.75), "c")],
        "params": {"duplicates": "report", "duplicate_threshold": 1},
    }
    assert client.post("/v1/image/group/g/add", strict).json()["duplicates"] == [None]
    # Without params (Qiniu's request), the answer has no duplicates field, even for an exact copy.
    plain = client.post("/v1/image/group/g/add", {"data": [entry(photos[0], "copy")]})
    assert plain.json() == {"errors": [None], "images": ["copy"]}


def test_bad_parameters_are_refused_before_any_work(client: QiniuClient, photos: list[Image.Image]) -> None:
    make_group(client, photos)
    for params, message in (
        ({"duplicates": "yes"}, "invalid duplicates: must be report or refuse"),
        ({"duplicates": "report", "duplicate_threshold": 2}, "invalid duplicate_threshold"),
        ({"duplicates": "report", "duplicate_threshold": "x"}, "invalid duplicate_threshold"),
    ):
        resp = client.post("/v1/image/group/g/add", {"data": [entry(photos[7], "x")], "params": params})
        assert resp.status_code == 400 and resp.json() == {"error": message}
    assert client.get("/v1/image/group/g/info").json() == {"count": 6}


def copies_group(client: QiniuClient, photos: list[Image.Image]) -> None:
    """Six photos, three edited copies of two of them, two more unrelated photos."""
    make_group(client, photos)
    extra = [
        entry(crop(photos[1]), "crop1"),
        entry(smaller(photos[2]), "small2", quality=40),
        entry(photos[2].rotate(90, expand=True), "turned2", quality=60),
        entry(photos[8], "cat"),
        entry(photos[9], "ball"),
    ]
    assert client.post("/v1/image/group/g/add", {"data": extra}).json()["errors"] == [None] * 5


EXPECTED = [["p2", "small2", "turned2"], ["crop1", "p1"]]


def test_duplicates_endpoint_clusters_a_group(client: QiniuClient, photos: list[Image.Image]) -> None:
    copies_group(client, photos)
    resp = client.post("/v1/image/group/g/duplicates", {})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["marker"] == "" and out["scanned"] == 11
    assert [c["images"] for c in out["clusters"]] == EXPECTED
    for cluster in out["clusters"]:
        for p in cluster["pairs"]:
            assert set(p["ids"]) <= set(cluster["images"]) and 0.85 <= p["score"] <= 1
    assert {tuple(p["ids"]) for p in out["clusters"][1]["pairs"]} == {("crop1", "p1")}
    # Stricter than any pair: nothing; pages of 4 images: the pairs each page finds, and a marker.
    assert client.post("/v1/image/group/g/duplicates", {"threshold": 1}).json()["clusters"] == []
    first = client.post("/v1/image/group/g/duplicates", {"limit": 4}).json()
    assert first["scanned"] == 4 and first["marker"]
    second = client.post("/v1/image/group/g/duplicates", {"limit": 4, "marker": first["marker"]}).json()
    assert second["scanned"] == 4 and second["marker"]


def test_duplicates_endpoint_refuses_bad_requests(client: QiniuClient, photos: list[Image.Image]) -> None:
    make_group(client, photos)
    for body, message in (
        ({"limit": 0}, "invalid limit: must be 1-1000"),
        ({"limit": "10"}, "invalid limit: must be 1-1000"),
        ({"threshold": 1.5}, "invalid threshold"),
        ({"marker": 3}, "invalid marker"),
        ({"marker": "not-a-marker"}, "invalid marker"),
    ):
        resp = client.post("/v1/image/group/g/duplicates", body)
        assert resp.status_code == 400 and resp.json() == {"error": message}, body
    missing = client.post("/v1/image/group/nope/duplicates", {})
    assert missing.status_code == 400 and missing.json() == {"error": "group nope not exists"}


def test_cli_duplicates_walks_every_page(tusou: Tusou, photos: list[Image.Image]) -> None:
    client = tusou.client("cli")
    copies_group(client, photos)
    env = {
        "TUSOU_SERVER": client.base,
        "TUSOU_ACCESS_KEY": client.access_key,
        "TUSOU_SECRET_KEY": client.secret_key,
    }
    runner = CliRunner()
    result = runner.invoke(
        main, ["duplicates", "g", "--page", "3", "--json"], env=env, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert [c["images"] for c in json.loads(result.stdout)] == EXPECTED  # clusters spanning pages come whole
    assert "duplicates g: 11/11 images scanned" in result.stderr
    plain = runner.invoke(main, ["duplicates", "g"], env=env, catch_exceptions=False)
    assert plain.stdout.splitlines()[0].startswith("1. 3 images (best pair 0.")
    assert plain.stdout.splitlines()[1].endswith(": crop1, p1")
    none = runner.invoke(main, ["duplicates", "g", "--threshold", "1"], env=env, catch_exceptions=False)
    assert none.exit_code == 0 and none.stdout == "no near-duplicates\n"
    gone = runner.invoke(main, ["duplicates", "nope"], env=env, catch_exceptions=False)
    assert gone.exit_code == 1 and "group nope not exists" in gone.stderr
