"""One tenant must not take the server down or starve the others (issue 10).

Short versions of ``bench/hostile.py``'s attacks, each against a real ``tusou serve`` process on loopback
(memory is that process's RSS, sampled with psutil). Bounds here are generous: they sit far below what the
defects cost (GBs, seconds) and above what a loaded 2-core CI box adds by itself; the bench prints the
issue's tighter figures.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.crash import image_uri
from bench.hostile import (
    RAW_REQUESTS,
    DribbleServer,
    attack_big_body,
    attack_edges,
    attack_grey16_searches,
    attack_pixel_batch,
    big_grey16_png,
    big_rgb_png,
    other_tenant_calls,
    raw_http,
    serve,
    start_flood,
    wait_for,
    warm_up,
)
from tusou.batching import Batcher, FairPool
from tusou.images import ImageError, PixelBudget, decode_image

# Peak RSS growth allowed in CI. Before the pixel budget: ~2.6 GB for the 16-image add, ~2.3 GB for four
# 16-bit searches.
MEMORY_BOUND_MB = 900


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with serve(tmp_path_factory.mktemp("hostile")) as tenants:
        warm_up(tenants)
        yield tenants


def test_small_pngs_that_decode_big_do_not_blow_up_memory(server) -> None:  # type: ignore[no-untyped-def]
    row, (resp,) = attack_pixel_batch(server, images=16)
    assert resp.status_code == 200, resp.text
    assert resp.json()["errors"] == [None] * 16  # every image was added, none refused for memory
    assert "X-Reqid" in resp.headers
    assert row.figure <= MEMORY_BOUND_MB, row


def test_concurrent_16_bit_searches_do_not_blow_up_memory(server) -> None:  # type: ignore[no-untyped-def]
    row, responses = attack_grey16_searches(server, searches=4)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert row.figure <= MEMORY_BOUND_MB, row


def test_big_images_are_still_found_after_shrinking(server) -> None:  # type: ignore[no-untyped-def]
    """Shrinking right after decoding must not cost accuracy: the same big image finds itself."""
    add = server.other.post(
        "/v1/image/group/warm/add",
        {
            "data": [
                {"uri": image_uri(7), "attribute": {"id": "small"}},
                {"uri": "data:image/png;base64," + _b64(big_grey16_png(shade=3)), "attribute": {"id": "g16"}},
            ]
        },
    )
    assert add.json()["errors"] == [None, None], add.text
    found = server.other.post(
        "/v1/image/groups/search",
        {
            "data": {"uri": "data:image/png;base64," + _b64(big_grey16_png(shade=3))},
            "params": {"groups": ["warm"]},
        },
    ).json()["result"]
    assert found and found[0]["id"] == "g16" and found[0]["score"] > 0.95, found


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# --- fairness --------------------------------------------------------------------------------------------
def test_a_slow_url_flood_does_not_starve_another_tenant(tmp_path: Path) -> None:
    """Tenant 1: an add of 40 URLs and 8 searches, on a host that dribbles a byte per 0.5 s and holds them
    all until released. Tenant 2's inline add, inline search and URL add are served meanwhile (before the
    fix: queued behind tenant 1's downloads, or refused "fetch busy")."""
    slow = DribbleServer()
    env = {"TUSOU_FETCH_ALLOW": '["127.0.0.1"]', "TUSOU_FETCH_TIMEOUT_S": "120"}
    try:
        with serve(tmp_path, env=env) as t:
            warm_up(t)
            t.other.timeout = 60
            flood = start_flood(t, slow, urls=40, searches=8)
            # Tenant 1's downloads are under way (its share of the download threads: 4).
            assert wait_for(lambda: slow.slow_started >= 4, 60), slow.slow_started
            timed = other_tenant_calls(t, slow)
            # Served while every one of tenant 1's requests still waits for its bytes.
            assert flood.alive() == len(flood.threads) and not slow.released.is_set()
            for name, (_, resp) in timed.items():
                assert resp.status_code == 200, (name, resp.text)
                assert "X-Reqid" in resp.headers
                if "errors" in resp.json():
                    assert resp.json()["errors"] == [None] * len(resp.json()["errors"]), (name, resp.text)
            assert timed["inline search"][1].json()["result"][0]["id"] == "inline-1"
            assert slow.slow_started == 4  # no more than its share, however many it queued
            slow.release()
            flood.join(120)
            assert flood.alive() == 0
            assert all(r.status_code != 500 for r in flood.responses)
    finally:
        slow.close()


