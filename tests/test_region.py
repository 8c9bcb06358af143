"""Region search (data.box, beyond Qiniu): a part of the query image, through real HTTP with real photos."""

from __future__ import annotations

from PIL import Image

from tests.conftest import QiniuClient, data_uri, jpeg

TILE = (320, 240)
# The composite's quadrants, left to right, top to bottom: photos 3, 5, 7, 9.
QUADRANTS = [3, 5, 7, 9]


def composite(photos: list[Image.Image]) -> Image.Image:
    """A 640x480 collage of four photos (as a shop's banner or a screenshot holding several pictures)."""
    out = Image.new("RGB", (2 * TILE[0], 2 * TILE[1]))
    for n, index in enumerate(QUADRANTS):
        out.paste(photos[index].resize(TILE), ((n % 2) * TILE[0], (n // 2) * TILE[1]))
    return out


def search(client: QiniuClient, image: Image.Image, box: object = None, **params: object) -> tuple[int, dict]:
    data: dict = {"uri": data_uri(jpeg(image, 85))}
    if box is not None:
        data["box"] = box
    resp = client.post("/v1/image/groups/search", {"data": data, "params": {"groups": ["g"], **params}})
    return resp.status_code, resp.json()


def test_a_box_finds_the_photo_in_that_part_of_a_composite(
    client: QiniuClient, photos: list[Image.Image]
) -> None:
    body = {"data": [{"uri": data_uri(jpeg(p)), "attribute": {"id": f"p{i}"}} for i, p in enumerate(photos)]}
    assert client.post("/v1/image/group/g/new", body).json()["errors"] == [None] * len(photos)
    collage = composite(photos)
    # The whole collage is no copy of any one photo: at the default threshold nothing is answered.
    assert search(client, collage, limit=5) == (200, {"code": 0, "message": "", "result": []})
    fractions = [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]
    for box, index in zip(fractions, QUADRANTS, strict=True):
        status, out = search(client, collage, box)
        assert status == 200 and [hit["id"] for hit in out["result"]] == [f"p{index}"], box
        assert out["result"][0]["score"] >= 0.85
    # The same in pixels of the collage; a box reaching past the image is clipped to it.
    status, out = search(client, collage, [320, 240, 640, 480])
    assert [hit["id"] for hit in out["result"]] == ["p9"]
    status, out = search(client, collage, [330, 0, 900, 230])
    assert [hit["id"] for hit in out["result"]] == ["p5"]
    # The legacy single-group search takes it too.
    legacy = client.post(
        "/v1/image/group/g/search", {"data": {"uri": data_uri(jpeg(collage, 85)), "box": [0, 0.5, 0.5, 1]}}
    )
    assert [hit["id"] for hit in legacy.json()["result"]] == ["p7"]


def test_a_bad_box_is_refused_with_a_short_message(client: QiniuClient, photos: list[Image.Image]) -> None:
    assert (
        client.post("/v1/image/group/g/new", {"data": [{"uri": data_uri(jpeg(photos[0]))}]}).status_code
        == 200
    )
    collage = composite(photos)
    for box, message in (
        ([0, 0, 1], "invalid box: [x0, y0, x1, y1] expected"),
        ("0,0,1,1", "invalid box: [x0, y0, x1, y1] expected"),
        ([0, 0, True, 1], "invalid box: [x0, y0, x1, y1] expected"),
        ([0.5, 0, 0.2, 1], "invalid box: need 0 <= x0 < x1 and 0 <= y0 < y1"),
        ([-5, 0, 100, 100], "invalid box: need 0 <= x0 < x1 and 0 <= y0 < y1"),
        ([700, 0, 800, 100], "invalid box: outside the image (640x480)"),
        ([10, 10, 20, 200], "invalid box: smaller than 16x16 pixels"),
        ([0, 0, 0.01, 1], "invalid box: smaller than 16x16 pixels"),
    ):
        assert search(client, collage, box) == (400, {"error": message}), box
    by_id = {"data": {"id": "x", "box": [0, 0, 0.5, 0.5]}, "params": {"groups": ["g"]}}
    resp = client.post("/v1/image/groups/search", by_id)
    assert resp.status_code == 400 and resp.json() == {"error": "box needs an image uri"}
