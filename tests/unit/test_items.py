"""The publish format, as backends and external producers send it."""

import pytest

from services.items import (
    MAX_DATA_BYTES,
    MAX_TEXT_BYTES,
    CustomEvent,
    Failure,
    Finish,
    InvalidItem,
    Text,
    ToolCallFragment,
    parse_item,
)


@pytest.mark.parametrize(
    ("value", "item"),
    [
        ("Hel", Text("token", "Hel")),
        ({"type": "token", "text": "lo"}, Text("token", "lo")),
        ({"type": "reasoning", "text": "The user wants"}, Text("reasoning", "The user wants")),
        (
            {
                "type": "tool_call",
                "index": 0,
                "id": "call_1",
                "name": "get_weather",
                "arguments": '{"ci',
            },
            ToolCallFragment(0, '{"ci', "call_1", "get_weather"),
        ),
        ({"type": "tool_call", "index": 1, "arguments": "ty"}, ToolCallFragment(1, "ty")),
        (
            {"type": "event", "name": "citation", "data": {"url": "https://example.org"}},
            CustomEvent("citation", {"url": "https://example.org"}),
        ),
        ({"type": "done"}, Finish("stop")),
        ({"type": "done", "finish_reason": "tool_calls"}, Finish("tool_calls")),
        (
            {"type": "error", "code": "my_agent_failed", "message": "the search tool timed out"},
            Failure("my_agent_failed", "the search tool timed out"),
        ),
    ],
)
def test_each_kind_of_item(value, item):
    assert parse_item(value) == item


@pytest.mark.parametrize(
    ("value", "field", "message"),
    [
        (7, "type", "an item must be a string or an object, got a number"),
        (
            {"text": "x"},
            "type",
            "type must be one of: token, reasoning, tool_call, event, done, error; got None",
        ),
        (
            {"type": "tokens", "text": "x"},
            "type",
            "type must be one of: token, reasoning, tool_call, event, done, error; got 'tokens'",
        ),
        ({"type": "token"}, "text", "text is required in a token item"),
        ({"type": "token", "text": 5}, "text", "text must be a string, got a number"),
        (
            {"type": "token", "text": "x", "extra": 1},
            "extra",
            "unknown field 'extra' in a token item",
        ),
        (
            {"type": "token", "text": "x" * (MAX_TEXT_BYTES + 1)},
            "text",
            f"text must be at most {MAX_TEXT_BYTES} bytes, got {MAX_TEXT_BYTES + 1}",
        ),
        ({"type": "token", "text": "\ud800"}, "text", "text must be valid Unicode text"),
        ({"type": "tool_call", "index": -1}, "index", "index must be an integer from 0 to 127"),
        ({"type": "tool_call", "index": True}, "index", "index must be an integer from 0 to 127"),
        (
            {"type": "tool_call", "index": 0, "name": "get weather"},
            "name",
            "name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -",
        ),
        ({"type": "event", "name": "done", "data": {}}, "name", None),
        ({"type": "event", "name": "Citation", "data": {}}, "name", None),
        ({"type": "event", "name": "x" * 65, "data": {}}, "name", None),
        (
            {"type": "event", "name": "citation", "data": [1]},
            "data",
            "data must be an object, got an array",
        ),
        ({"type": "event", "name": "citation", "data": {"t": "x" * MAX_DATA_BYTES}}, "data", None),
        (
            {"type": "done", "finish_reason": "cancelled"},
            "finish_reason",
            "finish_reason must be one of: stop, length, tool_calls",
        ),
        (
            {"type": "error", "code": "Bad-Code", "message": "m"},
            "code",
            "code must be 1 to 64 characters of a-z, 0-9 and _",
        ),
        (
            {"type": "error", "code": "x", "message": ""},
            "message",
            "message must be 1 to 2000 characters",
        ),
    ],
)
def test_a_bad_item_names_its_field_and_limit(value, field, message):
    with pytest.raises(InvalidItem) as caught:
        parse_item(value)
    assert caught.value.field == field
    if message is not None:
        assert caught.value.message == message


def test_custom_event_names_that_are_allowed():
    for name in ("citation", "a", "tool.result", "step-2", "x_y", "z" * 64):
        assert parse_item({"type": "event", "name": name, "data": {}}).name == name
