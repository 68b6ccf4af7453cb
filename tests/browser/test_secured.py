"""The watch page with viewer authentication and API keys on, end to end."""

from __future__ import annotations

import httpx
import pytest

from tests.browser.test_pages import shown_text
from tests.support import Cluster

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

KEY = "browser-key"


@pytest.fixture(scope="module")
def secured(redis_url):
    with Cluster(redis_url, api_keys=KEY, secret="browser-secret") as cluster:
        web = cluster.web()
        cluster.worker()
        yield web.url


def create(url: str, **body) -> dict:
    response = httpx.post(
        f"{url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert response.status_code == 201, response.text
    return response.json()


def test_the_watch_url_with_its_token_shows_the_job(context, secured):
    job = create(secured, prompt="for token holders", max_tokens=40, demo={"tokens_per_second": 40})
    page = context.new_page()
    page.goto(f"{secured}{job['watch_url']}")
    expect(page.get_by_test_id("status")).to_have_text("completed")
    state = httpx.get(f"{secured}/v1/jobs/{job['id']}", params={"token": job["viewer_token"]})
    assert shown_text(page) == state.json()["text"]


def test_without_the_token_the_page_is_refused(context, secured):
    job = create(secured, prompt="private", max_tokens=5, demo={"tokens_per_second": 0})
    page = context.new_page()
    response = page.goto(f"{secured}/watch/{job['id']}")
    assert response is not None and response.status == 401
    wrong = page.goto(f"{secured}/watch/{job['id']}?token=not-a-token")
    assert wrong is not None and wrong.status == 403


def test_a_viewer_cannot_cancel_and_the_page_says_why(context, secured):
    job = create(
        secured, prompt="not yours to stop", max_tokens=600, demo={"tokens_per_second": 10}
    )
    page = context.new_page()
    page.goto(f"{secured}{job['watch_url']}")
    expect(page.get_by_test_id("status")).to_have_text("running")
    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("note")).to_have_text(
        "Only whoever started this job can cancel it; watching does not allow it."
    )
    expect(page.get_by_test_id("status")).to_have_text("running")
    cancelled = httpx.delete(
        f"{secured}/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert cancelled.status_code == 202
    expect(page.get_by_test_id("status")).to_have_text("cancelled")
