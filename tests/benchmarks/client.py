"""The benchmark's load client: many SSE streams per process, parsed with bytes regexes.

One asyncio ``Protocol`` per connection on uvloop, no HTTP library: the
request is written once, the status line checked, and the rest of the bytes
(HTTP/1.1 chunked framing and all) searched for complete SSE events. A server
``yield`` is always whole events, so chunk-size lines only ever sit between
events and never inside one. Per event: its id, and for a merged token its
``first_id``; per token: the publish timestamp in its text, against the
receive time, into a latency histogram.

It runs in its own process and takes orders over a pipe: ``("open",)`` →
``("opened", report)`` once every stream has its first event, ``("finish",
timeout_s)`` → ``("result", report)`` once every stream ended (or the time is
up).
"""

from __future__ import annotations

import asyncio
import re
import resource
import signal
import time
from array import array
from collections.abc import MutableSequence
from multiprocessing.connection import Connection
from typing import Any

EVENT = re.compile(rb"id: (\d+)\nevent: (\w+)\ndata: ([^\n]*)\n\n")
ID = re.compile(rb"id: (\d+)\n")  # a data line cannot hold one: JSON escapes newlines
STAMP = re.compile(rb"@(\d{19})")  # a token's text: "@<time.time_ns()> "
FIRST_ID = b',"first_id":'

BUCKET_NS = 100_000  # latency histogram: 0.1 ms buckets ...
BUCKETS = 600_000  # ... up to 60 s (later ones land in the last bucket)
CONNECT_AT_ONCE = 500
PROGRESS_EVERY_S = 0.002
OPEN_TIMEOUT_S = 120.0


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Stream(asyncio.Protocol):
    """One viewer: counts what it gets by id (merged ranges expanded)."""

    def __init__(self, client: Client, job: int, after: int, request: bytes):
        self.client = client
        self.job = job
        self.after = after
        self.request = request
        self.transport: Any = None
        self.rest = b""
        self.status = 0
        self.last = after  # highest id received
        self.unique = 0  # distinct ids received
        self.duplicates = 0
        self.out_of_order = 0
        self.gaps: list[list[int]] = []  # ids skipped so far, as [first, last] ranges
        self.connect_ns = 0
        self.first_ns = 0
        self.done_ns = 0
        self.ended = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:  # uvloop's, not an asyncio.Transport
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        if self.rest:
            data = self.rest + data
        start = 0
        if not self.status:
            head = data.find(b"\r\n\r\n")
            if head < 0:
                self.rest = data
                return
            self.status = int(data[9:12])
            if self.status != 200:
                self.client.refusals.setdefault(self.status, data[head + 4 :][:300].decode())
                self._end(now)
                return
            start = head + 4
        end = data.rfind(b"\n\n") + 2
        if end < start + 2:
            self.rest = data[start:]
            return
        self.rest = data[end:]
        stamps = STAMP.findall(data, start, end)
        if stamps:
            self.client.count_tokens(stamps, now)
        if data.find(FIRST_ID, start, end) < 0:
            # No merged event: the ids alone say it all (the common case, kept cheap).
            ids = ID.findall(data, start, end)
            expected = self.last + 1
            if len(ids) == 1 and int(ids[0]) == expected:
                self.unique += 1
                self.last = expected
            elif list(map(int, ids)) == list(range(expected, expected + len(ids))):
                self.unique += len(ids)
                self.last += len(ids)
            else:
                for event_id in map(int, ids):
                    self._irregular(event_id, event_id)
        else:
            for match in EVENT.finditer(data, start, end):
                last = int(match[1])
                body = match[3]
                at = body.rfind(FIRST_ID) if match[2] == b"token" else -1
                first = int(body[at + len(FIRST_ID) : -1]) if at >= 0 else last
                if first == self.last + 1:
                    self.unique += last - first + 1
                    self.last = last
                else:
                    self._irregular(first, last)
        if not self.first_ns and self.unique:
            self.first_ns = now
            self.client.opened += 1
            if not self.ready.done():
                self.ready.set_result(None)
        if data.find(b"event: done\n", start, end) >= 0:
            self._end(now)

    def _irregular(self, first: int, last: int) -> None:
        """Ids not following the last one: a gap, a duplicate, or a late fill."""
        for event_id in range(first, last + 1):
            if event_id > self.last:
                if event_id > self.last + 1:
                    self.gaps.append([self.last + 1, event_id - 1])
                self.last = event_id
                self.unique += 1
            elif any(a <= event_id <= b for a, b in self.gaps):
                self.out_of_order += 1
                self.unique += 1
                self.gaps = [g for gap in self.gaps for g in _split(gap, event_id)]
            else:
                self.duplicates += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(time.time_ns())

    def _end(self, now: int) -> None:
        if not self.ended:
            self.ended = True
            self.done_ns = now
            self.client.stream_ended()
            if not self.ready.done():
                self.ready.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def report(self) -> tuple[int, ...]:
        return (
            self.job,
            self.after,
            self.unique,
            self.last,
            self.duplicates,
            self.out_of_order,
            self.status,
            int(self.ended),
            self.connect_ns,
            self.first_ns,
            self.done_ns,
        )


def _split(gap: list[int], event_id: int) -> list[list[int]]:
    a, b = gap
    if not a <= event_id <= b:
        return [gap]
    return [r for r in ([a, event_id - 1], [event_id + 1, b]) if r[0] <= r[1]]


