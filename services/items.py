"""What a producer emits, before it becomes events in a job's log.

A worker's backend yields items (a ``str`` is answer text, a dict is one line
of the publish format), and an external producer sends the same dicts as
NDJSON lines to ``POST /v1/jobs/<id>/publish`` (API.md, "Producers"). Both
are read here, into one typed model, with the same checks:

    {"type": "token", "text": "Hel"}                      -> Text(TOKEN, "Hel")
    {"type": "reasoning", "text": "The user wants"}       -> Text(REASONING, …)
    {"type": "tool_call", "index": 0, "id": "call_1",
     "name": "get_weather", "arguments": "{\\"ci"}        -> ToolCallFragment
    {"type": "event", "name": "citation", "data": {…}}    -> CustomEvent
    {"type": "done", "finish_reason": "stop"}             -> Finish
    {"type": "error", "code": "my_agent_failed",
     "message": "the search tool timed out"}              -> Failure

``parse_item`` raises ``InvalidItem`` naming the field and the limit; the
caller adds where the item came from (a line number, a backend's name).
Whether a tool call's first fragment carries its ``id`` and ``name`` depends
on the fragments before it: the job's writer checks that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TOKEN = "token"
REASONING = "reasoning"
TOOL_CALL = "tool_call"

# Names a custom event may not take: the stream's own events, and what a
# browser's EventSource uses for itself (API.md, "The event stream").
RESERVED_NAMES = frozenset(
    {"start", "token", "reasoning", "tool_call", "done", "error", "message", "keepalive"}
)
CUSTOM_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
ERROR_CODE = re.compile(r"[a-z0-9_]{1,64}")
TOOL_CALL_ID_MAX = 256
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_TOOL_INDEX = 127  # OpenAI allows 128 tools; a call's index is below that
MAX_TEXT_BYTES = 64 * 1024
MAX_DATA_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 2000
FINISH_REASONS = ("stop", "length", "tool_calls")


def is_custom_name(name: str) -> bool:
    """A name a custom event may take: the pattern, and none of the reserved names."""
    return CUSTOM_NAME.fullmatch(name) is not None and name not in RESERVED_NAMES


class InvalidItem(ValueError):
    """An item that is not in the publish format; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class Text:
    """Answer text (``kind`` ``token``) or reasoning (``kind`` ``reasoning``)."""

    kind: str
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallFragment:
    """A piece of tool call ``index``: the first carries ``id`` and ``name``."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class CustomEvent:
    """A producer's own event: a name that is not reserved, and a JSON object."""

    name: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Finish:
    """The generation is complete; ``finish_reason`` is ``stop``, ``length`` or ``tool_calls``."""

    finish_reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The generation failed: the job's ``done`` carries this code and message."""

    code: str
    message: str


Item = Text | ToolCallFragment | CustomEvent | Finish | Failure


def parse_item(value: object) -> Item:
    """The item ``value`` stands for: a ``str`` (answer text) or a publish-format dict."""
    if isinstance(value, str):
        return Text(TOKEN, _text(value, "text"))
    if not isinstance(value, dict):
        raise InvalidItem("type", f"an item must be a string or an object, got {_kind(value)}")
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in _PARSERS:
        known = ", ".join(_PARSERS)
        raise InvalidItem("type", f"type must be one of: {known}; got {kind!r}")
    _only(value, _FIELDS[kind])
    return _PARSERS[kind](value)


def _parse_text(value: dict) -> Text:
    return Text(value["type"], _text(_required(value, "text", str), "text"))


def _parse_tool_call(value: dict) -> ToolCallFragment:
    index = _required(value, "index", int)
    if isinstance(index, bool) or not 0 <= index <= MAX_TOOL_INDEX:
        raise InvalidItem("index", f"index must be an integer from 0 to {MAX_TOOL_INDEX}")
    call_id = _optional(value, "id", str)
    if call_id is not None and not 1 <= len(call_id) <= TOOL_CALL_ID_MAX:
        raise InvalidItem("id", f"id must be 1 to {TOOL_CALL_ID_MAX} characters")
    name = _optional(value, "name", str)
    if name is not None and not TOOL_NAME.fullmatch(name):
        raise InvalidItem("name", "name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -")
    arguments = _text(_optional(value, "arguments", str) or "", "arguments")
    return ToolCallFragment(index, arguments, call_id, name)


def _parse_custom(value: dict) -> CustomEvent:
    name = _required(value, "name", str)
    if not is_custom_name(name):
        raise InvalidItem(
            "name",
            "name must be 1 to 64 characters of a-z, 0-9, _, . and -, starting with a letter,"
            f" and not one of: {', '.join(sorted(RESERVED_NAMES))}; got {name[:80]!r}",
        )
    data = _required(value, "data", dict)
    size = len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_DATA_BYTES:
        raise InvalidItem(
            "data", f"data must be at most {MAX_DATA_BYTES} bytes of JSON, got {size}"
        )
    return CustomEvent(name, data)


def _parse_done(value: dict) -> Finish:
    reason = _optional(value, "finish_reason", str) or "stop"
    if reason not in FINISH_REASONS:
        raise InvalidItem(
            "finish_reason", f"finish_reason must be one of: {', '.join(FINISH_REASONS)}"
        )
    return Finish(reason)


def _parse_error(value: dict) -> Failure:
    code = _required(value, "code", str)
    if not ERROR_CODE.fullmatch(code):
        raise InvalidItem("code", "code must be 1 to 64 characters of a-z, 0-9 and _")
    message = _required(value, "message", str)
    if not 1 <= len(message) <= MAX_MESSAGE_CHARS:
        raise InvalidItem("message", f"message must be 1 to {MAX_MESSAGE_CHARS} characters")
    return Failure(code, message)


_PARSERS: dict[str, Callable[[dict], Item]] = {
    TOKEN: _parse_text,
    REASONING: _parse_text,
    TOOL_CALL: _parse_tool_call,
    "event": _parse_custom,
    "done": _parse_done,
    "error": _parse_error,
}
_FIELDS = {
    TOKEN: {"type", "text"},
    REASONING: {"type", "text"},
    TOOL_CALL: {"type", "index", "id", "name", "arguments"},
    "event": {"type", "name", "data"},
    "done": {"type", "finish_reason"},
    "error": {"type", "code", "message"},
}


def _only(value: dict, allowed: set[str]) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InvalidItem(unknown[0], f"unknown field {unknown[0]!r} in a {value['type']} item")


def _required(value: dict, field: str, kind: type) -> Any:
    if field not in value:
        raise InvalidItem(field, f"{field} is required in a {value['type']} item")
    return _optional(value, field, kind)


def _optional(value: dict, field: str, kind: type) -> Any:
    found = value.get(field)
    if found is not None and not isinstance(found, kind):
        raise InvalidItem(field, f"{field} must be {_NAMES[kind]}, got {_kind(found)}")
    return found


def _text(text: str, field: str) -> str:
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") is not text
        raise InvalidItem(field, f"{field} must be valid Unicode text") from None
    if size > MAX_TEXT_BYTES:
        raise InvalidItem(field, f"{field} must be at most {MAX_TEXT_BYTES} bytes, got {size}")
    return text


_NAMES = {str: "a string", int: "an integer", dict: "an object"}


def _kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return {**kinds, list: "an array", dict: "an object"}.get(
        type(value), "null" if value is None else type(value).__name__
    )
