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
    DribbleServer,
    attack_grey16_searches,
    attack_pixel_batch,
    big_grey16_png,
    big_rgb_png,
    other_tenant_calls,
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
    assert any(name.endswith(".usearch") for name in seen), seen  # the index snapshots are there
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for path in data.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            assert mode & 0o077 == 0, (path, oct(mode))