def test_fair_pool_caps_each_tenant_and_serves_tenants_in_turn() -> None:
    pool = FairPool(workers=4, per_tenant=2, name="test")
    gate = threading.Event()
    started: list[str] = []
    lock = threading.Lock()

    def job(name: str) -> str:
        with lock:
            started.append(name)
        gate.wait(30)
        return name

    try:
        flood = [pool.submit("a", lambda i=i: job(f"a{i}")) for i in range(10)]
        assert wait_for(lambda: len(started) == 2, 10)
        other = pool.submit("b", lambda: job("b0"))
        assert wait_for(lambda: len(started) == 3, 10)
        assert pool.running("a") == 2 and started[2] == "b0"  # a's 8 queued jobs did not delay b's
        gate.set()
        assert [f.result(10) for f in flood] == [f"a{i}" for i in range(10)] and other.result(10) == "b0"
    finally:
        gate.set()
        pool.close()


def test_batcher_takes_tenants_in_turn() -> None:
    order: list[str] = []
    first = threading.Event()
    go = threading.Event()

    def model(items: list[str]) -> np.ndarray:
        first.set()
        go.wait(30)
        order.extend(items)
        return np.zeros((len(items), 1), dtype=np.float32)

    batcher = Batcher(model, max_batch=1, workers=1)
    try:
        threads = [threading.Thread(target=batcher, args=(["a0"], "a"))]
        threads[0].start()
        assert first.wait(10)  # the worker is busy with a0; the rest queue up
        threads.append(threading.Thread(target=batcher, args=([f"a{i}" for i in range(1, 6)], "a")))
        threads[1].start()
        assert wait_for(lambda: len(batcher._turns) == 1, 10)
        threads.append(threading.Thread(target=batcher, args=(["b0"], "b")))
        threads[2].start()
        assert wait_for(lambda: len(batcher._turns) == 2, 10)
        go.set()
        for thread in threads:
            thread.join(10)
        assert order[:3] == ["a0", "a1", "b0"], order  # b's one job after one of a's, not after all five
    finally:
        go.set()
        batcher.close()


# --- the budget itself ---------------------------------------------------------------------------------
def test_a_decode_that_does_not_fit_waits_then_gets_a_clear_error() -> None:
    budget = PixelBudget(4999 * 4999, wait_s=0.2)
    data = big_rgb_png()
    with budget.hold(4999 * 4999):
        with pytest.raises(ImageError) as err:
            decode_image(data, 256, budget)
    assert err.value.kind == "image_busy" and err.value.code == 503
    assert "retry later" in err.value.message
    # Freed again: the same image now decodes, shrunk to what the model needs, in 8-bit RGB.
    image = decode_image(data, 256, budget)
    assert image.mode == "RGB" and 512 <= min(image.size) < 1024
    assert budget.in_use == 0


def test_a_waiting_decode_proceeds_when_pixels_are_given_back() -> None:
    budget = PixelBudget(100, wait_s=30)
    got: list[float] = []
    held = threading.Event()

    def holder() -> None:
        with budget.hold(80):
            held.set()
            time.sleep(0.3)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    with budget.hold(50):  # cannot fit until the holder gives its 80 back
        got.append(budget.in_use)
    thread.join()
    assert got == [50]
    with budget.hold(10**9):  # larger than the whole budget: clamped, decodes alone
        assert budget.in_use == 100


def test_16_bit_grey_keeps_its_high_byte_without_wide_copies() -> None:
    image = decode_image(big_grey16_png(side=600, shade=0), None)
    assert image.mode == "RGB" and image.size == (600, 600)
    assert image.getpixel((10, 10)) == (0x9A, 0x9A, 0x9A)
    shrunk = decode_image(big_grey16_png(side=600, shade=0), 100)
    assert shrunk.size == (200, 200) and shrunk.getpixel((10, 10)) == (0x9A, 0x9A, 0x9A)


def test_decode_shrinks_only_by_what_the_model_leaves_unused() -> None:
    image = decode_image(big_rgb_png(side=1000), 256)
    assert image.size == (1000, 1000)  # 1000 // 512 = 1: nothing to gain without going under 2x256
    image = decode_image(big_rgb_png(side=2000), 256)
    assert image.size == (667, 667)  # 2000 // 512 = 3, rounded up
    assert isinstance(image, Image.Image)


