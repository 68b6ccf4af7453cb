"""The mapping of a job's events to OpenAI chunks (API.md, "OpenAI-compatible endpoint")."""

import json

import pytest

from services.events import Event, done_data, start_data, token_data
from services.jobs import JobState
from web.models import InvalidField
from web.openai_format import ChunkEncoder, completion_body, include_usage_param

JOB = "Qajb9HAkvQ5X_kFYoKCFZA"
CREATED = "2026-11-24T10:00:00.000Z"
EPOCH = 1795514400


def encoder(include_usage=False) -> ChunkEncoder:
    return ChunkEncoder(JOB, "demo", EPOCH, include_usage)


def blocks(frame: bytes) -> list[tuple[str | None, str]]:
    """(id, data) of each SSE block."""
    parsed = []
    for block in frame.decode().split("\n\n")[:-1]:
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        parsed.append((fields.get("id"), fields["data"]))
    return parsed


def chunk(delta, finish=None, **extra):
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    body = {
        "id": f"chatcmpl-{JOB}",
        "object": "chat.completion.chunk",
        "created": EPOCH,
        "model": "demo",
        "choices": [choice],
    }
    return {**body, **extra}


def test_start_is_the_role_chunk():
    frame = encoder().frame(Event(1, "start", start_data(JOB, "demo", CREATED)))
    [(event_id, data)] = blocks(frame)
    assert event_id == "1"
    assert json.loads(data) == chunk({"role": "assistant", "content": ""})


@pytest.mark.parametrize("text", ["Hello", "two\nlines", 'say "hi"', "emoji 😀", "\u2028"])
def test_token_is_a_content_chunk_on_one_line(text):
    frame = encoder().frame(Event(7, "token", token_data(text)))
    [(event_id, data)] = blocks(frame)
    assert event_id == "7"
    assert json.loads(data) == chunk({"content": text})


def test_merged_token_carries_first_id():
    frame = encoder().frame(Event(12, "token", token_data("abc", first_id=7)))
    [(event_id, data)] = blocks(frame)
    assert event_id == "12"
    assert json.loads(data) == chunk({"content": "abc"}, first_id=7)


@pytest.mark.parametrize(
    ("status", "reason", "finish"),
    [
        ("completed", "stop", "stop"),
        ("completed", "length", "length"),
        ("cancelled", "cancelled", "stop"),
    ],
)
def test_done_is_finish_then_done(status, reason, finish):
    frame = encoder().frame(Event(9, "done", done_data(status, reason, 7)))
    assert blocks(frame) == [
        ("9", json.dumps(chunk({}, finish), separators=(",", ":"))),
        (None, "[DONE]"),
    ]
    assert frame.endswith(b"\n\ndata: [DONE]\n\n")


def test_include_usage_adds_null_usage_and_the_usage_chunk():
    enc = encoder(include_usage=True)
    token = enc.frame(Event(2, "token", token_data("x")))
    assert json.loads(blocks(token)[0][1]) == chunk({"content": "x"}, usage=None)
    done = blocks(enc.frame(Event(9, "done", done_data("completed", "stop", 7))))
    assert [event_id for event_id, _ in done] == ["9", "9", None]
    assert json.loads(done[0][1]) == chunk({}, "stop", usage=None)
    usage = json.loads(done[1][1])
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 7,
        "total_tokens": 7,
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert done[2][1] == "[DONE]"


def test_failed_is_an_error_object_and_no_done():
    error = {"code": "upstream_timeout", "message": "the upstream stalled"}
    frame = encoder(include_usage=True).frame(Event(5, "done", done_data("failed", None, 3, error)))
    [(event_id, data)] = blocks(frame)
    assert event_id == "5"
    assert json.loads(data) == {
        "error": {
            "message": "the upstream stalled",
            "type": "server_error",
            "code": "upstream_timeout",
        }
    }


def test_frames_are_cached_per_variant():
    event = Event(3, "token", token_data("x"))
    plain, with_usage = encoder(), encoder(include_usage=True)
    first = plain.frame(event)
    assert plain.frame(event) is first
    assert with_usage.frame(event) != first
    assert set(event.frames) == {"openai", "openai+usage"}


@pytest.mark.parametrize(
    ("raw", "value"), [(None, False), ("", False), ("false", False), ("true", True)]
)
def test_include_usage_query_values(raw, value):
    assert include_usage_param(raw) is value


def test_include_usage_query_rejects_other_values():
    with pytest.raises(InvalidField, match="include_usage must be true or false"):
        include_usage_param("yes")


def test_completion_of_a_cancelled_job():
    state = JobState(
        id=JOB,
        status="cancelled",
        model="demo",
        created_at=CREATED,
        started_at=CREATED,
        finished_at=CREATED,
        tokens=2,
        last_event_id=4,
        text="Hi there",
        reasoning="",
        tool_calls=[],
        error=None,
        finish_reason="cancelled",
        viewers=0,
        metadata={},
    )
    assert completion_body(state) == {
        "id": f"chatcmpl-{JOB}",
        "object": "chat.completion",
        "created": EPOCH,
        "model": "demo",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 0,
            "completion_tokens": 2,
            "total_tokens": 2,
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
