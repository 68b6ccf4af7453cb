"""The ``openai`` backend: generate from any OpenAI-compatible model server.

A job streams ``POST <TOKENCAST_UPSTREAM_BASE_URL>/chat/completions`` through
the official ``openai`` client, with the job's messages, tools and tool
choice as the client sent them (a prompt is one user message), and the model
name mapped by ``TOKENCAST_UPSTREAM_MODELS``. ``max_tokens`` goes as
``max_completion_tokens`` to OpenAI's own API (its reasoning models refuse
``max_tokens``), as ``max_tokens`` to every other server (the field they all
know).

A generation yields ``services.items`` items, as the worker's log takes them:
each non-empty ``delta.content`` is answer text (a ``str``); each non-empty
``delta.reasoning_content``, or ``delta.reasoning`` when a server names it so
(current vLLM, Ollama, OpenRouter), is ``Text("reasoning", …)``; each
``delta.tool_calls`` entry is a ``ToolCallFragment``, with ``id`` and
``name`` on the first fragment of its index only, whatever the upstream
repeats. Last comes ``Finish`` with the upstream's ``finish_reason``
(``length`` and ``tool_calls`` stay, any other reason is ``stop``).

Every failure raises ``BackendError`` with a message that says what the
upstream did, and ends the job:

- ``upstream_timeout``: nothing within ``upstream_first_token_timeout_s`` of
  the request (retries included), or silence for ``upstream_idle_timeout_s``
  once the upstream has started answering;
- ``backend_error``: the server cannot be reached, answers an HTTP error
  (its own message is quoted), sends a malformed chunk or an error mid-answer,
  or ends the stream before its ``finish_reason``.

Only opening the stream is retried (connection failures, 408, 409, 429, 5xx),
with backoff: once the upstream is answering, a retry could repeat text.
Cancelling the task that iterates a generation (the worker does, on
``DELETE``) closes the upstream request: the generator's ``finally`` runs
at once if it was waiting on the upstream, or as soon as asyncio finalizes it
if it sat at a ``yield``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit

import openai

from services import metrics
from services.config import Settings
from services.errors import BackendError
from services.items import (
    REASONING,
    TOOL_CALL,
    Finish,
    InvalidItem,
    Text,
    ToolCallFragment,
    parse_item,
)
from services.retry import Backoff
from worker.backends.base import Job

ATTEMPTS = 3
BACKOFF_S = 0.25  # then doubled per attempt
CONNECT_TIMEOUT_S = 10.0
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
QUOTE_CHARS = 300  # of an upstream message or a malformed chunk

TIMEOUT = "upstream_timeout"
KEPT_FINISH_REASONS = ("length", "tool_calls")  # any other is "stop"

# What a generation yields: answer text, reasoning, tool-call fragments, then Finish.
Produced = str | Text | ToolCallFragment | Finish

# Hosts of OpenAI's own API, whose reasoning models take only max_completion_tokens.
OPENAI_HOSTS = ("api.openai.com", ".openai.azure.com")


def token_limit_field(base_url: str) -> str:
    """The request field that bounds the answer: what the server's models need."""
    host = urlsplit(base_url).hostname or ""
    openai_host = host == OPENAI_HOSTS[0] or host.endswith(OPENAI_HOSTS[1])
    return "max_completion_tokens" if openai_host else "max_tokens"


