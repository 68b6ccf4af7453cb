"""Redis behind Sentinel: the master is lost while jobs stream.

3 web nodes and 2 workers find the master through three sentinels (their
``TOKENCAST_REDIS_URL`` names a port where nothing listens: only Sentinel
says where Redis is). 50 viewers follow 5 running jobs and reconnect by
themselves with ``Last-Event-ID``, as browsers do; a prober keeps looking
jobs up and creating new ones on every node throughout. The master is
killed (``kill -9``), demoted by a failover the sentinels are told to make
(it lives on, as a replica of the new one), or killed while the replica
lacks its last writes.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import redis

from services.keys import Keys
from tests.failover.support import MASTER_NAME, SentinelGroup, sentinel_available
from tests.support import (
    Cluster,
    Process,
    RedisServer,
    Watched,
    create_job,
    job_state,
    wait_finished,
    wait_until,
    watch_resiliently,
)

pytestmark = [
    pytest.mark.failover,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not sentinel_available(), reason="redis-sentinel is not installed"),
]

# Nothing listens there: with sentinels set, the URL's host and port are ignored.
UNREACHABLE_URL = "redis://127.0.0.1:1/0"
JOBS = 5
VIEWERS = 50
READY_WITHIN_S = 5.0


@pytest.fixture
def nodes(sentinels):
    settings = {"redis_sentinels": sentinels.addresses, "keepalive_seconds": "1"}
    with Cluster(UNREACHABLE_URL, **settings) as cluster:
        for _ in range(3):
            cluster.web()
        for _ in range(2):
            cluster.worker()
        yield cluster


def web_nodes(cluster: Cluster) -> list[Process]:
    return [proc for proc in cluster.procs if proc.port]


class Prober:
    """Looks jobs up and creates small ones on every node, keeping every answer."""

    def __init__(self, urls: list[str], job_ids: list[str]):
        self.urls = urls
        self.job_ids = job_ids
        self.answers: list[httpx.Response] = []

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while not stop.is_set():
                for index, url in enumerate(self.urls):
                    job_id = self.job_ids[index % len(self.job_ids)]
                    self.answers.append(await client.get(f"{url}/v1/jobs/{job_id}"))
                    body = {"prompt": "created during the failover", "max_tokens": 5}
                    self.answers.append(await client.post(f"{url}/v1/jobs", json=body))
                await asyncio.sleep(0.1)


def assert_only_retryable_errors(answers: list[httpx.Response]) -> None:
    """No answer >= 500 but a 503 with Retry-After and a JSON error."""
    for answer in answers:
        if answer.status_code >= 500:
            where = f"{answer.request.method} {answer.request.url}"
            assert answer.status_code == 503, f"{where}: {answer.status_code} {answer.text}"
            assert answer.headers.get("Retry-After"), f"{where}: 503 without Retry-After"
            assert answer.json()["error"]["code"] == "broker_unavailable", where


async def ready_at(url: str, deadline: float) -> float:
    """When ``url``'s /readyz first answered 200 (polling until ``deadline``)."""
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return time.monotonic()
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url}/readyz not 200 by the deadline")


def start_jobs(url: str) -> list[str]:
    """Jobs of 150 to 200 tokens at 20 tokens/s: they run through the failover."""
    demo = {"tokens_per_second": 20}
    return [
        create_job(url, prompt=f"failover {index}", max_tokens=200, demo=demo)
        for index in range(JOBS)
    ]


def progress(url: str, job_ids: list[str]) -> list[int]:
    return [int(job_state(url, job)["last_event_id"]) for job in job_ids]


async def lose_master(how: str, sentinels: SentinelGroup, url: str, job_ids: list[str]) -> None:
    """``kill``: kill -9 the master. ``demote``: a failover the sentinels are
    told to make (the old master lives on, demoted). ``kill-behind``: kill -9
    the master while the replica lacks its last few appends of every job."""
    if how == "demote":
        sentinels.sentinels[0].cli("SENTINEL", "FAILOVER", MASTER_NAME)
        return
    if how == "kill-behind":
        sentinels.cut_replication()
        held_at = progress(url, job_ids)
        await asyncio.to_thread(
            wait_until,
            lambda: all(n >= h + 5 for n, h in zip(progress(url, job_ids), held_at, strict=True)),
            10,
            what="5 more events of every job that the replica does not have",
        )
    sentinels.master.kill()
    sentinels.restore_replication()


