"""A job in OpenAI's chat-completion wire format (API.md, "OpenAI-compatible endpoint").

The mapping, for ``POST /v1/chat/completions`` and ``?format=openai`` alike:
``start`` → a chunk whose delta is ``{"role": "assistant", "content": ""}``;
``token`` → a chunk whose delta is ``{"content": …}``; ``reasoning`` → one
whose delta is ``{"reasoning_content": …}``; ``tool_call`` → one whose delta
is ``{"tool_calls": [{"index", …}]}``, with ``id``, ``type`` and
``function.name`` only on a call's first fragment, as OpenAI sends them (the
official client's accumulator concatenates every string it is sent again).
A merged event's chunk also carries top-level ``first_id``. ``done``
completed or cancelled → a chunk with an empty delta and ``finish_reason``,
the usage chunk when asked for, then ``data: [DONE]``; ``done`` failed → one
``{"error": …}`` object, and the stream ends. Custom events have no chunk.
Every chunk has its event's ``id:``; ``[DONE]`` has none. A keepalive is a
bare comment line: the official client fails on a blank line once it has
seen an ``id:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.events import DONE, FAILED, START, TOKEN, Event, dumps
from services.items import REASONING, TOOL_CALL
from services.jobs import JobHead, JobState
from web.models import InvalidField
from web.sse import COMMENT_KEEPALIVE_FRAME, Encoding

CHUNK = "chat.completion.chunk"
COMPLETION = "chat.completion"
DONE_FRAME = b"data: [DONE]\n\n"

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def include_usage_param(raw: str | None) -> bool:
    """``?include_usage=true`` on the events URL: the joiner's ``stream_options.include_usage``."""
    if raw in (None, "", "false"):
        return False
    if raw == "true":
        return True
    raise InvalidField("include_usage", "include_usage must be true or false")


def usage(tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    """Jobs do not count prompt tokens; completion tokens are the answer's and
    the reasoning's events, as OpenAI counts reasoning in completion tokens."""
    completion_tokens = tokens + reasoning_tokens
    return {
        "prompt_tokens": 0,
        "completion_tokens": completion_tokens,
        "total_tokens": completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def finish_reason(job_finish_reason: str | None) -> str:
    """``length`` and ``tool_calls`` stay; ``stop`` and ``cancelled`` are ``stop``."""
    return job_finish_reason if job_finish_reason in ("length", "tool_calls") else "stop"


def tool_call_delta(data: dict[str, Any]) -> dict[str, Any]:
    """One ``tool_call`` event's entry of ``delta.tool_calls``.

    Only the fragment that has the call's ``id`` (its first) says ``id``,
    ``type`` and ``name``; a later one is ``index`` and ``arguments`` alone.
    """
    if "id" in data:
        function = {"name": data["name"], "arguments": data["arguments"]}
        return {"index": data["index"], "id": data["id"], "type": "function", "function": function}
    return {"index": data["index"], "function": {"arguments": data["arguments"]}}


@dataclass(frozen=True)
class ChunkEncoder:
    """Encodes one job's events as OpenAI chunks, each frame once per node.

    Frames are cached on the event under a key per variant (with or without
    usage), so every viewer of the job on this node shares them.
    """

    job_id: str
    model: str
    created: int
    include_usage: bool = False

    @classmethod
    def for_job(cls, state: JobState | JobHead, include_usage: bool = False) -> ChunkEncoder:
        return cls(state.id, state.model, unix_seconds(state.created_at), include_usage)

    @property
    def cache_key(self) -> str:
        return "openai+usage" if self.include_usage else "openai"

    def encoding(self) -> Encoding:
        return Encoding(self.cache_key, self.frame, COMMENT_KEEPALIVE_FRAME)

    def frame(self, event: Event) -> bytes:
        frame = event.frames.get(self.cache_key)
        if frame is None:
            frame = self._encode(event)
            event.frames[self.cache_key] = frame
        return frame

    def _encode(self, event: Event) -> bytes:
        data = event.payload()
        if event.name == START:
            return _sse(event.id, self._chunk({"role": "assistant", "content": ""}))
        if event.name == TOKEN:
            return self._delta_frame(event.id, {"content": data["text"]}, data)
        if event.name == REASONING:
            return self._delta_frame(event.id, {"reasoning_content": data["text"]}, data)
        if event.name == TOOL_CALL:
            return self._delta_frame(event.id, {"tool_calls": [tool_call_delta(data)]}, data)
        if event.name == DONE:
            if data["status"] == FAILED:
                error = data.get("error") or {}
                failure = {
                    "message": error.get("message", "the job failed"),
                    "type": "server_error",
                    "code": error.get("code", "backend_error"),
                }
                return _sse(event.id, {"error": failure})
            frames = [_sse(event.id, self._chunk({}, finish_reason(data.get("finish_reason"))))]
            if self.include_usage:
                tokens = int(data["tokens"])
                reasoning_tokens = int(data.get("reasoning_tokens", 0))
                frames.append(_sse(event.id, self._usage_chunk(tokens, reasoning_tokens)))
            frames.append(DONE_FRAME)
            return b"".join(frames)
        return b""  # an event this format has no chunk for

    def _delta_frame(self, event_id: int, delta: dict[str, Any], data: dict[str, Any]) -> bytes:
        chunk = self._chunk(delta)
        if "first_id" in data:  # a merged event
            chunk["first_id"] = data["first_id"]
        return _sse(event_id, chunk)

    def _head(self) -> dict[str, Any]:
        return {
            "id": completion_id(self.job_id),
            "object": CHUNK,
            "created": self.created,
            "model": self.model,
        }

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        chunk = self._head()
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI does: only the last chunk has usage
        return chunk

    def _usage_chunk(self, tokens: int, reasoning_tokens: int) -> dict[str, Any]:
        chunk = self._head()
        chunk["choices"] = []
        chunk["usage"] = usage(tokens, reasoning_tokens)
        return chunk


def completion_body(state: JobState, reasoning_tokens: int = 0) -> dict[str, Any]:
    """The ``chat.completion`` object of a finished job (``reasoning_tokens``
    from its ``done``): ``reasoning_content`` when it reasoned, ``tool_calls``
    when it called tools, and then, as OpenAI does, ``content`` null if it
    wrote no text."""
    content = state.text if state.text or not state.tool_calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if state.reasoning:
        message["reasoning_content"] = state.reasoning
    if state.tool_calls:
        message["tool_calls"] = state.tool_calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": finish_reason(state.finish_reason),
    }
    return {
        "id": completion_id(state.id),
        "object": COMPLETION,
        "created": unix_seconds(state.created_at),
        "model": state.model,
        "choices": [choice],
        "usage": usage(state.tokens, reasoning_tokens),
    }


def completion_id(job_id: str) -> str:
    return f"chatcmpl-{job_id}"


def unix_seconds(iso: str) -> int:
    """``2026-11-24T10:00:00.000Z`` → seconds since the epoch."""
    return int(datetime.fromisoformat(iso).timestamp())


def _sse(event_id: int, body: dict[str, Any]) -> bytes:
    return f"id: {event_id}\ndata: {dumps(body)}\n\n".encode()
