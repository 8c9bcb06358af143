"""Screenshots of the web page's main screens, written to docs/ (listed and described in docs/web.md).

    python tools/screenshots.py [--out docs]

Needs Debian's ``chromium`` and ``chromium-driver`` (apt) and the test extra (``pip install '.[test]'`` for
selenium). It starts a real ``tusou serve`` on a throwaway data folder and a free loopback port, stores the
repository's photos (tests/data/photos, CC0/public domain) through :mod:`tusou.client`, then drives the page
in headless Chromium as a person would. ``TUSOU_MODEL_DIR`` is passed through, so an already built model
graph can be reused. Nothing reaches the network.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from tests import browser  # noqa: E402
from tusou.client import Client, data_uri  # noqa: E402
from tusou.client import Image as NewImage  # noqa: E402

PHOTOS = ROOT / "tests" / "data" / "photos"
# name -> (label, desc) for the photos stored in "shop"; the last two go to a second group.
LABELS = {
    "zimniPalace": ("宫殿 palace", {"sku": 1001, "city": "St Petersburg"}),
    "windmill15": ("风车 windmill", {"sku": 1002}),
    "hammer8": ("锤子 hammer", {"sku": 1003, "price": 39.9}),
    "fish19": ("鱼 fish", {"sku": 1004}),
    "operaHouse": ("歌剧院 opera house", {"sku": 1005, "city": "Sydney"}),
    "koala": ("考拉 koala", {"sku": 1006, "price": 129}),
    "chicken": ("鸡 chicken", {"sku": 1007}),
    "giraffe": ("长颈鹿 giraffe", {"sku": 1008}),
    "cat": ("猫 cat", {"sku": 1009}),
    "volleyball": ("排球 volleyball", {"sku": 1010}),
    "spoons": ("勺子 spoons", {"sku": 2001}),
    "bulb": ("灯泡 bulb", {"sku": 2002}),
}
SECOND_GROUP = "new arrivals 新品"

# name -> what docs/web.md says it shows (kept here so the two cannot drift apart silently).
SHOTS = {
    "web-signin-error.png": "A wrong secret key: the error and its hint appear next to the sign-in button.",
    "web-search.png": "A search of two groups with a near-duplicate photo: every hit with its thumbnail.",
    "web-browse.png": "Browsing a group a page at a time, each image with its picture and a delete button.",
    "web-fetch-refused.png": "A search with a private URL: the 403 names TUSOU_FETCH_ALLOW; old hits gone.",
    "web-phone.png": "The whole page at 375 px wide (a phone), after a search.",
    "web-wide.png": "The page at 1920 x 1080 after a search.",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def tusou_server(data: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real ``tusou serve`` and a fresh access key."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    made = subprocess.run(
        [sys.executable, "-m", "tusou", "keys", "create", "--data", str(data), "--name", "screenshots"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    key = json.loads(made.stdout)
    port = free_port()
    log = (data / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tusou", "serve", "--data", str(data), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                Client(url, key["access_key"], key["secret_key"], retries=0).health()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"tusou serve did not start: {(data / 'serve.log').read_text()}"
                    ) from None
                time.sleep(0.3)
        yield url, key
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def fill(url: str, key: dict[str, str]) -> None:
    files = sorted(PHOTOS.glob("*.jpg"))
    images = []
    for path in files:
        name = path.stem.split("-", 1)[1]
        label, desc = LABELS[name]
        images.append(NewImage(data_uri(path), id=name, label=label, desc=desc))
    with Client(url, key["access_key"], key["secret_key"]) as client:
        client.new_group("shop", images[:10])
        client.new_group(SECOND_GROUP, images[10:] + [images[5]])


def near_duplicate(folder: Path) -> Path:
    """A cropped, smaller, recompressed koala: what a shopper's own photo of a listed item looks like."""
    koala = Image.open(PHOTOS / "05-koala.jpg").convert("RGB")
    w, h = koala.size
    crop = koala.crop((w // 10, h // 12, w - w // 12, h - h // 10)).resize((320, 240))
    path = folder / "koala-photo.jpg"
    crop.save(path, "JPEG", quality=60)
    return path


def save(png: bytes, path: Path) -> None:
    """PNG with a 256-colour palette: the page is mostly flat colours, and the files stay small."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def full_page(driver: Any, width: int, mobile: bool) -> bytes:
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": mobile},
    )
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": int(height), "deviceScaleFactor": 1, "mobile": mobile},
    )
    png: bytes = driver.get_screenshot_as_png()
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return png


class Page:
    def __init__(self, driver: Any, url: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver = driver
        self.by = By
        driver.get(url + "/")
        self.wait("the page script", lambda: driver.execute_script("return !!window.QiniuSign"))

    def wait(self, what: str, check: Any) -> Any:
        return browser.wait_for(self.driver, what, check, timeout=120)

    def el(self, element_id: str) -> Any:
        return self.driver.find_element(self.by.ID, element_id)

    def type(self, element_id: str, text: str) -> None:
        self.el(element_id).clear()
        if text:
            self.el(element_id).send_keys(text)

    def choose(self, select_id: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.el(select_id)).select_by_value(value)

    def message(self, element_id: str, kind: str) -> None:
        self.wait(
            f"a {kind} message in #{element_id}",
            lambda: self.driver.execute_script(
                "return arguments[0].classList.contains(arguments[1])", self.el(element_id), kind
            ),
        )

    def pictures_loaded(self, tbody_id: str) -> None:
        self.wait(
            f"the pictures of #{tbody_id}",
            lambda: self.driver.execute_script(
                "const imgs = [...document.querySelectorAll('#' + arguments[0] + ' td.pic img')];"
                "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)",
                tbody_id,
            ),
        )

    def sign_in(self, key: dict[str, str], secret: str | None = None) -> None:
        from selenium.webdriver.common.keys import Keys

        self.type("ak", key["access_key"])
        self.type("sk", secret if secret is not None else key["secret_key"])
        self.el("sk").send_keys(Keys.ENTER)
        self.message("keys-msg", "bad" if secret is not None else "ok")

    def search(self, photo: Path) -> None:
        self.el("file").send_keys(str(photo))
        self.choose("sgroup1", "shop")
        self.choose("sgroup2", SECOND_GROUP)
        self.type("limit", "6")
        self.el("search").click()
        self.message("search-msg", "ok")
        self.pictures_loaded("hits")

    def top(self, element_id: str) -> None:
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", self.el(element_id))


def take(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="tusou-shots-") as tmp:
        data = Path(tmp) / "data"
        photo = near_duplicate(Path(tmp))
        with tusou_server(data) as (url, key), browser.chromium(1280, 900) as driver:
            fill(url, key)

            def shot(name: str, png: bytes) -> None:
                save(png, out / name)
                written.append(out / name)

            page = Page(driver, url)
            page.sign_in(key, secret=key["secret_key"][::-1])
            shot("web-signin-error.png", driver.get_screenshot_as_png())

            page.sign_in(key)
            page.search(photo)
            page.top("image")
            shot("web-search.png", page.el("image").screenshot_as_png)

            page.choose("bgroup", "shop")
            page.type("blimit", "4")
            page.el("first").click()
            page.pictures_loaded("images")
            page.wait("the next page button", lambda: page.el("next").is_enabled())
            page.top("browse")
            shot("web-browse.png", page.el("browse").screenshot_as_png)

            page.type("url", "http://10.0.0.1/koala.jpg")
            page.el("search").click()
            page.message("search-msg", "bad")
            page.top("image")
            shot("web-fetch-refused.png", page.el("image").screenshot_as_png)

            page.search(photo)
            shot("web-phone.png", full_page(driver, 375, mobile=True))
            driver.set_window_size(1920, 1080)
            driver.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": 1920, "height": 1080, "deviceScaleFactor": 1, "mobile": False},
            )
            driver.execute_script("window.scrollTo(0, 0)")
            shot("web-wide.png", driver.get_screenshot_as_png())
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="Folder for the PNG files.")
    args = parser.parse_args()
    why = browser.missing()
    if why:
        sys.exit(f"cannot take screenshots: {why}")
    for path in take(args.out):
        with Image.open(path) as image:
            width, height = image.size
        print(f"{path}  {width}x{height}  {SHOTS[path.name]}")


if __name__ == "__main__":
    main()
