"""Running jobs across a broker outage (API.md, "Broker outage").

Real processes on a Redis of the test's own, stopped with ``SHUTDOWN SAVE``
and started again with its data: no job fails because of the outage, and
every viewer, reconnecting with ``Last-Event-ID`` as a browser does, ends
with exactly its job's text, each event once. A worker that really died
during the outage is still noticed within one lease after the broker returns.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.support import (
    Cluster,
    Process,
    RedisServer,
    Watched,
    create_job,
    job_state,
    wait_until,
    watch_resiliently,
)

pytestmark = pytest.mark.timeout(180)

TOKENS_PER_SECOND = 10


def stop_for(server: RedisServer, seconds: float) -> float:
    """Stop ``server`` keeping its data, start it again after ``seconds``
    (the outage itself is the point: this sleep is the scenario); returns the
    monotonic time it was back."""
    server.shutdown_save()
    time.sleep(seconds)
    server.start()
    return time.monotonic()


def owner_of(server: RedisServer, cluster: Cluster, job_id: str) -> str:
    return server.cli("HGET", f"{cluster.prefix}:{{{job_id}}}:job", "owner").strip()


def wait_tokens(url: str, job_ids: list[str], tokens: int = 3) -> None:
    for job_id in job_ids:
        wait_until(lambda j=job_id: job_state(url, j)["tokens"] >= tokens, 20, what="tokens")


async def watch_through_outage(
    url: str, job_ids: list[str], viewers: int, outage: callable
) -> tuple[list[Watched], float]:
    """``viewers`` viewers spread over ``job_ids`` while ``outage()`` runs
    (in a thread); returns what each got and when the broker was back."""
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, connect=5)) as client:
        watchers = [
            asyncio.create_task(watch_resiliently(client, job_ids[i % len(job_ids)], give_up_s=150))
            for i in range(viewers)
        ]
        back_at = await asyncio.to_thread(outage)
        watched = await asyncio.wait_for(asyncio.gather(*watchers), 150)
    return list(watched), back_at


def assert_exact(url: str, job_id: str, watched: list[Watched]) -> dict:
    """Each viewer of ``job_id`` has its whole log, each id once, and its text."""
    state = job_state(url, job_id)
    assert state["finished_at"], state
    for got in watched:
        assert got.covered_ids == list(range(1, int(state["last_event_id"]) + 1))
        assert got.text == state["text"]
        assert got.done is not None and got.done["status"] == state["status"]
    return state


def run_jobs_through_outage(own_redis: RedisServer, outage_s: float, **settings: str) -> None:
    """3 running jobs, 20 viewers, an outage of ``outage_s``: all complete, exactly."""
    with Cluster(own_redis.url, broker_grace_seconds="5", **settings) as cluster:
        web = cluster.web()
        cluster.worker()
        tokens = int(TOKENS_PER_SECOND * (outage_s + 6))  # still running once the broker is back
        demo = {"tokens_per_second": TOKENS_PER_SECOND}
        job_ids = [create_job(web.url, max_tokens=tokens, demo=demo) for _ in range(3)]
        wait_tokens(web.url, job_ids)
        unfinished_when_back: list[str] = []

        def outage() -> float:
            back_at = stop_for(own_redis, outage_s)
            unfinished_when_back.extend(
                j for j in job_ids if not job_state(web.url, j)["finished_at"]
            )
            return back_at

        watched, _back_at = asyncio.run(watch_through_outage(web.url, job_ids, 20, outage))
        assert unfinished_when_back == job_ids  # the outage did hit running jobs
        for index, job_id in enumerate(job_ids):
            state = assert_exact(web.url, job_id, watched[index :: len(job_ids)])
            assert (state["status"], state["error"]) == ("completed", None), state
        assert max(got.connections for got in watched) > 1  # the outage did cut the streams


def test_a_six_second_outage_fails_no_job_and_loses_nothing(own_redis):
    run_jobs_through_outage(own_redis, 6, lease_seconds="30")


@pytest.mark.failover
def test_an_outage_of_twice_the_lease_fails_no_job_and_loses_nothing(own_redis):
    run_jobs_through_outage(own_redis, 20, lease_seconds="10")


@pytest.mark.failover
def test_a_worker_killed_during_the_outage_is_noticed_within_a_lease(own_redis):
    lease_s = 10
    settings = {"lease_seconds": str(lease_s), "broker_grace_seconds": "5"}
    with Cluster(own_redis.url, worker_concurrency="1", **settings) as cluster:
        web = cluster.web()
        doomed: Process = cluster.worker(node_id="doomed")
        demo = {"tokens_per_second": TOKENS_PER_SECOND}
        lost = create_job(web.url, max_tokens=300, demo=demo)
        wait_tokens(web.url, [lost])
        cluster.worker(node_id="alive")
        kept = create_job(web.url, max_tokens=260, demo=demo)
        wait_tokens(web.url, [kept])
        assert owner_of(own_redis, cluster, lost).startswith("worker-doomed/")
        assert owner_of(own_redis, cluster, kept).startswith("worker-alive/")

        def outage() -> float:
            own_redis.shutdown_save()
            doomed.signal(signal.SIGKILL)
            time.sleep(20)
            own_redis.start()
            back = time.monotonic()
            wait_until(lambda: job_state(web.url, lost)["finished_at"], lease_s, 0.1, what="end")
            ended_after.append(time.monotonic() - back)
            return back

        ended_after: list[float] = []
        watched, _back_at = asyncio.run(watch_through_outage(web.url, [lost, kept], 10, outage))
        assert ended_after[0] < lease_s
        state = assert_exact(web.url, lost, watched[0::2])
        assert (state["status"], state["error"]["code"]) == ("failed", "worker_lost")
        assert assert_exact(web.url, kept, watched[1::2])["status"] == "completed"
