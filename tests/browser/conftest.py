"""A real Chromium (Debian's, driven by Playwright) against real web and worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ARTIFACTS, Cluster

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = ARTIFACTS / "browser"


@pytest.fixture(scope="session")
def browser() -> Iterator:
    if not CHROMIUM.exists():
        pytest.fail("the browser tests need Debian's chromium: apt-get install -y chromium")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        # Each expect() waits on its condition up to this long.
        playwright_api.expect.set_options(timeout=20_000)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(browser) -> Iterator:
    """A fresh browser profile for one test: no shared cache, cookies or storage."""
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(20_000)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture(scope="module")
def site(redis_url: str) -> Iterator[str]:
    """The base URL of one web node with a worker, shared by a module's tests."""
    with Cluster(redis_url) as cluster:
        web = cluster.web()
        cluster.worker()
        yield web.url


@pytest.fixture
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
