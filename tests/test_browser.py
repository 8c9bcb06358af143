"""The web page at / driven in headless Chromium as a person would, against a real tusou server.

Sign in, a wrong secret, create a group, add files and a URL, search, page through, delete, remove: each
through the page's own buttons, the requests signed by the page's own signer and answered by the real app.
Any JavaScript error in the browser's console fails the test (expected HTTP refusals excepted, by status).

Runs wherever Debian's chromium and chromium-driver are installed; CI sets TUSOU_REQUIRE_BROWSER=1 so that a
missing browser fails instead of skipping.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import browser
from tests.conftest import MODEL_CACHE, ImageServer, Tusou, jpeg
from tusou.config import Settings
from tusou.embed.base import Embedder

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parent.parent

_why = browser.missing()
if _why and not os.environ.get("TUSOU_REQUIRE_BROWSER"):
    pytest.skip(f"no browser: {_why}", allow_module_level=True)


class Page:
    """The page in one browser tab, with the few moves the tests make."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url
        self.allowed_statuses: set[int] = set()
        self.allowed_urls: set[str] = set()
        driver.get(url + "/")
        self.wait("the page script running", lambda: self.js("return !!window.QiniuSign"))

    # --- plumbing
    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def el(self, element_id: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id)

    def wait(self, what: str, check: Any, timeout: float = 90) -> Any:
        return browser.wait_for(self.driver, what, check, timeout)

    def type(self, element_id: str, text: str) -> None:
        field = self.el(element_id)
        field.clear()
        if text:
            field.send_keys(text)

    def choose(self, select_id: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.el(select_id)).select_by_value(value)

    def options(self, select_id: str) -> list[str]:
        return list(self.js("return [...arguments[0].options].map(o => o.value)", self.el(select_id)))

    def text(self, element_id: str) -> str:
        return str(self.js("return document.getElementById(arguments[0]).innerText", element_id))

    def rows(self, tbody_id: str) -> list[list[str]]:
        return list(
            self.js(
                "return [...document.getElementById(arguments[0]).rows]"
                ".map(r => [...r.cells].map(c => c.innerText.trim()))",
                tbody_id,
            )
        )

    def press(self, button: Any) -> None:
        """Clicks a button whose action disables it while it runs, and waits for the action to end."""
        if isinstance(button, str):
            button = self.el(button)
        button.click()
        self.wait("the action finishing", lambda: not self.js("return arguments[0].disabled", button))

    def message(self, element_id: str, kind: str) -> str:
        """The message next to an action once it is of kind "ok" or "bad"; checked to be in view."""
        self.wait(
            f"a {kind} message in #{element_id}",
            lambda: self.js(
                "const e = arguments[0];"
                "return e.classList.contains(arguments[1]) && e.innerText.trim() !== ''",
                self.el(element_id),
                kind,
            ),
        )
        assert self.in_view(element_id), (
            f"#{element_id} is not in view",
            self.js(
                "const r = arguments[0].getBoundingClientRect(); return [r.top, r.bottom, r.left, r.right,"
                " innerWidth, innerHeight, scrollY]",
                self.el(element_id),
            ),
        )
        return self.text(element_id)

    def in_view(self, element_id: str) -> bool:
        return bool(
            self.js(
                "const r = arguments[0].getBoundingClientRect();"
                "return r.width > 0 && r.height > 0 && r.top >= 0 && r.left >= 0"
                " && r.bottom <= window.innerHeight + 1 && r.right <= window.innerWidth + 1",
                self.el(element_id),
            )
        )

    def pictures(self, tbody_id: str) -> dict[str, str]:
        """Image id -> the kind of picture its row shows once loaded ("data:image/jpeg", "http"...)."""
        found = self.wait(
            f"the pictures in #{tbody_id} loaded",
            lambda: self.js(
                "const rows = [...document.getElementById(arguments[0]).querySelectorAll('tr[data-id]')];"
                "const imgs = rows.map(r => r.querySelector('td.pic img'));"
                "if (imgs.some(i => i && !(i.complete && i.naturalWidth > 0))) return null;"
                "return rows.map((r, k) => [r.dataset.id, imgs[k] ? imgs[k].src.split(/[;:]/).slice(0, 2)"
                ".join(':') : '']);",
                tbody_id,
            ),
        )
        return {image_id: kind for image_id, kind in found}

    def count_of(self, group: str) -> str:
        return next((row[1] for row in self.rows("grouprows") if row[0] == group), "")

    def row_button(self, tbody_id: str, image_or_group: str, text: str) -> Any:
        from selenium.webdriver.common.by import By

        attr = "data-group" if tbody_id == "grouprows" else "data-id"
        css = f"#{tbody_id} tr[{attr}='{image_or_group}'] button"
        return next(b for b in self.driver.find_elements(By.CSS_SELECTOR, css) if text in b.text)

    def confirm(self, accept: bool) -> str:
        alert = self.wait("a confirmation", lambda: self.driver.switch_to.alert)
        text = str(alert.text)
        if accept:
            alert.accept()
        else:
            alert.dismiss()
        return text

    def log_lines(self) -> list[str]:
        return [line for line in self.text("log").splitlines() if line.strip()]

    def sign_in(self, access_key: str, secret_key: str) -> None:
        from selenium.webdriver.common.keys import Keys

        self.type("ak", access_key)
        self.type("sk", secret_key)
        self.el("sk").send_keys(Keys.ENTER)  # Enter submits
        self.wait("signing in finishing", lambda: self.el("signin").is_enabled())

    # --- the console: any JavaScript error fails; HTTP refusals only with a status the test expects
    def console_errors(self) -> list[str]:
        bad = []
        for entry in self.driver.get_log("browser"):
            if entry["level"] != "SEVERE":
                continue
            message = entry["message"]
            if entry.get("source") == "network":
                status = re.search(r"status of (\d{3})", message)
                if status and int(status.group(1)) in self.allowed_statuses:
                    continue
                if any(message.startswith(url + " ") for url in self.allowed_urls):
                    continue
            bad.append(message)
        return bad


