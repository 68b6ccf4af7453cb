"""A job's events as an OpenAI Responses stream (API.md, "OpenAI Responses API").

Frames are read back with the official SDK's own SSE decoder and its
``responses.stream()`` accumulator, not with our reading of the format.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import omit
from openai._models import construct_type
from openai._streaming import SSEDecoder
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from services.events import Event, done_data, dumps, start_data, token_data
from services.resume import coalesce
from web.responses_format import ResponseEncoder, ResponseHead, resume_base

JOB = "Qajb9HAkvQ5X_kFYoKCFZA"
CREATED = "2026-11-24T10:00:00.000Z"
EPOCH = 1795514400
ARGUMENTS = '{"city": "Paris"}'


def head() -> ResponseHead:
    return ResponseHead(JOB, "demo", EPOCH, metadata={"team": "tests"})


def start(event_id: int = 1) -> Event:
    return Event(event_id, "start", start_data(JOB, "demo", CREATED))


def token(event_id: int, text: str) -> Event:
    return Event(event_id, "token", token_data(text))


def reasoning(event_id: int, text: str) -> Event:
    return Event(event_id, "reasoning", dumps({"text": text}))


def call(event_id: int, arguments: str, index: int = 0, first: bool = False) -> Event:
    data: dict[str, Any] = {"index": index, "arguments": arguments}
    if first:
        data = {"index": index, "id": f"call_{index}", "name": "get_weather", **data}
    return Event(event_id, "tool_call", dumps(data))


def done(event_id: int, status: str = "completed", reason: str | None = "stop", **extra) -> Event:
    data = json.loads(done_data(status, reason, extra.pop("tokens", 2), extra.pop("error", None)))
    return Event(event_id, "done", dumps({**data, **extra}))


def thinking_job() -> list[Event]:
    """Reasoning, text and a tool call, as the log holds them."""
    return [
        start(),
        reasoning(2, "The user "),
        reasoning(3, "wants weather."),
        token(4, "Let me "),
        token(5, "check."),
        call(6, '{"city": ', first=True),
        call(7, '"Paris"}'),
        Event(8, "citation", dumps({"url": "https://example.org"})),
        done(9, reason="tool_calls", tokens=2, reasoning_tokens=2),
    ]


def encode(events: list[Event], encoder: ResponseEncoder | None = None) -> list[dict]:
    """The data of every SSE block, checking each block's ``event`` and ``id`` lines."""
    encoder = encoder or ResponseEncoder(head())
    raw = b"".join(encoder.frame(event) for event in events)
    decoded = []
    for sse in SSEDecoder().iter_bytes(iter([raw])):
        data = sse.json()
        assert sse.event == data["type"]
        assert sse.id == str(data["sequence_number"])
        decoded.append(data)
    return decoded


def accumulate(blocks: list[dict]) -> tuple[ResponseStreamState, list[Any]]:
    """What the SDK's ``responses.stream()`` makes of the blocks."""
    state: ResponseStreamState = ResponseStreamState(input_tools=omit, text_format=omit)
    fired = []
    for block in blocks:
        event = construct_type(type_=ResponseStreamEvent, value=block)
        fired += state.handle_event(event)  # type: ignore[arg-type]
    return state, fired


def test_reasoning_text_and_a_call_come_out_as_three_items_in_openai_order():
    blocks = encode(thinking_job())
    assert [b["type"] for b in blocks] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    numbers = [b["sequence_number"] for b in blocks]
    assert numbers == sorted(set(numbers))
    assert numbers[:5] == [10, 19, 20, 21, 29]  # 10·id + slot; an event's last output is slot 9


def test_the_sdk_accumulates_the_whole_response():
    state, fired = accumulate(encode(thinking_job()))
    final = state._completed_response
    assert final is not None
    assert final.id == f"resp_{JOB}"
    assert final.status == "completed"
    assert final.output_text == "Let me check."
    reasoning_item, message, function_call = final.output
    assert reasoning_item.type == "reasoning" and reasoning_item.id == f"rs_{JOB}"
    assert reasoning_item.content is not None
    assert reasoning_item.content[0].text == "The user wants weather."
    assert message.type == "message" and message.id == f"msg_{JOB}"
    assert function_call.type == "function_call"
    assert (function_call.id, function_call.call_id) == (f"fc_{JOB}_0", "call_0")
    assert (function_call.name, function_call.arguments) == ("get_weather", ARGUMENTS)
    assert final.usage is not None
    assert final.usage.output_tokens == 4
    assert final.usage.output_tokens_details.reasoning_tokens == 2
    assert final.metadata == {"team": "tests"}
    deltas = [e for e in fired if e.type == "response.output_text.delta"]
    assert [e.snapshot for e in deltas] == ["Let me ", "Let me check."]


