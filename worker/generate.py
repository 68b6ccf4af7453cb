"""Writing one generation into a job's log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable

from services.errors import BackendError
from services.eventlog import EventItem, JobWriter
from services.items import (
    CustomEvent,
    Failure,
    Finish,
    InvalidItem,
    Item,
    Text,
    ToolCallFragment,
    parse_item,
)

# At most this many items go in one append (one Lua call), bounding its size.
MAX_BATCH = 256
ITEMS = (Text, ToolCallFragment, CustomEvent, Finish, Failure)


async def pump(generation: AsyncIterable[object], writer: JobWriter, source: str) -> str:
    """Append what ``generation`` yields to the log as it comes, in order, and
    return the finish reason: a ``done`` item's (it must come last), else
    ``tool_calls`` when it called a tool, else ``stop``.

    While one append is in flight, the items that arrive meanwhile wait and go
    together in the next one: a slow model pays one round trip per token, a
    fast one a round trip per batch instead of per token. A bad item, or an
    ``error`` item, raises ``BackendError`` (``source`` names who yielded it)
    once the items before it are in the log.
    """
    iterator = aiter(generation)
    pending: list[EventItem] = []
    inflight: asyncio.Task | None = None
    finish: str | None = None
    called_tools = False

    async def flush() -> None:
        nonlocal inflight, pending
        if inflight is not None:
            await inflight
            inflight = None
        if pending:
            batch, pending = pending, []
            await writer.append(batch)

    try:
        try:
            async for value in iterator:
                item = checked(value, source)
                if finish is not None:
                    raise BackendError(f"{source} yielded {value!r} after its done item")
                if isinstance(item, Finish):
                    finish = item.finish_reason
                    continue
                if isinstance(item, Failure):
                    raise BackendError(item.message, code=item.code)
                called_tools = called_tools or isinstance(item, ToolCallFragment)
                pending.append(item)
                if inflight is not None and not inflight.done() and len(pending) < MAX_BATCH:
                    continue
                if inflight is not None:
                    await inflight
                inflight = asyncio.create_task(writer.append(pending))
                pending = []
        except BackendError:
            await flush()  # what the model produced before failing is part of the job
            raise
        await flush()
    except InvalidItem as exc:  # the writer's checks: tool-call fragments, custom names
        raise BackendError(f"{source} yielded a bad item: {exc.message}") from None
    finally:
        await _settle(inflight, iterator)
    return finish or ("tool_calls" if called_tools else "stop")


async def _settle(inflight: asyncio.Task | None, iterator: object) -> None:
    """However the pump ends: let an append in flight land (so the writer's
    counts match the log before the terminal event), and close the backend's
    iterator (a cancelled job's generator runs its ``finally`` now)."""
    if inflight is not None and not inflight.done():
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(inflight)
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


def checked(value: object, source: str) -> Item:
    """The item ``value`` stands for; raises ``BackendError`` naming ``source`` and the item."""
    if not isinstance(value, str | dict) and isinstance(value, ITEMS):
        return value
    try:
        return parse_item(value)
    except InvalidItem as exc:
        raise BackendError(f"{source} yielded a bad item {_quote(value)}: {exc.message}") from None


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"
