"""A promoted replica that lacks a job's last events, simulated on one real
Redis: the job's keys are saved (``DUMP``) as the replica last had them,
the writer appends on, and the keys are put back (``RESTORE``) as the
failover would leave them. The writer restores what was lost, and a viewer
that had seen it waits for it."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from redis.asyncio import Redis as RawRedis

from services import eventlog
from services.errors import Fenced
from services.eventlog import EventLog, JobWriter, LogAppender
from services.events import COMPLETED
from services.keys import Keys
from services.redisconn import connect
from tests.integration.test_hub import bare_job
from tests.support import Cluster, token_items, wait_until

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
    await writer.append(token_items(["a", "b"]))
    await replica.save()  # the replica has events 1 to 3
    await writer.append(token_items(["c"]))
    await writer.append(token_items(["d", "e"]))
    before = await log_of(redis, keys, JOB)
    await replica.promote()
    assert [event[0] for event in await log_of(redis, keys, JOB)] == [1, 2, 3]

    await writer.append(token_items(["f"]))
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
    await writer.append(token_items(["a", "b"]))
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
    await writer.append(token_items(["a", "b", "c"]))
    await replica.promote()
    with pytest.raises(Fenced, match="lost events 2 to 4; this writer kept only 2"):
        await writer.append(token_items(["d"]))
    assert [event[0] for event in await log_of(redis, keys, JOB)] == [1]


async def test_a_job_the_promoted_replica_never_had_fences_its_writer(redis, keys, replica):
    await replica.save()  # before the job was created
    writer = await bare_job(redis, keys, JOB)
    await writer.start("demo", STARTED_AT)
    await replica.promote()
    with pytest.raises(Fenced, match="the job does not exist"):
        await writer.append(token_items(["a"]))


async def read_events(
    client: httpx.AsyncClient, job_id: str, last_event_id: int, texts: list[str] | None = None
) -> list:
    """One connection's events (id, name) and keepalive comments ("keepalive"),
    to its end; the tokens' texts go to ``texts``."""
    got: list = []
    headers = {"Last-Event-ID": str(last_event_id)}
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        event_id = None
        async for line in response.aiter_lines():
            if line == ": keepalive":
                got.append("keepalive")
            elif line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("event: "):
                got.append((event_id, line[7:]))
            elif line.startswith("data: ") and got[-1][1] == "token" and texts is not None:
                texts.append(json.loads(line[6:])["text"])
    return got


def reconnects(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("tokencast_pubsub_reconnects_total"):
            return float(line.split()[-1])
    return 0.0


async def test_a_viewer_past_the_log_end_right_after_a_failover_waits_for_the_restore(own_redis):
    settings = {"broker_grace_seconds": "3", "keepalive_seconds": "0.5"}
    with Cluster(own_redis.url, **settings) as cluster:
        url = cluster.web().url
        keys = Keys(cluster.prefix)
        redis = connect(own_redis.url)
        replica = ReplicaView(own_redis.url, keys, JOB)
        try:
            writer = await bare_job(redis, keys, JOB)
            await writer.start("demo", STARTED_AT)
            await writer.append(token_items(["a", "b"]))
            await replica.save()
            await writer.append(token_items(["c", "d"]))  # viewers saw up to event 5
            await replica.promote()
            async with httpx.AsyncClient(base_url=url, timeout=20) as client:
                await past_the_end_is_refused_without_a_failover(client)
                # A viewer from the start, live when the pub/sub connection drops.
                texts: list[str] = []
                following = asyncio.create_task(read_events(client, JOB, 0, texts))
                await lose_pubsub(own_redis, url)
                await waits_then_gets_the_rest(client, writer)
                events = [event for event in await following if event != "keepalive"]
                assert events[-1] == (7, "done") and "".join(texts) == "abcde"
        finally:
            await replica.aclose()
            await redis.aclose()


async def past_the_end_is_refused_without_a_failover(client: httpx.AsyncClient) -> None:
    answer = await client.get(f"/v1/jobs/{JOB}/events", headers={"Last-Event-ID": "5"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_last_event_id"


async def lose_pubsub(own_redis, url: str) -> None:
    """The node's pub/sub connection drops and comes back, as in a failover."""
    before = reconnects(url)
    await asyncio.to_thread(
        wait_until, lambda: own_redis.cli("CLIENT", "KILL", "TYPE", "pubsub").strip() == "1", 10
    )
    await asyncio.to_thread(wait_until, lambda: reconnects(url) > before, 10, what="a reconnect")
    await asyncio.to_thread(
        wait_until, lambda: httpx.get(f"{url}/readyz").status_code == 200, 10, what="ready"
    )


async def waits_then_gets_the_rest(client: httpx.AsyncClient, writer: JobWriter) -> None:
    waiting = asyncio.create_task(read_events(client, JOB, 5))
    never_reached = asyncio.create_task(read_events(client, JOB, 50))
    await asyncio.sleep(1.2)  # keepalives meanwhile (the log ends at 3)
    await writer.append(token_items(["e"]))  # restores 4 and 5, then appends 6
    await writer.finish(COMPLETED, "stop", finished_at=STARTED_AT)
    got = await waiting
    assert "keepalive" in got
    assert [event for event in got if event != "keepalive"] == [(6, "token"), (7, "done")]
    # Past the grace, a position the log never reached ends the stream; the
    # client's reconnect then gets the 400.
    assert set(await never_reached) == {"keepalive"}
    answer = await client.get(f"/v1/jobs/{JOB}/events", headers={"Last-Event-ID": "50"})
    assert answer.status_code == 400
