"""The HTTP API on the Milvus store: a representative part of test_api.py, then two tusou apps in front of
one Milvus (add through one, read through the other, at once, without settling time).

Both apps share one access-key file: keys are local SQLite, which several processes on one machine can
share (WAL mode); on several machines each needs the same keys (see docs/scale.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from tests.conftest import QiniuClient, ThreadedServer
from tests.test_api import body_uri, entry
from tusou.config import Settings
from tusou.embed.base import Embedder
from tusou.fetch import Fetcher
from tusou.service import Service
from tusou.store.keys import KeyStore

pytest_plugins = ["tests.store_backends"]


class MilvusTusou:
    """One tusou app (its own Service, MilvusStore and uvicorn) on a shared Milvus and key file."""

    def __init__(self, settings: Settings, embedder: Embedder, keys_path: Path) -> None:
        from tusou.api.app import create_app
        from tusou.store.milvus import MilvusStore

        settings.data.mkdir(parents=True, exist_ok=True)
        self.store = MilvusStore(
            settings.milvus_uri,
            collection=settings.milvus_collection,
            model_id=embedder.model_id,
            dim=embedder.dim,
            group_max_images=settings.group_max_images,
        )
        self.service = Service(settings, self.store, embedder, Fetcher(settings))
        self.keys = KeyStore(keys_path)
        self.server = ThreadedServer(create_app(settings, self.service, self.keys))
        self.server.__enter__()

    def client_for(self, access_key: str, secret_key: str) -> QiniuClient:
        return QiniuClient(self.server.url, access_key, secret_key)

    def close(self) -> None:
        self.server.__exit__()
        self.service.close()
        self.store.close()
        self.keys.close()


@pytest.fixture(scope="module")
def http_collection(milvus_server) -> Iterator[str]:
    """One collection for the module (creating one costs seconds); each test is its own tenant."""
    collection = "http_" + uuid.uuid4().hex[:8]
    yield collection
    from pymilvus import MilvusClient

    client = MilvusClient(uri=milvus_server.uri)
    for name in (collection, collection + "_groups"):
        client.drop_collection(name)
    client.close()


@pytest.fixture
def milvus_apps(
    milvus_server, http_collection: str, embedder: Embedder, tmp_path: Path
) -> Iterator[list[MilvusTusou]]:
    apps = []
    for name in ("one", "two"):
        settings = Settings(
            data=tmp_path / name,
            fetch_allow=["127.0.0.1"],
            store="milvus",
            milvus_uri=milvus_server.uri,
            milvus_collection=http_collection,
        )
        apps.append(MilvusTusou(settings, embedder, tmp_path / "keys.db"))
    yield apps
    for app in apps:
        app.close()


@pytest.fixture
def clients(milvus_apps: list[MilvusTusou]) -> tuple[QiniuClient, QiniuClient]:
    """The same tenant (access key) against each app."""
    key = milvus_apps[0].keys.create("milvus-test")
    return (
        milvus_apps[0].client_for(key.access_key, key.secret_key),
        milvus_apps[1].client_for(key.access_key, key.secret_key),
    )


def test_http_api_on_milvus(clients: tuple[QiniuClient, QiniuClient], photos: list[Image.Image]) -> None:
    client, _ = clients
    body = {"data": [entry(photos[i], str(i + 1), "shoes", {"n": i}) for i in range(4)]}
    resp = client.post("/v1/image/group/g1/new", body)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"errors": [None] * 4, "images": ["1", "2", "3", "4"]}
    assert client.post("/v1/image/group/g1/new", {"data": []}).json() == {"error": "group already exists"}

    out = client.post(
        "/v1/image/group/g1/add", {"data": [entry(photos[5], "6"), entry(photos[6], "1")]}
    ).json()
    assert out["images"] == ["6", ""] and out["errors"][1] == {"code": 400, "message": "id already exists"}
    assert client.get("/v1/image/group/g1/info").json() == {"count": 5}
    assert client.post("/v1/image/group/g1/image", {"id": "2"}).json() == {"desc": {"n": 1}, "label": "shoes"}

    seen, marker = [], ""
    while True:
        page = client.get("/v1/image/group/g1", {"marker": marker, "limit": 2}).json()
        seen += [r["id"] for r in page["result"]]
        if not (marker := page["marker"]):
            break
    assert seen == ["1", "2", "3", "4", "6"]
    assert client.get("/v1/image/group/g1", {"marker": "garbage!"}).json() == {"error": "invalid marker"}

    query = photos[2].resize((240, 180))
    search = {"data": {"uri": body_uri(query)}, "params": {"groups": ["g1"], "limit": 3}}
    result = client.post("/v1/image/groups/search", search).json()["result"]
    assert result[0]["id"] == "3" and result[0]["group"] == "g1" and result[0]["score"] >= 0.85
    assert client.post("/v1/image/group/g1/delete", {"images": ["3"]}).json() == {}
    after = client.post("/v1/image/groups/search", search).json()["result"]
    assert "3" not in [h["id"] for h in after]

    client.post("/v1/image/group/g2/new", {"data": []})
    assert client.get("/v1/image/group").json()["result"] == ["g1", "g2"]
    assert client.post("/v1/image/group/g1/remove").json() == {}
    assert client.get("/v1/image/group/g1/info").json() == {"error": "group g1 not exists"}


def test_two_apps_serve_the_same_groups(
    clients: tuple[QiniuClient, QiniuClient], milvus_apps: list[MilvusTusou], photos: list[Image.Image]
) -> None:
    one, two = clients
    assert one.post("/v1/image/group/shop/new", {"data": [entry(photos[0], "a", "x")]}).status_code == 200
    # Created through one, visible through two at once: no cache, no settling time.
    assert two.get("/v1/image/group").json()["result"] == ["shop"]
    assert two.post("/v1/image/group/shop/new", {"data": []}).json() == {"error": "group already exists"}
    for i in range(1, 4):
        out = one.post("/v1/image/group/shop/add", {"data": [entry(photos[i], f"s{i}", "scene")]}).json()
        assert out == {"errors": [None], "images": [f"s{i}"]}
        search = {"data": {"uri": body_uri(photos[i])}, "params": {"groups": ["shop"], "limit": 1}}
        assert [h["id"] for h in two.post("/v1/image/groups/search", search).json()["result"]] == [f"s{i}"]
        assert two.get("/v1/image/group/shop/info").json() == {"count": i + 1}
    # A repeated id is refused whichever app it comes through.
    dup = two.post("/v1/image/group/shop/add", {"data": [entry(photos[5], "s1")]}).json()
    assert dup["errors"] == [{"code": 400, "message": "id already exists"}]
    # Deleted through two: gone from one's next answers.
    assert two.post("/v1/image/group/shop/delete", {"images": ["s2"]}).json() == {}
    assert [r["id"] for r in one.get("/v1/image/group/shop").json()["result"]] == ["a", "s1", "s3"]
    mirrored = {"data": {"uri": body_uri(ImageOps.mirror(photos[2]))}, "params": {"groups": ["shop"]}}
    assert one.post("/v1/image/groups/search", mirrored).json()["result"] == []
    # Another tenant sees none of it through either app.
    other = milvus_apps[1].keys.create("other")
    stranger = milvus_apps[0].client_for(other.access_key, other.secret_key)
    assert stranger.get("/v1/image/group").json()["result"] == []
    assert stranger.get("/v1/image/group/shop/info").json() == {"error": "group shop not exists"}
    # Removed through one: gone through two.
    assert one.post("/v1/image/group/shop/remove").json() == {}
    assert two.get("/v1/image/group/shop/info").json() == {"error": "group shop not exists"}


def test_two_tusou_processes_on_one_milvus(milvus_server, tmp_path: Path, photos: list[Image.Image]) -> None:
    """Two real `tusou serve` processes (TUSOU_STORE=milvus) sharing one Milvus and one data folder, with
    Strong reads: a write through one is visible to the very next read through the other. (Under the
    default Session level that holds within the bound tests/test_milvus_consistency.py measures.)"""
    from tests.conftest import free_port
    from tests.test_restart import ServeProcess

    env = {
        "TUSOU_STORE": "milvus",
        "TUSOU_MILVUS_CONSISTENCY": "Strong",
        "TUSOU_MILVUS_URI": milvus_server.uri,
        "TUSOU_MILVUS_COLLECTION": "procs_" + uuid.uuid4().hex[:8],
    }
    first = ServeProcess(tmp_path / "data", free_port(), env)
    key = first.read_key()
    second = ServeProcess(tmp_path / "data", free_port(), env)
    try:
        first.wait_ready()
        second.wait_ready()
        one = QiniuClient(first.url, key["access_key"], key["secret_key"])
        two = QiniuClient(second.url, key["access_key"], key["secret_key"])
        assert one.post(
            "/v1/image/group/p/new", {"data": [entry(photos[i], f"p{i}") for i in range(3)]}
        ).json() == {
            "errors": [None, None, None],
            "images": ["p0", "p1", "p2"],
        }
        search = {"data": {"uri": body_uri(photos[1])}, "params": {"groups": ["p"], "limit": 1}}
        assert [h["id"] for h in two.post("/v1/image/groups/search", search).json()["result"]] == ["p1"]
        assert two.post("/v1/image/group/p/delete", {"images": ["p1"]}).json() == {}
        assert one.post("/v1/image/groups/search", search).json()["result"] == []
        assert one.get("/v1/image/group/p/info").json() == {"count": 2}
    finally:
        for proc in (first, second):
            if proc.proc.poll() is None:
                proc.kill()
