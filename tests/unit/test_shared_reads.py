"""Catch-up reads shared by a job's viewers (``Topic.catch_up_read``), on
the embedded broker: who may be given whose read, and that nothing is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services import topic as topic_module
from services.errors import BrokerUnavailable
from services.eventlog import EventLog, JobWriter
from services.events import COMPLETED, Event
from services.feed import END, Batch, Feed, FeedSession
from services.hub import Hub
from services.jobs import StreamPosition
from services.keys import Keys
from services.redisconn import EmbeddedBroker
from services.topic import LogPage, Topic
from tests.integration.test_hub import bare_job, eventually, write_tokens
from tests.support import core_for_test

pytestmark = pytest.mark.timeout(20)

JOB = "shared-read-job"
BUFFER = 4  # live events a job keeps: small, so that tests can outrun it


class GatedLog(EventLog):
    """The log, noting the id each read starts after; a read waits while
    ``gate`` is clear, and raises once if ``fail_next`` is set."""

    def __init__(self, redis, keys: Keys):
        super().__init__(redis, keys)
        self.reads: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False

    async def read(self, job_id: str, after: int, limit: int | None = None) -> list[Event]:
        self.reads.append(after)
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise BrokerUnavailable("the test's broker blinked")
        return await super().read(job_id, after, limit)


class Node:
    """A hub and a feed over the embedded broker, the feed reading a ``GatedLog``."""

    def __init__(self, viewer_buffer: int):
        broker = EmbeddedBroker()
        self.redis = broker.client()
        self.keys = Keys("unit")
        self.core = core_for_test(self.redis, self.keys)
        self.hub = Hub(
            broker,
            self.redis,
            self.keys,
            self.core.viewers,
            node_id="unit-node",
            viewer_buffer=viewer_buffer,
        )
        self.log = GatedLog(self.redis, self.keys)
        self.feed = Feed(
            self.hub,
            self.log,
            self.core.store.exists,
            keepalive_s=15,
            grace_s=30,
            retention_s=60,
        )

    async def open(self, after: int = 0) -> FeedSession:
        session = await self.feed.open(JOB, after)
        assert session is not None
        return session

    @property
    def topic(self) -> Topic:
        topic = self.hub.topic(JOB)
        assert topic is not None
        return topic

    async def reads_started(self, count: int) -> None:
        await eventually(lambda: len(self.log.reads) == count, 5)
        await asyncio.sleep(0.01)  # whoever else was about to step has joined it by now

    def resubscribe(self) -> None:
        """What the hub's shard does when its connection drops and is made again."""
        self.topic.unsubscribed()
        self.topic.subscribed()


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = Node(viewer_buffer=BUFFER)
    await node.hub.start()
    try:
        yield node
    finally:
        await node.hub.stop()
        await node.redis.aclose()


@pytest.fixture
def keep_reads(monkeypatch):
    """Reads stay shareable for the whole test, however slow the machine."""
    monkeypatch.setattr(topic_module, "SHARED_READ_S", 30.0)


async def started_job(node: Node, tokens: int) -> JobWriter:
    writer = await bare_job(node.redis, node.keys, JOB)
    await writer.start("demo", "2026-01-01T00:00:00.000Z")
    await write_tokens(writer, [f" t{i}" for i in range(tokens)])
    return writer


async def batch(session: FeedSession) -> Batch:
    step = await asyncio.wait_for(session.next(), 5)
    assert isinstance(step, Batch), step
    return step


def expanded(batches: list[Batch]) -> list[int]:
    """Ids covered, merged token ranges expanded."""
    ids: list[int] = []
    for event in (event for b in batches for event in b.events):
        first = event.payload().get("first_id") if event.name == "token" else None
        ids.extend(range(first, event.id + 1) if first else [event.id])
    return ids


async def rest_of(session: FeedSession) -> list[Batch]:
    got = []
    while (step := await asyncio.wait_for(session.next(), 5)) is not END:
        if isinstance(step, Batch):
            got.append(step)
    return got


async def test_viewers_resuming_from_one_id_share_one_read(node, keep_reads):
    await started_job(node, tokens=3)
    first, second = await node.open(), await node.open()
    node.log.gate.clear()
    steps = [asyncio.create_task(first.next()), asyncio.create_task(second.next())]
    await node.reads_started(1)
    node.log.gate.set()
    a, b = await asyncio.wait_for(asyncio.gather(*steps), 5)
    assert node.log.reads == [0]  # one XRANGE for both
    assert a.events is b.events  # one merged list, so its frames are encoded once
    assert [(e.id, e.name) for e in a.events] == [(1, "start"), (4, "token")]
    # A viewer opening after the read ended is given it too.
    third = await node.open()
    assert (await batch(third)).events is a.events
    assert node.log.reads == [0]
    # A different resume id is a different read.
    fourth = await node.open(after=2)
    assert [e.id for e in (await batch(fourth)).events] == [4]
    assert node.log.reads == [0, 2]


async def test_a_read_under_way_across_a_resubscribe_is_not_given_to_a_new_viewer(node, keep_reads):
    await started_job(node, tokens=2)
    early = await node.open()
    node.log.gate.clear()
    early_step = asyncio.create_task(early.next())
    await node.reads_started(1)
    node.resubscribe()  # the read was sent under the old subscription
    late = await node.open()
    late_step = asyncio.create_task(late.next())
    await node.reads_started(2)  # its own read, not the old one
    node.log.gate.set()
    got_early, got_late = await asyncio.wait_for(asyncio.gather(early_step, late_step), 5)
    assert node.log.reads == [0, 0]
    assert got_early.events is not got_late.events
    assert expanded([got_late]) == [1, 2, 3]


