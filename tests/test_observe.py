"""/metrics, /healthz and the access log, through real HTTP against a running tusou."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import QiniuClient, Tusou, data_uri, jpeg
from tusou.api import observe
from tusou.api.observe import access_key_of
from tusou.config import Settings
from tusou.embed.base import Embedder

GROUP = "secret-shoes-of-acme"  # a group name that must never show up in metrics or logs
NEW = "/v1/image/group/{group_id}/new"
ADD = "/v1/image/group/{group_id}/add"


def entry(image: Image.Image, image_id: str) -> dict[str, Any]:
    return {"uri": data_uri(jpeg(image)), "attribute": {"id": image_id}}


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """The response reaches the client a moment before the server records it: poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(page: dict, name: str, **labels: str) -> float | None:
    return page.get((name, frozenset(labels.items())))


def scrape(base: str, **headers: str) -> requests.Response:
    return requests.get(base + "/metrics", headers=headers, timeout=30)


def started(settings: Settings, embedder: Embedder) -> Tusou:
    running = Tusou(settings, embedder)
    running.server.__enter__()
    return running


def test_metrics_count_by_route_template_without_tenant_data(
    tusou: Tusou, client: QiniuClient, photos: list[Image.Image]
) -> None:
    assert client.post(f"/v1/image/group/{GROUP}/new", {"data": [entry(photos[0], "a")]}).status_code == 200
    bad = {"uri": "data:application/octet-stream;base64,@@@@"}
    add = client.post(f"/v1/image/group/{GROUP}/add", {"data": [entry(photos[1], "b"), bad]})
    assert add.status_code == 200 and add.json()["errors"][1]["code"] == 400
    assert client.post("/v1/image/group/other-group/add", {"data": []}).status_code == 400  # unknown group
    assert client.get(f"/v1/image/group/{GROUP}/info").json() == {"count": 2}
    search = {"data": {"uri": data_uri(jpeg(photos[0]))}, "params": {"groups": [GROUP]}}
    assert client.post("/v1/image/groups/search", search).status_code == 200
    failed = client.post("/v1/image/groups/search", {"data": bad, "params": {"groups": [GROUP]}})
    assert failed.status_code == 400
    assert requests.get(tusou.server.url + f"/no/such/{GROUP}", timeout=30).status_code == 404

    def page() -> dict | None:
        resp = scrape(tusou.server.url)
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        parsed = samples(resp.text)
        if value(parsed, "tusou_http_requests_total", method="GET", route="unmatched", status="404") != 1:
            return None
        text = resp.text
        # No tenant data: no group name, no image id, no access key, no secret.
        for secret in (GROUP, "other-group", client.access_key, client.secret_key):
            assert secret not in text
        return parsed

    got = eventually(page)
    assert got, "the 404 never showed up in /metrics"
    requests_total = "tusou_http_requests_total"
    assert value(got, requests_total, method="POST", route=NEW, status="200") == 1
    assert value(got, requests_total, method="POST", route=ADD, status="200") == 1
    assert value(got, requests_total, method="POST", route=ADD, status="400") == 1
    info = "/v1/image/group/{group_id}/info"
    assert value(got, requests_total, method="GET", route=info, status="200") == 1
    assert value(got, requests_total, method="POST", route="/v1/image/groups/search", status="400") == 1
    count = "tusou_http_request_duration_seconds_count"
    assert value(got, count, method="POST", route=NEW, status="200") == 1
    assert value(got, "tusou_http_request_duration_seconds_bucket", method="POST", route=NEW, status="200",
                 le="+Inf") == 1  # fmt: skip
    assert value(got, "tusou_images_embedded_total", purpose="index") == 2
    assert value(got, "tusou_images_embedded_total", purpose="query") == 1
    assert value(got, "tusou_embed_batch_duration_seconds_count", purpose="index") >= 1
    # One bad image in an add, one bad query image in a search.
    assert value(got, "tusou_image_errors_total", kind="data_uri_invalid") == 2
    assert value(got, "tusou_image_errors_total", kind="fetch_timeout") == 0
    assert value(got, "tusou_groups") == 1
    assert value(got, "tusou_images") == 2
    if Path("/proc/self/stat").exists():
        assert value(got, "process_resident_memory_bytes") > 10_000_000