class Client:
    """The streams of one client process, and what they received together."""

    def __init__(
        self,
        host: str,
        port: int,
        plan: list[tuple[int, str, int]],
        progress: MutableSequence[int] | None,
        slot: int,
    ):
        self.host = host
        self.port = port
        self.plan = plan  # (job index, job id, after) per stream
        self.progress = progress
        self.slot = slot
        self.streams: list[Stream] = []
        self.histogram = array("q", bytes(8 * BUCKETS))
        self.tokens = 0
        self.max_latency_ns = 0
        self.last_token_ns = 0
        self.opened = 0
        self.ended = 0
        self.connect_errors = 0
        self.refusals: dict[int, str] = {}  # status -> the first such answer's body
        self.open_cpu_s = self.open_wall_s = 0.0
        self.opened_at = (0.0, 0.0)
        self.all_ended = asyncio.Event()

    def count_tokens(self, stamps: list[bytes], now: int) -> None:
        histogram = self.histogram
        worst = 0
        for stamp in stamps:
            latency = now - int(stamp)
            bucket = latency // BUCKET_NS
            if not 0 <= bucket < BUCKETS:
                bucket = 0 if bucket < 0 else BUCKETS - 1
            histogram[bucket] += 1
            if latency > worst:
                worst = latency
        if worst > self.max_latency_ns:
            self.max_latency_ns = worst
        self.tokens += len(stamps)
        self.last_token_ns = now

    def stream_ended(self) -> None:
        self.ended += 1
        if self.ended >= len(self.plan):
            self.all_ended.set()

    async def open(self) -> dict[str, Any]:
        """Connect every stream (``CONNECT_AT_ONCE`` at a time); returns once
        each has received its first event, or failed."""
        loop = asyncio.get_running_loop()
        started, cpu = time.monotonic(), time.process_time()
        gate = asyncio.Semaphore(CONNECT_AT_ONCE)

        async def connect(job: int, job_id: str, after: int) -> None:
            request = (
                f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Accept: text/event-stream\r\n"
                + (f"Last-Event-ID: {after}\r\n" if after else "")
                + "\r\n"
            ).encode()
            stream = Stream(self, job, after, request)
            self.streams.append(stream)
            async with gate:
                stream.connect_ns = time.time_ns()
                try:
                    await asyncio.wait_for(
                        loop.create_connection(lambda: stream, self.host, self.port), 30
                    )
                except (OSError, TimeoutError):
                    self.connect_errors += 1
                    stream._end(time.time_ns())
                    return
                # Hold the slot until the stream is open: a steady storm, not a flood.
                await stream.ready

        await asyncio.wait_for(
            asyncio.gather(*(connect(*spec) for spec in self.plan)), OPEN_TIMEOUT_S
        )
        self.open_wall_s = time.monotonic() - started
        self.open_cpu_s = time.process_time() - cpu
        self.opened_at = (time.monotonic(), time.process_time())
        return {"open_s": self.open_wall_s, "opened": self.opened, "errors": self.connect_errors}

    async def track_progress(self) -> None:
        """Publish the lowest id any open stream has reached (the publisher's
        window, or whether a storm has caught up). Before ``open`` there is none
        yet: the first value stays."""
        assert self.progress is not None
        while True:
            if self.streams:
                live = [s.last for s in self.streams if not s.ended]
                self.progress[self.slot] = min(live) if live else 1 << 62
            await asyncio.sleep(PROGRESS_EVERY_S)

    async def finish(self, timeout_s: float) -> dict[str, Any]:
        """Wait for every stream to end; CPU and wall time are counted from the
        end of ``open`` (the delivery phase)."""
        started, cpu = self.opened_at
        if self.ended < len(self.plan):
            try:
                await asyncio.wait_for(self.all_ended.wait(), timeout_s)
            except TimeoutError:
                pass
        wall, cpu_s = time.monotonic() - started, time.process_time() - cpu
        for stream in self.streams:
            if stream.transport is not None:
                stream.transport.close()
        return {
            "streams": [stream.report() for stream in self.streams],
            "histogram": self.histogram.tobytes(),
            "tokens": self.tokens,
            "max_latency_ns": self.max_latency_ns,
            "last_token_ns": self.last_token_ns,
            "timed_out": self.ended < len(self.plan),
            "refusals": self.refusals,
            "cpu_s": cpu_s,
            "wall_s": wall,
            "open_cpu_s": self.open_cpu_s,
            "open_wall_s": self.open_wall_s,
        }


def run(
    conn: Connection,
    host: str,
    port: int,
    plan: list[tuple[int, str, int]],
    progress: MutableSequence[int] | None,
    slot: int,
) -> None:
    """A client process's entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench's main process stops us
    raise_fd_limit()
    import uvloop

    uvloop.run(_serve_orders(conn, Client(host, port, plan, progress, slot)))


async def _serve_orders(conn: Connection, client: Client) -> None:
    tracking = asyncio.create_task(client.track_progress()) if client.progress else None
    try:
        await asyncio.to_thread(conn.recv)  # open
        conn.send(("opened", await client.open()))
        order = await asyncio.to_thread(conn.recv)
        conn.send(("result", await client.finish(order[1])))
    finally:
        if tracking:
            tracking.cancel()
