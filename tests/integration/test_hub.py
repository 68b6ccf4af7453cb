"""The hub and a viewer's feed, in-process, against a real Redis."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

import pytest

from services import metrics, redisconn
from services.errors import Fenced
from services.eventlog import EventLog, JobWriter, LogAppender
from services.events import COMPLETED, Event
from services.feed import END, KEEPALIVE, Batch, Feed
from services.hub import Hub
from services.jobs import now_iso
from services.keys import Keys
from services.redisconn import RedisBroker, connect
from services.topic import SHARED_READ_S
from tests.support import core_for_test, token_items

pytestmark = pytest.mark.timeout(60)

OWNER = "test-writer"


async def eventually(condition: Callable[[], object | Awaitable[object]], within_s: float = 10):
    """Wait until ``condition()`` (or what it awaits to) is true; fail after ``within_s``."""
    async with asyncio.timeout(within_s):
        while True:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


async def bare_job(
    redis, keys: Keys, job_id: str, appender: LogAppender | None = None
) -> JobWriter:
    """A running job owned by the test, and its writer."""
    await redis.hset(
        keys.job(job_id),
        mapping={
            "status": "running",
            "owner": OWNER,
            "model": "demo",
            "created_at": now_iso(),
            "spec": '{"prompt": "p", "model": "demo"}',
            "last_event_id": 0,
            "tokens": 0,
        },
    )
    appender = appender or LogAppender(redis)
    return JobWriter(appender, keys, job_id, OWNER, retention_s=60, retry_s=5)


class Harness:
    """A hub and the pieces a feed needs, on one Redis and key prefix."""

    def __init__(self, url: str, keys: Keys, viewer_buffer: int = 512, tick_s: float = 1.0):
        self.redis = connect(url)
        self.keys = keys
        self.core = core_for_test(self.redis, keys)
        self.hub = Hub(
            RedisBroker(url),
            self.redis,
            keys,
            self.core.viewers,
            node_id="test-node",
            viewer_buffer=viewer_buffer,
            tick_s=tick_s,
        )
        self.log = self.core.log
        self.store = self.core.store

    async def __aenter__(self) -> Harness:
        await self.hub.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.hub.stop()
        await self.redis.aclose()

    def feed(self, **kw) -> Feed:
        kw.setdefault("keepalive_s", 15)
        kw.setdefault("grace_s", 30)
        kw.setdefault("retention_s", 60)
        return Feed(self.hub, kw.pop("log", self.log), self.store.exists, **kw)

    async def watch(
        self,
        job_id: str,
        after: int = 0,
        delay: float = 0,
        batches: list[Batch] | None = None,
        **kw,
    ) -> list[Batch]:
        """Collect one viewer's batches (into ``batches`` as they come) until the end."""
        got = [] if batches is None else batches
        session = await self.feed(**kw).open(job_id, after)
        assert session is not None
        try:
            while (step := await session.next()) is not END:
                if isinstance(step, Batch):
                    got.append(step)
                    if delay:
                        await asyncio.sleep(delay)
        finally:
            session.close()
        return got


def events_of(batches: list[Batch]) -> list[Event]:
    return [event for batch in batches for event in batch.events]


def expand(batches: list[Batch]) -> list[int]:
    """Ids covered, merged token ranges expanded."""
    ids: list[int] = []
    for event in events_of(batches):
        first = event.payload().get("first_id") if event.name == "token" else None
        ids.extend(range(first, event.id + 1) if first else [event.id])
    return ids


def text_of(batches: list[Batch]) -> str:
    return "".join(e.payload()["text"] for e in events_of(batches) if e.name == "token")


def from_log(batch: Batch) -> bool:
    """Read from the log (live events carry the time they were appended)."""
    return all(event.appended_ms == 0 for event in batch.events)


def live(batch: Batch) -> bool:
    return all(event.appended_ms > 0 for event in batch.events)


async def write_tokens(writer: JobWriter, tokens: list[str], batch: int = 1, pause: float = 0):
    for i in range(0, len(tokens), batch):
        await writer.append(token_items(tokens[i : i + batch]))
        if pause:
            await asyncio.sleep(pause)


async def write_job(writer: JobWriter, tokens: list[str], batch: int = 1, pause: float = 0):
    await writer.start("demo", now_iso())
    await write_tokens(writer, tokens, batch, pause)
    await writer.finish(COMPLETED, "stop", finished_at=now_iso())


