"""Appends of many jobs share round trips to Redis (``LogAppender``)."""

from __future__ import annotations

import asyncio

import pytest

from services.errors import Fenced
from services.eventlog import EventLog, JobWriter, LogAppender
from services.keys import Keys
from services.redisconn import connect
from tests.integration.test_hub import bare_job
from tests.support import token_items

pytestmark = pytest.mark.timeout(60)


def count_pipelines(redis) -> list[int]:
    """Counts the pipelines (round trips) the client makes from now on."""
    made = [0]
    pipeline = redis.pipeline

    def counting(*args, **kwargs):
        made[0] += 1
        return pipeline(*args, **kwargs)

    redis.pipeline = counting
    return made


async def started_jobs(redis, keys: Keys, appender: LogAppender, count: int) -> list[JobWriter]:
    writers = [await bare_job(redis, keys, f"job-{n}", appender) for n in range(count)]
    for writer in writers:
        await writer.start("demo", "2026-11-25T10:00:00.000Z")
    return writers


async def test_appends_of_forty_jobs_go_out_together_and_each_lands_in_its_own_log(redis, keys):
    appender = LogAppender(redis)
    writers = await started_jobs(redis, keys, appender, 40)
    pipelines = count_pipelines(redis)

    async def three_appends(writer: JobWriter) -> None:
        for n in range(3):
            await writer.append(token_items([f"{writer.job_id}:{n} "]))

    await asyncio.gather(*(three_appends(writer) for writer in writers))

    # 120 appends, each job's three one after another: three round trips, not 120.
    assert pipelines[0] <= 6
    log = EventLog(redis, keys)
    for writer in writers:
        events = await log.read(writer.job_id, 0)
        assert [(e.id, e.name) for e in events] == [
            (1, "start"),
            (2, "token"),
            (3, "token"),
            (4, "token"),
        ]
        expected = "".join(f"{writer.job_id}:{n} " for n in range(3))
        assert await redis.get(keys.text(writer.job_id)) == expected


async def test_a_refusal_goes_only_to_its_own_writer(redis, keys):
    appender = LogAppender(redis)
    writers = await started_jobs(redis, keys, appender, 3)
    fenced = JobWriter(appender, keys, "job-1", "another-owner", retention_s=60, last_id=1)

    results = await asyncio.gather(
        writers[0].append(token_items(["a"])),
        fenced.append(token_items(["x"])),
        writers[2].append(token_items(["c"])),
        return_exceptions=True,
    )

    assert [type(result).__name__ for result in results] == [
        "AppendResult",
        "Fenced",
        "AppendResult",
    ]
    assert isinstance(results[1], Fenced)
    assert str(results[1]) == "another writer owns this job"
    assert await redis.get(keys.text("job-0")) == "a"
    assert await redis.get(keys.text("job-1")) is None
    assert await redis.get(keys.text("job-2")) == "c"


async def test_a_server_that_does_not_know_the_script_gets_it_loaded(own_redis, keys):
    redis = connect(own_redis.url)
    try:
        appender = LogAppender(redis)
        writers = await started_jobs(redis, keys, appender, 2)  # a new server: NOSCRIPT first
        own_redis.cli("SCRIPT", "FLUSH")  # as after a restart
        await asyncio.gather(*(writer.append(token_items(["t"])) for writer in writers))
        for writer in writers:
            assert [e.id for e in await EventLog(redis, keys).read(writer.job_id, 0)] == [1, 2]
    finally:
        await redis.aclose()


async def test_a_cancelled_append_does_not_hold_up_the_others(redis, keys):
    appender = LogAppender(redis)
    writers = await started_jobs(redis, keys, appender, 3)
    tasks = [asyncio.create_task(writer.append(token_items(["t"]))) for writer in writers]
    await asyncio.sleep(0)  # all three queued
    tasks[0].cancel()

    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(results[0], asyncio.CancelledError)
    assert [result.last_id for result in results[1:]] == [2, 2]
    # Queued before its caller left, the append went out anyway: the log
    # moved on, and a retry of the same append is recognised (idempotent).
    assert await redis.get(keys.text("job-0")) == "t"
    assert (await writers[0].append(token_items(["t"]))).last_id == 2


async def test_a_bad_tool_call_fragment_is_refused_after_the_items_before_it(redis, keys):
    from services.items import InvalidItem, Text, ToolCallFragment

    [writer] = await started_jobs(redis, keys, LogAppender(redis), 1)
    with pytest.raises(
        InvalidItem, match="the first tool_call fragment of index 2 must carry id and name"
    ) as info:
        await writer.append(
            [Text("token", "a"), ToolCallFragment(2, "{}", "call_1"), Text("token", "b")]
        )
    assert info.value.field == "name"
    await writer.append([ToolCallFragment(0, "{", "call_1", "f")])
    with pytest.raises(
        InvalidItem, match="tool call 0 has the name 'f'; a later fragment may not change it"
    ) as info:
        await writer.append([ToolCallFragment(0, "}", name="g")])
    assert info.value.field == "name"
    events = await EventLog(redis, keys).read(writer.job_id, 0)
    assert [(e.name, e.payload()) for e in events[1:]] == [
        ("token", {"text": "a"}),
        ("tool_call", {"index": 0, "id": "call_1", "name": "f", "arguments": "{"}),
    ]
    assert (writer.tokens, writer.last_id) == (1, 3)


async def test_a_custom_event_built_with_a_reserved_name_is_refused(redis, keys):
    from services.items import CustomEvent, InvalidItem

    [writer] = await started_jobs(redis, keys, LogAppender(redis), 1)
    for name in ("token", "done", "Bad"):
        with pytest.raises(InvalidItem, match=f"a custom event may not be named '{name}'"):
            await writer.append([CustomEvent(name, {})])
    assert (writer.tokens, writer.last_id) == (0, 1)
