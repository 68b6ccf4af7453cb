from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator

import pytest

from services.keys import Keys
from services.redisconn import connect
from tests.support import Cluster, RedisServer, redis_available


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: TOKENCAST_TEST_REDIS_URL, the one on 127.0.0.1:6379, or one of our own."""
    if url := os.environ.get("TOKENCAST_TEST_REDIS_URL"):
        yield url
    elif redis_available(6379):
        yield "redis://127.0.0.1:6379/0"
    else:
        with RedisServer().start() as server:
            yield server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis server this test may kill or restart."""
    with RedisServer().start() as server:
        yield server


@pytest.fixture
def keys() -> Keys:
    """A key prefix of this test's own, so tests never see each other's data."""
    return Keys(f"test-{secrets.token_hex(4)}")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator:
    client = connect(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def node(redis_url: str) -> Iterator[Cluster]:
    """One web node and one worker, shared by a module's tests."""
    with Cluster(redis_url) as cluster:
        cluster.web()
        cluster.worker()
        yield cluster