class OpenAIBackend:
    """Serves the models of ``TOKENCAST_UPSTREAM_MODELS`` from the upstream server."""

    def __init__(self, settings: Settings):
        if not settings.upstream_base_url:
            raise ValueError("the openai backend needs TOKENCAST_UPSTREAM_BASE_URL")
        self.settings = settings
        self.base_url = settings.upstream_base_url
        self.token_limit_field = token_limit_field(self.base_url)
        self.upstream_names = {
            name: upstream for name, upstream in settings.upstream_models if name != "demo"
        }
        # Our own deadlines bound each read; the client's would cut slow prompts short.
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url,
            # Local servers (vLLM, Ollama) take any key; the client insists on one.
            api_key=settings.upstream_api_key or "unused",
            max_retries=0,
            timeout=openai.Timeout(None, connect=CONNECT_TIMEOUT_S),
        )

    def models(self) -> list[str]:
        return list(self.upstream_names)

    def generate(self, job: Job) -> UpstreamGeneration:
        request: dict[str, Any] = {
            "model": self.upstream_names[job.model],
            "messages": job.messages,
            self.token_limit_field: job.max_tokens,
            "stream": True,
        }
        if job.tools is not None:
            request["tools"] = job.tools
        if job.tool_choice is not None:
            request["tool_choice"] = job.tool_choice
        if job.temperature is not None:
            request["temperature"] = job.temperature
        if job.seed is not None:
            request["seed"] = job.seed
        return UpstreamGeneration(self, request)

    async def aclose(self) -> None:
        await self.client.close()


