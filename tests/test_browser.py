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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import browser
from tests.conftest import ImageServer, Tusou, jpeg

pytestmark = pytest.mark.browser

_why = browser.missing()
if _why and not os.environ.get("TUSOU_REQUIRE_BROWSER"):
    pytest.skip(f"no browser: {_why}", allow_module_level=True)


class Page:
    """The page in one browser tab, with the few moves the tests make."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url
        self.allowed_statuses: set[int] = set()
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

    def press(self, button_id: str) -> None:
        """Clicks a button whose action disables it while it runs, and waits for the action to end."""
        button = self.el(button_id)
        button.click()
        self.wait(f"#{button_id} finishing", lambda: not self.js("return arguments[0].disabled", button))

    def log_lines(self) -> list[str]:
        return [line for line in self.text("log").splitlines() if line.strip()]

    def sign_in(self, access_key: str, secret_key: str) -> None:
        self.type("ak", access_key)
        self.type("sk", secret_key)
        self.press("refresh")

    # --- the console: any JavaScript error fails; HTTP refusals only with a status the test expects
    def console_errors(self) -> list[str]:
        bad = []
        for entry in self.driver.get_log("browser"):
            if entry["level"] != "SEVERE":
                continue
            message = entry["message"]
            status = re.search(r"status of (\d{3})", message)
            if entry.get("source") == "network" and status and int(status.group(1)) in self.allowed_statuses:
                continue
            bad.append(message)
        return bad


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    with browser.chromium() as drv:
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


def test_wrong_secret_shows_an_error(page: Page, tusou: Tusou) -> None:
    key = tusou.keys.create("web")
    page.allowed_statuses.add(401)
    page.sign_in(key.access_key, key.secret_key[:-1] + ("A" if key.secret_key[-1] != "A" else "B"))
    log = page.wait("a refused request in the log", lambda: [x for x in page.log_lines() if "401" in x])
    assert "bad token" in log[0]
    assert page.rows("grouprows") == []


def test_sign_in_create_add_search_and_page(
    page: Page, tusou: Tusou, photo_files: list[Path], photos: list[Image.Image], image_server: ImageServer
) -> None:
    key = tusou.keys.create("web")
    page.sign_in(key.access_key, key.secret_key)
    assert page.rows("grouprows") == [["还没有分组 No groups yet"]]

    # Create a group: it is listed with 0 images and chosen in every group field.
    page.type("newgroup", "shop")
    page.press("create")
    listed = [["shop", "0", "选用 Use 浏览 Browse"]]
    page.wait("the new group listed", lambda: page.rows("grouprows") == listed)
    assert page.el("agroup").get_attribute("value") == "shop"

    # Two files and a URL (a loopback server, allow-listed in the test settings).
    for i, path in enumerate(photo_files[:2]):
        page.el("file").send_keys(str(path))
        page.type("aid", f"p{i}")
        page.type("alabel", "鞋子" if i == 0 else "bag")
        page.press("add")
        page.wait(f"p{i} added", lambda i=i: any(f"added id p{i} to shop" in x for x in page.log_lines()))
    url = image_server.put("p2.jpg", jpeg(photos[2]))
    page.type("url", url)
    assert page.el("file").get_attribute("value") == ""  # a URL replaces the chosen file
    page.type("aid", "p2")
    page.type("alabel", "")
    page.press("add")
    page.wait("p2 added", lambda: any("added id p2 to shop" in x for x in page.log_lines()))

    page.press("refresh")
    page.wait("the count of 3", lambda: page.rows("grouprows")[0][:2] == ["shop", "3"])

    # Search with the first file: it is the first hit.
    page.el("file").send_keys(str(photo_files[0]))
    page.press("search")
    hits = page.rows("hits")
    assert hits[0][1:3] == ["p0", "鞋子"] and hits[0][4] == "shop"
    assert float(hits[0][3]) > 0.9

    # Search with the URL: the hit shows the picture it was added from.
    page.type("url", url)
    page.press("search")
    assert page.rows("hits")[0][1] == "p2"
    thumb = page.wait(
        "the first hit's thumbnail loaded",
        lambda: page.js(
            "const i = document.querySelector('#hits tr img');"
            "return i && i.complete && i.naturalWidth > 0 ? i.src : null"
        ),
    )
    assert thumb == url

    # Page through the group, two at a time.
    page.type("bgroup", "shop")
    page.type("blimit", "2")
    page.press("first")
    first = page.rows("images")
    assert len(first) == 2
    assert page.el("next").is_enabled()
    page.el("next").click()
    page.wait("the second page", lambda: len(page.rows("images")) == 1 and page.rows("images") != first)
    page.wait("next turned off on the last page", lambda: not page.el("next").is_enabled())
    shown = {row[0] for row in first} | {page.rows("images")[0][0]}
    assert shown == {"p0", "p1", "p2"}
