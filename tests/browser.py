"""Headless Debian Chromium under Selenium, for the web page's browser tests and tools/screenshots.py.

The browser is the system one (``apt-get install chromium chromium-driver``), started with a fresh profile and
everything that would reach the network on its own turned off, so a run needs no internet.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = os.environ.get("TUSOU_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TUSOU_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm; a crashed tab would fail a test
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
    "--lang=en-US",
]


def missing() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@contextmanager
def chromium(width: int = 1280, height: int = 900, extra: tuple[str, ...] = ()) -> Iterator[Any]:
    """A Chrome WebDriver on a fresh, throwaway profile; its console is read with get_log('browser')."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    profile = tempfile.mkdtemp(prefix="tusou-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, *extra, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=DriverService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: Any, what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    """Polls ``check`` until it returns something truthy; fails naming ``what`` (a deadline, not a timing)."""
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def probe(_: Any) -> Any:
        try:
            return check()
        except WebDriverException:
            return None

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(probe)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}") from None
