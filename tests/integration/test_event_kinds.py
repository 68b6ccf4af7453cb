"""Every kind of event through real web nodes and a real worker: reasoning,
answer tokens, tool-call fragments and custom events, merged for viewers that
are behind, resumed from any id, and added up in the job's state."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.eventlog import EventLog
from services.events import COMPLETED
from services.items import REASONING, TOKEN, CustomEvent, Text, ToolCallFragment
from services.jobs import new_job_id, now_iso
from services.keys import Keys
from services.redisconn import connect
from tests.integration.test_hub import bare_job, eventually
from tests.support import (
    Cluster,
    Received,
    aread_stream,
    create_job,
    job_state,
    read_stream,
    wait_finished,
)

pytestmark = pytest.mark.timeout(180)

VIEWERS_PER_NODE = 25
TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]


@pytest.fixture(scope="module")
def cluster(redis_url):
    with Cluster(redis_url) as cluster:
        cluster.web()
        cluster.web()
        cluster.worker()
        yield cluster


def added_up(received: Received) -> dict:
    """What a viewer's events add up to, merged or not: the job state's view of them."""
    text, reasoning, calls, others = "", "", {}, []
    for event_id, name, data in received.events:
        if name == "token":
            text += data["text"]
        elif name == "reasoning":
            reasoning += data["text"]
        elif name == "tool_call":
            call = calls.setdefault(data["index"], {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or data.get("id")
            call["name"] = call["name"] or data.get("name")
            call["arguments"] += data["arguments"]
        elif name not in ("start", "done"):
            others.append((event_id, name, data))
    tool_calls = [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]},
        }
        for c in calls.values()
    ]
    return {"text": text, "reasoning": reasoning, "tool_calls": tool_calls, "custom": others}


def state_part(state: dict) -> dict:
    return {k: state[k] for k in ("text", "reasoning", "tool_calls")}


async def watch_on_both_nodes(cluster: Cluster, job_id: str) -> list[Received]:
    a, b = cluster.procs[0], cluster.procs[1]
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=60) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=60) as on_b,
    ):
        viewers = [aread_stream(on_a, job_id) for _ in range(VIEWERS_PER_NODE)]
        viewers += [aread_stream(on_b, job_id) for _ in range(VIEWERS_PER_NODE)]
        return await asyncio.wait_for(asyncio.gather(*viewers), 90)


def assert_resumes_give_exactly_the_rest(cluster: Cluster, job_id: str, log: list) -> None:
    """From every id (inside merged runs too), on each node: exactly the events after it."""
    for after in range(len(log)):
        url = cluster.procs[after % 2].url
        got = read_stream(url, job_id, last_event_id=after)
        assert got.covered_ids == [event.id for event in log[after:]], after
        rest = Received([(e.id, e.name, e.payload()) for e in log[after:]])
        assert added_up(got) == added_up(rest), after
        assert got.done == log[-1].payload()


def demo_request(tokens_per_second: float) -> dict:
    """A demo job with 30 reasoning events, then its answer, then a call of get_weather."""
    call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    demo = {"tokens_per_second": tokens_per_second, "reasoning_tokens": 30, "tool_call": call}
    return {"max_tokens": 40, "seed": 3, "tools": TOOLS, "demo": demo}


async def test_the_demo_model_streams_reasoning_text_and_a_tool_call_to_50_viewers(
    cluster, redis_url
):
    url = cluster.procs[0].url
    job_id = create_job(url, **demo_request(tokens_per_second=400))
    results = await watch_on_both_nodes(cluster, job_id)
    state = wait_finished(url, job_id)
    last = int(state["last_event_id"])
    for got in results:
        assert got.covered_ids == list(range(1, last + 1))
        assert added_up(got) == {**state_part(state), "custom": []}
    assert results[0].done == {
        "status": "completed",
        "finish_reason": "tool_calls",
        "tokens": state["tokens"],
        "reasoning_tokens": 30,
    }
    assert state["finish_reason"] == "tool_calls"
    [call] = state["tool_calls"]
    assert call["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris", "unit": "celsius"}',
    }
    assert call["id"].startswith("call_")
    assert len(state["reasoning"].split()) == 30
    assert state["text"].startswith("You asked: hello from the tests")

    # The order of the kinds, from the log itself: reasoning, answer, then the call.
    redis = connect(redis_url)
    try:
        log = await EventLog(redis, Keys(cluster.prefix)).read(job_id, 0)
    finally:
        await redis.aclose()
    names = [event.name for event in log]
    assert names == (
        ["start"]
        + ["reasoning"] * 30
        + ["token"] * state["tokens"]
        + ["tool_call"] * names.count("tool_call")
        + ["done"]
    )
    assert names.count("tool_call") >= 3  # the arguments stream in several fragments
    assert_resumes_give_exactly_the_rest(cluster, job_id, log)

    # Deterministic: the same request gives the same events, call id included.
    again = create_job(url, **demo_request(tokens_per_second=0))
    assert state_part(wait_finished(url, again)) == state_part(state)


async def test_every_kind_written_by_a_job_writer_reaches_50_viewers_on_two_nodes(
    cluster, redis_url
):
    redis = connect(redis_url)
    keys = Keys(cluster.prefix)
    job_id = new_job_id()
    writer = await bare_job(redis, keys, job_id)
    try:
        await writer.start("demo", now_iso())
        viewers = asyncio.create_task(watch_on_both_nodes(cluster, job_id))
        batches = [
            [Text(REASONING, "The user"), Text(REASONING, " wants"), Text(REASONING, " 😀\n")],
            [Text(REASONING, " weather."), Text(TOKEN, "Let me")],
            [Text(TOKEN, " check"), CustomEvent("citation", {"url": "https://example.org"})],
            [CustomEvent("citation", {"url": "https://example.net"}), Text(TOKEN, ".")],
            [ToolCallFragment(0, '{"ci', "call_a", "get_weather")],
            [ToolCallFragment(0, 'ty": '), ToolCallFragment(0, '"Paris"}')],
            [ToolCallFragment(1, "{", "call_b", "get_time"), ToolCallFragment(0, "")],
            # A repeated id and name are left out of the log, not refused.
            [ToolCallFragment(1, '"tz": "CET"}', "call_b", "get_time")],
            [CustomEvent("progress.step", {"n": 3}), Text(REASONING, "Done.")],
        ]
        for batch in batches:
            await writer.append(batch)
            await asyncio.sleep(0.05)
        await writer.finish(COMPLETED, "tool_calls", finished_at=now_iso())
        results = await viewers
        log = await EventLog(redis, keys).read(job_id, 0)
    finally:
        await redis.aclose()

    state = job_state(cluster.procs[1].url, job_id)
    expected_calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
        },
    ]
    assert state_part(state) == {
        "text": "Let me check.",
        "reasoning": "The user wants 😀\n weather.Done.",
        "tool_calls": expected_calls,
    }
    assert state["tokens"] == 3
    assert log[-1].payload() == {
        "status": "completed",
        "finish_reason": "tool_calls",
        "tokens": 3,
        "reasoning_tokens": 5,
    }
    fragments = [e.payload() for e in log if e.name == "tool_call"]
    assert fragments[-1] == {"index": 1, "arguments": '"tz": "CET"}'}
    custom = [
        (8, "citation", {"url": "https://example.org"}),
        (9, "citation", {"url": "https://example.net"}),
        (17, "progress.step", {"n": 3}),
    ]
    for got in results:
        assert got.covered_ids == list(range(1, len(log) + 1))
        assert added_up(got) == {**state_part(state), "custom": custom}
        assert got.done == log[-1].payload()
    assert_resumes_give_exactly_the_rest(cluster, job_id, log)


class BadToolCallBackend:
    """Yields a tool call whose first fragment has no id and no name."""

    def models(self) -> list[str]:
        return ["mine"]

    async def generate(self, job):
        yield {"type": "reasoning", "text": "Calling"}
        yield "a tool"
        yield {"type": "tool_call", "index": 0, "arguments": "{}"}
        yield "never written"


async def finished(store, job_id: str) -> bool:
    return (await store.get(job_id)).finished


async def test_a_bad_tool_call_fragment_fails_the_job_and_keeps_what_came_before(
    redis, redis_url, keys
):
    from services.config import Settings
    from services.jobs import JobSpec
    from tests.support import core_for_test
    from worker.runner import Worker

    core = core_for_test(redis, keys, max_queued_jobs=10)
    store = core.store
    job_id = (await store.create(JobSpec(prompt="p", model="mine"))).id
    settings = Settings(redis_url=redis_url, key_prefix=keys.prefix)
    worker = Worker(core, settings, {"mine": BadToolCallBackend()})
    running = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: finished(store, job_id), within_s=20)
    finally:
        worker.stop()
        await running
    state = await store.get(job_id)
    message = (
        "the backend of model 'mine' yielded a bad item:"
        " the first tool_call fragment of index 0 must carry id and name"
    )
    assert state.error == {"code": "backend_error", "message": message}
    assert (state.text, state.reasoning, state.tool_calls) == ("a tool", "Calling", [])
    log = await EventLog(redis, keys).read(job_id, 0)
    assert [(e.name, e.payload()) for e in log[1:]] == [
        ("reasoning", {"text": "Calling"}),
        ("token", {"text": "a tool"}),
        (
            "done",
            {
                "status": "failed",
                "finish_reason": None,
                "tokens": 1,
                "reasoning_tokens": 1,
                "error": {"code": "backend_error", "message": message},
            },
        ),
    ]
