"""The hub and a viewer's feed, in-process, against a real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from services import metrics, redisconn
from services.errors import Fenced
from services.eventlog import EventLog, JobWriter, LogAppender
from services.events import COMPLETED, Event
from services.feed import Feed
from services.hub import Hub, Viewer, _Topic
from services.jobs import JobStore, now_iso
from services.keys import Keys
from services.redisconn import MAIN_SHARD, RedisBroker, connect

pytestmark = pytest.mark.timeout(60)

OWNER = "test-writer"


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

    def __init__(self, url: str, keys: Keys, viewer_buffer: int = 512):
        self.redis = connect(url)
        self.keys = keys
        self.hub = Hub(
            RedisBroker(url),
            self.redis,
            keys,
            node_id="test-node",
            viewer_buffer=viewer_buffer,
        )
        self.log = EventLog(self.redis, keys)
        self.store = JobStore(self.redis, keys, retention_s=60, max_queued_jobs=100)

    async def __aenter__(self) -> Harness:
        await self.hub.start()
        await asyncio.wait_for(self.hub._shards[MAIN_SHARD].connected.wait(), 5)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.hub.stop()
        await self.redis.aclose()

    def feed(self, **kw) -> Feed:
        kw.setdefault("keepalive_s", 15)
        kw.setdefault("grace_s", 30)
        return Feed(self.hub, self.log, self.store.exists, **kw)

    async def watch(self, job_id: str, after: int = 0, delay: float = 0, **kw) -> list[Event]:
        """Collect one viewer's events (each batch's events) until done."""
        got: list[Event] = []
        session = await self.feed(**kw).open(job_id, after)
        assert session is not None
        try:
            while (batch := await session.next()) != []:
                if batch:  # None: a keepalive
                    got.extend(batch)
                    if delay:
                        await asyncio.sleep(delay)
        finally:
            session.close()
        return got


def expand(events: list[Event]) -> list[int]:
    """Ids covered, merged token ranges expanded."""
    ids: list[int] = []
    for event in events:
        first = event.payload().get("first_id") if event.name == "token" else None
        ids.extend(range(first, event.id + 1) if first else [event.id])
    return ids


def text_of(events: list[Event]) -> str:
    return "".join(e.payload()["text"] for e in events if e.name == "token")


async def write_job(writer: JobWriter, tokens: list[str], batch: int = 1, pause: float = 0):
    await writer.start("demo", now_iso())
    for i in range(0, len(tokens), batch):
        await writer.append_tokens(tokens[i : i + batch])
        if pause:
            await asyncio.sleep(pause)
    await writer.finish(COMPLETED, "stop", finished_at=now_iso())


async def test_event_published_between_history_read_and_live_is_delivered_once(
    redis_url, keys, monkeypatch
):
    async with Harness(redis_url, keys) as h:
        writer = await bare_job(h.redis, keys, "race-job")
        await writer.start("demo", now_iso())
        await writer.append_tokens(["a", "b"])
        real_read = EventLog.read
        injected = asyncio.Event()

        async def read_then_publish(self, job_id, after, limit=None):
            events = await real_read(self, job_id, after, limit)
            if not injected.is_set():
                injected.set()
                # Published after the history read, before the viewer goes live.
                await writer.append_tokens(["RACE"])
                await writer.finish(COMPLETED, "stop", finished_at=now_iso())
            return events

        monkeypatch.setattr(EventLog, "read", read_then_publish)
        got = await asyncio.wait_for(h.watch("race-job"), 10)
        assert injected.is_set()
        assert expand(got) == [1, 2, 3, 4, 5]
        assert text_of(got) == "abRACE"


async def test_quiet_viewer_is_woken_for_its_keepalive_not_every_tick(redis_url, keys, monkeypatch):
    wakes: list[float] = []
    real_tick = Viewer.tick

    def counted_tick(self: Viewer) -> None:
        wakes.append(time.monotonic())
        real_tick(self)

    monkeypatch.setattr(Viewer, "tick", counted_tick)
    harness = Harness(redis_url, keys)
    harness.hub.tick_s = 0.05
    async with harness as h:
        writer = await bare_job(h.redis, keys, "quiet-job")
        await writer.start("demo", now_iso())
        session = await h.feed(keepalive_s=0.5).open("quiet-job", 0)
        assert session is not None
        try:
            assert [e.id for e in await session.next()] == [1]
            quiet_from = time.monotonic()
            assert await asyncio.wait_for(session.next(), 5) is None  # the keepalive
            waited = time.monotonic() - quiet_from
        finally:
            session.close()
    assert 0.45 <= waited < 1.0
    # About ten ticks passed; the viewer was woken only when its keepalive was due.
    assert len(wakes) == 1


async def test_event_both_in_history_and_buffer_is_sent_once(redis_url, keys, monkeypatch):
    async with Harness(redis_url, keys) as h:
        writer = await bare_job(h.redis, keys, "dup-job")
        await writer.start("demo", now_iso())
        real_read = EventLog.read
        injected = asyncio.Event()

        async def publish_then_read(self, job_id, after, limit=None):
            if not injected.is_set():
                injected.set()
                # Lands in the viewer's buffer *and* in the history it reads next.
                await writer.append_tokens(["x", "y"])
                await writer.finish(COMPLETED, "stop", finished_at=now_iso())
            return await real_read(self, job_id, after, limit)

        monkeypatch.setattr(EventLog, "read", publish_then_read)
        got = await asyncio.wait_for(h.watch("dup-job"), 10)
        assert expand(got) == [1, 2, 3, 4]
        assert text_of(got) == "xy"


async def test_one_subscription_per_job_however_many_viewers(redis_url, keys):
    async with Harness(redis_url, keys) as h:
        viewers = [await h.hub.attach("shared-job") for _ in range(10)]
        other = await h.hub.attach("other-job")
        numsub = dict(await h.redis.pubsub_numsub(keys.channel("shared-job")))
        assert numsub[keys.channel("shared-job")] == 1
        assert h.hub.viewer_total == 11
        for viewer in viewers:
            h.hub.detach(viewer)
        h.hub.detach(other)
        assert h.hub.viewer_total == 0
        await asyncio.sleep(0.2)
        numsub = dict(await h.redis.pubsub_numsub(keys.channel("shared-job")))
        assert numsub[keys.channel("shared-job")] == 0


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
        early = [asyncio.create_task(h.watch("fan-job")) for _ in range(20)]
        await asyncio.sleep(0.1)
        producing = asyncio.create_task(write_job(writer, tokens, pause=0.005))
        await asyncio.sleep(0.15)
        late = asyncio.create_task(h.watch("fan-job"))  # joins mid-job
        await producing
        results = await asyncio.wait_for(asyncio.gather(*early, late), 20)
        total = len(tokens) + 2
        for got in results:
            assert expand(got) == list(range(1, total + 1))
            assert text_of(got) == "".join(tokens)
        # A finished job, resumed from each position, gives exactly the rest.
        for after in range(0, total):
            got = await asyncio.wait_for(h.watch("fan-job", after=after), 5)
            assert expand(got) == list(range(after + 1, total + 1))
            assert text_of(got) == "".join(tokens[max(after - 1, 0) :])


async def test_slow_viewer_catches_up_from_the_log_with_a_bounded_buffer(
    redis_url, keys, monkeypatch
):
    limit = 16
    peak = {"len": 0}
    real_add = _Topic.add_event

    def measuring_add(self, event):
        real_add(self, event)
        peak["len"] = max(peak["len"], len(self.events))

    monkeypatch.setattr(_Topic, "add_event", measuring_add)
    tokens = [f" t{i}" for i in range(2000)]
    async with Harness(redis_url, keys, viewer_buffer=limit) as h:
        writer = await bare_job(h.redis, keys, "slow-job")
        finished_at: dict[str, float] = {}

        async def timed(name, **kw):
            got = await h.watch("slow-job", **kw)
            finished_at[name] = time.monotonic()
            return got

        fast = asyncio.create_task(timed("fast"))
        slow = asyncio.create_task(timed("slow", delay=0.02))
        await asyncio.sleep(0.1)
        await write_job(writer, tokens, batch=20)
        fast_got, slow_got = await asyncio.wait_for(asyncio.gather(fast, slow), 40)
        for got in (fast_got, slow_got):
            assert expand(got) == list(range(1, len(tokens) + 3))
            assert text_of(got) == "".join(tokens)
        assert finished_at["fast"] < finished_at["slow"]
        assert peak["len"] <= limit
        # The slow viewer got merged catch-up frames instead of 2000 single ones.
        assert len(slow_got) < len(fast_got)


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
            assert [e.id for e in await session.next()] == [1]
            await asyncio.sleep(1.0)  # five socket timeouts without a message
            assert h.hub.healthy()
            assert metrics.PUBSUB_RECONNECTS._value.get() == reconnects_before
            await writer.append_tokens([" still live"])
            batch = await asyncio.wait_for(session.next(), 2)
            assert [(e.id, e.payload()["text"]) for e in batch] == [(2, " still live")]
        finally:
            session.close()


async def test_killed_pubsub_connection_loses_no_event(own_redis, keys):
    tokens = [f" k{i}" for i in range(300)]
    async with Harness(own_redis.url, keys) as h:
        writer = await bare_job(h.redis, keys, "kill-job")
        viewers = [asyncio.create_task(h.watch("kill-job")) for _ in range(20)]
        await asyncio.sleep(0.2)
        producing = asyncio.create_task(write_job(writer, tokens, pause=0.003))
        await asyncio.sleep(0.3)
        killed = own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub").strip()
        assert killed == "1"  # the hub's one connection, shared by all 20 viewers
        await producing
        results = await asyncio.wait_for(asyncio.gather(*viewers), 20)
        for got in results:
            assert expand(got) == list(range(1, len(tokens) + 3))
            assert text_of(got) == "".join(tokens)


async def test_log_lost_when_the_broker_forgets_the_job(own_redis, keys):
    async with Harness(own_redis.url, keys) as h:
        writer = await bare_job(h.redis, keys, "lost-job")
        await writer.start("demo", now_iso())
        await writer.append_tokens(["a", "b", "c"])
        lost_before = metrics.LOGS_LOST._value.get()
        watching = asyncio.create_task(h.watch("lost-job"))
        await asyncio.sleep(0.3)
        own_redis.cli("FLUSHALL")
        own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub")
        got = await asyncio.wait_for(watching, 10)
        assert expand(got) == [1, 2, 3, 4, 5]
        assert metrics.LOGS_LOST._value.get() == lost_before + 1
        assert got[-1].name == "done"
        assert got[-1].payload() == {
            "status": "failed",
            "finish_reason": None,
            "tokens": 3,
            "error": {
                "code": "log_lost",
                "message": "the broker lost this job's events (it restarted without persistence)",
            },
        }


async def test_a_retried_append_is_applied_once_and_a_stale_writer_is_fenced(redis_url, keys):
    async with Harness(redis_url, keys) as h:
        writer = await bare_job(h.redis, keys, "idem-job")
        await writer.start("demo", now_iso())
        await writer.append_tokens(["a", "b"])
        # The same call again, as after a reply lost to a dropped connection.
        writer.last_id = 1
        result = await writer.append_tokens(["a", "b"])
        assert result.last_id == 3
        events = await h.log.read("idem-job", 0)
        assert [e.id for e in events] == [1, 2, 3]
        assert await h.redis.get(keys.text("idem-job")) == "ab"
        # A writer whose idea of the log is behind (another writer moved it on) is refused.
        stale = JobWriter(LogAppender(h.redis), keys, "idem-job", OWNER, retention_s=60, last_id=1)
        with pytest.raises(Fenced, match="moved on"):
            await stale.append_tokens(["x"])
        other = JobWriter(
            LogAppender(h.redis), keys, "idem-job", "someone-else", retention_s=60, last_id=3
        )
        with pytest.raises(Fenced, match="another writer owns"):
            await other.append_tokens(["x"])
        assert [e.id for e in await h.log.read("idem-job", 0)] == [1, 2, 3]


def test_job_buffer_keeps_recent_live_events_and_gives_each_viewer_the_newer_ones():
    topic = _Topic("buffer-job", "channel", shard=None, limit=10)
    for event_id, appended_ms in [(1, 0), (2, 1000), (3, 2500), (4, 2600), (5, 2700), (6, 3100)]:
        topic.add_event(Event(event_id, "token", '{"text":"x"}', appended_ms))
    # Older than KEEP_LIVE_MS (2 s) behind the newest: dropped.
    assert [event.id for event in topic.events] == [3, 4, 5, 6]
    assert [event.id for event in topic.since(4)] == [5, 6]
    assert topic.since(6) == []
    # Behind the buffer: what it has starts past id 2, so the viewer re-reads the log.
    assert [event.id for event in topic.since(1)] == [3, 4, 5, 6]
    topic.add_event(Event(5, "token", '{"text":"again"}', 3200))  # a repeat: ignored
    assert [event.id for event in topic.events] == [3, 4, 5, 6]
    topic.add_event(Event(9, "token", '{"text":"x"}', 3300))  # ids skipped: start over
    assert [event.id for event in topic.events] == [9]
    assert [event.id for event in topic.since(6)] == [9]  # starts past 7: a gap
