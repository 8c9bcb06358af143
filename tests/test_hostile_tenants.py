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

import pytest
from PIL import Image

from bench.crash import image_uri
from bench.hostile import (
    attack_grey16_searches,
    attack_pixel_batch,
    big_grey16_png,
    big_rgb_png,
    serve,
    warm_up,
)
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
