"""A promoted replica that lacks a job's last events, simulated on one real
Redis: the job's keys are saved (``DUMP``) as the replica last had them,
the writer appends on, and the keys are put back (``RESTORE``) as the
failover would leave them. The writer restores what was lost."""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis as RawRedis

from services import eventlog
from services.errors import Fenced
from services.eventlog import EventLog, LogAppender
from services.events import COMPLETED
from services.keys import Keys
from tests.integration.test_hub import bare_job

pytestmark = pytest.mark.timeout(60)

STARTED_AT = "2026-12-01T10:00:00.000Z"
JOB = "restoredJob-0123456789"  # 22 URL-safe characters, as the web tier wants


class ReplicaView:
    """The job's keys as a replica had them when ``save`` was called."""

    def __init__(self, url: str, keys: Keys, job_id: str):
        self.raw = RawRedis.from_url(url)
        self.names = keys.job_keys(job_id)[:3]  # the hash, the log, the text
        self.saved: dict[str, bytes | None] = {}

    async def save(self) -> None:
        self.saved = {name: await self.raw.dump(name) for name in self.names}

    async def promote(self) -> None:
        """The keys go back to what was saved: the writes since are lost."""
        for name, value in self.saved.items():
            await self.raw.delete(name)
            if value is not None:
                await self.raw.restore(name, 0, value)

    async def aclose(self) -> None:
        await self.raw.aclose()


@pytest.fixture
async def replica(redis_url, keys):
    view = ReplicaView(redis_url, keys, JOB)
    yield view
    await view.aclose()


async def log_of(redis, keys: Keys, job_id: str) -> list[tuple[int, str, str]]:
    return [(e.id, e.name, e.data) for e in await EventLog(redis, keys).read(job_id, 0)]


async def test_the_writer_restores_the_events_the_promoted_replica_lacks(redis, keys, replica):
    writer = await bare_job(redis, keys, JOB)
    await writer.start("demo", STARTED_AT)
    await writer.append_tokens(["a", "b"])
    await replica.save()  # the replica has events 1 to 3
    await writer.append_tokens(["c"])
    await writer.append_tokens(["d", "e"])
    before = await log_of(redis, keys, JOB)
    await replica.promote()
    assert [event[0] for event in await log_of(redis, keys, JOB)] == [1, 2, 3]

    await writer.append_tokens(["f"])
    await writer.finish(COMPLETED, "stop", finished_at=STARTED_AT)

    after = await log_of(redis, keys, JOB)
    assert after[: len(before)] == before  # the same ids with the same events
    assert [event[0] for event in after] == list(range(1, 9))
    assert [event[1] for event in after[6:]] == ["token", "done"]
    job = await redis.hgetall(keys.job(JOB))
    assert (job["last_event_id"], job["tokens"], job["status"]) == ("8", "6", "completed")
    assert await redis.get(keys.text(JOB)) == "abcdef"
    assert json.loads(after[-1][2])["tokens"] == 6


async def test_a_retried_restore_that_landed_restores_nothing_twice(redis, keys, replica):
    writer = await bare_job(redis, keys, JOB)
    await writer.start("demo", STARTED_AT)
    await replica.save()
    await writer.append_tokens(["a", "b"])
    await replica.promote()
    args = eventlog.restore_args(writer.owner, 2, [("token", '{"text": "a"}', "a")])
    appender = LogAppender(redis)
    job_keys = keys.job_keys(JOB)
    assert await appender.restore(job_keys, args) == 2
    assert await appender.restore(job_keys, args) == 2  # its reply was lost: asked again
    assert await redis.get(keys.text(JOB)) == "a"
    with pytest.raises(Fenced, match="moved on"):  # not onto a log that ends elsewhere
        await appender.restore(job_keys, eventlog.restore_args(writer.owner, 5, args[3:]))


async def test_a_log_that_lost_more_than_the_writer_keeps_fences_it(
    redis, keys, replica, monkeypatch
):
    monkeypatch.setattr(eventlog, "RESTORE_WINDOW", 2)
    writer = await bare_job(redis, keys, JOB)
    await writer.start("demo", STARTED_AT)
    await replica.save()
    await writer.append_tokens(["a", "b", "c"])
    await replica.promote()
    with pytest.raises(Fenced, match="lost events 2 to 4; this writer kept only 2"):
        await writer.append_tokens(["d"])
    assert [event[0] for event in await log_of(redis, keys, JOB)] == [1]


async def test_a_job_the_promoted_replica_never_had_fences_its_writer(redis, keys, replica):
    await replica.save()  # before the job was created
    writer = await bare_job(redis, keys, JOB)
    await writer.start("demo", STARTED_AT)
    await replica.promote()
    with pytest.raises(Fenced, match="the job does not exist"):
        await writer.append_tokens(["a"])