# --- the data folder -----------------------------------------------------------------------------------
def test_everything_in_the_data_folder_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a typical umask: without care, files come out 0644 and folders 0755
    try:
        with serve(tmp_path) as t:
            warm_up(t)
    finally:
        os.umask(old)
    data = tmp_path / "data"
    seen = {p.name for p in data.rglob("*")}
    assert any(name.endswith(".ivf") for name in seen), seen  # the index snapshots are there
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for path in data.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            assert mode & 0o077 == 0, (path, oct(mode))


# --- markers and literals -----------------------------------------------------------------------------------
def _tiny(seed: int) -> dict[str, object]:
    return {"uri": image_uri(seed), "attribute": {"id": f"m{seed}"}}


def test_bad_markers_are_400_and_markers_stay_in_their_group(tusou) -> None:  # type: ignore[no-untyped-def]
    alice, bob = tusou.client("alice"), tusou.client("bob")
    for client in (alice, bob):
        assert client.post("/v1/image/group/m/new", {"data": [_tiny(i) for i in range(3)]}).status_code == 200
    assert alice.post("/v1/image/group/n/new", {"data": [_tiny(9), _tiny(8)]}).status_code == 200
    first = alice.get("/v1/image/group/m", {"limit": 1}).json()
    marker = first["marker"]
    assert alice.get("/v1/image/group/m", {"limit": 1, "marker": marker}).json()["result"][0]["id"] == "m1"
    flipped = marker[:-2] + ("A" if marker[-2] != "A" else "B") + marker[-1]
    # gAAAAAAAAAA decoded to >= 2^63 under the old counter markers: a 500 from SQLite.
    for bad in ("gAAAAAAAAAA", "_____________________", flipped, marker + "A", marker[:-1], "AAAAAAAAAAA"):
        resp = alice.get("/v1/image/group/m", {"limit": 1, "marker": bad})
        assert resp.status_code == 400 and resp.json() == {"error": "invalid marker"}, (bad, resp.text)
    # A marker means a place in one group of one tenant: not in another group, nor in bob's "m".
    for client, group in ((alice, "n"), (bob, "m")):
        resp = client.get(f"/v1/image/group/{group}", {"limit": 1, "marker": marker})
        assert resp.status_code == 400 and resp.json() == {"error": "invalid marker"}


def test_markers_carry_no_counter() -> None:
    """Consecutive sequence numbers give unrelated markers (the old ones were the counter in base64, so
    two of them told a tenant how many images others had inserted in between)."""
    import base64

    from tusou.store.markers import MarkerCodec, new_marker_key

    codec = MarkerCodec(new_marker_key())
    for seq in (1, 2, 1000, 1 << 40):
        a, b = codec.encode("t", "g", seq), codec.encode("t", "g", seq + 1)
        bits = int.from_bytes(base64.urlsafe_b64decode(a + "="), "big") ^ int.from_bytes(
            base64.urlsafe_b64decode(b + "="), "big"
        )
        assert bin(bits).count("1") >= 24, (seq, a, b)  # ~56 of 112 on average
        assert codec.decode("t", "g", a) == seq and codec.decode("t", "g", b) == seq + 1
    assert codec.encode("t", "g", 5) != codec.encode("t", "h", 5) != codec.encode("u", "g", 5)
    assert MarkerCodec(new_marker_key()).encode("t", "g", 5) != codec.encode("t", "g", 5)


def _post_form(client, path: str, fields: dict[str, str]):  # type: ignore[no-untyped-def]
    from urllib.parse import urlencode

    import requests

    from tusou.api.auth import sign_qiniu

    url = client.base + path
    body = urlencode(fields).encode()
    headers = sign_qiniu(
        client.access_key,
        client.secret_key,
        "POST",
        url,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=body,
    )
    return requests.post(url, data=body, headers=headers, timeout=30)