# tusou.test is resolved to loopback by the browser alone: a plain-http, non-localhost origin, where browsers
# hide WebCrypto (not a secure context) and the page signs with its pure-JS HMAC instead.
PLAIN_HOST = "tusou.test"


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with browser.chromium(extra=(f"--host-resolver-rules=MAP {PLAIN_HOST} 127.0.0.1",)) as drv:
        yield drv


@pytest.fixture
def page(driver: Any, tusou: Tusou) -> Iterator[Page]:
    driver.get("about:blank")
    driver.get_log("browser")  # drop what an earlier test left
    tab = Page(driver, tusou.server.url)
    yield tab
    errors = tab.console_errors()
    tab.js("window.sessionStorage.clear()")
    assert not errors, f"JavaScript console errors: {errors}"


@pytest.fixture
def photo_files(tmp_path: Path, photos: list[Image.Image]) -> list[Path]:
    paths = []
    for i, photo in enumerate(photos[:3]):
        path = tmp_path / f"photo-{i}.jpg"
        path.write_bytes(jpeg(photo))
        paths.append(path)
    return paths


def test_wrong_secret_shows_an_error_in_view(page: Page, tusou: Tusou) -> None:
    key = tusou.keys.create("web")
    page.allowed_statuses.add(401)
    page.sign_in(key.access_key, key.secret_key[:-1] + ("A" if key.secret_key[-1] != "A" else "B"))
    shown = page.message("keys-msg", "bad")
    assert "401" in shown and "bad token" in shown
    assert "私钥" in shown and "secret key is wrong" in shown  # the hint, in both languages
    assert "clock" not in shown
    assert page.rows("grouprows") == []
    assert any("401" in line for line in page.log_lines())

    # The right secret: the error gives way to the groups.
    page.sign_in(key.access_key, key.secret_key)
    assert "Signed in" in page.message("keys-msg", "ok")
    assert page.rows("grouprows") == [["还没有分组 No groups yet"]]