def test_items_carry_their_texts_when_done():
    blocks = encode(thinking_job())
    by_type = {b["type"]: b for b in blocks}
    assert by_type["response.reasoning_text.done"]["text"] == "The user wants weather."
    assert by_type["response.output_text.done"]["text"] == "Let me check."
    assert by_type["response.output_text.done"]["logprobs"] == []
    assert by_type["response.function_call_arguments.done"]["arguments"] == ARGUMENTS
    added = [b for b in blocks if b["type"] == "response.output_item.added"]
    assert [b["item"]["status"] for b in added] == ["in_progress"] * 3
    assert added[2]["item"]["arguments"] == ""


def test_parallel_calls_are_items_of_their_own():
    events = [
        start(),
        call(2, '{"a": 1}', index=0, first=True),
        call(3, '{"b": ', index=1, first=True),
        call(4, "2}", index=1),
        done(5, reason="tool_calls", tokens=0),
    ]
    state, _ = accumulate(encode(events))
    final = state._completed_response
    assert final is not None
    calls = [(item.id, item.call_id, item.arguments) for item in final.output]  # type: ignore[union-attr]
    assert calls == [(f"fc_{JOB}_0", "call_0", '{"a": 1}'), (f"fc_{JOB}_1", "call_1", '{"b": 2}')]


def test_text_after_a_call_is_a_second_message_with_an_id_of_its_own():
    events = [start(), token(2, "a"), call(3, "{}", first=True), token(4, "b"), done(5)]
    state, _ = accumulate(encode(events))
    final = state._completed_response
    assert final is not None
    assert [item.id for item in final.output] == [f"msg_{JOB}", f"fc_{JOB}_0", f"msg_{JOB}_2"]
    assert final.output_text == "ab"


@pytest.mark.parametrize(
    ("ending", "event_type", "status", "details", "item_status"),
    [
        (
            done(4, reason="length"),
            "response.incomplete",
            "incomplete",
            "max_output_tokens",
            "incomplete",
        ),
        (done(4, "cancelled", "cancelled"), "response.incomplete", "cancelled", None, "incomplete"),
        (done(4, reason="stop"), "response.completed", "completed", None, "completed"),
    ],
)
def test_endings(ending, event_type, status, details, item_status):
    blocks = encode([start(), token(2, "Hel"), token(3, "lo"), ending])
    last = blocks[-1]
    assert last["type"] == event_type
    assert last["sequence_number"] == 49
    response = last["response"]
    assert response["status"] == status
    assert response["incomplete_details"] == ({"reason": details} if details else None)
    assert response["output"][0]["status"] == item_status
    assert response["output"][0]["content"][0]["text"] == "Hello"
    assert response["usage"]["output_tokens"] == 2


def test_a_failed_job_is_response_failed_with_its_code():
    error = {"code": "backend_error", "message": "the model broke"}
    blocks = encode([start(), token(2, "Hel"), done(3, "failed", None, error=error)])
    last = blocks[-1]
    assert last["type"] == "response.failed"
    assert last["response"]["status"] == "failed"
    assert last["response"]["error"] == error
    assert "error" not in last  # a top-level error would make the SDK raise instead
    _, fired = accumulate(blocks)
    assert fired[-1].type == "response.failed"
    assert fired[-1].response.error.code == "backend_error"


def test_a_job_cancelled_while_queued_still_opens_with_response_created():
    blocks = encode([done(1, "cancelled", "cancelled", tokens=0)])
    assert [b["type"] for b in blocks] == [
        "response.created",
        "response.in_progress",
        "response.incomplete",
    ]
    assert blocks[-1]["response"]["status"] == "cancelled"


