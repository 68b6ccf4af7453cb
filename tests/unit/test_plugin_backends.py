"""Loading ``TOKENCAST_BACKENDS`` references, and the checks at the seam."""

from __future__ import annotations

import asyncio
import textwrap
from types import SimpleNamespace

import pytest

from services.errors import BackendError
from services.items import REASONING, TOKEN, CustomEvent, Failure, Finish, Text, ToolCallFragment
from worker.backends.plugin import BackendLoadError, PluginBackend, load_backend, load_backends

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A directory on ``sys.path``; ``write(name, source)`` adds a module to it."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))

    return write


GOOD = """
    class Backend:
        def models(self):
            return ["m1", "m2"]

        async def generate(self, job):
            yield "hi"

    backend = Backend()

    def make():
        return Backend()
"""


@pytest.mark.parametrize("attribute", ["backend", "Backend", "make"])
def test_an_object_a_class_or_a_function_loads(project, attribute):
    project(f"good_{attribute.lower()}", GOOD)
    loaded = load_backend(f"good_{attribute.lower()}:{attribute}")
    assert loaded.models() == ["m1", "m2"]
    assert loaded.reference == f"good_{attribute.lower()}:{attribute}"


@pytest.mark.parametrize(
    ("reference", "source", "reason"),
    [
        ("justamodule", "", "a reference is module:attribute, e.g. mybackend:backend"),
        (
            "missing_mod:backend",
            None,
            "cannot import 'missing_mod': ModuleNotFoundError: No module named 'missing_mod'"
            " (is it on the worker's PYTHONPATH?)",
        ),
        (
            "broken_mod:backend",
            "import nothing_of_that_name\n",
            "cannot import 'broken_mod': ModuleNotFoundError: No module named"
            " 'nothing_of_that_name'",
        ),
        (
            "raising_mod:backend",
            "raise RuntimeError('no config')\n",
            "importing 'raising_mod' raised RuntimeError: no config",
        ),
        ("no_attr:backend", "x = 1\n", "module 'no_attr' has no attribute 'backend'"),
        (
            "no_generate:backend",
            "class B:\n    def models(self):\n        return ['x']\nbackend = B()\n",
            "backend has no generate() method",
        ),
        (
            "no_models:Backend",
            "class Backend:\n    async def generate(self, job):\n        yield 'x'\n",
            "Backend has no models() method",
        ),
        (
            "bad_init:Backend",
            "class Backend:\n    def __init__(self):\n        raise ValueError('needs a key')\n",
            "calling Backend() raised ValueError: needs a key",
        ),
        (
            "bad_models:backend",
            "class B:\n    def models(self):\n        return 'x'\n"
            "    def generate(self, job):\n        pass\nbackend = B()\n",
            "models() must return a non-empty list of model names (strings of 1 to 200"
            " characters, no surrounding spaces), got 'x'",
        ),
        (
            "empty_models:backend",
            "class B:\n    def models(self):\n        return []\n"
            "    def generate(self, job):\n        pass\nbackend = B()\n",
            "models() must return a non-empty list of model names (strings of 1 to 200"
            " characters, no surrounding spaces), got []",
        ),
        (
            "raising_models:backend",
            "class B:\n    def models(self):\n        raise KeyError('m')\n"
            "    def generate(self, job):\n        pass\nbackend = B()\n",
            "models() raised KeyError: 'm'",
        ),
    ],
)
def test_a_reference_that_cannot_serve_names_itself_and_the_reason(
    project, reference, source, reason
):
    if source is not None:
        project(reference.partition(":")[0], source)
    with pytest.raises(BackendLoadError) as info:
        load_backend(reference)
    assert str(info.value) == f"TOKENCAST_BACKENDS: cannot load {reference!r}: {reason}"