class AppendsDuringFirstRead(EventLog):
    """The log, with the producer appending while a viewer's first read of it
    is under way: what it appends then is not in that read."""

    def __init__(self, redis, keys: Keys, produce: Callable[[], Awaitable[None]]):
        super().__init__(redis, keys)
        self.produce: Callable[[], Awaitable[None]] | None = produce

    async def read(self, job_id: str, after: int, limit: int | None = None) -> list[Event]:
        events = await super().read(job_id, after, limit)
        if self.produce is not None:
            produce, self.produce = self.produce, None
            await produce()
        return events


async def test_event_published_between_history_read_and_live_is_delivered_once(redis_url, keys):
    async with Harness(redis_url, keys) as h:
        writer = await bare_job(h.redis, keys, "race-job")
        await writer.start("demo", now_iso())
        await writer.append(token_items(["a", "b"]))

        async def produce() -> None:
            await writer.append(token_items(["RACE"]))
            await writer.finish(COMPLETED, "stop", finished_at=now_iso())

        log = AppendsDuringFirstRead(h.redis, keys, produce)
        got = await asyncio.wait_for(h.watch("race-job", log=log), 10)
        assert log.produce is None  # the producer did append during the read
        history, *rest = got
        assert from_log(history) and expand([history]) == [1, 2, 3]
        assert rest and all(live(batch) for batch in rest)  # only the pub/sub buffer had them
        assert expand(got) == [1, 2, 3, 4, 5]
        assert text_of(got) == "abRACE"


async def test_event_both_in_history_and_buffer_is_sent_once(redis_url, keys):
    async with Harness(redis_url, keys) as h:
        writer = await bare_job(h.redis, keys, "dup-job")
        session = await h.feed().open("dup-job", 0)  # subscribed; nothing read yet
        assert session is not None
        probe = await h.hub.attach("dup-job")  # shares the job's live buffer
        try:
            await writer.start("demo", now_iso())
            await writer.append(token_items(["x", "y"]))
            # Published after the subscription, before the log is read: in both.
            await eventually(lambda: [e.id for e in probe.take(0)] == [1, 2, 3])
            history = await asyncio.wait_for(session.next(), 5)
            assert isinstance(history, Batch) and from_log(history)
            assert expand([history]) == [1, 2, 3]
            await writer.finish(COMPLETED, "stop", finished_at=now_iso())
            done = await asyncio.wait_for(session.next(), 5)
            assert isinstance(done, Batch) and live(done)
            assert (done.after, [e.name for e in done.events]) == (3, ["done"])
            assert await asyncio.wait_for(session.next(), 5) is END
        finally:
            h.hub.detach(probe)
            session.close()
        assert text_of([history]) == "xy"


async def test_quiet_viewer_is_woken_for_its_keepalive_not_every_tick(redis_url, keys):
    async with Harness(redis_url, keys, tick_s=0.05) as h:
        writer = await bare_job(h.redis, keys, "quiet-job")
        await writer.start("demo", now_iso())
        session = await h.feed(keepalive_s=0.5).open("quiet-job", 0)
        assert session is not None
        viewer = await h.hub.attach("quiet-job")
        try:
            first = await session.next()
            assert isinstance(first, Batch) and [e.id for e in first.events] == [1]
            quiet_from = time.monotonic()
            assert await asyncio.wait_for(session.next(), 5) is KEEPALIVE
            assert 0.45 <= time.monotonic() - quiet_from < 1.0
            # About ten ticks pass before its keepalive is due: none wakes it.
            viewer.take(0)
            quiet_from = time.monotonic()
            viewer.keepalive_due_at(quiet_from + 0.5)
            await asyncio.wait_for(viewer.wait(), 5)
            assert 0.45 <= time.monotonic() - quiet_from < 1.0
        finally:
            h.hub.detach(viewer)
            session.close()


async def test_one_subscription_per_job_however_many_viewers(redis_url, keys):
    channel = keys.channel("shared-job")
    async with Harness(redis_url, keys) as h:

        async def unsubscribed() -> bool:
            return dict(await h.redis.pubsub_numsub(channel))[channel] == 0

        viewers = [await h.hub.attach("shared-job") for _ in range(10)]
        other = await h.hub.attach("other-job")
        assert dict(await h.redis.pubsub_numsub(channel))[channel] == 1
        assert (h.hub.viewer_total, h.hub.local_viewers("shared-job")) == (11, 10)
        h.hub.detach(viewers[0])
        h.hub.detach(viewers[0])  # a second detach of one stream changes nothing
        assert (h.hub.viewer_total, h.hub.local_viewers("shared-job")) == (10, 9)
        for viewer in viewers[1:]:
            h.hub.detach(viewer)
        h.hub.detach(other)
        assert h.hub.viewer_total == 0
        assert h.hub.idle.is_set()
        await eventually(unsubscribed)


