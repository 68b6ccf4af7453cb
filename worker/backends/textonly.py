"""A plugin backend behind today's text-only ``Generation`` protocol.

Until the pump writes every kind of item, a ``PluginBackend``'s items reach
the log as this: answer text as tokens, ``Finish`` as the finish reason, a
``Failure`` as ``BackendError``; reasoning, tool calls and custom events are
left out. The backend gets its ``job`` as API.md describes it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from services.errors import BackendError
from services.items import TOKEN, Failure, Finish, Text
from services.jobs import JobSpec
from services.logs import current_ids
from worker.backends.plugin import PluginBackend


@dataclass(frozen=True)
class PluginJob:
    """What a backend's ``generate(job)`` is given (API.md, "Backends in tokencast workers")."""

    id: str | None
    model: str
    prompt: str | None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tool_choice: str | dict[str, Any] | None
    max_tokens: int
    temperature: float | None
    seed: int | None
    metadata: dict[str, str]


def plugin_job(spec: JobSpec) -> PluginJob:
    _request_id, job_id = current_ids()  # the runner names the job its task runs
    messages = spec.messages or [{"role": "user", "content": spec.prompt or ""}]
    return PluginJob(
        job_id,
        spec.model,
        spec.prompt,
        messages,
        spec.tools,
        spec.tool_choice,
        spec.max_tokens,
        spec.temperature,
        spec.seed,
        dict(spec.metadata),
    )


class TextGeneration:
    def __init__(self, backend: PluginBackend, spec: JobSpec):
        self.items = backend.generate(plugin_job(spec))
        self.finish_reason = "stop"

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for item in self.items:
                if isinstance(item, Text) and item.kind == TOKEN:
                    yield item.text
                elif isinstance(item, Finish):
                    self.finish_reason = item.finish_reason
                elif isinstance(item, Failure):
                    raise BackendError(item.message, item.code)
        finally:
            await self.items.aclose()  # type: ignore[attr-defined]


class TextOnly:
    """``backend`` as the worker's ``Backend`` protocol of today."""

    def __init__(self, backend: PluginBackend):
        self.backend = backend

    def models(self) -> list[str]:
        return self.backend.models()

    def generate(self, spec: JobSpec) -> TextGeneration:
        return TextGeneration(self.backend, spec)
