"""Writing one generation into a job's log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable

from services.errors import BackendError
from services.eventlog import JobWriter

# At most this many tokens go in one append (one Lua call), bounding its size.
MAX_BATCH = 256


async def pump(tokens: AsyncIterable[str], writer: JobWriter) -> None:
    """Append tokens to the log as they come, in order.

    While one append is in flight, the tokens that arrive meanwhile wait and go
    together in the next one: a slow model pays one round trip per token, a
    fast one a round trip per batch instead of per token.
    """
    pending: list[str] = []
    inflight: asyncio.Task | None = None

    async def flush() -> None:
        nonlocal inflight, pending
        if inflight is not None:
            await inflight
            inflight = None
        if pending:
            batch, pending = pending, []
            await writer.append_tokens(batch)

    try:
        try:
            async for text in tokens:
                pending.append(text)
                if inflight is not None and not inflight.done() and len(pending) < MAX_BATCH:
                    continue
                if inflight is not None:
                    await inflight
                inflight = asyncio.create_task(writer.append_tokens(pending))
                pending = []
        except BackendError:
            await flush()  # what the model produced before failing is part of the job
            raise
        await flush()
    finally:
        # Cancelled mid-append: let the append land so the writer's token
        # count matches the log before the terminal event is written.
        if inflight is not None and not inflight.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(inflight)