def test_a_model_already_served_stops_the_load(project):
    project("twice", GOOD)
    with pytest.raises(BackendLoadError) as info:
        load_backends(["twice:backend"], {"m2": "the demo backend"})
    assert str(info.value) == (
        "TOKENCAST_BACKENDS: cannot load 'twice:backend': model 'm2' is already served by"
        " the demo backend"
    )
    with pytest.raises(BackendLoadError) as info:
        load_backends(["twice:backend", "twice:make"], {})
    assert info.value.reason == "model 'm1' is already served by the backend twice:backend"


def plugin(generate) -> PluginBackend:
    return PluginBackend("mine:backend", SimpleNamespace(generate=generate), ["mine"])


async def collect(backend: PluginBackend) -> list:
    return [item async for item in backend.generate(SimpleNamespace(id="j"))]


async def test_items_come_out_typed_and_end_with_a_finish():
    async def generate(job):
        yield {"type": "reasoning", "text": "hm"}
        yield "Hel"
        yield {"type": "tool_call", "index": 0, "id": "c1", "name": "f", "arguments": "{}"}
        yield {"type": "event", "name": "note", "data": {"job": job.id}}

    assert await collect(plugin(generate)) == [
        Text(REASONING, "hm"),
        Text(TOKEN, "Hel"),
        ToolCallFragment(0, "{}", "c1", "f"),
        CustomEvent("note", {"job": "j"}),
        Finish("tool_calls"),  # it called a tool and set no reason
    ]


async def test_a_done_or_error_item_ends_the_generation_and_closes_it():
    closed = []

    async def generate(job):
        try:
            yield "a"
            yield {"type": "done", "finish_reason": "length"}
            yield "never read"
        finally:
            closed.append(True)

    assert await collect(plugin(generate)) == [Text(TOKEN, "a"), Finish("length")]
    assert closed == [True]

    async def failing(job):
        yield {"type": "error", "code": "search_down", "message": "the search tool timed out"}

    assert await collect(plugin(failing)) == [Failure("search_down", "the search tool timed out")]


async def test_a_bad_item_fails_naming_the_backend_and_the_item():
    async def generate(job):
        yield "fine"
        yield {"type": "tokn", "text": "x"}

    with pytest.raises(BackendError) as info:
        await collect(plugin(generate))
    assert info.value.code == "backend_error"
    assert info.value.message == (
        "backend mine:backend yielded a bad item {'type': 'tokn', 'text': 'x'}: type must be"
        " one of: token, reasoning, tool_call, event, done, error; got 'tokn'"
    )

    async def not_text(job):
        yield 42

    with pytest.raises(BackendError, match=r"yielded a bad item 42: an item must be a string"):
        await collect(plugin(not_text))


async def test_an_exception_fails_with_its_message():
    async def generate(job):
        yield "partial"
        raise RuntimeError("the model fell over")

    items = []
    with pytest.raises(BackendError) as info:
        async for item in plugin(generate).generate(None):
            items.append(item)
    assert items == [Text(TOKEN, "partial")]
    assert (info.value.code, info.value.message) == ("backend_error", "the model fell over")


async def test_generate_that_is_not_an_async_iterator_fails_clearly():
    async def coroutine(job):
        return "no yield"

    with pytest.raises(BackendError) as info:
        await collect(plugin(coroutine))
    assert info.value.message == (
        "backend mine:backend: generate() returned coroutine, not an async iterator"
        " (an async def with yield in it makes one)"
    )


async def test_cancelling_cancels_the_backends_iterator():
    started, closed = asyncio.Event(), asyncio.Event()

    async def generate(job):
        try:
            started.set()
            await asyncio.sleep(3600)
            yield "never"
        finally:
            closed.set()

    task = asyncio.create_task(collect(plugin(generate)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed.is_set()


async def test_closing_between_items_closes_the_backends_iterator():
    closed = asyncio.Event()

    async def generate(job):
        try:
            yield "one"
            yield "two"
        finally:
            closed.set()

    items = plugin(generate).generate(None)
    assert await anext(items) == Text(TOKEN, "one")
    await items.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()
