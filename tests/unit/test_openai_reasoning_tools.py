"""Reasoning and tool calls in OpenAI's chat format (API.md, "OpenAI-compatible endpoint").

The encoder is a pure function of the log's events: first each mapping on its
own, then whole streams read by the official client's own SSE decoder and
accumulator (``chat.completions.stream()``), as a user's code reads them.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from services.events import Event, done_data, dumps, start_data, token_data
from services.jobs import JobState
from tests.fakes.upstream import WEATHER
from tests.unit.test_openai_format import CREATED, JOB, blocks, chunk, encoder
from web.openai_format import completion_body

ARGUMENTS = '{"city": "Paris"}'
ARGUMENTS_2 = '{"city": "Tōkyō 東京"}'


def tool_call(index: int, arguments: str, call_id: str | None = None, **extra: Any) -> str:
    """A ``tool_call`` event's data: ``id`` and ``name`` only on a call's first fragment."""
    data: dict[str, Any] = {"index": index}
    if call_id is not None:
        data.update(id=call_id, name="get_weather")
    return dumps({**data, "arguments": arguments, **extra})


def reasoning(text: str, **extra: Any) -> str:
    return dumps({"text": text, **extra})


def done(finish: str, tokens: int, reasoning_tokens: int) -> str:
    # As the log writes it once it counts reasoning; older ``done`` events lack the count.
    body = json.loads(done_data("completed", finish, tokens))
    return dumps({**body, "reasoning_tokens": reasoning_tokens})


def only_chunk(event: Event) -> dict[str, Any]:
    [(event_id, data)] = blocks(encoder().frame(event))
    assert event_id == str(event.id)
    result: dict[str, Any] = json.loads(data)
    return result


def test_reasoning_is_a_reasoning_content_chunk():
    assert only_chunk(Event(2, "reasoning", reasoning("The user wants"))) == chunk(
        {"reasoning_content": "The user wants"}
    )


def test_merged_reasoning_carries_first_id():
    event = Event(9, "reasoning", reasoning("abc", first_id=4))
    assert only_chunk(event) == chunk({"reasoning_content": "abc"}, first_id=4)


def test_a_calls_first_fragment_has_id_type_and_name():
    call = {
        "index": 0,
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert only_chunk(Event(5, "tool_call", tool_call(0, "", "call_abc"))) == chunk(
        {"tool_calls": [call]}
    )


def test_a_later_fragment_is_index_and_arguments_only():
    # Repeating id or name, or sending "type": null, breaks the client's accumulator.
    call = {"index": 1, "function": {"arguments": '{"ci'}}
    assert only_chunk(Event(6, "tool_call", tool_call(1, '{"ci'))) == chunk({"tool_calls": [call]})


def test_a_merged_run_of_one_call_carries_first_id():
    event = Event(8, "tool_call", tool_call(0, ARGUMENTS, "call_abc", first_id=5))
    function = {"name": "get_weather", "arguments": ARGUMENTS}
    call = {"index": 0, "id": "call_abc", "type": "function", "function": function}
    assert only_chunk(event) == chunk({"tool_calls": [call]}, first_id=5)


def test_custom_events_have_no_chunk():
    assert encoder().frame(Event(3, "citation", dumps({"url": "https://example.org"}))) == b""


def test_done_with_tool_calls_and_usage_counting_reasoning():
    frame = encoder(include_usage=True).frame(Event(12, "done", done("tool_calls", 3, 5)))
    finish, usage, last = blocks(frame)
    assert finish == ("12", dumps(chunk({}, "tool_calls", usage=None)))
    assert json.loads(usage[1])["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 8,
        "total_tokens": 8,
        "completion_tokens_details": {"reasoning_tokens": 5},
    }
    assert last == (None, "[DONE]")


# A finished job but for what each test sets.
FINISHED: dict[str, Any] = {
    "id": JOB,
    "status": "completed",
    "model": "demo",
    **dict.fromkeys(("created_at", "started_at", "finished_at"), CREATED),
    "tokens": 2,
    "last_event_id": 9,
    "error": None,
    "finish_reason": "tool_calls",
    "viewers": 0,
    "metadata": {},
}


def finished_state(text: str, reasoning: str, tool_calls: list[dict[str, Any]]) -> JobState:
    return JobState(**FINISHED, text=text, reasoning=reasoning, tool_calls=tool_calls)


CALL = {
    "id": "call_abc",
    "type": "function",
    "function": {"name": "get_weather", "arguments": ARGUMENTS},
}


def test_completion_with_reasoning_and_a_tool_call():
    body = completion_body(finished_state("Let me look.", "The user wants", [CALL]), 4)
    [choice] = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Let me look.",
        "refusal": None,
        "reasoning_content": "The user wants",
        "tool_calls": [CALL],
    }
    assert choice["finish_reason"] == "tool_calls"
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}


def test_completion_of_only_a_tool_call_has_null_content():
    # As OpenAI answers a call without text; no reasoning, so no reasoning_content.
    message = completion_body(finished_state("", "", [CALL]))["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "refusal": None, "tool_calls": [CALL]}


def test_the_client_reads_the_completion():
    state = finished_state("", "The user wants", [CALL])
    completion = sdk(json.dumps(completion_body(state, 3)).encode(), "application/json")
    with completion:
        answer = completion.chat.completions.create(model="demo", messages=[])
    message = answer.choices[0].message
    assert message.content is None
    assert message.model_extra == {"reasoning_content": "The user wants"}
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("call_abc", "get_weather", ARGUMENTS)
    ]
    assert answer.choices[0].finish_reason == "tool_calls"


# Whole streams through the official client.

LIVE = [
    Event(1, "start", start_data(JOB, "demo", CREATED)),
    Event(2, "reasoning", reasoning("The user wants ")),
    Event(3, "reasoning", reasoning("the weather.")),
    Event(4, "token", token_data("Let me ")),
    Event(5, "token", token_data("look.")),
    Event(6, "tool_call", tool_call(0, "", "call_abc")),
    Event(7, "tool_call", tool_call(0, '{"city"')),
    Event(8, "tool_call", tool_call(0, ': "Paris"}')),
    Event(9, "tool_call", tool_call(1, '{"city": ', "call_def")),
    Event(10, "tool_call", tool_call(1, '"Tōkyō 東京"}')),
    Event(11, "done", done("tool_calls", 2, 2)),
]
# The same job for a viewer that is behind: every run merged.
MERGED = [
    LIVE[0],
    Event(3, "reasoning", reasoning("The user wants the weather.", first_id=2)),
    Event(5, "token", token_data("Let me look.", first_id=4)),
    Event(8, "tool_call", tool_call(0, ARGUMENTS, "call_abc", first_id=6)),
    Event(10, "tool_call", tool_call(1, ARGUMENTS_2, "call_def", first_id=9)),
    LIVE[-1],
]


BASE_URL = "http://tokencast.test/v1"


def answering(body: bytes, content_type: str) -> httpx.Client:
    """An HTTP client whose server answers every request with ``body``."""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": content_type})

    return httpx.Client(transport=httpx.MockTransport(answer))


def sdk(body: bytes, content_type: str = "text/event-stream") -> openai.OpenAI:
    """The official client, its server answering every request with ``body``."""
    http_client = answering(body, content_type)
    return openai.OpenAI(
        base_url=BASE_URL, api_key="unused", max_retries=0, http_client=http_client
    )


def encoded(events: list[Event]) -> bytes:
    enc = encoder(include_usage=True)
    return b"".join(enc.frame(event) for event in events)


@pytest.mark.parametrize("events", [LIVE, MERGED], ids=["live", "merged"])
def test_the_clients_stream_helper_assembles_reasoning_text_and_calls(events):
    with sdk(encoded(events)) as client:
        with client.chat.completions.stream(
            model="demo", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER]
        ) as stream:
            kinds = [event.type for event in stream]
            completion = stream.get_final_completion()
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    assert (choice.message.model_extra or {})["reasoning_content"] == "The user wants the weather."
    calls = [
        (call.id, call.type, call.function.name, call.function.arguments)
        for call in choice.message.tool_calls or []
    ]
    assert calls == [
        ("call_abc", "function", "get_weather", ARGUMENTS),
        ("call_def", "function", "get_weather", ARGUMENTS_2),
    ]
    parsed = [call.function.parsed_arguments for call in choice.message.tool_calls or []]
    assert parsed == [{"city": "Paris"}, {"city": "Tōkyō 東京"}]
    assert kinds.count("tool_calls.function.arguments.done") == 2
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 2


def test_the_clients_chunks_are_as_openai_sends_them():
    with sdk(encoded(LIVE)) as client:
        chunks = list(client.chat.completions.create(model="demo", messages=[], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning_parts = [(d.model_extra or {}).get("reasoning_content") for d in deltas]
    assert "".join(part for part in reasoning_parts if part) == "The user wants the weather."
    fragments = [call for d in deltas for call in d.tool_calls or []]
    assert [(f.index, f.id, f.type) for f in fragments] == [
        (0, "call_abc", "function"),
        (0, None, None),
        (0, None, None),
        (1, "call_def", "function"),
        (1, None, None),
    ]
    assert [f.function.name for f in fragments if f.function] == [
        "get_weather",
        None,
        None,
        "get_weather",
        None,
    ]


def langchain(body: bytes, content_type: str = "text/event-stream") -> ChatOpenAI:
    """LangChain's ChatOpenAI, its server answering every request with ``body``."""
    return ChatOpenAI(
        model="demo",
        base_url=BASE_URL,
        api_key=SecretStr("unused"),
        http_client=answering(body, content_type),
        max_retries=0,
    )


@pytest.mark.parametrize("events", [LIVE, MERGED], ids=["live", "merged"])
def test_langchains_stream_assembles_the_calls(events):
    chunks = list(langchain(encoded(events)).bind_tools([WEATHER]).stream("weather?"))
    message = chunks[0]
    for piece in chunks[1:]:
        message += piece
    assert message.content == "Let me look."
    assert message.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_abc", "type": "tool_call"},
        {
            "name": "get_weather",
            "args": {"city": "Tōkyō 東京"},
            "id": "call_def",
            "type": "tool_call",
        },
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_langchains_invoke_reads_the_completion():
    state = finished_state("Let me look.", "The user wants", [CALL])
    model = langchain(json.dumps(completion_body(state, 3)).encode(), "application/json")
    message = model.bind_tools([WEATHER]).invoke("weather?")
    assert message.content == "Let me look."
    assert [(call["id"], call["name"], call["args"]) for call in message.tool_calls] == [
        ("call_abc", "get_weather", {"city": "Paris"})
    ]
