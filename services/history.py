"""Finished jobs' logs, kept in memory on each web node.

A finished log never changes, yet a resume storm (hundreds of viewers coming
back after a node died) used to read and merge it once per viewer. Here it is
read once per node (concurrent loads of one job share a single read), the
data of its events that merge parsed once, and the merged batch for each resume position built
once, so its encoded frames are shared too.

Bounded: at most ``MAX_JOBS`` logs (least recently used first out), and
``MAX_POSITIONS`` merged batches per log. Whoever asks must already know the
job exists (an expired job is answered 404 before this is consulted).
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Any

from services.eventlog import EventLog
from services.events import DONE, KINDS, Event, Merge
from services.resume import coalesce

MAX_JOBS = 32
MAX_POSITIONS = 64
READ_PAGE = 5000
MERGED = frozenset(name for name, kind in KINDS.items() if kind.merge is not Merge.NEVER)


class FinishedLog:
    """The whole log of a finished job: ids 1..N, the last one ``done``."""

    def __init__(self, events: list[Event]):
        self.events = events
        self.payloads: list[dict[str, Any]] = [
            json.loads(e.data) if e.name in MERGED else {} for e in events
        ]
        self._batches: OrderedDict[int, list[Event]] = OrderedDict()

    def after(self, sent: int) -> list[Event]:
        """Everything after id ``sent``, merged as ``coalesce`` merges."""
        batch = self._batches.get(sent)
        if batch is None:
            batch = coalesce(self.events[sent:], lambda event: self.payloads[event.id - 1])
            self._batches[sent] = batch
            if len(self._batches) > MAX_POSITIONS:
                self._batches.popitem(last=False)
        return batch


class FinishedLogs:
    """The per-node cache of ``FinishedLog`` by job id."""

    def __init__(self, log: EventLog):
        self.log = log
        self._logs: OrderedDict[str, FinishedLog] = OrderedDict()
        self._loading: dict[str, asyncio.Future[FinishedLog | None]] = {}

    async def get(self, job_id: str) -> FinishedLog | None:
        """The job's finished log, or ``None`` if it has not finished (or is gone)."""
        cached = self._logs.get(job_id)
        if cached is not None:
            self._logs.move_to_end(job_id)
            return cached
        loading = self._loading.get(job_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[FinishedLog | None] = asyncio.get_running_loop().create_future()
        self._loading[job_id] = future
        try:
            finished = await self._load(job_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here: waiters get it too, nobody else must
            raise
        finally:
            del self._loading[job_id]
        future.set_result(finished)
        if finished is not None:
            self._logs[job_id] = finished
            if len(self._logs) > MAX_JOBS:
                self._logs.popitem(last=False)
        return finished

    async def _load(self, job_id: str) -> FinishedLog | None:
        events: list[Event] = []
        while True:
            page = await self.log.read(job_id, len(events), READ_PAGE)
            events.extend(page)
            if len(page) < READ_PAGE:
                break
        if not events or events[-1].name != DONE:
            return None
        return FinishedLog(events)