async def test_live_frames_are_shared_between_viewers(redis_url, keys):
    async with Harness(redis_url, keys) as h:
        writer = await bare_job(h.redis, keys, "share-job")
        a = await h.hub.attach("share-job")
        b = await h.hub.attach("share-job")
        await writer.start("demo", now_iso())
        await asyncio.wait_for(a.wait(), 6)
        await asyncio.wait_for(b.wait(), 6)
        (event_a,), (event_b,) = a.take(0), b.take(0)
        assert event_a is event_b  # one Event object, so one encoding per node
        h.hub.detach(a)
        h.hub.detach(b)


async def test_many_viewers_late_joiner_and_resume_from_every_position(redis_url, keys):
    tokens = [f" w{i}" for i in range(60)]
    async with Harness(redis_url, keys) as h:
        writer = await bare_job(h.redis, keys, "fan-job")
        early_got: list[list[Batch]] = [[] for _ in range(20)]
        early = [asyncio.create_task(h.watch("fan-job", batches=got)) for got in early_got]
        await eventually(lambda: h.hub.local_viewers("fan-job") == 20)
        await writer.start("demo", now_iso())
        await write_tokens(writer, tokens[:30])
        # Past the early viewers' shared read (of an empty log): the late
        # joiner reads the log itself (within it, it would take the buffer).
        await asyncio.sleep(SHARED_READ_S * 1.5)
        late_got: list[Batch] = []
        late = asyncio.create_task(h.watch("fan-job", batches=late_got))  # joins mid-job
        await eventually(lambda: late_got)
        await write_tokens(writer, tokens[30:], pause=0.002)
        await writer.finish(COMPLETED, "stop", finished_at=now_iso())
        results = await asyncio.wait_for(asyncio.gather(*early, late), 20)
        total = len(tokens) + 2
        for got in results:
            assert expand(got) == list(range(1, total + 1))
            assert text_of(got) == "".join(tokens)
        # The late joiner got the job so far as one merged batch from the log, then live.
        history, *rest = late_got
        assert from_log(history)
        assert [(e.id, e.name) for e in history.events] == [(1, "start"), (31, "token")]
        assert history.events[1].payload()["first_id"] == 2
        assert rest[0].after == 31 and all(live(batch) for batch in rest)
        # A finished job, resumed from each position, gives exactly the rest.
        for after in range(0, total):
            got = await asyncio.wait_for(h.watch("fan-job", after=after), 5)
            assert expand(got) == list(range(after + 1, total + 1))
            assert text_of(got) == "".join(tokens[max(after - 1, 0) :])


async def test_slow_viewer_catches_up_from_the_log_with_a_bounded_buffer(redis_url, keys):
    limit = 16
    tokens = [f" t{i}" for i in range(2000)]
    catch_ups_before = metrics.CATCH_UPS._value.get()
    async with Harness(redis_url, keys, viewer_buffer=limit) as h:
        writer = await bare_job(h.redis, keys, "slow-job")
        probe = await h.hub.attach("slow-job")  # never reads: it measures the job's buffer
        peak = 0

        async def measure() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(probe.take(0)))
                await asyncio.sleep(0.002)

        measuring = asyncio.create_task(measure())
        finished_at: dict[str, float] = {}

        async def timed(name, **kw):
            got = await h.watch("slow-job", **kw)
            finished_at[name] = time.monotonic()
            return got

        fast = asyncio.create_task(timed("fast"))
        slow = asyncio.create_task(timed("slow", delay=0.02))
        await eventually(lambda: h.hub.local_viewers("slow-job") == 3)
        await write_job(writer, tokens, batch=20)
        fast_got, slow_got = await asyncio.wait_for(asyncio.gather(fast, slow), 40)
        measuring.cancel()
        h.hub.detach(probe)
        for got in (fast_got, slow_got):
            assert expand(got) == list(range(1, len(tokens) + 3))
            assert text_of(got) == "".join(tokens)
        assert finished_at["fast"] < finished_at["slow"]
        assert peak == limit  # filled up to its bound, never past it
        # The slow viewer fell behind the buffer and caught up from the log,
        # in merged batches instead of 2000 single events.
        assert metrics.CATCH_UPS._value.get() > catch_ups_before
        assert any(from_log(batch) and batch.after > 1 for batch in slow_got)
        assert len(events_of(slow_got)) < len(events_of(fast_got))


