"""A job in OpenAI's chat-completion wire format (API.md, "OpenAI-compatible endpoint").

The mapping, for ``POST /v1/chat/completions`` and ``?format=openai`` alike:
``start`` → a chunk whose delta is ``{"role": "assistant", "content": ""}``;
``token`` → a chunk whose delta is ``{"content": …}`` (a merged one also
carries top-level ``first_id``); ``done`` completed or cancelled → a chunk
with an empty delta and ``finish_reason``, the usage chunk when asked for,
then ``data: [DONE]``; ``done`` failed → one ``{"error": …}`` object, and the
stream ends. Every chunk has its event's ``id:``; ``[DONE]`` has none. A
keepalive is a bare comment line: the official client fails on a blank line
once it has seen an ``id:``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.events import DONE, FAILED, START, TOKEN, Event, dumps
from services.jobs import JobState
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


def usage(completion_tokens: int) -> dict[str, int]:
    # Jobs do not count prompt tokens; completion tokens are the job's token events.
    return {
        "prompt_tokens": 0,
        "completion_tokens": completion_tokens,
        "total_tokens": completion_tokens,
    }


def finish_reason(job_finish_reason: str | None) -> str:
    """``length`` stays ``length``; ``stop`` and ``cancelled`` are ``stop``."""
    return "length" if job_finish_reason == "length" else "stop"


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
    def for_job(cls, state: JobState, include_usage: bool = False) -> ChunkEncoder:
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
            chunk = self._chunk({"content": data["text"]})
            if "first_id" in data:
                chunk["first_id"] = data["first_id"]
            return _sse(event.id, chunk)
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
                frames.append(_sse(event.id, self._usage_chunk(int(data["tokens"]))))
            frames.append(DONE_FRAME)
            return b"".join(frames)
        return b""  # an event this format has no chunk for

    def _head(self) -> dict[str, Any]:
        return {
            "id": completion_id(self.job_id),
            "object": CHUNK,
            "created": self.created,
            "model": self.model,
        }

    def _chunk(self, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        chunk = self._head()
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI does: only the last chunk has usage
        return chunk

    def _usage_chunk(self, tokens: int) -> dict[str, Any]:
        chunk = self._head()
        chunk["choices"] = []
        chunk["usage"] = usage(tokens)
        return chunk


def completion_body(state: JobState) -> dict[str, Any]:
    """The ``chat.completion`` object of a finished job."""
    message = {"role": "assistant", "content": state.text, "refusal": None}
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
        "usage": usage(state.tokens),
    }


def completion_id(job_id: str) -> str:
    return f"chatcmpl-{job_id}"


def unix_seconds(iso: str) -> int:
    """``2026-11-24T10:00:00.000Z`` → seconds since the epoch."""
    return int(datetime.fromisoformat(iso).timestamp())


def _sse(event_id: int, body: dict[str, Any]) -> bytes:
    return f"id: {event_id}\ndata: {dumps(body)}\n\n".encode()