class UpstreamGeneration:
    """One upstream chat completion, iterated as items (``Produced``), ``Finish`` last."""

    def __init__(self, backend: OpenAIBackend, request: dict[str, Any]):
        self.backend = backend
        self.request = request
        self.where = f"the upstream model server at {backend.base_url}"
        self._finish: Finish | None = None
        self._calls: set[int] = set()  # the indexes whose first fragment was yielded

    async def __aiter__(self) -> AsyncIterator[Produced]:
        settings = self.backend.settings
        loop = asyncio.get_running_loop()
        requested_at: float | None = loop.time()
        deadline = loop.time() + settings.upstream_first_token_timeout_s
        stream = await self._open(deadline)
        try:
            first = True
            while self._finish is None:
                try:
                    if first:
                        async with asyncio.timeout_at(deadline):
                            chunk = await self._next(stream)
                    else:
                        async with asyncio.timeout(settings.upstream_idle_timeout_s):
                            chunk = await self._next(stream)
                except TimeoutError:
                    raise self._timeout(first) from None
                if chunk is None:
                    raise BackendError(
                        f"{self.where} ended the stream before the answer was finished"
                        " (no finish_reason)"
                    )
                first = False
                for item in self._items(chunk):
                    if requested_at is not None:
                        metrics.UPSTREAM_FIRST_TOKEN.observe(loop.time() - requested_at)
                        requested_at = None
                    yield item
            await self._drain(stream)
        finally:
            await stream.close()
        yield self._finish

    async def _open(self, deadline: float) -> openai.AsyncStream:
        """The upstream stream, retried with backoff while it fails to open."""
        failure = ""
        attempt = 0
        backoff = Backoff(BACKOFF_S, math.inf)
        while True:
            attempt += 1
            try:
                async with asyncio.timeout_at(deadline):
                    stream: openai.AsyncStream = await self.backend.client.chat.completions.create(
                        **self.request
                    )
                    return stream
            except TimeoutError:
                raise self._timeout(True, failure) from None
            except openai.APIStatusError as exc:
                failure = f"{self.where} answered HTTP {exc.status_code}: {_upstream_message(exc)}"
                if exc.status_code not in RETRY_STATUSES:
                    raise BackendError(failure) from exc
            except openai.APIConnectionError as exc:
                failure = f"could not connect to {self.where}: {_root_cause(exc)}"
            if attempt == ATTEMPTS or asyncio.get_running_loop().time() + backoff.delay >= deadline:
                raise BackendError(f"{failure} (tried {attempt} times)")
            await backoff.wait()

    async def _next(self, stream: openai.AsyncStream) -> Any:
        """The next chunk, ``None`` at the end of the stream."""
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None
        except json.JSONDecodeError as exc:
            raise self._malformed(exc.doc) from None
        except openai.APIConnectionError as exc:
            raise BackendError(
                f"the connection to {self.where} broke mid-answer: {_root_cause(exc)}"
            ) from exc
        except openai.APIError as exc:
            raise BackendError(f"{self.where} reported an error mid-answer: {exc.message}") from exc

    async def _drain(self, stream: openai.AsyncStream) -> None:
        # The answer is whole at finish_reason; reading on to [DONE] (past the
        # usage chunk) lets the client reuse the connection for the next job.
        with contextlib.suppress(BackendError, TimeoutError):
            async with asyncio.timeout(self.backend.settings.upstream_idle_timeout_s):
                while await self._next(stream) is not None:
                    pass

    def _items(self, chunk: Any) -> list[Produced]:
        """What the chunk's first choice adds; records its finish_reason."""
        choices = getattr(chunk, "choices", None)
        if not isinstance(choices, list):
            raise self._malformed(_dump(chunk))
        items: list[Produced] = []
        for choice in choices[:1]:
            delta = getattr(choice, "delta", None)
            if delta is not None:
                reasoning = self._text(chunk, delta, "reasoning_content")
                reasoning = reasoning or self._text(chunk, delta, "reasoning")
                if reasoning:
                    items.append(Text(REASONING, reasoning))
                content = self._text(chunk, delta, "content")
                if content:
                    items.append(content)
                items.extend(self._fragments(chunk, getattr(delta, "tool_calls", None) or []))
            reason = getattr(choice, "finish_reason", None)
            if reason:
                self._finish = Finish(reason if reason in KEPT_FINISH_REASONS else "stop")
        return items

    def _text(self, chunk: Any, delta: Any, field: str) -> str | None:
        text = getattr(delta, field, None)
        if text is not None and not isinstance(text, str):
            raise self._malformed(_dump(chunk))
        return text

    def _fragments(self, chunk: Any, calls: Any) -> list[ToolCallFragment]:
        """The tool-call fragments of one delta: ``id`` and ``name`` only on the
        first of an index (servers that repeat them would double them for a
        client that concatenates), and no empty later fragment."""
        if not isinstance(calls, list):
            raise self._malformed(_dump(chunk))
        fragments = []
        for call in calls:
            index = getattr(call, "index", None)
            function = getattr(call, "function", None)
            fragment: dict[str, Any] = {"type": TOOL_CALL, "index": index}
            fragment["arguments"] = getattr(function, "arguments", None) or ""
            if index not in self._calls:
                # A call needs an id to be answered; not every server sends one.
                fragment["id"] = getattr(call, "id", None) or f"call_{secrets.token_hex(12)}"
                fragment["name"] = getattr(function, "name", None)
                if fragment["name"] is None:
                    raise self._malformed(_dump(chunk), "a tool call's first fragment has no name")
            elif not fragment["arguments"]:
                continue
            try:  # the publish format's checks: index, id and name as the log takes them
                parsed = cast(ToolCallFragment, parse_item(fragment))
            except InvalidItem as exc:
                raise self._malformed(_dump(chunk), exc.message) from None
            self._calls.add(parsed.index)
            fragments.append(parsed)
        return fragments

    def _timeout(self, first: bool, failure: str = "") -> BackendError:
        settings = self.backend.settings
        if first:
            message = (
                f"{self.where} sent nothing within"
                f" {settings.upstream_first_token_timeout_s:g} s of the request"
                " (TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS)"
            )
            if failure:
                message += f"; before that, {failure}"
        else:
            message = (
                f"{self.where} stopped sending for {settings.upstream_idle_timeout_s:g} s"
                " in the middle of the answer (TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS)"
            )
        return BackendError(message, code=TIMEOUT)

    def _malformed(self, raw: str, why: str = "") -> BackendError:
        because = f" ({why})" if why else ""
        return BackendError(f"{self.where} sent a malformed chunk{because}: {_quote(raw)}")


def _upstream_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return _quote(body["message"])
    if isinstance(body, str) and body.strip():
        return _quote(body)
    return "no message"


def _root_cause(exc: BaseException) -> str:
    """The innermost reason, e.g. ``connection refused``."""
    for _ in range(20):  # a chain is short; the bound only guards against a cycle
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _dump(chunk: Any) -> str:
    to_json = getattr(chunk, "to_json", None)
    return to_json(indent=None) if callable(to_json) else repr(chunk)


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "…"