def test_sign_in_create_add_search_page_delete_remove(
    page: Page, tusou: Tusou, photo_files: list[Path], photos: list[Image.Image], image_server: ImageServer
) -> None:
    from selenium.webdriver.common.keys import Keys

    key = tusou.keys.create("web")
    page.sign_in(key.access_key, key.secret_key)
    assert page.rows("grouprows") == [["还没有分组 No groups yet"]]

    # Create two groups (Enter submits); an id with a space is one group, never split.
    for group in ("shop", "summer shoes"):
        page.type("newgroup", group)
        page.el("newgroup").send_keys(Keys.ENTER)
        assert f"Created group {group}" in page.message("groups-msg", "ok")
    page.wait(
        "both groups listed",
        lambda: [r[:2] for r in page.rows("grouprows")] == [["shop", "0"], ["summer shoes", "0"]],
    )
    assert page.options("sgroup1") == ["shop", "summer shoes"]
    assert page.options("sgroup2") == ["", "shop", "summer shoes"]
    assert page.el("agroup").get_attribute("value") == "summer shoes"  # the new group is chosen

    # Two files into "shop", a URL (a loopback server, allow-listed in the test settings) into "summer shoes";
    # the counts follow every add without a refresh.
    page.choose("agroup", "shop")
    for i, path in enumerate(photo_files[:2]):
        page.el("file").send_keys(str(path))
        page.type("aid", f"p{i}")
        page.type("alabel", "鞋子" if i == 0 else "bag")
        page.press("add")
        assert f"Added id p{i} to shop" in page.message("add-msg", "ok")
        page.wait(f"the count of shop at {i + 1}", lambda i=i: page.count_of("shop") == str(i + 1))
    url = image_server.put("p2.jpg", jpeg(photos[2]))
    page.type("url", url)
    assert page.el("file").get_attribute("value") == ""  # a URL replaces the chosen file
    page.choose("agroup", "summer shoes")
    page.type("aid", "p2")
    page.type("alabel", "")
    page.press("add")
    assert "Added id p2 to summer shoes" in page.message("add-msg", "ok")
    page.wait("the count of summer shoes at 1", lambda: page.count_of("summer shoes") == "1")

    # Search both groups with the first file: it is the first hit.
    page.el("file").send_keys(str(photo_files[0]))
    page.choose("sgroup1", "shop")
    page.choose("sgroup2", "summer shoes")
    page.press("search")
    assert "result(s)" in page.message("search-msg", "ok")
    hits = page.rows("hits")
    assert hits[0][1:3] == ["p0", "鞋子"] and hits[0][4] == "shop"
    assert float(hits[0][3]) > 0.9
    assert {row[1] for row in hits} <= {"p0", "p1", "p2"}
    # Every hit shows its picture, a file-added image too: the thumbnail the server kept.
    assert page.pictures("hits") == {row[1]: "data:image/jpeg" for row in hits}

    # Search with the URL: the hit from the second group shows its picture too.
    page.type("url", url)
    page.press("search")
    assert page.rows("hits")[0][1] == "p2" and page.rows("hits")[0][4] == "summer shoes"
    assert page.pictures("hits")["p2"] == "data:image/jpeg"

    # A failed search: the error is next to the button with a hint that fits, and the old results are gone.
    refused = url.replace("127.0.0.1", "127.0.0.2")
    page.allowed_statuses.add(403)
    page.allowed_urls.add(refused)  # the preview of a URL nothing answers
    page.type("url", refused)
    page.press("search")
    shown = page.message("search-msg", "bad")
    assert "403" in shown and "fetch refused" in shown and "TUSOU_FETCH_ALLOW" in shown
    assert "clock" not in shown and "时钟" not in shown
    assert page.rows("hits") == []

    # Page through "shop" and then "summer shoes", two at a time.
    page.choose("bgroup", "shop")
    page.type("blimit", "1")
    page.press("first")
    first = page.rows("images")
    assert len(first) == 1
    page.wait("next turned on", lambda: page.el("next").is_enabled())
    page.el("next").click()
    page.wait("the second page", lambda: len(page.rows("images")) == 1 and page.rows("images") != first)
    page.wait("next turned off on the last page", lambda: not page.el("next").is_enabled())
    assert {first[0][1], page.rows("images")[0][1]} == {"p0", "p1"}
    page.type("blimit", "50")
    page.press("first")
    assert sorted(row[1] for row in page.rows("images")) == ["p0", "p1"]
    assert page.pictures("images") == {"p0": "data:image/jpeg", "p1": "data:image/jpeg"}

    # Delete from the browsed page: cancelling keeps the image; confirming deletes it and the count follows.
    page.row_button("images", "p1", "Delete").click()
    assert "p1" in page.confirm(accept=False)
    assert [row[1] for row in page.rows("images")] == ["p0", "p1"]
    page.row_button("images", "p1", "Delete").click()
    assert "p1" in page.confirm(accept=True)
    assert "Deleted p1" in page.message("browse-msg", "ok")
    assert [row[1] for row in page.rows("images")] == ["p0"]
    page.wait("the count of shop at 1", lambda: page.count_of("shop") == "1")

    # Delete from the results.
    page.el("file").send_keys(str(photo_files[0]))
    page.press("search")
    assert page.rows("hits")[0][1] == "p0"
    page.row_button("hits", "p0", "Delete").click()
    page.confirm(accept=True)
    assert "Deleted p0" in page.message("search-msg", "ok")
    assert "p0" not in [row[1] for row in page.rows("hits")]
    assert "p0" not in [row[1] for row in page.rows("images")]
    page.wait("the count of shop at 0", lambda: page.count_of("shop") == "0")

    # Remove a group: it asks first, then the group is gone from the table and every picker.
    page.row_button("grouprows", "summer shoes", "Remove").click()
    assert "summer shoes" in page.confirm(accept=True)
    assert "Removed group summer shoes" in page.message("groups-msg", "ok")
    assert [row[0] for row in page.rows("grouprows")] == ["shop"]
    assert page.options("sgroup1") == ["shop"]
    # The server agrees.
    assert "summer shoes" not in tusou.service.list_groups(key.access_key)


