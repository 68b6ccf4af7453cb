"""Streams of one running job, opened in storms over HTTP while it is being
written: they share the node's catch-up reads and its knowledge of the log's
end, and each still gets every event exactly once, in order, to its done."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.events import COMPLETED
from services.jobs import new_job_id, now_iso
from services.keys import Keys
from services.redisconn import connect
from tests.integration.test_hub import bare_job, write_tokens
from tests.support import Cluster, Received, aread_stream

pytestmark = pytest.mark.timeout(90)

WAVE = 25  # streams opened at once, from the start and from event RESUME_AFTER
RESUME_AFTER = 20


def commands(info: dict, name: str) -> int:
    return int(info.get(f"cmdstat_{name}", {}).get("calls", 0))


def check(got: Received, after: int, last: int) -> None:
    assert got.status == 200
    assert got.covered_ids == list(range(after + 1, last + 1))  # each once, in order
    assert got.done is not None and got.done["status"] == "completed"


async def test_storms_of_streams_on_a_running_job_get_every_event_once(own_redis):
    """Three waves: before anything live, while tokens flow, and right before
    the done; from id 0 and from RESUME_AFTER."""
    redis = connect(own_redis.url)
    with Cluster(own_redis.url) as cluster:
        web = cluster.web()
        keys = Keys(cluster.prefix)
        job_id = new_job_id()
        writer = await bare_job(redis, keys, job_id)
        await writer.start("demo", now_iso())
        await write_tokens(writer, [f" w{i}" for i in range(40)])  # ids 1-41
        await redis.config_resetstat()
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=web.url, timeout=60, limits=limits) as client:
            streams: list[tuple[int, asyncio.Task[Received]]] = []

            def wave() -> None:
                for after in (0, RESUME_AFTER):
                    streams.extend(
                        (after, asyncio.create_task(aread_stream(client, job_id, after)))
                        for _ in range(WAVE)
                    )

            wave()
            await write_tokens(writer, [f" x{i}" for i in range(60)], pause=0.005)
            wave()
            await write_tokens(writer, [f" y{i}" for i in range(60)], pause=0.005)
            wave()
            await writer.finish(COMPLETED, "stop", finished_at=now_iso())
            last = writer.last_id
            got = await asyncio.wait_for(asyncio.gather(*(task for _, task in streams)), 60)
        info = await redis.info("commandstats")
        await redis.aclose()
    for (after, _task), received in zip(streams, got, strict=True):
        check(received, after, last)
    # 150 streams: without sharing, one XRANGE and one HMGET each.
    opened = len(streams)
    assert commands(info, "xrange") < opened / 3, info.get("cmdstat_xrange")
    # Redis counts a script's commands too: each append (an EVALSHA) runs one HMGET.
    position_lookups = commands(info, "hmget") - commands(info, "evalsha")
    assert position_lookups < opened, info.get("cmdstat_hmget")