def test_metrics_token_is_enforced_when_set(
    tmp_path: Path, embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tusou.access")
    running = started(Settings(data=tmp_path / "data", metrics_token="s3cret-token"), embedder)
    try:
        client = running.client("ops")
        assert scrape(running.server.url).status_code == 401
        assert scrape(running.server.url).headers["www-authenticate"] == "Bearer"
        assert scrape(running.server.url, Authorization="Bearer wrong").status_code == 401
        assert scrape(running.server.url, Authorization="s3cret-token").status_code == 401
        assert scrape(running.server.url, Authorization="Bearer s3cret-token-and-more").status_code == 401
        assert scrape(running.server.url, Authorization="Bearer s3crét").status_code == 401  # not ASCII
        # A valid Qiniu signature is no substitute for the operator's token.
        assert client.session.get(running.server.url + "/metrics", auth=client.auth).status_code == 401
        ok = scrape(running.server.url, Authorization="Bearer s3cret-token")
        assert ok.status_code == 200 and "tusou_http_requests_total" in ok.text
        # The token never reaches the access log.
        assert eventually(lambda: len([r for r in caplog.records if r.name == "tusou.access"]) >= 7)
        assert "s3cret" not in caplog.text
    finally:
        running.close()


def test_metrics_can_be_turned_off(tmp_path: Path, embedder: Embedder) -> None:
    running = started(Settings(data=tmp_path / "data", metrics=False), embedder)
    try:
        assert scrape(running.server.url).status_code == 404
        assert requests.get(running.server.url + "/healthz", timeout=30).status_code == 200
    finally:
        running.close()


def test_healthz(tusou: Tusou, monkeypatch: pytest.MonkeyPatch) -> None:
    url = tusou.server.url + "/healthz"
    resp = requests.get(url, timeout=30)
    assert resp.status_code == 200
    assert resp.json() == {
        "status": "ok",
        "version": observe.__version__,
        "model": tusou.service.embedder.model_id,
        "store": "sqlite",
    }
    assert resp.headers["X-Reqid"]

    def broken(tenant: str) -> list[str]:
        raise RuntimeError("disk on fire at /secret/path")

    monkeypatch.setattr(tusou.store, "list_groups", broken)
    down = requests.get(url, timeout=30)
    assert down.status_code == 503
    assert down.json() == {"error": "store unavailable"}  # no internals to an unauthenticated caller

    # A store that hangs fails the probe after the timeout instead of hanging it.
    release = threading.Event()
    monkeypatch.setattr(tusou.store, "list_groups", lambda tenant: release.wait(30))
    monkeypatch.setattr(observe, "_HEALTH_TIMEOUT_S", 0.3)
    try:
        start = time.monotonic()
        assert requests.get(url, timeout=30).status_code == 503
        assert requests.get(url, timeout=30).status_code == 503  # waits on the same read
        assert time.monotonic() - start < 5
    finally:
        release.set()
    monkeypatch.undo()
    assert eventually(lambda: requests.get(url, timeout=30).status_code == 200)


def test_access_log_line(
    tusou: Tusou, client: QiniuClient, photos: list[Image.Image], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tusou.access")
    body = {"data": [entry(photos[0], "img-1")]}
    resp = client.post(f"/v1/image/group/{GROUP}/new", body)
    assert resp.status_code == 200
    listing = client.get(f"/v1/image/group/{GROUP}", params={"marker": "bWFya2VyLXNlY3JldA", "limit": "5"})
    assert listing.status_code == 400  # not a marker tusou made; the query string still must not be logged

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "tusou.access"]

    records = eventually(lambda: lines() if len(lines()) >= 2 else None)
    assert records and all(r.levelno == logging.INFO for r in records)
    first, second = (r.getMessage() for r in records[:2])
    reqid = resp.headers["X-Reqid"]
    size = len(resp.request.body)
    assert first.startswith(f"POST {NEW} 200 ")
    assert f"reqid={reqid}" in first and f"ak={client.access_key}" in first and f" in={size} " in first
    assert second.startswith("GET /v1/image/group/{group_id} 400 ")
    signature = resp.request.headers["Authorization"].split(":", 1)[1]
    payload = body["data"][0]["uri"][40:80]
    for text in (first, second, caplog.text):
        for leak in (signature, client.secret_key, GROUP, "img-1", payload, "bWFya2VyLXNlY3JldA", "marker"):
            assert leak not in text


def test_access_key_of_takes_only_the_key_id() -> None:
    assert access_key_of("Qiniu AK123:c2lnbmF0dXJl") == "AK123"
    assert access_key_of("QBox AK-_9:sig") == "AK-_9"
    assert access_key_of("Bearer token:with-colon") == "-"  # never a bearer credential
    assert access_key_of("") == "-"
    assert access_key_of("Qiniu nocolon") == "-"
    assert access_key_of("Qiniu a\nb:sig") == "?"  # no log injection
    assert access_key_of("Qiniu " + "k" * 500 + ":sig") == "?"


def test_operator_routes_stay_out_of_the_openapi_document(tusou: Tusou) -> None:
    paths = requests.get(tusou.server.url + "/openapi.json", timeout=30).json()["paths"]
    assert "/metrics" not in paths and "/healthz" not in paths
    assert "/v1/image/groups/search" in paths


def test_a_service_built_at_startup_is_instrumented_too(
    tmp_path: Path, embedder: Embedder, photos: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `tusou serve` passes no service: the lifespan builds it after install() ran.
    from tests.conftest import ThreadedServer
    from tusou import service as service_module
    from tusou.api.app import create_app
    from tusou.fetch import Fetcher
    from tusou.store.keys import KeyStore
    from tusou.store.sqlite import SQLiteStore

    settings = Settings(data=tmp_path / "data")
    settings.data.mkdir(parents=True)

    def build(s: Settings) -> service_module.Service:
        store = SQLiteStore(s.db_path, model_id=embedder.model_id, dim=embedder.dim)
        return service_module.Service(s, store, embedder, Fetcher(s))

    monkeypatch.setattr(service_module, "build_service", build)
    keys = KeyStore(settings.data / "keys.db")
    key = keys.create("ops")
    with ThreadedServer(create_app(settings, keys=keys)) as server:
        client = QiniuClient(server.url, key.access_key, key.secret_key)
        assert client.post("/v1/image/group/g/new", {"data": [entry(photos[0], "a")]}).status_code == 200
        page = samples(scrape(server.url).text)
        assert value(page, "tusou_images_embedded_total", purpose="index") == 1
        assert value(page, "tusou_images") == 1
    keys.close()