@pytest.mark.parametrize("width", [375, 1920])
def test_layout_fits_phone_and_wide_screens(
    page: Page, tusou: Tusou, photo_files: list[Path], width: int
) -> None:
    page.driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 500},
    )
    try:
        page.driver.refresh()
        page.wait("the page script running", lambda: page.js("return !!window.QiniuSign"))
        assert page.js("return window.innerWidth") == width
        # With content in every table: a group, an image with a long label and desc, results and a page.
        key = tusou.keys.create("web")
        page.sign_in(key.access_key, key.secret_key)
        page.type("newgroup", "a-group-with-a-rather-long-name-" + "x" * 40)
        page.press("create")
        page.message("groups-msg", "ok")
        page.el("file").send_keys(str(photo_files[0]))
        page.type("alabel", "a label that goes on and on " * 3)
        page.type("adesc", '{"note": "' + "a long description without spaces " * 8 + '"}')
        page.press("add")
        page.message("add-msg", "ok")
        page.press("search")
        page.message("search-msg", "ok")
        page.press("first")
        page.wait("the browsed page", lambda: len(page.rows("images")) == 1)
        # Nothing makes the page scroll sideways; every control is on screen horizontally, except row buttons
        # in a table that scrolls sideways on its own (a phone).
        assert page.js("return document.documentElement.scrollWidth") <= width
        off = page.js(
            "return [...document.querySelectorAll('input, select, button')].filter(e => {"
            "  const r = e.getBoundingClientRect();"
            "  return r.width > 0 && (r.left < 0 || r.right > innerWidth) && !e.closest('.scroll');"
            "}).map(e => e.id || e.innerText)"
        )
        assert off == []
        scrolling = page.js(
            "return [...document.querySelectorAll('.scroll')].filter(e => e.scrollWidth > e.clientWidth + 1)"
            ".length"
        )
        if width >= 1920:
            assert scrolling == 0  # wide screens show every table whole
    finally:
        page.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_labels_and_keyboard_order(page: Page) -> None:
    from selenium.webdriver.common.keys import Keys

    # Every field has a label; every button says what it does.
    unlabelled = page.js(
        "return [...document.querySelectorAll('input, select')].filter(e => !e.labels.length).map(e => e.id)"
    )
    assert unlabelled == []
    mute = page.js(
        "return [...document.querySelectorAll('button')].filter(e => !e.innerText.trim()).map(e => e.id)"
    )
    assert mute == []
    # Tab walks the page in reading order.
    page.el("ak").click()
    order = ["ak"]
    for _ in range(6):
        page.driver.switch_to.active_element.send_keys(Keys.TAB)
        order.append(page.js("return document.activeElement.id"))
    assert order == ["ak", "sk", "signin", "forget", "newgroup", "create", "refresh"]


