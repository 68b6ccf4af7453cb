"""A Redis that restarts or crashes under a web node and a worker (API.md, "Broker outage").

Real processes on a Redis of the test's own: once ``/readyz`` says 200 after
a restart, a burst of requests all succeed on their first try; while the
broker is down, loading its data or demoted to a replica, requests get 503
with Retry-After, never a 500. Running jobs across an outage:
``test_outage_jobs.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests.support import (
    Cluster,
    RedisServer,
    create_job,
    http_status,
    wait_finished,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

BURST = 12


def restart_with_data(server: RedisServer) -> None:
    server.shutdown_save()
    server.start()


def crash_without_data(server: RedisServer) -> None:
    server.kill()
    server.forget()
    server.start()


def wait_ready(url: str, timeout: float = 15) -> None:
    """Return the moment ``/readyz`` answers 200 (polled every 10 ms)."""
    wait_until(lambda: http_status(f"{url}/readyz") == 200, timeout, 0.01, what="/readyz 200")


async def burst(url: str, job_ids: list[str]) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """``BURST`` creations and a lookup of each of ``job_ids``, all at once."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        posts = [
            client.post("/v1/jobs", json={"prompt": "after the restart"}) for _ in range(BURST)
        ]
        gets = [client.get(f"/v1/jobs/{job_id}") for job_id in job_ids]
        replies = await asyncio.gather(*posts, *gets)
    return list(replies[:BURST]), list(replies[BURST:])


def describe(responses: list[httpx.Response]) -> list[str]:
    return [f"{r.status_code} {r.text[:120]}" for r in responses]


@pytest.fixture
def node(own_redis):
    """A web node and a worker on a Redis this test restarts."""
    with Cluster(own_redis.url) as cluster:
        cluster.web()
        cluster.worker()
        yield cluster


def prepare(node: Cluster) -> tuple[str, list[str]]:
    """Warm the node's pool with a burst of its own, then leave jobs to look up."""
    web = node.procs[0]
    job_ids = [create_job(web.url, max_tokens=5) for _ in range(BURST)]
    asyncio.run(burst(web.url, job_ids))
    for job_id in job_ids:
        wait_finished(web.url, job_id)
    return web.url, job_ids


@pytest.mark.parametrize(
    ("outage", "lookups"), [(restart_with_data, 200), (crash_without_data, 404)]
)
def test_a_burst_right_after_the_broker_returns_succeeds_first_try(
    node, own_redis, outage, lookups
):
    """Every creation works; a lookup fails only for a job the crash lost."""
    url, job_ids = prepare(node)
    outage(own_redis)
    wait_ready(url)
    posts, gets = asyncio.run(burst(url, job_ids))
    assert [r.status_code for r in posts] == [201] * BURST, describe(posts)
    assert [r.status_code for r in gets] == [lookups] * BURST, describe(gets)
    if lookups == 404:
        assert {r.json()["error"]["code"] for r in gets} == {"job_not_found"}
    for response in posts:  # and the jobs created run to the end
        assert wait_finished(url, response.json()["id"])["status"] == "completed"


def test_readyz_is_503_while_the_broker_is_down(node, own_redis):
    url = node.procs[0].url
    own_redis.kill()
    started = time.monotonic()
    wait_until(lambda: http_status(f"{url}/readyz") == 503, 5, what="/readyz 503")
    assert time.monotonic() - started < 5
    response = httpx.post(f"{url}/v1/jobs", json={"prompt": "nobody home"}, timeout=10)
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "2"
    assert response.json()["error"]["code"] == "broker_unavailable"
    own_redis.start()
    wait_ready(url)
    # New jobs work again (a fast worker may have finished this one already).
    assert wait_finished(url, create_job(url, max_tokens=3))["status"] == "completed"


def test_a_demoted_master_answers_503_until_it_is_master_again(node, own_redis):
    """READONLY (a failover demoted the server) is unavailability, never a 500."""
    url = node.procs[0].url
    with RedisServer().start() as master:
        own_redis.cli("REPLICAOF", "127.0.0.1", str(master.port))
        wait_until(lambda: http_status(f"{url}/readyz") == 503, 5, what="/readyz 503")
        response = httpx.post(f"{url}/v1/jobs", json={"prompt": "read only"}, timeout=10)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "2"
        assert response.json()["error"]["code"] == "broker_unavailable"
        own_redis.cli("REPLICAOF", "NO", "ONE")
    wait_ready(url)
    assert wait_finished(url, create_job(url, max_tokens=3))["status"] == "completed"
    assert "internal_error" not in node.procs[0].log()


# A server that takes about 5 s to load 2500 keys, answering LOADING (slowly) meanwhile.
SLOW_LOADING = ("--key-load-delay", "2000", "--loading-process-events-interval-bytes", "1024")


def test_a_server_loading_its_data_answers_503_until_loaded():
    """LOADING is unavailability, never a 500: readiness and creations wait for it."""
    with RedisServer(extra_args=SLOW_LOADING).start() as server, Cluster(server.url) as node:
        url = node.web().url
        node.worker()
        server.cli("EVAL", "for i = 1, 2500 do redis.call('SET', 'filler' .. i, i) end", "0")
        server.shutdown_save()
        starting = threading.Thread(target=server.start)  # returns once loaded
        starting.start()
        try:
            wait_until(lambda: server.cli("PING").startswith("LOADING"), 10, what="LOADING")
            assert http_status(f"{url}/readyz") == 503
            response = httpx.post(f"{url}/v1/jobs", json={"prompt": "loading"}, timeout=10)
            assert server.cli("PING").startswith("LOADING"), "loaded too soon to tell"
        finally:
            starting.join()
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "2"
        assert response.json()["error"]["code"] == "broker_unavailable"
        wait_ready(url)
        assert wait_finished(url, create_job(url, max_tokens=3))["status"] == "completed"
        assert "internal_error" not in node.procs[0].log()
