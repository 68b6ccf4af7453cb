"""Every kind of event against the merge and every output format (services.events.KINDS)."""

from __future__ import annotations

import json

import pytest

from services.events import (
    CUSTOM,
    DONE,
    KINDS,
    REASONING,
    START,
    TOKEN,
    TOOL_CALL,
    Event,
    done_data,
    dumps,
    start_data,
    token_data,
    tool_call_data,
)
from services.history import FinishedLog
from services.resume import coalesce
from web.openai_format import ChunkEncoder
from web.sse import native_frame

JOB = "Qajb9HAkvQ5X_kFYoKCFZA"

# One event of every kind. A kind added to services.events.KINDS fails
# test_every_kind_has_a_sample until it is listed here, and then every format
# below must say what it does with it.
SAMPLES = {
    START: Event(1, START, start_data(JOB, "demo", "2026-11-24T10:00:00.000Z")),
    REASONING: Event(2, REASONING, token_data("The user wants")),
    TOKEN: Event(3, TOKEN, token_data("Hello")),
    TOOL_CALL: Event(4, TOOL_CALL, tool_call_data(0, '{"ci', "call_1", "get_weather")),
    CUSTOM: Event(5, "citation", dumps({"url": "https://example.org"})),
    DONE: Event(6, DONE, done_data("completed", "tool_calls", 1, reasoning_tokens=1)),
}


def test_every_kind_has_a_sample():
    assert set(SAMPLES) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_native_frame_of_every_kind(kind):
    event = SAMPLES[kind]
    assert native_frame(event).decode() == (
        f"id: {event.id}\nevent: {event.name}\ndata: {event.data}\n\n"
    )


