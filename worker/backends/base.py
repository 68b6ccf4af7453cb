"""What a model backend provides."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from services.jobs import JobSpec


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