async def test_a_finished_read_of_an_older_epoch_is_not_given_to_a_later_viewer(node, keep_reads):
    writer = await started_job(node, tokens=2)
    early = await node.open()
    assert expanded([await batch(early)]) == [1, 2, 3]
    node.resubscribe()
    await write_tokens(writer, [" later"])
    late = await node.open()
    got = await batch(late)
    assert node.log.reads == [0, 0]
    assert expanded([got]) == [1, 2, 3, 4]  # read after the resubscribe: it has id 4


async def test_a_late_viewer_gets_what_came_after_a_shared_read_once_and_in_order(node, keep_reads):
    writer = await started_job(node, tokens=3)
    early = await node.open()
    shared = await batch(early)
    assert expanded([shared]) == [1, 2, 3, 4]
    # Published after the read, before the late viewer attaches: live only.
    await write_tokens(writer, [" a", " b"])
    await eventually(lambda: node.topic.since(4) and not node.topic.wake_due, 5)
    late = await node.open()
    assert (await batch(late)).events is shared.events
    # At once, from the buffer: no wake-up is due for events that came
    # before the viewer did.
    then = await batch(late)
    assert expanded([then]) == [5, 6]
    await writer.finish(COMPLETED, "stop", finished_at="2026-01-01T00:00:01.000Z")
    got = [shared, then, *await rest_of(late)]
    assert node.log.reads == [0]
    assert expanded(got) == list(range(1, 8))
    assert got[-1].events[-1].name == "done"  # the end, never missed
    assert expanded([shared, *await rest_of(early)]) == list(range(1, 8))


async def test_a_read_the_buffer_has_outrun_is_not_given_again(node, keep_reads):
    writer = await started_job(node, tokens=2)
    probe = await node.hub.attach(JOB)  # keeps the topic, and its reads, alive
    at_end = await node.open(after=3)
    step = asyncio.create_task(at_end.next())
    await node.reads_started(1)  # an empty read: nothing after id 3 yet
    step.cancel()
    at_end.close()
    await write_tokens(writer, [f" n{i}" for i in range(10)])  # ids 4-13; the buffer keeps 4
    await eventually(lambda: node.topic.since(12), 5)
    # Given that empty read, a viewer resuming from id 3 would find a gap in
    # the buffer, be given it again, and so on without end: it reads itself.
    late = await node.open(after=3)
    assert expanded([await batch(late)]) == list(range(4, 14))
    assert node.log.reads == [3, 3]
    # That one the buffer continues: it is given again.
    later = await node.open(after=3)
    assert expanded([await batch(later)]) == list(range(4, 14))
    assert node.log.reads == [3, 3]
    node.hub.detach(probe)


async def test_a_failed_read_is_not_kept():
    topic = Topic(JOB, "channel", "main", limit=16)
    topic.subscribed()
    calls: list[int] = []

    async def failing(job_id: str, after: int) -> LogPage:
        calls.append(after)
        raise BrokerUnavailable("the test's broker blinked")

    async def working(job_id: str, after: int) -> LogPage:
        calls.append(after)
        return LogPage([Event(1, "start", "{}")], False, False, 1)

    with pytest.raises(BrokerUnavailable):
        await topic.catch_up_read(0, failing)
    page = await topic.catch_up_read(0, working)
    assert calls == [0, 0] and page.end == 1


async def test_a_viewer_leaving_mid_read_does_not_cancel_it_for_the_others():
    topic = Topic(JOB, "channel", "main", limit=16)
    topic.subscribed()
    gate = asyncio.Event()
    calls: list[int] = []

    async def read(job_id: str, after: int) -> LogPage:
        calls.append(after)
        await gate.wait()
        return LogPage([Event(1, "start", "{}")], False, False, 1)

    async def viewer_step() -> LogPage:
        return await topic.catch_up_read(0, read)

    leaving, staying = asyncio.create_task(viewer_step()), asyncio.create_task(viewer_step())
    await eventually(lambda: calls, 5)
    leaving.cancel()
    gate.set()
    page = await asyncio.wait_for(staying, 5)
    assert calls == [0] and page.end == 1
    assert leaving.cancelled()


async def test_a_topic_learns_the_log_end_from_this_subscription_only():
    topic = Topic(JOB, "channel", "main", limit=16)
    topic.subscribed()
    topic.add_event(Event(7, "token", '{"text":"x"}', 1000))
    assert (topic.known_id, topic.done_at) == (7, None)
    topic.add_event(Event(8, "done", "{}", 1001))
    assert topic.known_id == 8 and topic.done_at is not None
    topic.unsubscribed()  # another broker may be next: start over
    assert (topic.known_id, topic.done_at) == (0, None)


async def test_the_feed_knows_a_running_jobs_position_only_as_far_as_it_saw(node):
    writer = await started_job(node, tokens=2)  # ids 1-3, before any viewer came
    session = await node.open()
    assert node.feed.known_position(JOB, 0) is None  # seen nothing yet
    await batch(session)  # read after the subscription went live: ids 1-3
    assert node.feed.known_position(JOB, 3) == StreamPosition(3, False)
    assert node.feed.known_position(JOB, 4) is None  # past what it saw: Redis decides
    await write_tokens(writer, [" live"])
    await eventually(lambda: node.feed.known_position(JOB, 4) == StreamPosition(4, False), 5)
    node.resubscribe()
    assert node.feed.known_position(JOB, 0) is None
    await writer.finish(COMPLETED, "stop", finished_at="2026-01-01T00:00:01.000Z")
    await eventually(lambda: node.feed.known_position(JOB, 5) == StreamPosition(5, True), 5)
    node.feed.retention_s = 0  # a done seen longer ago than retention allows: the job may be gone
    assert node.feed.known_position(JOB, 5) is None
    session.close()
    assert node.feed.known_position(JOB, 5) is None  # no viewer left: no topic
