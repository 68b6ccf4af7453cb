"""The hub: one pub/sub connection per process (per shard on a Redis
Cluster), shared by every local viewer.

Each job with local viewers is subscribed once, however many viewers watch
it. An incoming event is parsed once into an ``Event`` that every viewer of
the job shares (its encoded frames are cached on it).

Pub/sub is only a hint; the log is the truth. Each job keeps a short, bounded
buffer of its live events, shared by its viewers (``services.topic``): a
viewer that fell behind it, or any viewer when the pub/sub connection was
lost and re-established, is marked ``lagging`` and re-reads the log after the
last id it sent (see ``services.feed``). Nothing is dropped for good.

Who writes what: a ``_Shard`` owns its connection and its topics by channel,
and tells the hub one thing, ``on_event(topic)``; the ``Hub`` owns the jobs'
topics by id, the shards, the linger window's wake-ups and the viewer counts;
a ``Topic`` owns its buffer, its viewers and whether it is subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
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
from services.retry import Backoff
from services.topic import Topic, Viewer
from services.viewers import REFRESH_S, ViewerCounts

log = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 3.0
# Viewers are woken this long after an event arrives, so the events of that
# window leave in one write per viewer instead of one write each. Measured
# with 300 viewers of a 500 tokens/s job: 5.1 us of server CPU per delivered
# event without it, 3.7 us with 10 ms (2.7 us with 20 ms); it adds at most
# 10 ms to an event's latency.
LINGER_S = 0.01
COUNTS_FLUSH_S = 1.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0


class _Shard:
    """One pub/sub connection, to one Redis node, and the topics it carries.

    It reconnects with backoff when the connection drops; every subscription
    it re-makes marks that job's viewers ``lagging`` so they re-read the log.
    What it tells the hub is one call: ``on_event(topic)`` when a topic's
    viewers are to be woken for new events.
    """

    def __init__(self, name: str, broker: Broker, on_event: Callable[[Topic], None]):
        self.name = name
        self._broker = broker
        self._on_event = on_event
        # Sharded pub/sub on a cluster: a channel lives on its slot's node only.
        self._subscribe = "ssubscribe" if broker.cluster else "subscribe"
        self._unsubscribe = "sunsubscribe" if broker.cluster else "unsubscribe"
        self.topics: dict[bytes, Topic] = {}
        self._client: Redis | None = None
        self._pubsub: Any = None
        self.connected = asyncio.Event()
        # Set when a connection attempt failed or a connection dropped; a
        # shard still making its first connection is not "down".
        self.disconnected_at: float | None = None
        self.back_at: float | None = None  # when it last reconnected after a loss
        self._pending: set[asyncio.Task] = set()  # (un)subscribe commands under way
        self.task = asyncio.create_task(self._read_loop(), name=f"hub-{name}")

    def add(self, topic: Topic) -> None:
        self.topics[topic.channel.encode()] = topic
        if self.connected.is_set():
            self._spawn(self._send(self._subscribe, topic.channel))

    def remove(self, topic: Topic) -> None:
        del self.topics[topic.channel.encode()]
        if self.connected.is_set():
            self._spawn(self._send(self._unsubscribe, topic.channel))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _send(self, command: str, channel: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return
        try:
            await getattr(pubsub, command)(channel)
        except BROKER_IO_ERRORS:
            pass  # the reader notices the broken connection and resubscribes everything

    async def _connect(self) -> None:
        self._client = self._broker.pubsub_client(self.name)
        self._pubsub = self._client.pubsub()
        # A connection with no subscription yet: a ping proves the broker answers.
        await self._pubsub.ping()
        # Connected first: a topic added while the others are being subscribed
        # sends its own subscribe (a duplicate subscribe is harmless).
        self.connected.set()
        if self.disconnected_at is not None:
            self.back_at = time.monotonic()
        self.disconnected_at = None
        subscribe = getattr(self._pubsub, self._subscribe)
        channels = [topic.channel for topic in self.topics.values()]
        if self._broker.cluster:
            for channel in channels:  # SSUBSCRIBE takes channels of one slot only
                await subscribe(channel)
        elif channels:
            await subscribe(*channels)

    async def stop(self) -> None:
        """Stop reading and close the connection."""
        await cancel_and_wait([self.task, *self._pending])
        await self.close()

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
            topic.unsubscribed()

    async def _read_loop(self) -> None:
        backoff = Backoff(BACKOFF_MIN_S, BACKOFF_MAX_S)
        while True:
            try:
                if self._pubsub is None:
                    await self._connect()
                    backoff.reset()
                # No timeout: a timer per read cost more CPU than the message
                # itself, and a dropped connection ends the read with an error.
                # (redis-py >= 8.1: older ones cut it at the socket timeout.)
                message = await self._pubsub.get_message(timeout=None)
                raise_lost_cancel()  # a pub/sub read, not a command: broker_errors() is not here
                if message is not None:
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, BROKER_IO_ERRORS):
                    log.exception("pub/sub reader failed")
                self._lost()
                await self.close()
                await backoff.wait()
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
            if topic.add_event(event):
                self._on_event(topic)
        elif kind in ("subscribe", "ssubscribe"):
            topic = self.topics.get(message["channel"])
            if topic is not None:
                topic.subscribed()


class Hub:
    """Multiplexes pub/sub connections (one per shard: one on a single Redis)
    over all local viewers of all jobs."""

    def __init__(
        self,
        broker: Broker,
        redis: Redis,
        keys: Keys,
        counts: ViewerCounts,
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
        self._counts = counts
        self._topics: dict[str, Topic] = {}
        self._viewer_total = 0
        self._shards: dict[str, _Shard] = {}
        self._dirty: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._due: list[Topic] = []  # jobs with new events, their viewers woken after LINGER_S
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
        await cancel_and_wait(self._tasks)
        await asyncio.gather(*(shard.stop() for shard in self._shards.values()))
        with contextlib.suppress(Exception):
            await self._counts.report({job_id: 0 for job_id in self._topics}, self.node_id)

    def _shard(self, name: str) -> _Shard:
        shard = self._shards.get(name)
        if shard is None:
            shard = self._shards[name] = _Shard(name, self.broker, self._on_event)
        return shard

    # Health.

    def healthy(self) -> bool:
        """No pub/sub connection this process holds is down."""
        return all(shard.disconnected_at is None for shard in self._shards.values())

    def disconnected_for(self, job_id: str | None = None) -> float:
        """Seconds since the pub/sub connection (of ``job_id``'s shard, or of
        any shard) was lost; 0 while connected."""
        topic = self._topics.get(job_id) if job_id else None
        shards = [self._shards[topic.shard_name]] if topic else list(self._shards.values())
        now = time.monotonic()
        return max((now - s.disconnected_at for s in shards if s.disconnected_at), default=0.0)

    def back_within(self, seconds: float) -> bool:
        """A pub/sub connection of this process came back from a loss (the
        broker restarted or failed over) less than ``seconds`` ago."""
        now = time.monotonic()
        return any(
            s.back_at is not None and now - s.back_at < seconds for s in self._shards.values()
        )

    # Viewers.

    @property
    def viewer_total(self) -> int:
        """Streams attached on this node (counted as they come and go: every
        new stream asks, and summing over thousands of jobs would not be free)."""
        return self._viewer_total

    def topic(self, job_id: str) -> Topic | None:
        """The job's topic, while it has viewers on this node."""
        return self._topics.get(job_id)

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
            topic = self._topics[job_id] = Topic(job_id, channel, shard.name, self.viewer_buffer)
            shard.add(topic)
        viewer = topic.add_viewer()
        self._viewer_total += 1
        self.idle.clear()
        self._dirty.add(job_id)
        if topic.ready.is_set():
            return viewer  # the usual case in a storm: no timer to arm
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
        if topic is None or viewer not in topic.viewers:
            return
        self._viewer_total -= 1
        self._dirty.add(viewer.job_id)
        if topic.remove_viewer(viewer):
            del self._topics[viewer.job_id]
            self._shards[topic.shard_name].remove(topic)
            if not self._topics:
                self.idle.set()

    def close_all(self) -> None:
        """Wake every viewer so streams notice a shutdown at once."""
        for topic in self._topics.values():
            topic.resync_viewers()

    def _on_event(self, topic: Topic) -> None:
        """A shard's call: ``topic`` has new events; wake its viewers after
        LINGER_S, together with every other job's of that window."""
        self._due.append(topic)
        if self._wakeups is None:
            self._wakeups = asyncio.get_running_loop().call_later(LINGER_S, self._wake_due)

    def _wake_due(self) -> None:
        due, self._due, self._wakeups = self._due, [], None
        for topic in due:
            topic.wake_viewers()

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
