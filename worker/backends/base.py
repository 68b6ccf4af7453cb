"""What a model backend provides, and the job it is given (API.md, "Backends
in tokencast workers").

A backend is a plain object: ``models()`` and ``generate(job)``, which
returns an async iterator (or iterable) of items: a ``str`` is answer text, a
dict is a line of the publish format (``{"type": "reasoning", "text": …}``,
``{"type": "tool_call", …}``, ``{"type": "event", …}``, and last, if it
wants to set the finish reason, ``{"type": "done", "finish_reason": …}``);
``services.items`` objects are taken as they are. An exception fails the job
(``services.errors.BackendError`` with its code, anything else
``backend_error``); cancelling the job cancels the iterator.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.jobs import JobSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    """One job, as a backend sees it.

    ``messages`` is always the conversation: a ``prompt`` job gives one user
    message. ``demo`` holds the ``demo`` model's options (empty for others).
    """

    id: str
    model: str
    prompt: str | None
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: int = 256
    temperature: float | None = None
    seed: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, job_id: str, spec: JobSpec) -> Job:
        messages = spec.messages or [{"role": "user", "content": spec.prompt}]
        return cls(
            id=job_id,
            model=spec.model,
            prompt=spec.prompt,
            messages=messages,
            tools=spec.tools,
            tool_choice=spec.tool_choice,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            seed=spec.seed,
            metadata=spec.metadata,
            demo=spec.demo,
        )


class Backend(Protocol):
    def models(self) -> list[str]:
        """The model names this backend serves."""
        ...

    def generate(self, job: Job) -> AsyncIterable[object]: ...


async def close_backends(backends: Iterable[Backend]) -> None:
    """Await ``aclose()`` once on each backend that has one (a backend serving
    several models is one object), so its connections close with the worker.
    A failing close is logged: the others still close."""
    unique = {id(backend): backend for backend in backends}
    for backend in unique.values():
        aclose = getattr(backend, "aclose", None)
        if aclose is None:
            continue
        try:
            await aclose()
        except Exception:
            log.exception("closing backend %r failed", backend)
