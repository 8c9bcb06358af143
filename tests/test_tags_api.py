"""Automatic tags, keyword search and filters through the real HTTP API (real photos, real signatures)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ImageServer, QiniuClient, Tusou, data_uri, jpeg
from tusou.config import Settings
from tusou.embed.base import Embedder
from tusou.fetch import Fetcher
from tusou.service import Service

PHOTOS = Path(__file__).resolve().parent / "data" / "photos"
NAMES = [p.name.split("-", 1)[1].removesuffix(".jpg") for p in sorted(PHOTOS.glob("*.jpg"))]
ANIMALS = {"koala", "chicken", "giraffe", "cat", "fish19"}


def entries(photos: list[Image.Image]) -> list[dict]:
    out = []
    for i, (name, img) in enumerate(zip(NAMES, photos, strict=True)):
        desc = {"kind": "animal" if name in ANIMALS else "thing", "n": i}
        label = "zoo" if i % 2 else "shop"
        out.append({"uri": data_uri(jpeg(img)), "attribute": {"id": name, "label": label, "desc": desc}})
    return out


@pytest.fixture
def filled(client: QiniuClient, photos: list[Image.Image]) -> QiniuClient:
    resp = client.post("/v1/image/group/g/new", {"data": entries(photos)})
    assert resp.status_code == 200 and all(e is None for e in resp.json()["errors"]), resp.text
    return client


def text_search(client: QiniuClient, text: str, **params: object) -> list[dict]:
    resp = client.post(
        "/v1/image/groups/search", {"data": {"text": text}, "params": {"groups": ["g"], **params}}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["result"]


def test_tags_only_when_asked(filled: QiniuClient) -> None:
    plain = filled.post("/v1/image/group/g/image", {"id": "hammer8"})
    assert plain.json() == {"desc": {"kind": "thing", "n": 2}, "label": "shop"}
    tagged = filled.post("/v1/image/group/g/image", {"id": "hammer8", "tags": True}).json()
    assert tagged["desc"] == {"kind": "thing", "n": 2}
    top = tagged["tags"][0]
    assert top["id"] == "n03481172" and top["name"] == "hammer" and top["name_zh"] == "锤子"
    assert 0.5 < top["score"] <= 1
    assert [t["score"] for t in tagged["tags"]] == sorted((t["score"] for t in tagged["tags"]), reverse=True)

    listed = filled.get("/v1/image/group/g", {"limit": 3}).json()["result"]
    assert all(set(e["value"]) == {"desc", "label"} for e in listed)
    listed = filled.get("/v1/image/group/g", {"limit": 3, "tags": "1"}).json()["result"]
    assert [e["value"]["tags"][0]["name"] for e in listed] == [
        "palace",
        *[e["value"]["tags"][0]["name"] for e in listed[1:]],
    ]
    assert filled.get("/v1/image/group/g", {"tags": "yes"}).status_code == 400

    hits = text_search(filled, "hand tool", limit=1)
    assert "tags" not in hits[0]
    hits = text_search(filled, "hand tool", limit=1, tags=True)
    assert hits[0]["tags"][0]["name"] == "hammer"


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("hand tool", "hammer8"),
        ("Hammers", "hammer8"),
        ("手工具", "hammer8"),
        ("fish", "fish19"),
        ("鱼", "fish19"),
        ("hen", "chicken"),
        ("猫", "cat"),
        ("ball", "volleyball"),
    ],
)
def test_keyword_search_finds_the_photo(filled: QiniuClient, text: str, first: str) -> None:
    hits = text_search(filled, text, limit=3)
    assert hits and hits[0]["id"] == first, hits
    assert set(hits[0]) == {"desc", "group", "id", "label", "score"}
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(0.1 <= s <= 1 for s in scores)


def test_keyword_search_covers_hyponyms_and_combines(filled: QiniuClient) -> None:
    animals = {h["id"] for h in text_search(filled, "animal", limit=20)}
    assert {"koala", "chicken", "cat", "fish19"} <= animals
    assert not animals & {"hammer8", "volleyball", "spoons", "bulb"}
    assert {h["id"] for h in text_search(filled, "动物", limit=20)} == animals
    # limit counts hits; threshold is the least evidence (0..1) and may be lowered below the default.
    assert len(text_search(filled, "animal", limit=2)) == 2
    strict = text_search(filled, "animal", limit=20, threshold=0.9)
    assert strict and all(h["score"] >= 0.9 for h in strict) and len(strict) < len(animals)
    # Combined with labels and with a filter on desc.
    zoo = text_search(filled, "animal", limit=20, labels=["zoo"])
    assert zoo and all(h["label"] == "zoo" for h in zoo)
    odd = text_search(filled, "animal", limit=20, filter={"desc.n": {"gte": 5}, "label": "zoo"})
    assert {h["id"] for h in odd} == {h["id"] for h in zoo if h["desc"]["n"] >= 5}
    assert text_search(filled, "no such thing") == []
    assert text_search(filled, "animal", filter={"desc.kind": "thing"}) == []


def test_filter_inside_image_search(filled: QiniuClient, photos: list[Image.Image]) -> None:
    def search(photo: int, flt: dict | None) -> list[str]:
        params: dict = {"groups": ["g"], "limit": 5}
        if flt is not None:
            params["filter"] = flt
        body = {"data": {"uri": data_uri(jpeg(photos[photo]))}, "params": params}
        resp = filled.post("/v1/image/groups/search", body)
        assert resp.status_code == 200, resp.text
        return [h["id"] for h in resp.json()["result"]]

    assert search(8, None) == ["cat"]
    assert search(8, {"desc.kind": "animal"}) == ["cat"]
    assert search(8, {"desc.kind": "thing"}) == []  # the threshold still applies
    assert search(2, {"desc.n": {"in": [2, 3]}}) == ["hammer8"]
    assert search(2, {"desc.n": {"gt": 2}}) == []
    assert search(2, {"label": "shop", "desc.kind": {"eq": "thing"}}) == ["hammer8"]


@pytest.mark.parametrize(
    ("data", "params", "error"),
    [
        ({"text": ""}, {}, "invalid text"),
        ({"text": 5}, {}, "invalid text"),
        ({"text": "x" * 300}, {}, "invalid text"),
        ({"text": "dog"}, {"filter": "desc.x=1"}, "invalid filter: expected an object"),
        (
            {"text": "dog"},
            {"filter": {"x": 1}},
            "invalid filter: unknown field 'x' (use label or desc.<key>)",
        ),
        ({"text": "dog"}, {"tags": "maybe"}, "invalid tags"),
    ],
)
def test_bad_extension_parameters_are_406(filled: QiniuClient, data: dict, params: dict, error: str) -> None:
    resp = filled.post("/v1/image/groups/search", {"data": data, "params": {"groups": ["g"], **params}})
    assert resp.status_code == 406 and resp.json() == {"error": error}


@pytest.fixture
def untagged(tmp_path: Path, embedder: Embedder) -> Iterator[Tusou]:
    running = Tusou(Settings(data=tmp_path / "data", fetch_allow=["127.0.0.1"], tags=False), embedder)
    running.server.__enter__()
    yield running
    running.close()


def test_tags_off_then_retag_from_uris(
    untagged: Tusou, image_server: ImageServer, photos: list[Image.Image], embedder: Embedder
) -> None:
    client = untagged.client()
    data = [
        {"uri": image_server.put(f"{n}.jpg", jpeg(img)), "attribute": {"id": n}}
        for n, img in zip(NAMES[:4], photos[:4], strict=True)
    ]
    data.append({"uri": data_uri(jpeg(photos[5])), "attribute": {"id": "koala"}})
    assert client.post("/v1/image/group/g/new", {"data": data}).status_code == 200
    assert client.post("/v1/image/group/g/image", {"id": "hammer8", "tags": True}).json()["tags"] == []
    assert text_search(client, "hand tool") == []
    image_server.files.pop("/windmill15.jpg")  # gone from its server since it was added

    tagging = Service(
        Settings(data=untagged.settings.data, fetch_allow=["127.0.0.1"]),
        untagged.store,
        embedder,
        Fetcher(untagged.settings),
    )
    seen: list[tuple[int, int, int]] = []
    counts = tagging.retag(client.access_key, "g", lambda *a: seen.append(a))
    assert counts == {"tagged": 3, "no_uri": 1, "failed": 1}
    assert seen[-1] == (5, 5, 3)
    assert [h["id"] for h in text_search(client, "hand tool", limit=1)] == ["hammer8"]
    koala = client.post("/v1/image/group/g/image", {"id": "koala", "tags": True}).json()
    assert koala["tags"] == []  # added from a data URI: nothing to fetch again, re-add it to tag it


def test_retag_command(
    tmp_path: Path, image_server: ImageServer, photos: list[Image.Image], embedder: Embedder
) -> None:
    from click.testing import CliRunner

    from tusou.cli import main

    data = tmp_path / "data"
    running = Tusou(Settings(data=data, fetch_allow=["127.0.0.1"], tags=False), embedder)
    running.server.__enter__()
    client = running.client()
    items = [{"uri": image_server.put("h.jpg", jpeg(photos[2])), "attribute": {"id": "hammer8"}}]
    items.append({"uri": data_uri(jpeg(photos[3])), "attribute": {"id": "fish19"}})
    assert client.post("/v1/image/group/g/new", {"data": items}).status_code == 200
    running.close()

    env = {"TUSOU_FETCH_ALLOW": '["127.0.0.1"]'}
    result = CliRunner().invoke(main, ["retag", "g", "--data", str(data)], env=env)
    assert result.exit_code == 0, result.output
    line = [x for x in result.stdout.splitlines() if x.startswith("{")][0]
    assert json.loads(line) == {
        "access_key": client.access_key,
        "group": "g",
        "tagged": 1,
        "no_uri": 1,
        "failed": 0,
    }
    missing = CliRunner().invoke(main, ["retag", "nope", "--data", str(data)], env=env)
    assert missing.exit_code != 0 and "no group 'nope'" in missing.output

    again = Tusou(Settings(data=data, fetch_allow=["127.0.0.1"]), embedder)
    again.server.__enter__()
    try:
        info = client_for(again, client).post("/v1/image/group/g/image", {"id": "hammer8", "tags": True})
        assert info.json()["tags"][0]["name"] == "hammer"
    finally:
        again.close()


def client_for(running: Tusou, old: QiniuClient) -> QiniuClient:
    """The same access key against another server on the same data folder."""
    return QiniuClient(running.server.url, old.access_key, old.secret_key)


def test_typed_client_searches_by_text(tusou: Tusou, filled: QiniuClient) -> None:
    from tusou.client import Client

    with Client(tusou.server.url, filled.access_key, filled.secret_key) as client:
        hits = client.search("g", text="手工具", limit=2, tags=True)
        assert [h.id for h in hits][:1] == ["hammer8"] and hits[0].extra["tags"][0]["name"] == "hammer"
        assert client.search("g", text="animal", limit=20, where={"desc.n": {"lt": 5}}) != []
        assert all(
            h.desc["n"] < 5 for h in client.search("g", text="animal", limit=20, where={"desc.n": {"lt": 5}})
        )
        with pytest.raises(ValueError):
            client.search("g", "http://x/1.jpg", text="dog")
