"""The benchmark's publisher: writes jobs through the worker's real write path.

Each job is a hash prepared as a worker would leave it (running, owned by the
publisher), written by ``services.eventlog.JobWriter`` (the Lua script that
appends to the log and publishes) fed by ``worker.generate.pump`` (the
worker's batching of tokens that arrive while an append is in flight). Every
token's text is its creation time, ``"@<time.time_ns()> "``, so a client can
tell each token's latency, merged or not.

It runs in its own process and takes orders over a pipe:
``("prepare", spec)`` → ``("ready", job_ids)``, ``("go",)`` →
``("published", report)``. Modes that follow the viewers (``window``,
``running``) read the lowest id each client process's viewers have.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from services.eventlog import JobWriter, LogAppender
from services.events import COMPLETED
from services.jobs import new_job_id, now_iso
from services.keys import Keys
from services.redisconn import Redis, connect
from services.runtime import tune_gc
from tests.support import token_items
from worker.generate import pump

OWNER = "bench-publisher"
RETENTION_S = 600
WINDOW_POLL_S = 0.002  # libuv timers have 1 ms resolution: less would spin


@dataclass(frozen=True)
class PublishSpec:
    """What to publish. ``mode``: ``paced`` (``tokens`` per job at ``rate``
    tokens/s, job starts spread over one token interval), ``window`` (one job,
    for ``seconds``, never more than ``window`` tokens ahead of the slowest
    viewer), ``one`` (one token, then done: for idle streams), ``history``
    (``tokens`` written and the job finished before any viewer comes), or
    ``running`` (``tokens`` written before any viewer comes, then more at
    ``rate`` while they come, until every viewer has those first ones or
    ``seconds`` are up, then done)."""

    mode: str
    jobs: int = 1
    tokens: int = 0
    rate: float = 0.0
    seconds: float = 0.0
    window: int = 256


def run(conn: Connection, redis_url: str, prefix: str, progress: Sequence[int] | None) -> None:
    """The publisher process's entry point. ``progress``: per client process,
    the lowest id its viewers have received (for ``window`` mode)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench's main process stops us
    import uvloop

    loop = uvloop.new_event_loop()
    publisher = Publisher(redis_url, prefix, progress)
    tune_gc()  # as a worker process does
    try:
        spec: PublishSpec = conn.recv()[1]
        conn.send(("ready", loop.run_until_complete(publisher.prepare(spec))))
        conn.recv()  # go
        conn.send(("published", loop.run_until_complete(publisher.publish(spec))))
    finally:
        loop.run_until_complete(publisher.close())
        loop.close()


class Publisher:
    def __init__(self, redis_url: str, prefix: str, progress: Sequence[int] | None):
        self.redis = connect(redis_url)
        self.appender = LogAppender(self.redis)  # as a worker process shares one
        self.keys = Keys(prefix)
        self.progress = progress
        self.writers: list[JobWriter] = []

    async def close(self) -> None:
        await self.redis.aclose()

    async def prepare(self, spec: PublishSpec) -> list[str]:
        """Create the jobs, each with its ``start`` event (and, for ``history``,
        all its tokens and its ``done``)."""
        for _ in range(spec.jobs):
            self.writers.append(await start_job(self.redis, self.appender, self.keys, new_job_id()))
        if spec.mode in ("history", "running"):
            for writer in self.writers:
                await pump(unpaced(spec.tokens), writer, "the bench")
        if spec.mode == "history":
            for writer in self.writers:
                await writer.finish(COMPLETED, "stop", finished_at=now_iso())
        return [writer.job_id for writer in self.writers]

    async def publish(self, spec: PublishSpec) -> dict[str, Any]:
        cpu, started = time.process_time(), time.time()
        if spec.mode == "paced":
            await asyncio.gather(
                *(
                    self._paced(w, spec, i / spec.jobs / spec.rate)
                    for i, w in enumerate(self.writers)
                )
            )
        elif spec.mode == "window":
            await self._finished(self.writers[0], self._within_window(spec))
        elif spec.mode == "running":
            await self._finished(self.writers[0], self._until_caught_up(self.writers[0], spec))
        elif spec.mode == "one":
            for writer in self.writers:
                await writer.append(token_items([stamp()]))
                await writer.finish(COMPLETED, "stop", finished_at=now_iso())
        elapsed = time.time() - started
        return {
            "final_ids": [writer.last_id for writer in self.writers],
            "tokens": sum(writer.tokens for writer in self.writers),
            "seconds": elapsed,
            "cpu_s": time.process_time() - cpu,
        }

    async def _paced(self, writer: JobWriter, spec: PublishSpec, offset_s: float) -> None:
        await asyncio.sleep(offset_s)
        await pump(paced(spec.tokens, spec.rate), writer, "the bench")
        await writer.finish(COMPLETED, "stop", finished_at=now_iso())

    async def _finished(self, writer: JobWriter, tokens: AsyncIterator[str]) -> None:
        await pump(tokens, writer, "the bench")
        await writer.finish(COMPLETED, "stop", finished_at=now_iso())

    async def _within_window(self, spec: PublishSpec) -> AsyncIterator[str]:
        """Tokens as fast as the slowest viewer keeps up: at most ``window`` ahead."""
        assert self.progress is not None
        deadline = time.monotonic() + spec.seconds
        next_id = 2  # the start event is 1
        while time.monotonic() < deadline:
            if next_id - min(self.progress) > spec.window:
                await asyncio.sleep(WINDOW_POLL_S)
                continue
            yield stamp()
            next_id += 1
            if next_id % 64 == 0:
                await asyncio.sleep(0)  # let pump's append task run

    async def _until_caught_up(self, writer: JobWriter, spec: PublishSpec) -> AsyncIterator[str]:
        """Tokens at ``spec.rate`` until every viewer has the events the job had
        when they came (so the job ends once the storm is over), or ``spec.seconds``.

        Not "has every event so far": under load a live viewer is always a
        few tokens behind, and the job would run to ``spec.seconds``."""
        assert self.progress is not None
        history = writer.last_id
        async for text in paced(int(spec.seconds * spec.rate), spec.rate):
            if min(self.progress) >= history:
                return
            yield text


async def start_job(redis: Redis, appender: LogAppender, keys: Keys, job_id: str) -> JobWriter:
    """A running job as a worker would leave it, owned by the publisher, and its
    writer, the job's ``start`` event appended."""
    await redis.hset(
        keys.job(job_id),
        mapping={
            "status": "running",
            "owner": OWNER,
            "model": "demo",
            "created_at": now_iso(),
            "spec": '{"prompt": "bench", "model": "demo"}',
            "last_event_id": 0,
            "tokens": 0,
        },
    )
    writer = JobWriter(appender, keys, job_id, OWNER, retention_s=RETENTION_S)
    await writer.start("demo", now_iso())
    return writer


def stamp() -> str:
    """A token's text: its creation time, behind a marker a regex can jump to."""
    return f"@{time.time_ns()} "


async def paced(count: int, rate: float) -> AsyncIterator[str]:
    """``count`` tokens at ``rate`` per second; late ones come at once."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield stamp()


async def unpaced(count: int) -> AsyncIterator[str]:
    for i in range(count):
        if i % 64 == 0:
            await asyncio.sleep(0)
        yield stamp()
