"""Reasoning and tool calls from an upstream model, against a fake upstream
speaking OpenAI's wire format (``tests/fakes/upstream.py``): first what the
``openai`` backend yields in this process, then what comes out of real
``tokencast serve`` and ``worker`` processes, read by the clients users have."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from openai._streaming import SSEDecoder
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import SecretStr

from services.items import Text, ToolCallFragment
from tests.fakes.upstream import (
    ANSWER,
    ANSWER_PIECES,
    CALLS,
    THOUGHT,
    THOUGHT_PIECES,
    WEATHER,
    FakeUpstream,
)
from tests.integration.test_openai_upstream import generate
from tests.support import Cluster, create_job, read_stream, wait_finished

pytestmark = pytest.mark.timeout(60)

QUESTION = [{"role": "user", "content": "How warm is it in Paris?"}]
MODELS = "call=tool-call,parallel=parallel-calls,repeating=repeating-calls,think=reasoning"


def call(index: int) -> dict[str, Any]:
    """Call ``index`` of the fake upstream, as OpenAI's message shows it."""
    call_id, pieces = CALLS[index]
    function = {"name": "get_weather", "arguments": "".join(pieces)}
    return {"id": call_id, "type": "function", "function": function}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream().start()
    try:
        yield upstream
    finally:
        upstream.close()


THOUGHT_ITEMS = [Text("reasoning", piece) for piece in THOUGHT_PIECES]


@pytest.mark.parametrize("model", ["reasoning", "reasoning-field"])
async def test_upstream_reasoning_becomes_reasoning_items(fake, model):
    # reasoning_content (DeepSeek, Qwen) or reasoning (vLLM, Ollama); never both twice.
    items, finish = await generate(fake.base_url, model)
    assert items == [*THOUGHT_ITEMS, *ANSWER_PIECES]
    assert finish == "stop"


def fragments(index: int) -> list[ToolCallFragment]:
    """Call ``index`` of the fake's ``CALLS`` as the log takes it: id and name first only."""
    call_id, pieces = CALLS[index]
    first = ToolCallFragment(index, "", call_id, "get_weather")
    return [first, *(ToolCallFragment(index, piece) for piece in pieces)]


async def test_a_call_split_over_many_deltas_after_reasoning_and_text(fake):
    items, finish = await generate(fake.base_url, "tool-call")
    assert items == [*THOUGHT_ITEMS, *ANSWER_PIECES, *fragments(0)]
    assert finish == "tool_calls"


@pytest.mark.parametrize("model", ["parallel-calls", "repeating-calls"])
async def test_parallel_calls_each_name_themselves_once(fake, model):
    # A server that repeats id, type and name in every fragment gives the same fragments.
    items, finish = await generate(fake.base_url, model)
    assert items == [*fragments(0), *fragments(1)]
    assert finish == "tool_calls"


# Through real processes.


@pytest.fixture(scope="module")
def url(redis_url: str, fake: FakeUpstream) -> Iterator[str]:
    with Cluster(redis_url, upstream_base_url=fake.base_url, upstream_models=MODELS) as node:
        web = node.web()
        node.worker()
        yield web.url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def calls_of(completion: ChatCompletion) -> list[dict[str, Any]]:
    message = completion.choices[0].message
    fields = {"id": True, "type": True, "function": {"name", "arguments"}}
    return [c.model_dump(include=fields) for c in message.tool_calls or []]


def test_the_native_stream_and_the_job_state(url):
    job_id = create_job(url, model="call", messages=QUESTION, tools=[WEATHER])
    state = wait_finished(url, job_id)
    assert (state["reasoning"], state["text"], state["tool_calls"]) == (THOUGHT, ANSWER, [call(0)])
    assert state["finish_reason"] == "tool_calls"
    received = read_stream(url, job_id)
    texts = {"reasoning": "", "token": "", "tool_call": ""}
    firsts, next_id = [], 1
    for event_id, name, data in received.events:
        assert data.get("first_id", event_id) == next_id  # gap-free, merged runs counted
        next_id = event_id + 1
        if name in texts:
            texts[name] += data.get("text", data.get("arguments", ""))
        if "id" in data:
            firsts.append((data["index"], data["id"], data["name"]))
    assert texts == {
        "reasoning": THOUGHT,
        "token": ANSWER,
        "tool_call": call(0)["function"]["arguments"],
    }
    assert firsts == [(0, "call_abc", "get_weather")]
    assert received.done == {
        "status": "completed",
        "finish_reason": "tool_calls",
        "tokens": 2,
        "reasoning_tokens": 4,
    }


