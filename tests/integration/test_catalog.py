"""Workers' model advertisements on a real Redis, as web nodes read them."""

from __future__ import annotations

import asyncio

import pytest

from services.catalog import ModelCatalog

pytestmark = pytest.mark.timeout(20)


async def test_advertised_models_are_listed_until_they_expire(redis, keys):
    worker, web = ModelCatalog(redis, keys), ModelCatalog(redis, keys, cache_s=0)
    assert await web.advertised() == []
    await worker.advertise(["weather", "demo"], ttl_s=0.5)
    assert await web.advertised() == ["demo", "weather"]
    await asyncio.sleep(0.6)
    assert await web.advertised() == []


async def test_a_shorter_advertisement_never_cuts_a_longer_one(redis, keys):
    first, second = ModelCatalog(redis, keys), ModelCatalog(redis, keys)
    web = ModelCatalog(redis, keys, cache_s=0)
    await first.advertise(["weather"], ttl_s=30)
    await second.advertise(["weather", "probe"], ttl_s=0.3)  # another worker, soon gone
    await asyncio.sleep(0.4)
    assert await web.advertised() == ["weather"]


async def test_a_web_node_reads_at_most_once_per_cache_interval(redis, keys):
    worker, web = ModelCatalog(redis, keys), ModelCatalog(redis, keys, cache_s=0.3)
    await worker.advertise(["a"], ttl_s=30)
    assert await web.advertised() == ["a"]
    await worker.advertise(["b"], ttl_s=30)
    assert await web.advertised() == ["a"]  # from the cache
    await asyncio.sleep(0.35)
    assert await web.advertised() == ["a", "b"]


async def test_advertise_forever_refreshes_before_expiry(redis, keys):
    worker, web = ModelCatalog(redis, keys), ModelCatalog(redis, keys, cache_s=0)
    task = asyncio.create_task(worker.advertise_forever(["weather"], ttl_s=0.3))
    try:
        for _ in range(6):  # twice the ttl, read every 0.1 s: never missing
            await asyncio.sleep(0.1)
            assert await web.advertised() == ["weather"]
    finally:
        task.cancel()
    await asyncio.sleep(0.4)
    assert await web.advertised() == []
