"""The hub: one pub/sub connection per process (per shard on a Redis
Cluster), shared by every local viewer.

Each job with local viewers is subscribed once, however many viewers watch
it. An incoming event is parsed once into an ``Event`` that every viewer of
the job shares (its encoded frames are cached on it).

Pub/sub is only a hint; the log is the truth. Each job keeps a short, bounded
buffer of its live events, shared by its viewers: a viewer that fell behind
it, or any viewer when the pub/sub connection was lost and re-established,
is marked ``lagging`` and re-reads the log after the last id it sent (see
``services.feed``). Nothing is dropped for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from services import metrics
from services.errors import BrokerUnavailable
from services.events import Event
from services.keys import Keys
from services.redisconn import (
    BROKER_IO_ERRORS,
    MAIN_SHARD,
    Broker,
    Redis,
    cancel_and_wait,
    raise_lost_cancel,
)
from services.viewers import REFRESH_S, ViewerCounts

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 3.0
# Viewers are woken this long after an event arrives, so the events of that
# window leave in one write per viewer instead of one write each. Measured
# with 300 viewers of a 500 tokens/s job: 5.1 us of server CPU per delivered
# event without it, 3.7 us with 10 ms (2.7 us with 20 ms); it adds at most
# 10 ms to an event's latency.
LINGER_S = 0.01
# Live events a job keeps for its viewers: a viewer further behind catches
# up from the log (also at most TOKENCAST_VIEWER_BUFFER events).
KEEP_LIVE_MS = 2000
COUNTS_FLUSH_S = 1.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0


class Viewer:
    """One open stream's wake-up: it reads its job's live events from the
    job's shared buffer (``_Topic``), after the last id it sent."""

    __slots__ = ("_wakeup", "job_id", "lagging", "tick_after", "topic")

    def __init__(self, topic: _Topic):
        self.topic = topic
        self.job_id = topic.job_id
        self._wakeup = asyncio.Event()
        # A new viewer starts lagging: it reads the log before anything live.
        self.lagging = True
        # The hub's tick wakes the viewer once ``time.monotonic()`` passes
        # this (its next keepalive), or at every tick while pub/sub is down.
        self.tick_after = 0.0

    def resync(self) -> None:
        """Make the viewer re-read the log after the last id it sent."""
        self.lagging = True
        self._wakeup.set()

    async def wait(self) -> None:
        """Until live events arrive, a resync is asked, or the hub's tick: no
        timer per wait, which would cost more than the event itself."""
        await self._wakeup.wait()

    def tick(self) -> None:
        self._wakeup.set()

    def take(self, after: int) -> list[Event]:
        """The job's buffered live events after id ``after``: consecutive
        ids, oldest first. If the viewer fell behind the buffer, they start
        past ``after + 1``: the caller then catches up from the log."""
        self._wakeup.clear()
        return self.topic.since(after)


class _Topic:
    """The local viewers of one job, whether its subscription is live, and
    its recent live events, shared by all its viewers.

    One buffer per job instead of one per viewer: an event costs one append
    however many viewers watch, and the viewers are woken once per linger
    window. Measured with 1,000 viewers of a 500 tokens/s job (make bench
    S1): pushing each event to each viewer kept the pub/sub reader 100-400 ms
    behind Redis.
    """

    __slots__ = ("channel", "events", "job_id", "limit", "ready", "shard", "viewers", "wake_due")

    def __init__(self, job_id: str, channel: str, shard: _Shard, limit: int):
        self.job_id = job_id
        self.channel = channel
        self.shard = shard
        self.viewers: set[Viewer] = set()
        self.ready = asyncio.Event()
        self.events: list[Event] = []
        self.limit = limit
        self.wake_due = False  # the hub wakes this job's viewers after LINGER_S

    def add_event(self, event: Event) -> None:
        """Keep ``event``. The buffer always holds consecutive ids, so a
        viewer's share of it is one slice."""
        events = self.events
        if events and event.id != events[-1].id + 1:
            if event.id <= events[-1].id:
                return  # a repeat: the buffer has it
            events.clear()  # pub/sub skipped ids: viewers before the gap re-read the log
        events.append(event)
        # Events older than KEEP_LIVE_MS, or past the limit, are only for
        # viewers that far behind, who catch up from the log instead.
        oldest = event.appended_ms - KEEP_LIVE_MS
        stale = 0
        while events[stale].appended_ms < oldest:
            stale += 1
        stale = max(stale, len(events) - self.limit)
        if stale:
            del events[:stale]

    def since(self, after: int) -> list[Event]:
        """The buffered events after id ``after``; they start past
        ``after + 1`` when the viewer fell behind the buffer."""
        events = self.events
        if not events or events[-1].id <= after:
            return []
        return events[max(after + 1 - events[0].id, 0) :]


