"""The start and watch pages in a real Chromium, against real web and worker processes."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from tests.support import create_job, job_state, wait_finished

pytestmark = [pytest.mark.browser, pytest.mark.timeout(90)]

FAST = {"tokens_per_second": 0}
SLOW = {"tokens_per_second": 10}


def open_watch(context, site: str, job_id: str, query: str = "") -> Page:
    page = context.new_page()
    page.goto(f"{site}/watch/{job_id}{query}")
    return page


def shown_text(page: Page) -> str:
    """The text exactly as the page holds it (expect's to_have_text folds whitespace)."""
    return page.get_by_test_id("text").text_content() or ""


def test_start_a_job_follow_its_link_and_read_the_whole_text(context, site):
    page = context.new_page()
    page.goto(f"{site}/")
    expect(page.get_by_test_id("model")).to_have_value("demo")
    page.get_by_test_id("prompt").fill("Tell me about rivers")
    page.get_by_test_id("max-tokens").fill("40")
    page.get_by_test_id("generate").click()

    link = page.get_by_test_id("watch-link")
    expect(link).to_have_attribute("href", re.compile(r"/watch/[A-Za-z0-9_-]{22}$"))
    # The start page streams the job too.
    expect(page.get_by_test_id("text")).to_contain_text("You asked: Tell me about rivers")
    job_id = (link.get_attribute("href") or "").rsplit("/", 1)[1]

    link.click()
    expect(page).to_have_url(f"{site}/watch/{job_id}")
    expect(page.get_by_test_id("status")).to_have_text("completed")
    expect(page.get_by_test_id("connection")).to_have_text("closed")
    state = job_state(site, job_id)
    assert shown_text(page) == state["text"]
    expect(page.get_by_test_id("tokens")).to_have_text(str(state["tokens"]))


def test_a_page_opened_after_the_job_ended_shows_the_whole_text_at_once(context, site):
    job_id = create_job(site, prompt="finished before anyone looked", max_tokens=300, demo=FAST)
    state = wait_finished(site, job_id)
    page = context.new_page()
    streams: list[str] = []
    page.on("request", lambda req: "/events" in req.url and streams.append(req.url))
    page.goto(f"{site}/watch/{job_id}")
    expect(page.get_by_test_id("status")).to_have_text("completed", timeout=5_000)
    assert shown_text(page) == state["text"]
    assert "\n" in state["text"]  # and newlines arrive as line breaks, not as markup
    assert page.locator("[data-testid=text] br").count() == 0
    expect(page.get_by_test_id("connection")).to_have_text("closed")
    assert streams == []  # the state had it all: no stream was opened


def test_markup_in_the_prompt_shows_as_characters_and_never_runs(context, site):
    payload = "<img src=x onerror=alert(1)> <script>alert(2)</script> hello"
    dialogs: list[str] = []
    page = context.new_page()
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{site}/")
    page.get_by_test_id("prompt").fill(payload)
    page.get_by_test_id("max-tokens").fill("30")
    page.get_by_test_id("generate").click()
    expect(page.get_by_test_id("status")).to_have_text("completed")
    assert shown_text(page).startswith(f"You asked: {payload}")

    job_id = (page.get_by_test_id("watch-link").get_attribute("href") or "").rsplit("/", 1)[1]
    late = open_watch(page.context, site, job_id)  # the whole-text path, too
    late.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    expect(late.get_by_test_id("status")).to_have_text("completed")
    assert shown_text(late) == job_state(site, job_id)["text"]
    for shown in (page, late):
        assert shown.locator("[data-testid=text] *").count() == 0
    assert dialogs == []


def test_viewer_count_follows_the_pages_that_watch(context, site):
    job_id = create_job(site, prompt="a crowd gathers", max_tokens=600, demo=SLOW)
    pages = [open_watch(context, site, job_id) for _ in range(5)]
    for page in pages:
        expect(page.get_by_test_id("viewers")).to_have_text("5")
    for page in pages[:2]:
        page.close()
    for page in pages[2:]:
        expect(page.get_by_test_id("viewers")).to_have_text("3")
    httpx.delete(f"{site}/v1/jobs/{job_id}", timeout=10)
    for page in pages[2:]:
        expect(page.get_by_test_id("status")).to_have_text("cancelled")


def test_cancel_button_stops_the_job_for_every_viewer(context, site):
    job_id = create_job(site, prompt="stop me", max_tokens=600, demo=SLOW)
    page, other = open_watch(context, site, job_id), open_watch(context, site, job_id)
    expect(page.get_by_test_id("status")).to_have_text("running")
    page.get_by_test_id("cancel").click()
    for shown in (page, other):
        expect(shown.get_by_test_id("status")).to_have_text("cancelled")
        expect(shown.get_by_test_id("message")).to_have_text("This generation was cancelled.")
    state = job_state(site, job_id)
    assert state["status"] == "cancelled"
    assert shown_text(page) == shown_text(other) == state["text"]


def test_a_refused_cancel_is_explained(context, site):
    """With API keys configured a viewer's DELETE gets 401; the page says why in words.
    (This module's node has no keys, so the browser is handed the 401 here;
    test_secured.py gets it from a real server.)"""
    job_id = create_job(site, prompt="not yours to stop", max_tokens=600, demo=SLOW)
    page = open_watch(context, site, job_id)

    def refuse(route: Route) -> None:
        if route.request.method != "DELETE":
            route.fallback()
            return
        body = {"error": {"code": "unauthorized", "message": "an API key is required"}}
        route.fulfill(status=401, content_type="application/json", body=json.dumps(body))

    page.route(f"**/v1/jobs/{job_id}", refuse)
    expect(page.get_by_test_id("status")).to_have_text("running")
    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("note")).to_have_text(
        "Only whoever started this job can cancel it; watching does not allow it."
    )
    expect(page.get_by_test_id("status")).to_have_text("running")
    httpx.delete(f"{site}/v1/jobs/{job_id}", timeout=10)