async def through_failover(
    how: str, sentinels: SentinelGroup, urls: list[str], job_ids: list[str]
) -> tuple[list[Watched], Prober]:
    """Viewers and a prober on every node while the master is lost; returns
    once every node was ready again within ``READY_WITHIN_S`` of the
    promotion and every viewer has its job's ``done``."""
    limits = httpx.Limits(max_connections=VIEWERS + 10, max_keepalive_connections=0)
    clients = [httpx.AsyncClient(base_url=url, timeout=30, limits=limits) for url in urls]
    viewers = [
        asyncio.create_task(
            watch_resiliently(clients[index % len(urls)], job_ids[index % JOBS], give_up_s=120)
        )
        for index in range(VIEWERS)
    ]
    prober, stop_probing = Prober(urls, job_ids), asyncio.Event()
    probing = asyncio.create_task(prober.run(stop_probing))
    try:
        # Every job well under way, viewers following, before the master is lost.
        await asyncio.to_thread(
            wait_until, lambda: min(progress(urls[0], job_ids)) >= 30, 20, what="the jobs"
        )
        await lose_master(how, sentinels, urls[0], job_ids)
        await asyncio.to_thread(wait_until, sentinels.promoted, 30, what="the promotion")
        promoted_at = time.monotonic()
        deadline = promoted_at + READY_WITHIN_S
        ready = await asyncio.gather(*(ready_at(url, deadline) for url in urls))
        assert max(ready) - promoted_at <= READY_WITHIN_S
        await asyncio.sleep(2)  # keep probing a little after the failover
        stop_probing.set()
        await probing
        return await asyncio.wait_for(asyncio.gather(*viewers), 90), prober
    finally:
        stop_probing.set()
        for task in [*viewers, probing]:
            task.cancel()
        for client in clients:
            await client.aclose()


def longest_logs(servers: list[RedisServer], prefix: str, job_ids: list[str]) -> dict[str, dict]:
    """Each job's log, event id -> (name, data), as the server that has the
    most of it holds it (the master: a replica has as much or less)."""
    logs: dict[str, dict] = {job: {} for job in job_ids}
    for server in servers:
        client = redis.Redis(port=server.port, decode_responses=True)
        try:
            for job in job_ids:
                found = client.xrange(Keys(prefix).log(job))
                if len(found) > len(logs[job]):
                    logs[job] = {
                        int(i.split("-")[0]): (f["e"], json.loads(f["d"])) for i, f in found
                    }
        except redis.ConnectionError:
            pass  # the killed master
        finally:
            client.close()
    return logs


def assert_each_id_names_one_event(got: Watched, log: dict[int, tuple[str, dict]]) -> None:
    """Every event a viewer got is the log's event of that id (tokens the
    node merged are the log's tokens over their ids): no id named another
    event for any viewer at any time."""
    for event_id, name, data in got.events:
        if name == "token" and "first_id" in data:
            run = [log[i] for i in range(data["first_id"], event_id + 1)]
            assert all(kind == "token" for kind, _ in run), (event_id, run)
            assert data["text"] == "".join(piece["text"] for _, piece in run), event_id
        else:
            assert (name, data) == log[event_id], event_id


# A graceful failover can lose a job's `done`: the old master takes writes
# until the sentinels demote it, and a writer that has ended never writes
# again, so it cannot restore it; the job then ends worker_lost at that id
# (seen in 2 of 5 runs on a loaded machine). Known gap, in the README's
# failure table: until writers wait for replication (WAIT) it may fail.
DEMOTE_MAY_LOSE_A_DONE = pytest.mark.xfail(
    reason="a done written on the old master after the promotion is lost", strict=False
)


@pytest.mark.parametrize(
    "how", ["kill", pytest.param("demote", marks=DEMOTE_MAY_LOSE_A_DONE), "kill-behind"]
)
async def test_every_viewer_gets_exactly_its_job_through_a_failover(how, sentinels, nodes):
    urls = [node.url for node in web_nodes(nodes)]
    job_ids = start_jobs(urls[0])
    results, prober = await through_failover(how, sentinels, urls, job_ids)
    states = {job: wait_finished(urls[1], job, timeout=60) for job in job_ids}
    for index, got in enumerate(results):
        state = states[job_ids[index % JOBS]]
        assert state["status"] == "completed", state
        assert got.covered_ids == list(range(1, int(state["last_event_id"]) + 1))
        assert got.text == state["text"]
        assert got.done is not None and got.done["status"] == "completed"
    if how == "kill-behind":  # the writers did find their logs behind, and restored them
        restored = [proc for proc in nodes.procs if "restoring them" in proc.log()]
        assert restored, "no writer restored anything: the replica was not behind"
    logs = longest_logs([sentinels.master, sentinels.replica], nodes.prefix, job_ids)
    for index, got in enumerate(results):
        assert_each_id_names_one_event(got, logs[job_ids[index % JOBS]])
    assert_only_retryable_errors([answer for got in results for answer in got.refused])
    assert_only_retryable_errors(prober.answers)
    # Not checked: that every job created during the failover still exists.
    # Replication is asynchronous, and Sentinel demotes the old master only
    # after promoting the replica: a creation the old master acknowledged in
    # between is lost with it (seen: such a job is 404 afterwards).
