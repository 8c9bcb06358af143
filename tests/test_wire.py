"""The wire boundary's own promises: limits come from Settings (in answers and in the OpenAPI document
alike), and a 429 says when to come back."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.conftest import Tusou
from tusou.config import Settings
from tusou.embed.base import Embedder


def start(tmp_path: Path, embedder: Embedder, **settings: object) -> Tusou:
    running = Tusou(Settings(data=tmp_path / "data", **settings), embedder)  # type: ignore[arg-type]
    running.server.__enter__()
    return running


def test_limits_in_answers_and_openapi_come_from_settings(tmp_path: Path, embedder: Embedder) -> None:
    running = start(tmp_path, embedder, search_max_groups=3, max_batch_images=2, search_max_limit=50)
    try:
        client = running.client("w")
        for group in ("a", "b", "c"):
            assert client.post(f"/v1/image/group/{group}/new", {"data": []}).status_code == 200
        query = {"data": {"id": "x"}, "params": {"groups": ["a", "b", "c"]}}
        # Three groups pass the wire (the stored image is then missing); four do not.
        assert client.post("/v1/image/groups/search", query).json() == {"error": "image x not exists"}
        query["params"]["groups"] = ["a", "b", "c", "d"]
        four = client.post("/v1/image/groups/search", query)
        assert four.status_code == 406 and four.json() == {"error": "too many groups, at most 3"}
        query["params"] = {"groups": ["a"], "limit": 51}
        assert client.post("/v1/image/groups/search", query).json()["error"].startswith("invalid limit")
        three = client.post("/v1/image/group/a/add", {"data": [{"uri": "x"}] * 3})
        assert three.json() == {"error": "too many images, at most 2"}

        spec = requests.get(running.server.url + "/openapi.json", timeout=30).json()["components"]["schemas"]
        assert spec["SearchParams"]["properties"]["groups"]["description"] == "At most 3 groups."
        assert spec["SearchParams"]["properties"]["limit"]["description"].startswith("1..50,")
        assert spec["BatchRequest"]["properties"]["data"]["description"] == "At most 2 images."
        assert "4096 bytes" in spec["Attribute"]["properties"]["desc"]["description"]
    finally:
        running.close()


def test_429_carries_retry_after(tmp_path: Path, embedder: Embedder) -> None:
    running = start(tmp_path, embedder, rate_limit_per_s=0.01, rate_limit_burst=1)
    try:
        client = running.client("r")
        assert client.get("/v1/image/group").status_code == 200
        limited = client.get("/v1/image/group")
        assert limited.status_code == 429 and limited.json() == {"error": "too many requests"}
        # One token per 100 s, and the bucket is empty: about 100 s to wait, as whole seconds.
        assert 90 <= int(limited.headers["Retry-After"]) <= 100
        assert "Retry-After" not in client.get("/v1/nothing").headers
    finally:
        running.close()