class _Shard:
    """One pub/sub connection, to one Redis node, and the topics it carries.

    It reconnects with backoff when the connection drops; every subscription
    it re-makes marks that job's viewers ``lagging`` so they re-read the log.
    """

    def __init__(self, hub: Hub, name: str):
        self.hub = hub
        self.name = name
        self.topics: dict[bytes, _Topic] = {}
        self._client: Redis | None = None
        self._pubsub: Any = None
        self.connected = asyncio.Event()
        # Set when a connection attempt failed or a connection dropped; a
        # shard still making its first connection is not "down".
        self.disconnected_at: float | None = None
        self.task = asyncio.create_task(self._read_loop(), name=f"hub-{name}")

    def add(self, topic: _Topic) -> None:
        self.topics[topic.channel.encode()] = topic
        if self.connected.is_set():
            self.hub._spawn(self._send(self.hub.subscribe_command, topic.channel))

    def remove(self, topic: _Topic) -> None:
        del self.topics[topic.channel.encode()]
        if self.connected.is_set():
            self.hub._spawn(self._send(self.hub.unsubscribe_command, topic.channel))

    async def _send(self, command: str, channel: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return
        try:
            await getattr(pubsub, command)(channel)
        except BROKER_IO_ERRORS:
            pass  # the reader notices the broken connection and resubscribes everything

    async def _connect(self) -> None:
        self._client = self.hub.broker.pubsub_client(self.name)
        self._pubsub = self._client.pubsub()
        # A connection with no subscription yet: a ping proves the broker answers.
        await self._pubsub.ping()
        # Connected first: a topic added while the others are being subscribed
        # sends its own subscribe (a duplicate subscribe is harmless).
        self.connected.set()
        self.disconnected_at = None
        subscribe = getattr(self._pubsub, self.hub.subscribe_command)
        channels = [topic.channel for topic in self.topics.values()]
        if self.hub.broker.cluster:
            for channel in channels:  # SSUBSCRIBE takes channels of one slot only
                await subscribe(channel)
        elif channels:
            await subscribe(*channels)

    async def close(self) -> None:
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
            log.warning("pub/sub connection to %s lost; viewers resume from the log", self.name)
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()
        self.connected.clear()
        for topic in self.topics.values():
            topic.ready.clear()

    async def _read_loop(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            try:
                if self._pubsub is None:
                    await self._connect()
                    backoff = BACKOFF_MIN_S
                # No timeout: a timer per read cost more CPU than the message
                # itself, and a dropped connection ends the read with an error.
                # (redis-py >= 8.1: older ones cut it at the socket timeout.)
                message = await self._pubsub.get_message(timeout=None)
                raise_lost_cancel()
                if message is not None:
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, BROKER_IO_ERRORS):
                    log.exception("pub/sub reader failed")
                self._lost()
                await self.close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                metrics.PUBSUB_RECONNECTS.inc()

    def _dispatch(self, message: dict) -> None:
        kind = message["type"]
        if isinstance(kind, bytes):
            kind = kind.decode()
        if kind in ("message", "smessage"):
            topic = self.topics.get(message["channel"])
            if topic is None:
                return
            try:
                event = Event.from_message(message["data"].decode())
            except ValueError:
                log.error("malformed event on %r", message["channel"])
                return
            topic.add_event(event)
            if not topic.wake_due:
                topic.wake_due = True
                self.hub.due.append(topic)
                self.hub.schedule_wakeups()
        elif kind in ("subscribe", "ssubscribe"):
            topic = self.topics.get(message["channel"])
            if topic is not None:
                # Live from here on; whatever was published before is in the log.
                topic.ready.set()
                for viewer in topic.viewers:
                    viewer.resync()


class Hub:
    """Multiplexes pub/sub connections (one per shard: one on a single Redis)
    over all local viewers of all jobs."""

    def __init__(
        self,
        broker: Broker,
        redis: Redis,
        keys: Keys,
        *,
        node_id: str,
        viewer_buffer: int,
        tick_s: float = 1.0,
    ):
        self.broker = broker
        self.tick_s = tick_s
        self.redis = redis
        self.keys = keys
        self.node_id = node_id
        self.viewer_buffer = viewer_buffer
        # Sharded pub/sub on a cluster: a channel lives on its slot's node only.
        self.subscribe_command = "ssubscribe" if broker.cluster else "subscribe"
        self.unsubscribe_command = "sunsubscribe" if broker.cluster else "unsubscribe"
        self._counts = ViewerCounts(redis, keys)
        self._topics: dict[str, _Topic] = {}
        self._shards: dict[str, _Shard] = {}
        self._dirty: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._pending: set[asyncio.Task] = set()
        self.due: list[_Topic] = []  # jobs with new events, their viewers woken after LINGER_S
        self._wakeups: asyncio.TimerHandle | None = None
        self.idle = asyncio.Event()  # set while no viewer is attached
        self.idle.set()

    # Lifecycle.

    async def start(self) -> None:
        if self.broker.cluster:
            await self.redis.initialize()  # the slot map
        else:
            self._shard(MAIN_SHARD)  # connect now: readiness reflects pub/sub too
        self._tasks = [
            asyncio.create_task(self._counts_loop(), name="hub-counts"),
            asyncio.create_task(self._tick_loop(), name="hub-tick"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(
            self._tasks + list(self._pending) + [s.task for s in self._shards.values()]
        )
        for shard in self._shards.values():
            await shard.close()
        with contextlib.suppress(Exception):
            await self._counts.report({job_id: 0 for job_id in self._topics}, self.node_id)

    def _shard(self, name: str) -> _Shard:
        shard = self._shards.get(name)
        if shard is None:
            shard = self._shards[name] = _Shard(self, name)
        return shard

    # Health.

    def healthy(self) -> bool:
        """No pub/sub connection this process holds is down."""
        return all(shard.disconnected_at is None for shard in self._shards.values())

    def disconnected_for(self, job_id: str | None = None) -> float:
        """Seconds since the pub/sub connection (of ``job_id``'s shard, or of
        any shard) was lost; 0 while connected."""
        topic = self._topics.get(job_id) if job_id else None
        shards = [topic.shard] if topic else list(self._shards.values())
        now = time.monotonic()
        return max((now - s.disconnected_at for s in shards if s.disconnected_at), default=0.0)

    # Viewers.

    @property
    def viewer_total(self) -> int:
        return sum(len(topic.viewers) for topic in self._topics.values())

    def local_viewers(self, job_id: str) -> int:
        topic = self._topics.get(job_id)
        return len(topic.viewers) if topic else 0

    async def attach(self, job_id: str) -> Viewer:
        """Register a viewer; returns once the job's subscription is live.

        Raises ``BrokerUnavailable`` if the subscription cannot be made.
        """
        topic = self._topics.get(job_id)
        if topic is None:
            channel = self.keys.channel(job_id)
            try:
                shard = self._shard(self.broker.shard_for(self.redis, channel))
            except BROKER_IO_ERRORS as exc:
                raise BrokerUnavailable(f"cannot locate the job's shard: {exc}") from exc
            topic = self._topics[job_id] = _Topic(job_id, channel, shard, self.viewer_buffer)
            shard.add(topic)
        viewer = Viewer(topic)
        topic.viewers.add(viewer)
        self.idle.clear()
        self._dirty.add(job_id)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                await topic.ready.wait()
        except TimeoutError:
            self.detach(viewer)
            raise BrokerUnavailable("could not subscribe to the job's events") from None
        except BaseException:  # e.g. the request was cancelled: the client left
            self.detach(viewer)
            raise
        return viewer

    def detach(self, viewer: Viewer) -> None:
        topic = self._topics.get(viewer.job_id)
        if topic is None:
            return
        topic.viewers.discard(viewer)
        self._dirty.add(viewer.job_id)
        if not topic.viewers:
            del self._topics[viewer.job_id]
            topic.shard.remove(topic)
            if not self._topics:
                self.idle.set()

    def close_all(self) -> None:
        """Wake every viewer so streams notice a shutdown at once."""
        for topic in self._topics.values():
            for viewer in topic.viewers:
                viewer.resync()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def schedule_wakeups(self) -> None:
        if self.due and self._wakeups is None:
            self._wakeups = asyncio.get_running_loop().call_later(LINGER_S, self._wake_due)

    def _wake_due(self) -> None:
        due, self.due, self._wakeups = self.due, [], None
        for topic in due:
            topic.wake_due = False
            for viewer in topic.viewers:
                viewer.tick()

    async def _tick_loop(self) -> None:
        """Each ``tick_s``, wake the viewers whose keepalive is due, and every
        viewer while a pub/sub connection is down so it notices a long outage.
        Waking only those matters with thousands of idle streams."""
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            wake_all = not self.healthy()
            for topic in list(self._topics.values()):
                for viewer in topic.viewers:
                    if wake_all or viewer.tick_after <= now:
                        viewer.tick()

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
            raise_lost_cancel()
