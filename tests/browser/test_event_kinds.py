"""The watch page shows reasoning, the answer and a tool call, each exactly once,
across its web node dying; markup in any of them is shown as text."""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import expect

from tests.support import Cluster, create_job, job_state

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "today's weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ARGUMENTS = {"city": "Paris <img src=x onerror=alert(1)>", "unit": "celsius"}


def test_reasoning_text_and_a_tool_call_survive_a_web_node_restart(browser, redis_url, screenshots):
    cluster = Cluster(redis_url)
    context = browser.new_context()
    try:
        web = cluster.web()
        cluster.worker()
        job_id = create_job(
            web.url,
            prompt="what is the weather in <b>Paris</b>?",
            max_tokens=60,
            tools=TOOLS,
            demo={
                "tokens_per_second": 12,
                "reasoning_tokens": 24,
                "tool_call": {"name": "get_weather", "arguments": ARGUMENTS},
            },
        )
        desktop = context.new_page()
        phone = context.new_page()
        phone.set_viewport_size({"width": 390, "height": 844})
        dialogs: list[str] = []
        for page in (desktop, phone):
            page.on("dialog", lambda dialog: dialogs.append(dialog.message))
            page.goto(f"{web.url}/watch/{job_id}")
        for page in (desktop, phone):
            expect(page.get_by_test_id("reasoning")).to_be_visible()  # open while it streams
        desktop.screenshot(path=screenshots / "watch-reasoning-desktop.png")

        web.stop()  # SIGKILL, in the middle of the reasoning or the answer
        for page in (desktop, phone):
            expect(page.get_by_test_id("connection")).to_have_text("reconnecting")
        cluster.web(port=web.port)

        for page in (desktop, phone):
            expect(page.get_by_test_id("status")).to_have_text("completed", timeout=40_000)
        state = job_state(web.url, job_id)
        assert state["finish_reason"] == "tool_calls"
        (call,) = state["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == ARGUMENTS
        for page, name in ((desktop, "desktop"), (phone, "phone")):
            reasoning = page.get_by_test_id("reasoning")
            assert reasoning.text_content() == state["reasoning"]
            expect(reasoning).to_be_hidden()  # folded once the answer started
            assert page.get_by_test_id("text").text_content() == state["text"]
            cards = page.get_by_test_id("tool-call")
            expect(cards).to_have_count(1)
            expect(cards.get_by_test_id("tool-name")).to_have_text("get_weather")
            shown = cards.get_by_test_id("tool-arguments").text_content()
            assert json.loads(shown) == ARGUMENTS
            viewer = page.locator("section.viewer")
            assert viewer.get_attribute("data-repeats") is None
            assert viewer.get_attribute("data-gaps") is None
            assert viewer.get_attribute("data-last-event-id") == state["last_event_id"]
            assert page.locator("img").count() == 0  # the markup stayed text
            page.screenshot(path=screenshots / f"watch-tool-call-{name}.png", full_page=True)
        assert dialogs == []
    finally:
        context.close()
        cluster.close()