def test_a_failed_job_says_so_in_words(context, site):
    job_id = create_job(site, prompt="this will break", max_tokens=50, demo={"fail_after": 3})
    page = open_watch(context, site, job_id)
    expect(page.get_by_test_id("status")).to_have_text("failed")
    expect(page.get_by_test_id("message")).to_contain_text(
        "The model failed while writing this text."
    )
    expect(page.get_by_test_id("connection")).to_have_text("closed")
    assert shown_text(page) == job_state(site, job_id)["text"]


@pytest.mark.parametrize("job_id", ["AAAAAAAAAAAAAAAAAAAAAA", "not-a-job"])
def test_an_unknown_job_is_explained(context, site, job_id):
    page = context.new_page()
    response = page.goto(f"{site}/watch/{job_id}")
    assert response is not None and response.status == (200 if len(job_id) == 22 else 404)
    expect(page.get_by_test_id("message")).to_have_text("This job does not exist or has expired.")
    expect(page.get_by_test_id("connection")).to_have_text("closed")


def test_the_viewer_token_in_the_url_reaches_the_api(context, site):
    job_id = create_job(site, prompt="with a token", max_tokens=600, demo=SLOW)
    page = context.new_page()
    seen: list[str] = []
    page.on("request", lambda req: "/v1/jobs/" in req.url and seen.append(req.url))
    page.goto(f"{site}/watch/{job_id}?token=tok-123")
    expect(page.get_by_test_id("connection")).to_have_text("live")
    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("status")).to_have_text("cancelled")
    assert any(f"/v1/jobs/{job_id}/events?token=tok-123" in url for url in seen), seen
    # The state (GET) and the cancel (DELETE) carry it too.
    assert any(url.endswith(f"/v1/jobs/{job_id}?token=tok-123") for url in seen), seen
    assert all("token=tok-123" in url for url in seen), seen
