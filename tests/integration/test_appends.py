"""Appends of many jobs share round trips to Redis (``LogAppender``)."""

from __future__ import annotations

import asyncio

import pytest

from services import eventlog
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


async def test_round_trips_start_apart_and_the_first_after_a_quiet_spell_goes_at_once(
    redis, keys, monkeypatch
):
    monkeypatch.setattr(eventlog, "MIN_ROUND_TRIP_GAP_S", 0.5)
    first, second = await started_jobs(redis, keys, LogAppender(redis), 2)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.5)  # quiet

    started = loop.time()
    await first.append(token_items(["a"]))
    assert loop.time() - started < 0.4
    started = loop.time()
    await second.append(token_items(["b"]))
    assert loop.time() - started >= 0.3  # it waited for the gap
    assert [first.last_id, second.last_id] == [2, 2]


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


async def job_state(redis, keys: Keys, job_id: str) -> dict:
    """All an append writes of a job: its hash (less its creation time), texts,
    tool calls, and its log after the start event (which names the job)."""
    job = await redis.hgetall(keys.job(job_id))
    job.pop("created_at")
    return {
        "hash": job,
        "text": await redis.get(keys.text(job_id)),
        "reasoning": await redis.get(keys.reasoning(job_id)),
        "tool_calls": await redis.lrange(keys.tool_calls(job_id), 0, -1),
        "log": [(e.id, e.name, e.data) for e in await EventLog(redis, keys).read(job_id, 1)],
    }


async def test_one_append_of_many_kinds_writes_what_one_append_per_item_does(redis, keys):
    from services.events import COMPLETED, Event
    from services.items import CustomEvent, Text, ToolCallFragment

    items = [
        Text("reasoning", "think "),
        Text("token", "a"),
        ToolCallFragment(0, '{"q":', "call_1", "search"),
        Text("reasoning", "more"),
        CustomEvent("progress", {"step": 1}),
        ToolCallFragment(0, '"x"}'),
        Text("token", "b"),
        Text("token", "c"),
    ]
    appender = LogAppender(redis)
    batched, single = await started_jobs(redis, keys, appender, 2)
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.channel(batched.job_id), keys.channel(single.job_id))

    result = await batched.append(items)
    for item in items:
        await single.append([item])
    for writer in (batched, single):
        await writer.finish(COMPLETED, "stop", finished_at="2026-11-25T10:00:01.000Z")

    assert result.last_id == 9
    expected = await job_state(redis, keys, single.job_id)
    assert await job_state(redis, keys, batched.job_id) == expected
    assert (expected["text"], expected["reasoning"]) == ("abc", "think more")
    assert expected["hash"]["tokens"] == "3" and expected["hash"]["reasoning_tokens"] == "2"
    assert expected["hash"]["last_event_id"] == "10"
    assert len(expected["tool_calls"]) == 2
    for key in keys.job_keys(batched.job_id):
        if key != keys.channel(batched.job_id) and key != keys.viewers(batched.job_id):
            assert 0 < await redis.pttl(key) <= 60_000
    # Every event was published, in order, with its append time.
    published: dict[str, list[tuple[int, str, str]]] = {}
    async for message in pubsub.listen():
        if message["type"] == "message":
            event = Event.from_message(message["data"])
            assert event.appended_ms > 0
            published.setdefault(message["channel"], []).append((event.id, event.name, event.data))
            if sum(map(len, published.values())) == 18:
                break
    await pubsub.aclose()
    assert published[keys.channel(batched.job_id)] == expected["log"]
    assert published[keys.channel(single.job_id)] == expected["log"]
    # A retried finish that landed changes nothing and answers 'appended'.
    batched.last_id = 9
    again = await batched.finish(COMPLETED, "stop", finished_at="2026-11-25T10:00:01.000Z")
    assert again.last_id == 10
    assert await job_state(redis, keys, batched.job_id) == expected
