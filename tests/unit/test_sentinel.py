"""Clients through Sentinel: the same pool as ``connect()``'s, the URL's
credentials and database, and every Sentinel failure a broker outage."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio.sentinel import MasterNotFoundError, SentinelManagedConnection
from redis.exceptions import BusyLoadingError

from services.errors import BrokerUnavailable
from services.redisconn import Redis, RedisBroker, broker_errors, connect
from services.sentinel import SentinelMaster

# Nothing listens on these ports: no sentinel can be reached.
SENTINELS = (("127.0.0.1", 1), ("127.0.0.1", 2))
URL = "redis://app:s3cret@ignored.invalid:1/4"
# Options that name a server rather than say how to talk to it, and those
# redis-py adds to each pool by itself (maintenance notifications, a registry).
WHERE = {"host", "port", "connection_pool", "db", "password", "username"}
REDIS_PY_OWN = ("maint_notifications_", "orig_", "himport_registry")


def how_to_talk(options: dict) -> dict:
    return {
        name: value
        for name, value in options.items()
        if name not in WHERE and not name.startswith(REDIS_PY_OWN)
    }


@pytest.fixture
async def clients() -> AsyncIterator[list[Redis]]:
    """Clients the test makes (closed after it)."""
    made: list[Redis] = []
    yield made
    for client in made:
        await client.aclose()


@pytest.fixture
async def sentinel() -> AsyncIterator[SentinelMaster]:
    master = SentinelMaster(SENTINELS, "cache", URL)
    yield master
    await master.aclose()


async def test_client_has_the_limits_timeouts_and_retries_of_connect(sentinel, clients):
    clients += [sentinel.client(decode=False), connect(URL, decode=False)]
    pool, expected = clients[0].connection_pool, clients[1].connection_pool
    assert (pool.max_connections, pool.timeout) == (expected.max_connections, expected.timeout)
    assert how_to_talk(pool.connection_kwargs) == how_to_talk(expected.connection_kwargs)
    assert pool.connection_class is SentinelManagedConnection


async def test_the_url_gives_credentials_and_database_not_the_host(sentinel, clients):
    clients.append(sentinel.client())
    options = clients[0].connection_pool.connection_kwargs
    assert (options["username"], options["password"], options["db"]) == ("app", "s3cret", 4)
    assert "host" not in options
    assert clients[0].connection_pool.service_name == "cache"


async def test_broker_hands_out_sentinel_clients_for_commands_and_pubsub(sentinel, clients):
    broker = RedisBroker(URL, sentinel=sentinel)
    clients.append(broker.client())
    clients.append(broker.pubsub_client(broker.shard_for(clients[0], "channel")))
    assert [client.connection_pool.service_name for client in clients] == ["cache", "cache"]
    pubsub_options = clients[1].connection_pool.connection_kwargs
    assert (pubsub_options["protocol"], pubsub_options["decode_responses"]) == (2, False)


async def test_no_sentinel_reachable_is_broker_unavailable(sentinel, clients):
    clients.append(sentinel.client())
    with pytest.raises(BrokerUnavailable) as info, broker_errors():
        await clients[0].ping()
    assert isinstance(info.value.__cause__, MasterNotFoundError)


@pytest.mark.parametrize("error", [MasterNotFoundError, BusyLoadingError])
def test_failover_errors_are_broker_unavailable(error):
    with pytest.raises(BrokerUnavailable), broker_errors():
        raise error("during a failover")