def test_the_openai_events_url_through_the_sdks_accumulator(url):
    job_id = create_job(url, model="call", messages=QUESTION, tools=[WEATHER])
    wait_finished(url, job_id)
    accumulator: ChatCompletionStreamState = ChatCompletionStreamState(input_tools=[WEATHER])
    events_url = f"{url}/v1/jobs/{job_id}/events?format=openai"
    with httpx.stream("GET", events_url, timeout=30) as response:
        for sse in SSEDecoder().iter_bytes(response.iter_bytes()):
            if sse.data.startswith("[DONE]"):
                break
            accumulator.handle_chunk(ChatCompletionChunk.model_validate(sse.json()))
    completion = accumulator.get_final_completion()
    assert calls_of(completion) == [call(0)]
    assert completion.choices[0].message.content == ANSWER
    assert (completion.choices[0].message.model_extra or {})["reasoning_content"] == THOUGHT
    assert completion.choices[0].finish_reason == "tool_calls"


def test_the_sdks_stream_helper_with_a_strict_tool(url):
    with sdk(url) as client:
        with client.chat.completions.stream(
            model="call", messages=QUESTION, tools=[WEATHER], stream_options={"include_usage": True}
        ) as stream:
            kinds = [event.type for event in stream]
            completion = stream.get_final_completion()
    assert calls_of(completion) == [call(0)]
    [parsed] = [c.function.parsed_arguments for c in completion.choices[0].message.tool_calls or []]
    assert parsed == {"city": "Paris"}
    assert kinds.count("tool_calls.function.arguments.done") == 1
    assert completion.choices[0].message.content == ANSWER
    assert (completion.choices[0].message.model_extra or {})["reasoning_content"] == THOUGHT
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 4


@pytest.mark.parametrize("model", ["parallel", "repeating"])
def test_parallel_calls_through_the_sdk(url, model):
    # An upstream that repeats id and name in every fragment gives the same two calls.
    accumulator: ChatCompletionStreamState = ChatCompletionStreamState()
    with sdk(url) as client:
        for chunk in client.chat.completions.create(model=model, messages=QUESTION, stream=True):
            accumulator.handle_chunk(chunk)
    completion = accumulator.get_final_completion()
    assert calls_of(completion) == [call(0), call(1)]
    assert completion.choices[0].finish_reason == "tool_calls"


def test_a_whole_completion_carries_reasoning_and_tool_calls(url):
    with sdk(url) as client:
        completion = client.chat.completions.create(
            model="call", messages=QUESTION, tools=[WEATHER]
        )
    message = completion.choices[0].message
    assert (message.content, (message.model_extra or {})["reasoning_content"]) == (ANSWER, THOUGHT)
    assert calls_of(completion) == [call(0)]
    assert completion.choices[0].finish_reason == "tool_calls"
    with sdk(url) as client:
        thought = client.chat.completions.create(model="think", messages=QUESTION)
    assert thought.choices[0].message.content == ANSWER
    assert (thought.choices[0].message.model_extra or {})["reasoning_content"] == THOUGHT
    assert not thought.choices[0].message.tool_calls


def langchain(url: str, model: str) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, base_url=f"{url}/v1", api_key=SecretStr("unused"), max_retries=0, timeout=30
    )


def test_langchains_stream_assembles_the_tool_call(url):
    chunks = list(langchain(url, "call").bind_tools([WEATHER]).stream("How warm is it in Paris?"))
    message = chunks[0]
    for piece in chunks[1:]:
        message += piece
    assert message.content == ANSWER
    assert message.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_abc", "type": "tool_call"}
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_langchains_invoke_returns_the_text(url):
    message = langchain(url, "demo").invoke("hello there", max_tokens=6)
    job_id = message.response_metadata["id"].removeprefix("chatcmpl-")
    state = wait_finished(url, job_id)
    assert message.content == state["text"]
    assert state["text"].startswith("You asked: hello there")
