"""Headless Debian Chromium driven by selenium: the dashboards as a person sees them.

Needs ``/usr/bin/chromium`` and ``/usr/bin/chromedriver`` (``.ci/browser-deps`` installs
them; ``make test`` runs it first) and selenium (the dev extras). Without them the tests
skip, except under CI, where a missing browser is a failure. Screenshots are written to
``runs/browser/<test>/dashboard.png``.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
RUNS = Path(__file__).resolve().parents[2] / "runs" / "browser"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
)
DESKTOP = (1280, 900)
PHONE = (390, 844)  # CSS pixels of a common phone

pytestmark = pytest.mark.browser


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (run .ci/browser-deps)"
    return None


@pytest.fixture
def browser(chromium: Any) -> Iterator[Any]:
    """The session's Chromium, on a blank page with an empty console log, left that way."""
    chromium.get("about:blank")
    console_errors(chromium)
    yield chromium
    chromium.get("about:blank")  # a page left open would keep polling a server that is gone
    console_errors(chromium)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """One headless Chromium for the session, with a fresh profile and the console log on."""
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never try to download anything
    profile = tempfile.mkdtemp(prefix="p2pfl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: Any) -> list[str]:
    """Return the browser console's errors since the last call (the log is drained)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver: Any, name: str, *, size: tuple[int, int] = DESKTOP, file: str = "dashboard.png") -> Path:
    """Save a full-page screenshot at ``size``'s width (a phone is emulated as one); return its path."""
    folder = RUNS / name
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": size[0] < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        driver.execute_script("window.dispatchEvent(new Event('resize'))")  # charts are sized in pixels
        height = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics | {"height": max(size[1], int(height) + 1)})
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path = folder / file
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
