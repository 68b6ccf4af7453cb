"""The pages at desktop and phone width: screenshots to look at (test-artifacts/browser/),
and the layout promises a screenshot cannot check by itself."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import DESKTOP, PHONE
from tests.support import create_job, wait_finished

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]

SIZES = {"desktop": DESKTOP, "phone": PHONE}
PROMPT = "Write a short note about rivers, bridges and the people who cross them"


def fits_the_width(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def at_least(page: Page, tokens: int) -> None:
    page.wait_for_function(
        "n => Number(document.querySelector('[data-testid=tokens]').textContent) >= n",
        arg=tokens,
        timeout=10_000,
    )


def bar_boxes(page: Page) -> list[dict | None]:
    hooks = ("status", "tokens", "viewers", "connection")
    return [page.get_by_test_id(hook).bounding_box() for hook in hooks]


@pytest.mark.parametrize("size", SIZES)
def test_screenshots_of_the_start_and_watch_pages(browser, site, screenshots, size):
    viewport = SIZES[size]
    context = browser.new_context(
        viewport=viewport, device_scale_factor=2 if size == "phone" else 1
    )
    try:
        start = context.new_page()
        start.goto(f"{site}/")
        expect(start.get_by_test_id("model")).to_have_value("demo")
        start.screenshot(path=screenshots / f"start-{size}.png", full_page=True)
        start.get_by_test_id("prompt").fill(PROMPT)
        start.get_by_test_id("max-tokens").fill("60")
        start.get_by_test_id("generate").click()
        expect(start.get_by_test_id("status")).to_have_text("completed")
        start.screenshot(path=screenshots / f"start-generated-{size}.png", full_page=True)
        assert fits_the_width(start)

        running = create_job(site, prompt=PROMPT, max_tokens=400, demo={"tokens_per_second": 12})
        page = context.new_page()
        page.goto(f"{site}/watch/{running}")
        expect(page.get_by_test_id("viewers")).to_have_text("1")
        at_least(page, 30)
        before = bar_boxes(page)
        page.screenshot(path=screenshots / f"watch-running-{size}.png")
        at_least(page, 50)
        # Tokens arriving move nothing in the status bar.
        assert bar_boxes(page) == before
        assert fits_the_width(page)
        httpx.delete(f"{site}/v1/jobs/{running}", timeout=10)
        expect(page.get_by_test_id("status")).to_have_text("cancelled")
        page.screenshot(path=screenshots / f"watch-cancelled-{size}.png")

        finished = create_job(site, prompt=PROMPT, max_tokens=160, demo={"tokens_per_second": 0})
        wait_finished(site, finished)
        page.goto(f"{site}/watch/{finished}")
        expect(page.get_by_test_id("status")).to_have_text("completed")
        page.screenshot(path=screenshots / f"watch-finished-{size}.png", full_page=True)
        assert fits_the_width(page)
    finally:
        context.close()