NATIVE_DATA = {
    START: {"job_id": JOB, "model": "demo", "created_at": "2026-11-24T10:00:00.000Z"},
    REASONING: {"text": "The user wants"},
    TOKEN: {"text": "Hello"},
    TOOL_CALL: {"index": 0, "id": "call_1", "name": "get_weather", "arguments": '{"ci'},
    CUSTOM: {"url": "https://example.org"},
    DONE: {
        "status": "completed",
        "finish_reason": "tool_calls",
        "tokens": 1,
        "reasoning_tokens": 1,
    },
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_native_data_of_every_kind(kind):
    assert set(NATIVE_DATA) == set(KINDS)
    assert json.loads(SAMPLES[kind].data) == NATIVE_DATA[kind]


def chat_blocks(event: Event) -> list[dict]:
    frame = ChunkEncoder(JOB, "demo", 0).frame(event).decode()
    return [
        json.loads(line[len("data: ") :])
        for line in frame.split("\n")
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


# What the OpenAI chat format does with each kind: a check of its chunks.
CHAT = {
    START: lambda chunks: chunks[0]["choices"][0]["delta"]["role"] == "assistant",
    TOKEN: lambda chunks: chunks[0]["choices"][0]["delta"]["content"] == "Hello",
    REASONING: lambda chunks: all("choices" in chunk for chunk in chunks),
    TOOL_CALL: lambda chunks: all("choices" in chunk for chunk in chunks),
    CUSTOM: lambda chunks: chunks == [],  # chat chunks have no place for a custom event
    DONE: lambda chunks: chunks[0]["choices"][0]["finish_reason"] is not None,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_chat_format_of_every_kind(kind):
    assert set(CHAT) == set(KINDS)
    assert CHAT[kind](chat_blocks(SAMPLES[kind]))


def reasoning(i: int, text: str) -> Event:
    return Event(i, REASONING, token_data(text))


def token(i: int, text: str) -> Event:
    return Event(i, TOKEN, token_data(text))


def fragment(i: int, index: int, arguments: str, first: bool = False) -> Event:
    if first:
        return Event(i, TOOL_CALL, tool_call_data(index, arguments, f"call_{index}", f"f{index}"))
    return Event(i, TOOL_CALL, tool_call_data(index, arguments))


def custom(i: int, name: str = "citation") -> Event:
    return Event(i, name, dumps({"n": i}))


def a_log() -> list[Event]:
    """Every kind, with runs of each that merge and neighbours that must not."""
    return [
        SAMPLES[START],
        reasoning(2, "Think"),
        reasoning(3, " hard"),
        reasoning(4, " 😀\n"),
        token(5, "Hel"),
        token(6, "lo"),
        custom(7),
        custom(8),
        token(9, "!"),
        fragment(10, 0, '{"ci', first=True),
        fragment(11, 0, 'ty": '),
        fragment(12, 0, '"Paris"}'),
        fragment(13, 1, "{", first=True),
        fragment(14, 1, "}"),
        fragment(15, 0, ""),
        reasoning(16, "More"),
        Event(17, DONE, done_data("completed", "tool_calls", 3, reasoning_tokens=4)),
    ]


def test_coalesce_merges_each_kind_as_the_contract_says():
    merged = coalesce(a_log())
    assert [(e.id, e.name, e.payload()) for e in merged] == [
        (1, START, SAMPLES[START].payload()),
        (4, REASONING, {"text": "Think hard 😀\n", "first_id": 2}),
        (6, TOKEN, {"text": "Hello", "first_id": 5}),
        (7, "citation", {"n": 7}),  # custom events never merge
        (8, "citation", {"n": 8}),
        (9, TOKEN, {"text": "!"}),
        (
            12,
            TOOL_CALL,
            {
                "index": 0,
                "id": "call_0",
                "name": "f0",
                "arguments": '{"city": "Paris"}',
                "first_id": 10,
            },
        ),
        (
            14,
            TOOL_CALL,
            {"index": 1, "id": "call_1", "name": "f1", "arguments": "{}", "first_id": 13},
        ),
        (15, TOOL_CALL, {"index": 0, "arguments": ""}),
        (16, REASONING, {"text": "More"}),
        (17, DONE, a_log()[-1].payload()),
    ]


def test_tokens_and_reasoning_never_merge_into_one():
    merged = coalesce([token(2, "a"), reasoning(3, "b"), token(4, "c"), reasoning(5, "d")])
    assert [e.id for e in merged] == [2, 3, 4, 5]


def test_a_run_resumed_inside_a_tool_call_keeps_only_arguments():
    merged = coalesce(a_log()[10:12])  # ids 11 and 12: the call's later fragments
    assert [(e.id, e.payload()) for e in merged] == [
        (12, {"index": 0, "arguments": 'ty": "Paris"}', "first_id": 11})
    ]


def covered(event: Event) -> range:
    first = event.payload().get("first_id", event.id) if event.name in KINDS else event.id
    return range(first, event.id + 1)


def reassembled(events: list[Event]) -> tuple[str, str, dict, list]:
    """Text, reasoning, the calls and the other events, as a client adds them up."""
    text, thought, calls, others = "", "", {}, []
    for event in events:
        data = event.payload()
        if event.name == TOKEN:
            text += data["text"]
        elif event.name == REASONING:
            thought += data["text"]
        elif event.name == TOOL_CALL:
            call = calls.setdefault(data["index"], {"arguments": ""})
            call.setdefault("id", data.get("id"))
            call.setdefault("name", data.get("name"))
            call["arguments"] += data["arguments"]
        else:
            others.append((event.id, event.name, data))
    return text, thought, calls, others


@pytest.mark.parametrize("sent", range(len(a_log())))
def test_resume_from_every_position_gives_exactly_the_rest(sent):
    log = a_log()
    rest = log[sent:]
    merged = coalesce(rest)
    ids = [i for event in merged for i in covered(event)]
    assert ids == [event.id for event in rest]  # gap-free, each once, in order
    assert reassembled(merged) == reassembled(rest)
    # And the finished-log cache, with its pre-parsed data, gives the same batch.
    assert FinishedLog(log).after(sent) == merged
