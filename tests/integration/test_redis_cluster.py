"""The same code on a Redis Cluster: three masters started by the test."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from services.keys import Keys
from services.redisconn import RedisBroker
from tests.support import Cluster, LocalRedisCluster, aread_stream, create_job, job_state

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def redis_cluster():
    cluster = LocalRedisCluster().start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def nodes(redis_cluster):
    with Cluster(redis_cluster.url, redis_cluster="1") as cluster:
        cluster.web()
        cluster.web()
        cluster.worker()
        yield cluster


def owner_of(redis_cluster: LocalRedisCluster, key: str):
    """The master whose slot ranges hold ``key``."""
    slot = int(redis_cluster.servers[0].cli("CLUSTER", "KEYSLOT", key))
    for line in redis_cluster.servers[0].cli("CLUSTER", "NODES").splitlines():
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for part in fields[8:]:
            low, _, high = part.partition("-")
            if int(low) <= slot <= int(high or low):
                return next(s for s in redis_cluster.servers if s.port == port)
    raise AssertionError(f"no master serves slot {slot}")


async def test_jobs_on_every_shard_stream_exactly_with_sharded_pubsub(nodes, redis_cluster):
    a, b = nodes.procs[0], nodes.procs[1]
    keys = Keys(nodes.prefix)
    # Six jobs, more (up to 12) while all are on one shard: random ids put
    # six jobs on the same one of three shards once in 243 runs.
    job_ids: list[str] = []
    shards: set[int] = set()
    while len(job_ids) < 6 or (len(shards) < 2 and len(job_ids) < 12):
        job_ids.append(create_job(a.url, max_tokens=80, demo={"tokens_per_second": 40}))
        shards.add(owner_of(redis_cluster, keys.job(job_ids[-1])).port)
    assert len(shards) >= 2, "the jobs should land on several shards"
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=60) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=60) as on_b,
    ):
        viewers = [
            asyncio.create_task(aread_stream(client, job_id))
            for job_id in job_ids
            for client in (on_a, on_b)
            for _ in range(3)
        ]
        # While they watch: each job's channel is a shard channel, subscribed
        # on the master that owns its slot (once per web node: 2).
        channel = keys.channel(job_ids[-1])

        def numsub() -> list[str]:
            return owner_of(redis_cluster, channel).cli("PUBSUB", "SHARDNUMSUB", channel).split()

        for _ in range(200):  # up to 10 s on a busy machine
            if numsub() == [channel, "2"]:
                break
            await asyncio.sleep(0.05)
        assert numsub() == [channel, "2"]
        results = await asyncio.wait_for(asyncio.gather(*viewers), 60)
    by_job = iter(results)
    for job_id in job_ids:
        state = job_state(b.url, job_id)
        expected = list(range(1, int(state["last_event_id"]) + 1))
        for _ in range(6):
            got = next(by_job)
            assert got.status == 200
            assert got.covered_ids == expected
            assert got.text == state["text"]
            assert got.done["status"] == "completed"


async def test_shard_pubsub_connection_killed_loses_nothing(nodes, redis_cluster):
    web = nodes.procs[0]
    job_id = create_job(web.url, max_tokens=150, demo={"tokens_per_second": 60})
    owner = owner_of(redis_cluster, Keys(nodes.prefix).channel(job_id))
    async with httpx.AsyncClient(base_url=web.url, timeout=60) as client:
        viewers = [asyncio.create_task(aread_stream(client, job_id)) for _ in range(10)]
        await asyncio.sleep(1.0)
        assert int(owner.cli("CLIENT", "KILL", "TYPE", "pubsub")) >= 1
        results = await asyncio.wait_for(asyncio.gather(*viewers), 60)
    state = job_state(web.url, job_id)
    for got in results:
        assert got.covered_ids == list(range(1, int(state["last_event_id"]) + 1))
        assert got.text == state["text"]


def test_broker_routes_channels_to_their_shard(redis_cluster):
    async def check():
        broker = RedisBroker(redis_cluster.url, cluster=True)
        client = broker.client()
        try:
            await client.initialize()
            names = {broker.shard_for(client, Keys("t").channel(f"job{i}")) for i in range(30)}
        finally:
            await client.aclose()
        return names

    names = asyncio.run(check())
    assert names == {f"127.0.0.1:{s.port}" for s in redis_cluster.servers}