def test_form_literals_with_lone_surrogates_are_400(tusou) -> None:  # type: ignore[no-untyped-def]
    client = tusou.client("forms")
    assert client.post("/v1/image/group/f/new", {"data": [_tiny(1)]}).status_code == 200
    lone = "'\\ud800'"  # a valid Python literal for a str no UTF-8 database or response can hold
    cases = [
        (
            "/v1/image/group/f/add",
            {"data": f"[{{'uri': {image_uri(2)!r}, 'attribute': {{'id': {lone}}}}}]"},
        ),
        (
            "/v1/image/group/f/add",
            {"data": f"[{{'uri': {image_uri(2)!r}, 'attribute': {{'label': {lone}}}}}]"},
        ),
        (
            "/v1/image/group/f/add",
            {"data": f"[{{'uri': {image_uri(2)!r}, 'attribute': {{'desc': {{'k': {lone}}}}}}}]"},
        ),
        (
            "/v1/image/groups/search",
            {"data": f"{{'uri': {image_uri(2)!r}}}", "params": f"{{'groups': [{lone}]}}"},
        ),
        ("/v1/image/group/f/delete", {"images": f"[{lone}]"}),
        ("/v1/image/group/f/update", {"id": "m1", "desc": f"{{'k': {lone}}}"}),
        ("/v1/image/group/f/image", {"id": f"[{lone}]"}),
    ]
    for path, fields in cases:
        resp = _post_form(client, path, fields)
        assert resp.status_code == 400, (path, fields, resp.status_code, resp.text)
        assert "X-Reqid" in resp.headers and "error" in resp.json()


# --- HTTP edges -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RAW_REQUESTS))
def test_malformed_raw_http_is_answered_with_a_reqid(server, name: str) -> None:  # type: ignore[no-untyped-def]
    answer = raw_http(server.server.port, RAW_REQUESTS[name])
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 4"), (name, answer[:300])
    assert b"\r\nx-reqid: " in head, (name, answer[:300])


def test_paths_that_hide_separators_or_are_not_utf8_are_400(server) -> None:  # type: ignore[no-untyped-def]
    import requests

    for path in (
        "/v1/image/group/shop%2Finfo",
        "/v1/image/group/shop%2finfo",
        "/v1/image/group/a%5Cb",
        "/v1/image/group/%FE",
        "/v1/image/group/%FF/info",
    ):
        resp = requests.get(server.server.url + path, timeout=30)
        assert resp.status_code == 400 and resp.json() == {"error": "invalid group id"}, (path, resp.text)
        assert resp.headers["X-Reqid"] and resp.headers["X-Content-Type-Options"] == "nosniff"
    # A real group id with escaped UTF-8 is fine.
    ok = server.attacker.post("/v1/image/group/图搜/new", {"data": [_tiny(1)]})
    assert ok.status_code == 200, ok.text
    assert server.attacker.get("/v1/image/group/图搜/info").json() == {"count": 1}


def test_no_redirect_is_built_from_host_and_no_cdn_pages(server) -> None:  # type: ignore[no-untyped-def]
    import requests

    resp = requests.get(
        server.server.url + "/v1/image/group/",
        headers={"Host": "evil.example"},
        allow_redirects=False,
        timeout=30,
    )
    assert resp.status_code in (400, 401, 404) and "location" not in resp.headers, resp.status_code
    assert resp.headers["X-Reqid"]
    for path in ("/redoc", "/docs/oauth2-redirect"):
        assert requests.get(server.server.url + path, timeout=30).status_code == 404, path
    # /docs is tusou's own page (tusou/web/docs.html), not Swagger UI: nothing from a CDN, same CSP as /.
    docs = requests.get(server.server.url + "/docs", timeout=30)
    assert docs.status_code == 200 and "default-src 'none'" in docs.headers["Content-Security-Policy"]
    assert "cdn" not in docs.text.lower() and "swagger" not in docs.text.lower()
    assert 'src="http' not in docs.text and 'src="//' not in docs.text
    page = requests.get(server.server.url + "/", timeout=30)
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert requests.get(server.server.url + "/openapi.json", timeout=30).status_code == 200


def test_a_redirect_to_a_data_uri_is_the_documented_400() -> None:
    import http.server

    from tusou.config import Settings
    from tusou.fetch import Fetcher

    location = "data:image/png;base64," + _b64(big_rgb_png(side=40))

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with Fetcher(Settings(fetch_allow=["127.0.0.1"])) as fetcher:
            with pytest.raises(ImageError) as err:
                fetcher.fetch(f"http://127.0.0.1:{httpd.server_address[1]}/a.png")
        assert (err.value.kind, err.value.code) == ("uri_invalid", 400)
        assert err.value.message == "invalid redirect to: only http and https redirects are followed"
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- bodies and signatures --------------------------------------------------------------------------------
def test_a_big_body_with_a_wrong_signature_is_not_buffered(server) -> None:  # type: ignore[no-untyped-def]
    """A known access key (keys are not secret), a wrong signature, 120 MB: before, the server held the body
    twice (~2x RSS) and hashed it on the event loop."""
    rows, answers = attack_big_body(server, megabytes=120)
    growth, _ = rows
    assert growth.note == "status 401", growth
    assert answers[-1] == (401, True)
    assert growth.figure <= 150, growth
    assert all(answer == (200, True) for answer in answers[:-1])
    # The spool went away with the request.
    assert not any((server.server.data / "tmp").iterdir())


