"""Backends from ``TOKENCAST_BACKENDS``: loading them, and the seam they run behind.

A backend is other people's code: a plain object with ``models()`` and
``generate(job)``, importing nothing from tokencast (README, "Writing a
backend"). ``load_backends`` imports each ``module:attribute`` reference and
checks it once, at start-up; a reference that cannot serve stops the worker
with a ``BackendLoadError`` naming it and the reason. ``PluginBackend``
then checks everything the backend yields, as it yields it: every item goes
through ``services.items.parse_item``, so a bad one fails the job with
``backend_error`` naming the backend and the item, and so does an exception
raised in it (with its message). Cancelling the job closes the backend's
iterator, so its ``finally`` runs.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any

from services.errors import BackendError, SettingsError
from services.items import Failure, Finish, InvalidItem, Item, ToolCallFragment, parse_item

VARIABLE = "TOKENCAST_BACKENDS"
MAX_MODEL_NAME = 200  # POST /v1/jobs takes model names of at most this length
OWN_PACKAGES = ("services", "web", "worker")  # tokencast's top-level packages
SHOWN_ITEM_CHARS = 200


class BackendLoadError(SettingsError):
    """A ``TOKENCAST_BACKENDS`` reference cannot serve; the message names it and why."""

    def __init__(self, reference: str, reason: str):
        super().__init__(f"{VARIABLE}: cannot load {reference!r}: {reason}")
        self.reference = reference
        self.reason = reason


class PluginBackend:
    """One loaded backend, behind the checks of the seam.

    ``generate(job)`` yields ``services.items`` items, ending with one
    ``Finish`` (``tool_calls`` when the backend called a tool and set no
    reason, else ``stop``) or one ``Failure``; it raises ``BackendError`` for
    a bad item or an exception in the backend.
    """

    def __init__(self, reference: str, backend: Any, models: list[str]):
        self.reference = reference
        self.backend = backend
        self._models = models

    def models(self) -> list[str]:
        return list(self._models)

    def generate(self, job: Any) -> AsyncIterator[Item]:
        return self._items(job)

    async def _items(self, job: Any) -> AsyncIterator[Item]:
        produced = self._start(job)
        called_a_tool = False
        try:
            while True:
                try:
                    value = await produced.__anext__()
                except StopAsyncIteration:
                    break
                except BackendError:
                    raise
                except Exception as exc:
                    raise BackendError(str(exc) or type(exc).__name__) from exc
                item = self._checked(value)
                yield item
                if isinstance(item, Finish | Failure):
                    return
                called_a_tool = called_a_tool or isinstance(item, ToolCallFragment)
            yield Finish("tool_calls" if called_a_tool else "stop")
        finally:
            await _close(produced)

    def _start(self, job: Any) -> Any:
        try:
            produced = self.backend.generate(job)
        except Exception as exc:
            raise BackendError(str(exc) or type(exc).__name__) from exc
        if not hasattr(produced, "__anext__"):
            if inspect.iscoroutine(produced):
                produced.close()  # never awaited: say why instead of warning later
            raise BackendError(
                f"backend {self.reference}: generate() returned {type(produced).__name__},"
                " not an async iterator (an async def with yield in it makes one)"
            )
        return produced

    def _checked(self, value: object) -> Item:
        try:
            return parse_item(value)
        except InvalidItem as exc:
            shown = repr(value)
            if len(shown) > SHOWN_ITEM_CHARS:
                shown = shown[:SHOWN_ITEM_CHARS] + "…"
            raise BackendError(
                f"backend {self.reference} yielded a bad item {shown}: {exc.message}"
            ) from None


async def _close(produced: Any) -> None:
    """Close the backend's iterator (its ``finally`` runs), whatever it raises."""
    aclose = getattr(produced, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # the job's outcome is decided; its cleanup cannot change it
            pass


def load_backends(references: Iterable[str], served: Mapping[str, str]) -> list[PluginBackend]:
    """Load each ``module:attribute`` reference, in order.

    ``served`` maps each model name already served to what serves it; a
    backend may not take one of them, nor one of an earlier reference.
    Raises ``BackendLoadError`` for the first reference that cannot serve.
    """
    taken = dict(served)
    loaded = []
    for reference in references:
        backend = load_backend(reference)
        for name in backend.models():
            if name in taken:
                raise BackendLoadError(
                    reference, f"model {name!r} is already served by {taken[name]}"
                )
            taken[name] = f"the backend {reference}"
        loaded.append(backend)
    return loaded


def load_backend(reference: str) -> PluginBackend:
    """Import, build and check one backend; raises ``BackendLoadError``."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise BackendLoadError(reference, "a reference is module:attribute, e.g. mybackend:backend")
    module = _import(reference, module_name.strip())
    found: Any = module
    for part in attribute.strip().split("."):
        if not hasattr(found, part):
            raise BackendLoadError(
                reference, f"module {module_name!r} has no attribute {attribute!r}"
            )
        found = getattr(found, part)
    backend = _built(reference, attribute, found)
    for method in ("models", "generate"):
        if not callable(getattr(backend, method, None)):
            raise BackendLoadError(reference, f"{attribute} has no {method}() method")
    return PluginBackend(reference, backend, _models(reference, backend))


def _import(reference: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        clash = _shadowed_package(exc)
        if clash:
            raise BackendLoadError(reference, clash) from None
        hint = " (is it on the worker's PYTHONPATH?)" if exc.name == module_name else ""
        raise BackendLoadError(
            reference, f"cannot import {module_name!r}: {type(exc).__name__}: {exc}{hint}"
        ) from None
    except Exception as exc:
        raise BackendLoadError(
            reference, f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from None


def _shadowed_package(exc: ImportError) -> str | None:
    """Why an import failed when the backend's project has its own top-level
    package named like one of tokencast's: one process holds one module of a
    name, and the worker imported its own first."""
    missing = exc.name or ""
    top = missing.partition(".")[0]
    if top not in OWN_PACKAGES or missing == top:
        return None
    own = Path(sys.modules[top].__file__ or "").parent if top in sys.modules else None
    for entry in sys.path:
        candidate = Path(entry or ".").resolve() / top
        if candidate.is_dir() and candidate != own:
            return (
                f"it imports {missing}, from its project's own {top!r} package"
                f" ({candidate}); in a worker {top!r} is tokencast's package, and"
                " one process cannot import two packages of one name: rename yours"
                " or put it inside a package of your own (README, Writing a backend)"
            )
    return None


def _built(reference: str, attribute: str, found: Any) -> Any:
    """The backend object: ``found`` itself, or what calling it returns."""
    is_object = not inspect.isclass(found) and hasattr(found, "models")
    if is_object or not callable(found):
        return found
    try:
        return found()
    except Exception as exc:
        raise BackendLoadError(
            reference, f"calling {attribute}() raised {type(exc).__name__}: {exc}"
        ) from None


def _models(reference: str, backend: Any) -> list[str]:
    try:
        names = backend.models()
    except Exception as exc:
        raise BackendLoadError(reference, f"models() raised {type(exc).__name__}: {exc}") from None
    valid = isinstance(names, list | tuple) and all(
        isinstance(name, str) and 1 <= len(name) <= MAX_MODEL_NAME and name.strip() == name
        for name in names
    )
    if not valid or not names:
        raise BackendLoadError(
            reference,
            "models() must return a non-empty list of model names (strings of 1 to"
            f" {MAX_MODEL_NAME} characters, no surrounding spaces), got {names!r:.200}",
        )
    return list(names)
