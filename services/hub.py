"""The hub: one pub/sub connection per process, shared by every local viewer.

Each job with local viewers is subscribed once, however many viewers watch
it. An incoming event is parsed once into an ``Event`` that every viewer of
the job shares (its encoded frames are cached on it).

Pub/sub is only a hint; the log is the truth. Each viewer has a bounded
buffer: when it overflows, or when the pub/sub connection was lost and
re-established, the viewer is marked ``lagging`` and re-reads the log after
the last id it sent (see ``services.feed``). Nothing is dropped for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from services.errors import BrokerUnavailable
from services.events import Event
from services.keys import Keys
from services.redisconn import BROKER_IO_ERRORS, Redis
from services.viewers import REFRESH_S, ViewerCounts

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 3.0
COUNTS_FLUSH_S = 1.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0


class Viewer:
    """One open stream's inbox: a bounded buffer of live events."""

    __slots__ = ("_buffer", "_wakeup", "job_id", "lagging", "limit", "overflows")

    def __init__(self, job_id: str, limit: int):
        self.job_id = job_id
        self.limit = limit
        self._buffer: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        # A new viewer starts lagging: it reads the log before anything live.
        self.lagging = True
        self.overflows = 0

    def push(self, event: Event) -> None:
        if len(self._buffer) >= self.limit:
            # Too far behind: free the buffer and catch up from the log instead.
            self._buffer.clear()
            self.overflows += 1
            self.resync()
            return
        self._buffer.append(event)
        self._wakeup.set()

    def resync(self) -> None:
        """Make the viewer re-read the log after the last id it sent."""
        self.lagging = True
        self._wakeup.set()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until there is something to do; ``False`` on timeout."""
        if not self._wakeup.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return False
        return True

    def take(self) -> list[Event]:
        """Everything buffered, oldest first."""
        events = list(self._buffer)
        self._buffer.clear()
        self._wakeup.clear()
        return events

    def __len__(self) -> int:
        return len(self._buffer)


class _Topic:
    """The local viewers of one job, and whether its subscription is live."""

    __slots__ = ("job_id", "ready", "viewers")

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.viewers: set[Viewer] = set()
        self.ready = asyncio.Event()


class Hub:
    """Multiplexes one pub/sub connection over all local viewers of all jobs."""

    def __init__(
        self,
        client_factory: Callable[[], Redis],
        counts_redis: Redis,
        keys: Keys,
        *,
        node_id: str,
        viewer_buffer: int,
    ):
        self._client_factory = client_factory
        self.keys = keys
        self.node_id = node_id
        self.viewer_buffer = viewer_buffer
        self._counts = ViewerCounts(counts_redis, keys)
        self._topics: dict[str, _Topic] = {}
        self._by_channel: dict[bytes, _Topic] = {}
        self._dirty: set[str] = set()
        self._client: Redis | None = None
        self._pubsub: Any = None
        self._tasks: list[asyncio.Task] = []
        self._pending: set[asyncio.Task] = set()
        self.connected = asyncio.Event()
        self.idle = asyncio.Event()  # set while no viewer is attached
        self.idle.set()
        self._disconnected_at: float | None = time.monotonic()
        self.reconnects = 0

    # Lifecycle.

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="hub-reader"),
            asyncio.create_task(self._counts_loop(), name="hub-counts"),
        ]

    async def stop(self) -> None:
        for task in self._tasks + list(self._pending):
            task.cancel()
        for task in self._tasks + list(self._pending):
            with contextlib.suppress(BaseException):
                await task
        await self._close()
        with contextlib.suppress(Exception):
            await self._counts.report({job_id: 0 for job_id in self._topics}, self.node_id)

    # Viewers.

    @property
    def viewer_total(self) -> int:
        return sum(len(topic.viewers) for topic in self._topics.values())

    def local_viewers(self, job_id: str) -> int:
        topic = self._topics.get(job_id)
        return len(topic.viewers) if topic else 0

    def disconnected_for(self) -> float:
        """Seconds since the pub/sub connection was lost (0 while connected)."""
        if self._disconnected_at is None:
            return 0.0
        return time.monotonic() - self._disconnected_at

    async def attach(self, job_id: str) -> Viewer:
        """Register a viewer; returns once the job's subscription is live.

        Raises ``BrokerUnavailable`` if the subscription cannot be made.
        """
        topic = self._topics.get(job_id)
        if topic is None:
            topic = self._topics[job_id] = _Topic(job_id)
            self._by_channel[self.keys.channel(job_id).encode()] = topic
            if self.connected.is_set():
                self._spawn(self._send("subscribe", job_id))
        viewer = Viewer(job_id, self.viewer_buffer)
        topic.viewers.add(viewer)
        self.idle.clear()
        self._dirty.add(job_id)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                await topic.ready.wait()
        except TimeoutError:
            self.detach(viewer)
            raise BrokerUnavailable("could not subscribe to the job's events") from None
        return viewer

    def detach(self, viewer: Viewer) -> None:
        topic = self._topics.get(viewer.job_id)
        if topic is None:
            return
        topic.viewers.discard(viewer)
        self._dirty.add(viewer.job_id)
        if not topic.viewers:
            del self._topics[viewer.job_id]
            del self._by_channel[self.keys.channel(viewer.job_id).encode()]
            if self.connected.is_set():
                self._spawn(self._send("unsubscribe", viewer.job_id))
            if not self._topics:
                self.idle.set()

    def close_all(self) -> None:
        """Wake every viewer so streams notice a shutdown at once."""
        for topic in self._topics.values():
            for viewer in topic.viewers:
                viewer.resync()

    # The pub/sub connection.

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, command: str, job_id: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return
        channel = self.keys.channel(job_id)
        try:
            if command == "subscribe":
                await pubsub.subscribe(channel)
            else:
                await pubsub.unsubscribe(channel)
        except BROKER_IO_ERRORS:
            pass  # the reader notices the broken connection and resubscribes everything

    async def _connect(self) -> None:
        self._client = self._client_factory()
        self._pubsub = self._client.pubsub()
        channels = [self.keys.channel(job_id) for job_id in self._topics]
        # A connection with no subscription yet: a ping proves the broker answers.
        await self._pubsub.ping()
        if channels:
            await self._pubsub.subscribe(*channels)
        self.connected.set()
        self._disconnected_at = None

    async def _close(self) -> None:
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        with contextlib.suppress(Exception):
            if pubsub is not None:
                await pubsub.aclose()
        with contextlib.suppress(Exception):
            if client is not None:
                await client.aclose()

    def _lost(self) -> None:
        if self.connected.is_set():
            self._disconnected_at = time.monotonic()
            log.warning("pub/sub connection lost; viewers will resume from the log")
        self.connected.clear()
        for topic in self._topics.values():
            topic.ready.clear()

    async def _read_loop(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            try:
                if self._pubsub is None:
                    await self._connect()
                    backoff = BACKOFF_MIN_S
                message = await self._pubsub.get_message(timeout=1.0)
                if message is not None:
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, BROKER_IO_ERRORS):
                    log.exception("pub/sub reader failed")
                self._lost()
                await self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                self.reconnects += 1

    def _dispatch(self, message: dict) -> None:
        kind = message["type"]
        if kind in (b"message", "message"):
            topic = self._by_channel.get(message["channel"])
            if topic is None:
                return
            try:
                event = Event.from_message(message["data"].decode())
            except ValueError:
                log.error("malformed event on %r", message["channel"])
                return
            for viewer in topic.viewers:
                viewer.push(event)
        elif kind in (b"subscribe", "subscribe"):
            topic = self._by_channel.get(message["channel"])
            if topic is not None:
                # Live from here on; whatever was published before is in the log.
                topic.ready.set()
                for viewer in topic.viewers:
                    viewer.resync()

    # Viewer counts.

    async def _counts_loop(self) -> None:
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(COUNTS_FLUSH_S)
            now = time.monotonic()
            if now - last_refresh >= REFRESH_S:
                self._dirty.update(self._topics)
                last_refresh = now
            if not self._dirty:
                continue
            dirty, self._dirty = self._dirty, set()
            counts = {job_id: self.local_viewers(job_id) for job_id in dirty}
            try:
                await self._counts.report(counts, self.node_id)
            except BrokerUnavailable:
                self._dirty.update(dirty)