def _qiniu_headers(client, method: str, url: str, body: bytes, content_type: str | None) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Headers of a Qiniu-signed request exactly as a client sending ``content_type`` (or none) signs it."""
    import hashlib
    import hmac
    from base64 import urlsafe_b64encode
    from urllib.parse import urlsplit

    from tusou.api.auth import qiniu_string_to_sign

    headers = {"X-Qiniu-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}
    if content_type is not None:
        headers["Content-Type"] = content_type
    parts = urlsplit(url)
    data = qiniu_string_to_sign(method, parts.path, parts.query, parts.netloc, headers, body)
    sign = urlsafe_b64encode(hmac.new(client.secret_key.encode(), data, hashlib.sha1).digest()).decode()
    return {**headers, "Authorization": f"Qiniu {client.access_key}:{sign}"}


def test_bodies_the_signature_did_not_cover_are_refused(tusou) -> None:  # type: ignore[no-untyped-def]
    import json

    import requests

    client = tusou.client("cover")
    assert client.post("/v1/image/group/c/new", {"data": [_tiny(1)]}).status_code == 200
    url = client.base + "/v1/image/groups/search"
    body = json.dumps({"data": {"uri": image_uri(1)}, "params": {"groups": ["c"], "limit": -1}}).encode()
    for content_type in (None, "application/octet-stream"):
        headers = _qiniu_headers(client, "POST", url, body, content_type)
        if content_type is None:
            headers["Content-Type"] = ""  # requests would add none; some clients send an empty one
        resp = requests.post(url, data=body, headers=headers, timeout=30)
        assert resp.status_code == 400, (content_type, resp.status_code, resp.text)
        assert "not covered by the signature" in resp.json()["error"]
    # Signed as JSON, the same body is served.
    headers = _qiniu_headers(client, "POST", url, body, "application/json")
    assert requests.post(url, data=body, headers=headers, timeout=30).status_code == 200


def test_qbox_can_be_refused(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    import requests

    from tests.conftest import Tusou
    from tusou.api.auth import sign_qbox
    from tusou.config import Settings

    for allowed in (True, False):
        running = Tusou(Settings(data=tmp_path / str(allowed), qbox=allowed), embedder)
        running.server.__enter__()
        try:
            client = running.client("qbox")
            url = client.base + "/v1/image/group"
            resp = requests.get(url, headers=sign_qbox(client.access_key, client.secret_key, url), timeout=30)
            assert resp.status_code == (200 if allowed else 401), resp.text
            assert "X-Reqid" in resp.headers
        finally:
            running.close()


def test_edge_requests_are_4xx_with_a_reqid(server) -> None:  # type: ignore[no-untyped-def]
    """bench/hostile.py's edge set against a real server: raw malformed HTTP, bad markers, lone surrogates in
    form literals, hidden separators, a Host-built redirect."""
    rows, answers = attack_edges(server)
    assert len(answers) >= 20
    for row in rows:
        assert row.figure == 0, row


def test_one_key_holds_at_most_max_groups_per_key(tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    """Each group costs memory even when empty: one key stops at ``max_groups_per_key`` with Qiniu's 400,
    another key is not affected, and removing a group makes room again."""
    from tests.conftest import Tusou
    from tusou.config import Settings

    running = Tusou(Settings(data=tmp_path / "data", max_groups_per_key=2), embedder)
    running.server.__enter__()
    try:
        greedy, other = running.client("greedy"), running.client("other")
        for name in ("a", "b"):
            assert greedy.post(f"/v1/image/group/{name}/new", {"data": []}).status_code == 200
        refused = greedy.post("/v1/image/group/c/new", {"data": []})
        assert refused.status_code == 400
        assert refused.json() == {"error": "too many groups: 2 at most per access key"}
        assert greedy.post("/v1/image/group/a/new", {"data": []}).json() == {"error": "group already exists"}
        assert greedy.get("/v1/image/group").json()["result"] == ["a", "b"]
        assert other.post("/v1/image/group/c/new", {"data": []}).status_code == 200
        assert greedy.post("/v1/image/group/a/remove").status_code == 200
        assert greedy.post("/v1/image/group/c/new", {"data": []}).status_code == 200
    finally:
        running.close()
