"""Redis clients, and the one place redis-py's I/O errors become ours."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from services.errors import BrokerUnavailable

# Connection-level failures: the broker is down, restarting or unreachable.
BROKER_IO_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

Redis = aredis.Redis


def connect(url: str, *, decode: bool = True, **options: Any) -> Redis:
    """A pooled client for ``url``.

    Commands are retried twice on a dropped connection, so a pool holding
    connections to a Redis that restarted reconnects instead of failing the
    request that found the stale connection.
    """
    return aredis.Redis.from_url(
        url,
        decode_responses=decode,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **options,
    )


class RedisBroker:
    """Hands out clients of one Redis server (``TOKENCAST_REDIS_URL``)."""

    # A blocking XREADGROUP wakes up as soon as a job is queued.
    blocking_reads = True

    def __init__(self, url: str):
        self.url = url

    def client(self, *, decode: bool = True) -> Redis:
        return connect(self.url, decode=decode)


class EmbeddedBroker:
    """The in-memory twin of ``RedisBroker`` for ``tokencast dev``: one shared server."""

    # fakeredis does not wake a blocked XREADGROUP on XADD: readers must poll.
    blocking_reads = False

    def __init__(self) -> None:
        import fakeredis  # only the embedded mode needs it

        self._fakeredis = fakeredis
        self.server = fakeredis.FakeServer()

    def client(self, *, decode: bool = True) -> Redis:
        client: Redis = self._fakeredis.FakeAsyncRedis(server=self.server, decode_responses=decode)
        return client


Broker = RedisBroker | EmbeddedBroker


@contextmanager
def broker_errors() -> Iterator[None]:
    """Turn redis-py's connection errors into ``BrokerUnavailable``."""
    try:
        yield
    except BROKER_IO_ERRORS as exc:
        raise BrokerUnavailable(f"the broker is unreachable: {exc}") from exc
