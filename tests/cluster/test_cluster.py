"""A local cluster behind real nginx: 3 web nodes, 2 workers, our own Redis.

Every viewer reconnects by itself with Last-Event-ID (as EventSource does),
and every test checks that each viewer's text equals the job's ``text`` and
that its ids run 1..N with no gap or duplicate.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import time

import httpx
import pytest

from deploy.local.cluster import LocalCluster, http_status
from tests.support import create_job, job_state, wait_finished, wait_until, watch_resiliently

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed"),
]


def start_cluster(**settings: str) -> LocalCluster:
    settings.setdefault("keepalive_seconds", "1")
    settings.setdefault("drain_seconds", "5")
    return LocalCluster(web=3, workers=2, **settings).start()


@pytest.fixture
def cluster():
    cluster = start_cluster(lease_seconds="10")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def short_lease_cluster():
    cluster = start_cluster(lease_seconds="2")
    try:
        yield cluster
    finally:
        cluster.stop()


def assert_exact(results, state: dict) -> None:
    """Each viewer got the whole job, each event once, in order."""
    expected = list(range(1, int(state["last_event_id"]) + 1))
    for got in results:
        assert got.covered_ids == expected
        assert got.text == state["text"]
        assert got.done["status"] == state["status"]


async def watchers(url: str, job_id: str, count: int, **kw):
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    client = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30), limits=limits)
    tasks = [asyncio.create_task(watch_resiliently(client, job_id, **kw)) for _ in range(count)]
    return client, tasks


async def finish(client: httpx.AsyncClient, tasks, within_s: float = 90):
    try:
        return await asyncio.wait_for(asyncio.gather(*tasks), within_s)
    finally:
        await client.aclose()


def not_ready(url: str) -> bool:
    try:
        return http_status(f"{url}/readyz") != 200
    except OSError:
        return True  # no longer listening


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def wait_tokens(url: str, job_id: str, at_least: int) -> None:
    wait_until(lambda: job_state(url, job_id)["tokens"] >= at_least, 20, what=f"{at_least} tokens")


async def test_200_viewers_spread_over_three_nodes(cluster):
    job_id = create_job(cluster.url, max_tokens=300, demo={"tokens_per_second": 100})
    client, tasks = await watchers(cluster.url, job_id, 200)
    viewers_key = f"{cluster.settings['key_prefix']}:{{{job_id}}}:viewers"

    def nodes_reporting() -> set[str]:
        return set(cluster.redis.cli("HKEYS", viewers_key).split())

    # least_conn spreads the viewers over all three nodes.
    await asyncio.to_thread(
        wait_until, lambda: nodes_reporting() == {"web-1", "web-2", "web-3"}, 5, 0.1, "3 nodes"
    )
    results = await finish(client, tasks)
    state = job_state(cluster.url, job_id)
    assert_exact(results, state)
    assert all(got.connections == 1 for got in results)
    # least_conn spread the viewers over all three nodes.


async def test_kill_9_of_a_web_node_mid_stream(cluster):
    job_id = create_job(cluster.url, max_tokens=200, demo={"tokens_per_second": 40})
    client, tasks = await watchers(cluster.url, job_id, 30)
    await asyncio.to_thread(wait_tokens, cluster.url, job_id, 40)
    cluster.web[0].signal(signal.SIGKILL)
    results = await finish(client, tasks)
    state = job_state(cluster.url, job_id)
    assert_exact(results, state)
    reconnected = sum(got.connections > 1 for got in results)
    print(f"\n{reconnected} of 30 viewers reconnected after the kill")
    assert reconnected > 0


async def test_sigterm_drains_a_node_mid_stream(cluster):
    job_id = create_job(cluster.url, max_tokens=200, demo={"tokens_per_second": 40})
    client, tasks = await watchers(cluster.url, job_id, 30)
    await asyncio.to_thread(wait_tokens, cluster.url, job_id, 40)
    node = cluster.web[0]
    sent_at = time.monotonic()
    node.signal(signal.SIGTERM)
    # /readyz fails within 1 s (or the node has already stopped listening).
    await asyncio.to_thread(wait_until, lambda: not_ready(node.url), 1.0, 0.02, "readyz 503")
    code = await asyncio.to_thread(node.wait, 5.5)
    exited_after = time.monotonic() - sent_at
    results = await finish(client, tasks)
    state = job_state(cluster.url, job_id)
    assert_exact(results, state)
    assert code == 0
    assert exited_after < 5.0, f"exited {exited_after:.1f}s after SIGTERM (drain 5 s)"
    assert sum(got.connections > 1 for got in results) > 0
    print(f"\nnode exited {exited_after:.2f}s after SIGTERM")


async def test_redis_clean_restart_then_crash(cluster):
    # A clean restart keeps the data: viewers pause, then continue exactly.
    job_id = create_job(cluster.url, max_tokens=150, demo={"tokens_per_second": 30})
    client, tasks = await watchers(cluster.url, job_id, 20)
    await asyncio.to_thread(wait_tokens, cluster.url, job_id, 20)
    cluster.redis.shutdown_save()
    node = cluster.web[0]
    await asyncio.to_thread(
        wait_until, lambda: http_status(f"{node.url}/readyz") == 503, 5, 0.05, "readyz 503"
    )
    down = await asyncio.to_thread(httpx.get, f"{node.url}/v1/jobs/{job_id}/events")
    assert down.status_code == 503
    assert down.headers["Retry-After"] == "2"
    assert down.json()["error"]["code"] == "broker_unavailable"
    await asyncio.sleep(1.0)
    cluster.redis.start()
    results = await finish(client, tasks)
    state = job_state(cluster.url, job_id)
    assert_exact(results, state)
    assert state["status"] == "completed"

    # A crash without persistence loses everything: connected viewers get
    # done/failed/log_lost with the next id, never a hang.
    job_id = create_job(cluster.url, max_tokens=300, demo={"tokens_per_second": 30})
    client, tasks = await watchers(cluster.url, job_id, 20)
    await asyncio.to_thread(wait_tokens, cluster.url, job_id, 10)
    cluster.redis.kill()
    cluster.redis.forget()
    cluster.redis.start()
    results = await finish(client, tasks, within_s=30)
    for got in results:
        assert got.done["status"] == "failed"
        assert got.done["error"]["code"] == "log_lost"
        assert got.covered_ids == list(range(1, got.ids[-1] + 1))
    gone = await asyncio.to_thread(httpx.get, f"{cluster.url}/v1/jobs/{job_id}")
    assert gone.status_code == 404
    # A job created after the restart streams normally.
    await asyncio.to_thread(
        wait_until, lambda: http_status(f"{cluster.url}/readyz") == 200, 10, 0.1, "ready"
    )
    job_id = create_job(cluster.url, max_tokens=20, demo={"tokens_per_second": 0})
    client, tasks = await watchers(cluster.url, job_id, 5)
    results = await finish(client, tasks)
    assert_exact(results, job_state(cluster.url, job_id))


async def test_pubsub_connections_killed_while_50_viewers_watch(cluster):
    job_id = create_job(cluster.url, max_tokens=200, demo={"tokens_per_second": 50})
    client, tasks = await watchers(cluster.url, job_id, 50)
    await asyncio.to_thread(wait_tokens, cluster.url, job_id, 30)
    killed = int(cluster.redis.cli("CLIENT", "KILL", "TYPE", "pubsub"))
    assert killed == 3  # one per web node, however many viewers each has
    results = await finish(client, tasks)
    assert_exact(results, job_state(cluster.url, job_id))
    assert all(got.connections == 1 for got in results)  # nobody even noticed


def owner_process(cluster: LocalCluster, job_id: str):
    owner = cluster.redis.cli("HGET", f"{cluster.settings['key_prefix']}:{{{job_id}}}:job", "owner")
    node_id = owner.strip().split("/")[0].removeprefix("worker-")
    return next(p for p in cluster.workers if p.env["TOKENCAST_NODE_ID"] == node_id)


async def test_kill_9_of_the_worker_running_a_job(short_lease_cluster):
    cluster = short_lease_cluster
    job_id = create_job(cluster.url, max_tokens=300, demo={"tokens_per_second": 20})
    client, tasks = await watchers(cluster.url, job_id, 10)
    await asyncio.to_thread(wait_tokens, cluster.url, job_id, 5)
    owner_process(cluster, job_id).signal(signal.SIGKILL)
    killed_at = time.monotonic()
    results = await finish(client, tasks)
    elapsed = time.monotonic() - killed_at
    state = job_state(cluster.url, job_id)
    assert_exact(results, state)
    assert state["error"]["code"] == "worker_lost"
    assert elapsed < 2.0, f"terminal event {elapsed:.1f}s after the kill (lease 2 s)"

    # A job that had sent no token yet is retried by the other worker.
    cluster.workers.append(cluster.start_worker(node_id="worker-3"))  # two alive again
    job_id = create_job(cluster.url, max_tokens=3, demo={"tokens_per_second": 0.5})
    wait_until(lambda: job_state(cluster.url, job_id)["status"] == "running", 10, what="start")
    client, tasks = await watchers(cluster.url, job_id, 10)
    owner_process(cluster, job_id).signal(signal.SIGKILL)
    results = await finish(client, tasks)
    state = job_state(cluster.url, job_id)
    assert_exact(results, state)
    assert state["status"] == "completed"
    assert [name for _id, name, _ in results[0].events].count("start") == 1


SLOW_EVENTS = 100


async def test_slow_viewer_of_a_20000_token_job(cluster):
    job_id = create_job(cluster.url, max_tokens=20000, seed=2, demo={"tokens_per_second": 0})
    pids = [node.pid for node in cluster.web]
    before = [rss_mb(pid) for pid in pids]
    client, tasks = await watchers(cluster.url, job_id, 5)
    slow_client = httpx.AsyncClient(base_url=cluster.url, timeout=60)
    slow_events: list[int] = []

    async def slow_viewer():
        """One event per 50 ms for its first ``SLOW_EVENTS`` events, while the
        job runs to its end, then as fast as it can. Frames the node wrote
        before the viewer fell behind wait in socket buffers one event each
        (only what is still on the node is merged): a viewer that attached
        early would need minutes to read them all at 50 ms apiece."""
        from httpx_sse import aconnect_sse

        async with aconnect_sse(slow_client, "GET", f"/v1/jobs/{job_id}/events") as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    slow_events.append(int(sse.id))
                    if len(slow_events) <= SLOW_EVENTS:
                        await asyncio.sleep(0.05)
                    if sse.event == "done":
                        return time.monotonic()

    slow = asyncio.create_task(slow_viewer())
    results = await finish(client, tasks)
    fast_done = time.monotonic()
    state = await asyncio.to_thread(wait_finished, cluster.url, job_id)
    peak = [rss_mb(pid) for pid in pids]
    slow_done = await asyncio.wait_for(slow, 120)
    await slow_client.aclose()
    assert_exact(results, state)
    assert slow_events[-1] == int(state["last_event_id"])
    assert slow_events == sorted(set(slow_events))
    growth = max(p - b for p, b in zip(peak, before, strict=True))
    print(
        f"\n{state['tokens']} tokens; web RSS before {before} MB, after {peak} MB; "
        f"slow viewer done {slow_done - fast_done:.1f}s after the others, "
        f"in {len(slow_events)} events"
    )
    assert growth < 60, f"a web node grew by {growth:.0f} MB"


async def test_reconnect_storm_of_1000_viewers(cluster):
    job_id = create_job(cluster.url, max_tokens=2000, seed=4, demo={"tokens_per_second": 0})
    state = await asyncio.to_thread(wait_finished, cluster.url, job_id)
    last = int(state["last_event_id"])
    rng = random.Random(1)
    positions = [rng.randrange(0, last) for _ in range(1000)]
    limits = httpx.Limits(max_connections=1100, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=cluster.url, timeout=60, limits=limits) as client:
        started = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*(watch_resiliently(client, job_id, p) for p in positions)), 120
        )
        elapsed = time.monotonic() - started
    for position, got in zip(positions, results, strict=True):
        assert got.covered_ids == list(range(position + 1, last + 1))
    print(f"\n1000 viewers resumed from different ids and completed in {elapsed:.2f}s")


async def test_viewer_count_forgets_a_dead_node(cluster):
    job_id = create_job(cluster.url, max_tokens=2000, demo={"tokens_per_second": 20})
    node = cluster.web[0]
    streams = []
    async with httpx.AsyncClient(timeout=60) as client:
        for url in (node.url, node.url, cluster.web[1].url):
            request = client.build_request("GET", f"{url}/v1/jobs/{job_id}/events")
            streams.append(await client.send(request, stream=True))
        await asyncio.to_thread(
            wait_until, lambda: job_state(cluster.url, job_id)["viewers"] == 3, 5, 0.1, "3"
        )
        node.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.to_thread(
            wait_until, lambda: job_state(cluster.url, job_id)["viewers"] == 1, 35, 0.5, "1"
        )
        print(f"\ndead node's viewers stopped counting after {time.monotonic() - killed_at:.0f}s")
        for stream in streams[2:]:
            await stream.aclose()
    await asyncio.to_thread(httpx.delete, f"{cluster.url}/v1/jobs/{job_id}")
