"""tusou.client against the real app over HTTP: every endpoint, errors, paging, retries."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PHOTOS, Tusou
from tusou.client import Client, Image, TusouError, data_uri
from tusou.config import Settings
from tusou.embed.base import Embedder

PHOTO_FILES = sorted(PHOTOS.glob("*.jpg"))


@pytest.fixture
def api(tusou: Tusou) -> Iterator[Client]:
    key = tusou.keys.create("client")
    with Client(tusou.server.url, key.access_key, key.secret_key) as client:
        yield client


def test_every_endpoint_round_trip(api: Client) -> None:
    group = "商品 shop"  # CJK and a space: percent-encoded paths must still verify
    first = api.new_group(
        group,
        [
            Image(data_uri(PHOTO_FILES[0]), id="palace", label="building", desc={"sku": 17}),
            Image(data_uri(PHOTO_FILES[5].read_bytes()), id="koala", label="animal"),
            Image("data:application/octet-stream;base64,bm90IGFuIGltYWdl", id="junk"),
        ],
    )
    assert first.images == ["palace", "koala", ""]
    assert first.errors[:2] == [None, None]
    assert [(i, e["code"]) for i, e in first.failed] == [(2, 415)]

    added = api.add_images(group, [Image(data_uri(p), id=p.stem, label="more") for p in PHOTO_FILES[6:]])
    assert added.failed == [] and len(added.images) == len(PHOTO_FILES) - 6
    assert group in api.list_groups()
    assert api.count(group) == 2 + len(PHOTO_FILES) - 6

    pages = []
    marker = ""
    while True:
        page = api.list_images(group, marker, limit=3)
        pages.append(page.images)
        if not page.marker:
            break
        marker = page.marker
    assert len(pages) >= 3 and all(len(p) <= 3 for p in pages)
    listed = [img.id for img in api.iter_images(group, page_size=3)]
    assert listed == [img.id for page in pages for img in page]
    assert sorted(listed) == sorted(["palace", "koala"] + [p.stem for p in PHOTO_FILES[6:]])

    assert api.get_image(group, "palace").desc == {"sku": 17}
    assert api.update_image(group, "palace", desc={"sku": 18}).label == "building"
    assert api.get_image(group, "palace").desc == {"sku": 18}
    assert api.update_image(group, "palace", label="museum").desc == {"sku": 18}

    hits = api.search([group], data_uri(PHOTO_FILES[5]), limit=3)
    assert hits[0].id == "koala" and hits[0].score > 0.9 and hits[0].group == group
    by_id = api.search(group, image_id="koala", limit=1)
    assert by_id[0].id == "koala"
    chicken = data_uri(PHOTO_FILES[6])
    assert [hit.id for hit in api.search(group, chicken, limit=1, labels=["more"])] == [PHOTO_FILES[6].stem]
    assert api.search(group, chicken, limit=1, labels=["animal"]) == []
    legacy = api.search_group(group, data_uri(PHOTO_FILES[0]), limit=1)
    assert legacy[0].id == "palace" and legacy[0].group is None

    api.delete_images(group, ["koala"])
    with pytest.raises(TusouError) as err:
        api.get_image(group, "koala")
    assert (err.value.status, err.value.message) == (400, "image koala not exists") and err.value.reqid
    api.remove_group(group)
    assert group not in api.list_groups()


def test_errors_carry_status_and_message(api: Client, tusou: Tusou) -> None:
    with pytest.raises(TusouError) as err:
        api.count("nope")
    assert (err.value.status, err.value.message) == (400, "group nope not exists")
    api.new_group("g")
    with pytest.raises(TusouError) as err:
        api.new_group("g")
    assert (err.value.status, err.value.message) == (400, "group already exists")
    with Client(tusou.server.url, api.access_key, "wrong-secret") as bad:
        with pytest.raises(TusouError) as err:
            bad.list_groups()
    assert (err.value.status, err.value.message) == (401, "bad token")
    with pytest.raises(ValueError):
        api.search("g")


def test_health_and_metrics(api: Client) -> None:
    assert api.health()["status"] == "ok"
    assert "tusou_http_requests_total" in api.metrics()


def test_rate_limited_requests_are_retried(tmp_path: Path, embedder: Embedder) -> None:
    settings = Settings(data=tmp_path / "data", rate_limit_per_s=5, rate_limit_burst=1)
    running = Tusou(settings, embedder)
    running.server.__enter__()
    try:
        key = running.keys.create()
        with Client(running.server.url, key.access_key, key.secret_key, retries=0) as impatient:
            with pytest.raises(TusouError) as err:
                for _ in range(5):
                    impatient.list_groups()
            assert err.value.status == 429
        with Client(running.server.url, key.access_key, key.secret_key, backoff_s=0.05) as patient:
            for _ in range(5):
                assert patient.list_groups() == []
    finally:
        running.close()


class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers 503 with Retry-After once, then 200; records when each request came."""

    seen: list[float] = []

    def do_GET(self) -> None:  # noqa: N802
        Flaky.seen.append(time.monotonic())
        first = len(Flaky.seen) == 1
        body = json.dumps({"error": "busy"} if first else {"code": 0, "message": "", "result": ["x"]})
        self.send_response(503 if first else 200)
        if first:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


def test_retry_after_is_honoured() -> None:
    Flaky.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        retried: list[tuple[str, float]] = []
        with Client(url, "ak", "sk", backoff_s=0.01, on_retry=lambda *why: retried.append(why)) as api:
            assert api.list_groups() == ["x"]
        assert len(Flaky.seen) == 2 and Flaky.seen[1] - Flaky.seen[0] >= 0.95
        assert retried == [("503 Service Unavailable", 1.0)]
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_server_is_one_error() -> None:
    from tests.conftest import free_port

    retried: list[tuple[str, float]] = []
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, "ak", "sk", retries=1, backoff_s=0.01, on_retry=lambda *why: retried.append(why)) as api:
        with pytest.raises(TusouError) as err:
            api.list_groups()
        assert err.value.status == 0 and "cannot connect" in err.value.message
        assert [why for why, _ in retried] == [err.value.message]  # one retry, then the same failure
        for unsigned in (api.health, api.metrics):
            with pytest.raises(TusouError) as err:
                unsigned()
            assert err.value.status == 0 and "cannot reach" in err.value.message


def test_client_needs_no_qiniu_sdk() -> None:
    code = "import sys, tusou.client; assert not [m for m in sys.modules if m.startswith('qiniu')]"
    subprocess.run([sys.executable, "-c", code], check=True)
