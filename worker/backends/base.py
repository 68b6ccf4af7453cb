"""What a model backend provides."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from services.jobs import JobSpec

log = logging.getLogger(__name__)


class Generation(Protocol):
    """One running generation: iterate it for token texts.

    ``finish_reason`` (``stop`` or ``length``) is valid once iteration ends.
    Iteration raises ``services.errors.BackendError`` when the model fails.
    """

    finish_reason: str

    def __aiter__(self) -> AsyncIterator[str]: ...


class Backend(Protocol):
    def models(self) -> list[str]:
        """The model names this backend serves."""
        ...

    def generate(self, spec: JobSpec) -> Generation: ...


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
