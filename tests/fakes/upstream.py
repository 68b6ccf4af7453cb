"""A small OpenAI-compatible model server for tests, on 127.0.0.1, in a thread of its own.

It speaks HTTP/1.1 and OpenAI's streaming wire format byte for byte (chunked
transfer encoding, ``data: {…}`` blocks, ``data: [DONE]``), and behaves as
the requested model name says (``SCENARIOS``), so a test picks the upstream's
behaviour through ``TOKENCAST_UPSTREAM_MODELS``. Each request is recorded,
with the moment its client closed the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

# The answer of the ``ok`` model: multi-byte characters of 2, 3 and 4 bytes.
PIECES = ["Grüße", " aus", " 東京", " 🎉", "!", " Fin."]
TEXT = "".join(PIECES)
SPLIT_PIECE = " 東京"  # its chunk is written in two parts, cut inside "東"

# A tool, and what a chat product sends for its second turn: a system prompt,
# the question (as text parts), the model's call of the tool, and its result.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": [{"type": "text", "text": "How warm is it in Paris?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc", "content": "18C and sunny"},
]


# Reasoning models: what they think, then what they answer.
THOUGHT_PIECES = ["The user", " wants", " the weather", " in Paris."]
THOUGHT = "".join(THOUGHT_PIECES)
ANSWER_PIECES = ["Let me", " check."]
ANSWER = "".join(ANSWER_PIECES)

# Tool calls by index: (id, their arguments in the pieces they are streamed in).
CALLS = [("call_abc", ['{"', "city", '":"', "Paris", '"}']), ("call_def", ['{"city":', ' "東京"}'])]


@dataclass
class Request:
    """One request the server received."""

    headers: dict[str, str]
    body: dict[str, Any]
    closed: threading.Event = field(default_factory=threading.Event)
    closed_at: float | None = None


class Reply:
    """Writes one HTTP response, chunk by chunk."""

    def __init__(self, writer: asyncio.StreamWriter, body: dict[str, Any]):
        self.writer = writer
        self.model = body.get("model", "")
        self.max_tokens = body.get("max_tokens")

    async def start(self, status: int = 200, content_type: str = "text/event-stream") -> None:
        head = (
            f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n"
            "transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )
        self.writer.write(head.encode())
        await self.writer.drain()

    async def raw(self, data: bytes) -> None:
        self.writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await self.writer.drain()

    async def data(self, payload: str) -> None:
        await self.raw(f"data: {payload}\n\n".encode())

    async def chunk(self, delta: dict[str, Any], finish: str | None = None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        await self.data(json.dumps(self._head(choices=[choice]), ensure_ascii=False))

    async def usage(self, completion_tokens: int) -> None:
        usage = {"prompt_tokens": 7, "completion_tokens": completion_tokens, "total_tokens": 7}
        usage["total_tokens"] += completion_tokens
        await self.data(json.dumps(self._head(choices=[], usage=usage)))

    async def finish(self, completion_tokens: int) -> None:
        """The usage chunk, ``[DONE]``, and the end of the body."""
        await self.usage(completion_tokens)
        await self.data("[DONE]")
        await self.end()

    async def end(self) -> None:
        """The clean end of a chunked body."""
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    async def error(self, status: int, message: str) -> None:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        body = json.dumps({"error": error}).encode()
        await self.start(status, "application/json")
        await self.raw(body)
        await self.end()

    def _head(self, **fields: Any) -> dict[str, Any]:
        head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000}
        return {**head, "model": self.model, "system_fingerprint": None, **fields}


async def answer_ok(reply: Reply) -> None:
    """Role-only first chunk, an empty delta, split UTF-8, finish, usage, [DONE]."""
    await reply.start()
    await reply.chunk({"role": "assistant", "content": ""})
    await reply.chunk({})
    pieces = PIECES[: reply.max_tokens] if reply.max_tokens else PIECES
    for piece in pieces:
        if piece == SPLIT_PIECE:
            # One SSE block across two writes, cut in the middle of a character.
            choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            block = f"data: {json.dumps(reply._head(choices=[choice]), ensure_ascii=False)}\n\n"
            raw = block.encode()
            cut = raw.index("東".encode()) + 1
            await reply.raw(raw[:cut])
            await asyncio.sleep(0.02)
            await reply.raw(raw[cut:])
        else:
            await reply.chunk({"content": piece})
        await reply.chunk({"content": ""})
    await reply.chunk({}, "length" if len(pieces) < len(PIECES) else "stop")
    await reply.finish(len(pieces))


async def answer_slow(reply: Reply) -> None:
    """A token every 20 ms, up to a minute: for cancelling."""
    await reply.start()
    await reply.chunk({"role": "assistant", "content": ""})
    for index in range(3000):
        await reply.chunk({"content": f" t{index}"})
        await asyncio.sleep(0.02)
    await reply.chunk({}, "stop")
    await reply.data("[DONE]")
    await reply.end()


async def answer_mute(reply: Reply) -> None:
    """Accepts the request and never answers, not even the headers."""
    await asyncio.sleep(3600)


async def answer_silent(reply: Reply) -> None:
    """Sends the headers, then nothing."""
    await reply.start()
    await asyncio.sleep(3600)


async def answer_stall(reply: Reply) -> None:
    """Two tokens, then silence."""
    await reply.start()
    await reply.chunk({"role": "assistant", "content": ""})
    await reply.chunk({"content": "Hello"})
    await reply.chunk({"content": " there"})
    await asyncio.sleep(3600)


async def answer_bad_request(reply: Reply) -> None:
    await reply.error(400, "max_tokens is too large: this model supports at most 4096 tokens")


async def answer_unavailable(reply: Reply) -> None:
    await reply.error(503, "the model is loading, try again")


async def answer_malformed(reply: Reply) -> None:
    await reply.start()
    await reply.chunk({"role": "assistant", "content": ""})
    await reply.chunk({"content": "Hello"})
    await reply.data('{"choices": [{"delta": {"content": "unterminated')


async def answer_cut(reply: Reply) -> None:
    """Ends the body cleanly after a token: no finish_reason, no [DONE]."""
    await reply.start()
    await reply.chunk({"role": "assistant", "content": ""})
    await reply.chunk({"content": "Hello"})
    await reply.end()


async def answer_drop(reply: Reply) -> None:
    """Closes the connection in the middle of the body."""
    await reply.start()
    await reply.chunk({"role": "assistant", "content": ""})
    await reply.chunk({"content": "Hello"})
    reply.writer.transport.abort()


async def answer_error_midway(reply: Reply) -> None:
    await reply.start()
    await reply.chunk({"content": "Hello"})
    await reply.data(
        json.dumps({"error": {"message": "the GPU fell over", "type": "server_error"}})
    )
    await reply.data("[DONE]")
    await reply.end()


async def answer_reasoning(reply: Reply) -> None:
    """DeepSeek's and Qwen's shape: ``reasoning_content`` deltas (``content``
    null), then ``content`` deltas (``reasoning_content`` null)."""
    await reply.start()
    await reply.chunk({"role": "assistant", "content": None, "reasoning_content": ""})
    for piece in THOUGHT_PIECES:
        await reply.chunk({"content": None, "reasoning_content": piece})
    for piece in ANSWER_PIECES:
        await reply.chunk({"content": piece, "reasoning_content": None})
    await reply.chunk({"content": "", "reasoning_content": None}, "stop")
    await reply.finish(len(THOUGHT_PIECES) + len(ANSWER_PIECES))


async def answer_reasoning_field(reply: Reply) -> None:
    """vLLM's, Ollama's and OpenRouter's ``delta.reasoning``; the first piece also
    as ``reasoning_content``, as servers between the two names send: not twice."""
    await reply.start()
    await reply.chunk({"role": "assistant", "content": ""})
    first, *rest = THOUGHT_PIECES
    await reply.chunk({"reasoning": first, "reasoning_content": first})
    for piece in rest:
        await reply.chunk({"reasoning": piece})
    for piece in ANSWER_PIECES:
        await reply.chunk({"content": piece})
    await reply.chunk({}, "stop")
    await reply.finish(len(THOUGHT_PIECES) + len(ANSWER_PIECES))


async def stream_call(reply: Reply, index: int, repeat: bool = False) -> None:
    """Call ``index`` of ``CALLS`` as OpenAI streams it: ``index``, ``id``,
    ``type`` and ``name`` with empty ``arguments`` first, then ``index`` and an
    ``arguments`` piece per delta. ``repeat``: as servers that send ``id``,
    ``type`` and ``name`` again in every fragment."""
    call_id, pieces = CALLS[index]
    head, name = {"index": index, "id": call_id, "type": "function"}, "get_weather"
    await reply.chunk({"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]})
    for piece in pieces:
        call: dict[str, Any] = {"index": index, "function": {"arguments": piece}}
        if repeat:
            call = {**head, "function": {"name": name, "arguments": piece}}
        await reply.chunk({"tool_calls": [call]})


async def answer_tool_call(reply: Reply) -> None:
    """Reasoning, a sentence, then one call split over many deltas; ``tool_calls``."""
    await reply.start()
    await reply.chunk({"role": "assistant", "content": None, "refusal": None})
    for piece in THOUGHT_PIECES:
        await reply.chunk({"reasoning_content": piece})
    for piece in ANSWER_PIECES:
        await reply.chunk({"content": piece})
    await stream_call(reply, 0)
    await reply.chunk({}, "tool_calls")
    await reply.finish(len(THOUGHT_PIECES) + len(ANSWER_PIECES) + 5)


async def answer_parallel_calls(reply: Reply, repeat: bool = False) -> None:
    """Two calls in parallel (index 0, then 1), no text: ``content`` stays null."""
    await reply.start()
    await reply.chunk({"role": "assistant", "content": None, "refusal": None})
    for index in range(len(CALLS)):
        await stream_call(reply, index, repeat)
    await reply.chunk({}, "tool_calls")
    await reply.finish(12)


SCENARIOS: dict[str, Callable[[Reply], Awaitable[None]]] = {
    "ok": answer_ok,
    "slow": answer_slow,
    "mute": answer_mute,
    "silent": answer_silent,
    "stall": answer_stall,
    "bad-request": answer_bad_request,
    "unavailable": answer_unavailable,
    "malformed": answer_malformed,
    "cut": answer_cut,
    "drop": answer_drop,
    "error-midway": answer_error_midway,
    "reasoning": answer_reasoning,
    "reasoning-field": answer_reasoning_field,
    "tool-call": answer_tool_call,
    "parallel-calls": answer_parallel_calls,
    "repeating-calls": functools.partial(answer_parallel_calls, repeat=True),
}


class FakeUpstream:
    """The server. ``flaky`` fails that many requests with 503 before behaving."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.flaky = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstream:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def requests_for(self, model: str) -> list[Request]:
        return [request for request in self.requests if request.body.get("model") == model]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request: Request | None = None
        try:
            request = await self._read_request(reader)
            if request is None:
                return
            self.requests.append(request)
            watcher = asyncio.create_task(self._watch_close(reader, request))
            reply = Reply(writer, request.body)
            if self.flaky > 0:
                self.flaky -= 1
                await reply.error(503, "warming up")
            else:
                await SCENARIOS[request.body["model"]](reply)
            watcher.cancel()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if request is not None and not request.closed.is_set():
                self._mark_closed(request)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        if not await reader.readline():  # the request line
            return None
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Request(headers, json.loads(body))

    async def _watch_close(self, reader: asyncio.StreamReader, request: Request) -> None:
        # The client sends nothing after its request: end of input means it hung up.
        with contextlib.suppress(ConnectionError):
            await reader.read()
        self._mark_closed(request)

    @staticmethod
    def _mark_closed(request: Request) -> None:
        request.closed_at = time.monotonic()
        request.closed.set()
