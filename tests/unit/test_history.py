"""Finished logs in memory: the same merged batches as the log, read once."""

import asyncio

import pytest

from services.events import Event, done_data, start_data, token_data
from services.history import FinishedLog, FinishedLogs
from services.resume import coalesce, next_run


def finished_events(tokens: int) -> list[Event]:
    events = [Event(1, "start", start_data("j", "demo", "t"))]
    events += [Event(i + 2, "token", token_data(f" w{i}\n😀")) for i in range(tokens)]
    events.append(Event(tokens + 2, "done", done_data("completed", "stop", tokens)))
    return events


@pytest.mark.parametrize("tokens", [0, 1, 2, 7])
def test_after_equals_merging_the_log_from_every_position(tokens):
    events = finished_events(tokens)
    log = FinishedLog(events)
    for sent in range(len(events)):
        expected = coalesce(next_run(events, sent)[0])
        assert log.after(sent) == expected, sent


def test_batches_are_built_once_per_position():
    log = FinishedLog(finished_events(5))
    assert log.after(3) is log.after(3)


class CountingLog:
    def __init__(self, events):
        self.events = events
        self.reads = 0

    async def read(self, job_id, after, limit=None):
        self.reads += 1
        await asyncio.sleep(0.01)
        return self.events[after : after + limit]


async def test_concurrent_viewers_share_one_read():
    source = CountingLog(finished_events(20))
    history = FinishedLogs(source)
    logs = await asyncio.gather(*(history.get("j") for _ in range(50)))
    assert all(log is logs[0] for log in logs)
    assert source.reads == 1
    await history.get("j")
    assert source.reads == 1


async def test_a_running_job_is_not_kept():
    source = CountingLog(finished_events(3)[:-1])  # no done yet
    history = FinishedLogs(source)
    assert await history.get("j") is None
    assert await history.get("j") is None
    assert source.reads == 2