async def test_an_idle_pubsub_connection_outlives_the_socket_timeout(redis_url, keys, monkeypatch):
    # The hub waits for messages with a blocking read; redis-py before 8.1
    # cut such a read at the socket timeout and the hub reconnected.
    monkeypatch.setattr(redisconn, "SOCKET_TIMEOUT_S", 0.2)
    reconnects_before = metrics.PUBSUB_RECONNECTS._value.get()
    async with Harness(redis_url, keys) as h:
        writer = await bare_job(h.redis, keys, "idle-job")
        await writer.start("demo", now_iso())
        session = await h.feed().open("idle-job", 0)
        assert session is not None
        try:
            first = await session.next()
            assert isinstance(first, Batch) and [e.id for e in first.events] == [1]
            await asyncio.sleep(1.0)  # five socket timeouts without a message
            assert h.hub.healthy()
            assert metrics.PUBSUB_RECONNECTS._value.get() == reconnects_before
            await writer.append(token_items([" still live"]))
            batch = await asyncio.wait_for(session.next(), 2)
            assert isinstance(batch, Batch)
            assert [(e.id, e.payload()["text"]) for e in batch.events] == [(2, " still live")]
        finally:
            session.close()


async def test_killed_pubsub_connection_loses_no_event(own_redis, keys):
    tokens = [f" k{i}" for i in range(300)]
    reconnects_before = metrics.PUBSUB_RECONNECTS._value.get()
    async with Harness(own_redis.url, keys) as h:
        writer = await bare_job(h.redis, keys, "kill-job")
        got: list[list[Batch]] = [[] for _ in range(20)]
        viewers = [asyncio.create_task(h.watch("kill-job", batches=b)) for b in got]
        await writer.start("demo", now_iso())
        await eventually(lambda: all(got))  # every viewer is subscribed and has the start
        producing = asyncio.create_task(write_tokens(writer, tokens, pause=0.003))
        await eventually(lambda: writer.last_id > 50)
        killed = own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub").strip()
        assert killed == "1"  # the hub's one connection, shared by all 20 viewers
        assert writer.last_id < len(tokens)  # mid-job
        await producing
        await writer.finish(COMPLETED, "stop", finished_at=now_iso())
        results = await asyncio.wait_for(asyncio.gather(*viewers), 20)
        assert metrics.PUBSUB_RECONNECTS._value.get() > reconnects_before
        for batches in results:
            assert expand(batches) == list(range(1, len(tokens) + 3))
            assert text_of(batches) == "".join(tokens)


async def test_log_lost_when_the_broker_forgets_the_job(own_redis, keys):
    async with Harness(own_redis.url, keys) as h:
        writer = await bare_job(h.redis, keys, "lost-job")
        await writer.start("demo", now_iso())
        await writer.append(token_items(["a", "b", "c"]))
        lost_before = metrics.LOGS_LOST._value.get()
        batches: list[Batch] = []
        watching = asyncio.create_task(h.watch("lost-job", batches=batches))
        await eventually(lambda: batches)  # the viewer has the job so far
        own_redis.cli("FLUSHALL")
        own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
        got = await asyncio.wait_for(watching, 10)
        assert expand(got) == [1, 2, 3, 4, 5]
        assert metrics.LOGS_LOST._value.get() == lost_before + 1
        done = got[-1].events[-1]
        assert done.name == "done"
        assert done.payload() == {
            "status": "failed",
            "finish_reason": None,
            "tokens": 3,
            "reasoning_tokens": 0,
            "error": {
                "code": "log_lost",
                "message": "the broker lost this job's events (it restarted without persistence)",
            },
        }


async def test_a_retried_append_is_applied_once_and_a_stale_writer_is_fenced(redis_url, keys):
    async with Harness(redis_url, keys) as h:
        writer = await bare_job(h.redis, keys, "idem-job")
        await writer.start("demo", now_iso())
        await writer.append(token_items(["a", "b"]))
        # The same call again, as after a reply lost to a dropped connection.
        writer.last_id = 1
        result = await writer.append(token_items(["a", "b"]))
        assert result.last_id == 3
        events = await h.log.read("idem-job", 0)
        assert [e.id for e in events] == [1, 2, 3]
        assert await h.redis.get(keys.text("idem-job")) == "ab"
        # A writer whose idea of the log is behind (another writer moved it on) is refused.
        stale = JobWriter(LogAppender(h.redis), keys, "idem-job", OWNER, retention_s=60, last_id=1)
        with pytest.raises(Fenced, match="moved on"):
            await stale.append(token_items(["x"]))
        other = JobWriter(
            LogAppender(h.redis), keys, "idem-job", "someone-else", retention_s=60, last_id=3
        )
        with pytest.raises(Fenced, match="another writer owns"):
            await other.append(token_items(["x"]))
        assert [e.id for e in await h.log.read("idem-job", 0)] == [1, 2, 3]