def test_screenshot_command_writes_every_screen(tmp_path: Path, embedder: Embedder) -> None:
    """tools/screenshots.py regenerates docs/web-*.png; docs/web.md lists exactly those files."""
    from tools.screenshots import SHOTS

    # The graph the embedder fixture built, so the tool's server does not build it again.
    models = Settings(data=MODEL_CACHE.parent / "tusou-model-data").model_cache
    env = {**os.environ, "TUSOU_MODEL_DIR": str(models), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "screenshots.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(SHOTS)
    for name in SHOTS:
        with Image.open(tmp_path / name) as shot:
            assert shot.format == "PNG" and shot.size[0] >= 375 and shot.size[1] >= 300, name
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing: run python tools/screenshots.py"
    listed = set(re.findall(r"\(([\w-]+\.png)\)", (ROOT / "docs" / "web.md").read_text("utf-8")))
    assert listed == set(SHOTS)


def test_api_docs_page_lists_every_operation(driver: Any, tusou: Tusou) -> None:
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get(tusou.server.url + "/docs")
    shown = browser.wait_for(
        driver,
        "the operations listed",
        lambda: driver.execute_script(
            "return [...document.querySelectorAll('.op h2')].map(h => h.innerText.replace(/\\s+/g, ' '))"
        ),
    )
    assert "POST /v1/image/groups/search" in shown and "GET /v1/image/group/{group_id}" in shown
    assert len(shown) >= 12
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []


def test_signing_without_webcrypto_on_a_plain_http_address(driver: Any, tusou: Tusou) -> None:
    driver.get("about:blank")
    driver.get_log("browser")
    page = Page(driver, tusou.server.url.replace("127.0.0.1", PLAIN_HOST))
    try:
        assert page.js("return window.location.hostname") == PLAIN_HOST
        assert page.js("return window.isSecureContext") is False
        assert page.js("return !!(window.crypto && window.crypto.subtle)") is False  # the fallback signs
        key = tusou.keys.create("plain-http")
        page.sign_in(key.access_key, key.secret_key)
        assert "Signed in" in page.message("keys-msg", "ok")
        page.type("newgroup", "从 http 来的 group")  # a UTF-8 path, signed by the pure-JS HMAC
        page.press("create")
        assert "Created group" in page.message("groups-msg", "ok")
        assert tusou.service.list_groups(key.access_key) == ["从 http 来的 group"]
        assert page.console_errors() == []
    finally:
        page.js("window.sessionStorage.clear()")