def test_custom_events_have_no_output():
    assert encode([start(), Event(2, "citation", dumps({"url": "x"}))])[-1]["sequence_number"] == 19


def test_merged_events_keep_the_numbers_of_what_they_stand_for():
    events = thinking_job()
    single = encode(events)
    merged_events = [
        events[0],
        Event(3, "reasoning", dumps({"text": "The user wants weather.", "first_id": 2})),
        Event(5, "token", token_data("Let me check.", first_id=4)),
        Event(
            7,
            "tool_call",
            dumps({**json.loads(events[5].data), "arguments": ARGUMENTS, "first_id": 6}),
        ),
        events[7],
        events[8],
    ]
    merged = encode(merged_events)
    numbers = {b["sequence_number"]: b for b in single}
    for block in merged:
        if block["type"].endswith(".delta"):
            continue
        assert numbers[block["sequence_number"]] == block
    merged_deltas = [b["sequence_number"] for b in merged if b["type"].endswith(".delta")]
    assert merged_deltas == [39, 59, 79]  # the numbers of the last deltas they stand for
    assert accumulate(merged)[0]._completed_response == accumulate(single)[0]._completed_response


def resumed(events: list[Event], after: int, merge: bool) -> list[dict]:
    """What a resume after ``after`` sends: the log folded up to its base, then the rest."""
    base = resume_base(after)
    encoder = ResponseEncoder(head(), after)
    for event in events[:base]:
        encoder.apply(event)
    rest = events[base:]
    return encode(coalesce(rest) if merge else rest, encoder)


def texts(blocks: list[dict]) -> str:
    return "".join(b.get("delta", "") for b in blocks)


@pytest.mark.parametrize("merge", [False, True])
def test_a_resume_from_any_number_sends_exactly_the_rest(merge):
    events = [
        start(),
        token(2, "a"),
        token(3, "b"),
        reasoning(4, "r"),
        token(5, "c"),
        token(6, "d"),
    ]
    events.append(done(7, tokens=4))
    whole = encode(events)
    for after in range(0, 80):
        rest = resumed(events, after, merge)
        expected = [b for b in whole if b["sequence_number"] > after]
        if not merge:
            assert rest == expected, after
        assert [b for b in rest if not b["type"].endswith(".delta")] == [
            b for b in expected if not b["type"].endswith(".delta")
        ], after
        assert texts(rest) == texts(expected), after
        numbers = [b["sequence_number"] for b in rest]
        assert numbers == sorted(set(numbers)) and all(n > after for n in numbers)


def test_frames_are_shared_between_viewers_and_each_keeps_its_own_state():
    events = thinking_job()
    first, second = ResponseEncoder(head()), ResponseEncoder(head())
    frames = [first.frame(event) for event in events]
    assert [second.frame(event) for event in events] == frames
    assert all(events[i].frames["responses"] is frames[i] for i in range(len(events)))
    assert second.snapshot() == first.snapshot()
    assert second.snapshot()["status"] == "completed"


def test_the_object_so_far():
    encoder = ResponseEncoder(head())
    assert encoder.snapshot()["status"] == "queued"
    for event in [start(), reasoning(2, "hmm"), token(3, "Hi")]:
        encoder.apply(event)
    so_far = encoder.snapshot()
    assert so_far["status"] == "in_progress"
    assert [item["status"] for item in so_far["output"]] == ["completed", "in_progress"]
    assert so_far["output"][1]["content"][0]["text"] == "Hi"
    assert encoder.snapshot("cancelled")["status"] == "cancelled"


def test_reasoning_tokens_are_counted_from_the_log_when_done_does_not_say():
    # A log written before done carried reasoning_tokens (a rolling upgrade).
    merged = Event(4, "reasoning", dumps({"text": "abc", "first_id": 2}))
    old_done = Event(
        6, "done", dumps({"status": "completed", "finish_reason": "stop", "tokens": 1})
    )
    blocks = encode([start(), merged, token(5, "x"), old_done])
    usage = blocks[-1]["response"]["usage"]
    assert usage["output_tokens_details"] == {"reasoning_tokens": 3}
    assert usage["output_tokens"] == usage["total_tokens"] == 4
