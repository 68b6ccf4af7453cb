"""Watch pages survive their web node dying: they say so, resume, and lose or repeat nothing."""

from __future__ import annotations

import pytest
from playwright.sync_api import Request, expect

from tests.support import Cluster, create_job, job_state

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

VIEWERS = 5


def test_five_pages_resume_exactly_after_the_web_node_restarts(browser, redis_url, screenshots):
    cluster = Cluster(redis_url)
    context = browser.new_context()
    try:
        web = cluster.web()
        cluster.worker()
        job_id = create_job(
            web.url, prompt="survive a restart", max_tokens=160, demo={"tokens_per_second": 16}
        )
        pages = [context.new_page() for _ in range(VIEWERS)]
        streams: list[Request] = []
        for page in pages:
            page.on("request", lambda req: "/events" in req.url and streams.append(req))
            page.goto(f"{web.url}/watch/{job_id}")
        for page in pages:
            expect(page.get_by_test_id("connection")).to_have_text("live")
            expect(page.get_by_test_id("tokens")).not_to_have_text("0")

        web.stop()  # SIGKILL: every stream drops at once
        for page in pages:
            expect(page.get_by_test_id("connection")).to_have_text("reconnecting")
        pages[0].screenshot(path=screenshots / "watch-reconnecting-desktop.png")
        cluster.web(port=web.port)

        state = None
        for page in pages:
            expect(page.get_by_test_id("status")).to_have_text("completed", timeout=40_000)
            state = state or job_state(web.url, job_id)
            assert page.get_by_test_id("text").text_content() == state["text"]
            expect(page.get_by_test_id("tokens")).to_have_text(str(state["tokens"]))
            # Every event arrived once, in order: none skipped as a repeat, no gap refilled.
            viewer = page.locator("section.viewer")
            assert viewer.get_attribute("data-repeats") is None
            assert viewer.get_attribute("data-gaps") is None
            assert viewer.get_attribute("data-last-event-id") == state["last_event_id"]
        # The browsers resumed on their own, with the last id they had.
        resumes = [request.all_headers().get("last-event-id") for request in streams]
        assert any(value and int(value) > 1 for value in resumes), [r.url for r in streams]
    finally:
        context.close()
        cluster.close()
