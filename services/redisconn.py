"""Redis clients, and the one place redis-py's I/O errors become ours."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from services.errors import BrokerUnavailable

if TYPE_CHECKING:
    from services.sentinel import SentinelMaster

# Connection-level failures: the broker is down, restarting or unreachable.
BROKER_IO_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

Redis = aredis.Redis


# Connections per client. A burst of requests (a reconnect storm) waits up to
# POOL_WAIT_S for one instead of opening hundreds, each with its own
# handshake; past that, the request gets 503 and retries elsewhere.
POOL_SIZE = 64
POOL_WAIT_S = 5.0
# A command without an answer for this long fails (pub/sub's wait for the
# next message is not a command: it blocks for as long as it takes).
SOCKET_TIMEOUT_S = 10.0


def pool_options(decode: bool) -> dict[str, Any]:
    """How a pooled client talks to Redis (limits, timeouts, retries): the
    same for ``connect()`` and for clients through Sentinel."""
    return dict(
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_S,
        decode_responses=decode,
        socket_connect_timeout=2,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


def connect(url: str, *, decode: bool = True, **options: Any) -> Redis:
    """A pooled client for ``url`` (at most ``POOL_SIZE`` connections).

    Commands are retried twice on a dropped connection, so a pool holding
    connections to a Redis that restarted reconnects instead of failing the
    request that found the stale connection.
    """
    pool = aredis.BlockingConnectionPool.from_url(url, **pool_options(decode), **options)
    return aredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


MAIN_SHARD = "main"


class RedisBroker:
    """Hands out clients of one Redis server, of the master that Sentinel
    names (``sentinel``), or of a Redis Cluster.

    On a cluster, a job's channel lives on the shard of its hash tag: the hub
    opens one pub/sub connection per shard (``shard_for``/``pubsub_client``)
    and events are published with SPUBLISH (sharded pub/sub).
    """

    # A blocking XREADGROUP wakes up as soon as a job is queued.
    blocking_reads = True

    def __init__(self, url: str, *, cluster: bool = False, sentinel: SentinelMaster | None = None):
        self.url = url
        self.cluster = cluster
        self.sentinel = sentinel

    def client(self, *, decode: bool = True) -> Redis:
        if self.sentinel is not None:
            return self.sentinel.client(decode=decode)
        if self.cluster:
            # Same command API as a single-server client, for everything we use.
            cluster_client: Redis = RedisCluster.from_url(  # type: ignore[assignment]
                self.url,
                decode_responses=decode,
                socket_connect_timeout=2,
                socket_timeout=SOCKET_TIMEOUT_S,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            )
            return cluster_client
        return connect(self.url, decode=decode)

    def shard_for(self, client: Redis, channel: str) -> str:
        """The name of the node that holds ``channel`` (one name unless clustered)."""
        if not self.cluster:
            return MAIN_SHARD
        node = client.get_node_from_key(channel)  # type: ignore[attr-defined]
        return str(node.name)

    def pubsub_client(self, shard: str) -> Redis:
        """A client for one pub/sub connection to ``shard``.

        RESP2: under RESP3 redis-py hands every published message to a push
        handler that formats it for a debug log whether or not that log is
        on, about a third of the reader's CPU per message.
        """
        if self.sentinel is not None:
            return self.sentinel.client(decode=False, protocol=2)
        url = self.url if shard == MAIN_SHARD else f"redis://{shard}"
        return connect(url, decode=False, protocol=2)


class EmbeddedBroker:
    """The in-memory twin of ``RedisBroker`` for ``tokencast dev``: one shared server."""

    # fakeredis does not wake a blocked XREADGROUP on XADD: readers must poll.
    blocking_reads = False

    def __init__(self) -> None:
        import fakeredis  # only the embedded mode needs it

        self._fakeredis = fakeredis
        self.server = fakeredis.FakeServer()

    cluster = False

    def client(self, *, decode: bool = True) -> Redis:
        client: Redis = self._fakeredis.FakeAsyncRedis(server=self.server, decode_responses=decode)
        return client

    def shard_for(self, client: Redis, channel: str) -> str:
        return MAIN_SHARD

    def pubsub_client(self, shard: str) -> Redis:
        return self.client(decode=False)


Broker = RedisBroker | EmbeddedBroker


def is_cluster(client: Redis) -> bool:
    return isinstance(client, RedisCluster)


@contextmanager
def broker_errors() -> Iterator[None]:
    """Turn redis-py's connection errors into ``BrokerUnavailable``."""
    try:
        yield
    except BROKER_IO_ERRORS as exc:
        raise BrokerUnavailable(f"the broker is unreachable: {exc}") from exc


def raise_lost_cancel() -> None:
    """Raise ``CancelledError`` if this task was asked to stop but the request
    never reached it.

    A cancel that arrives during a redis-py command can come back as a normal
    return (seen on the stream path, where a client that left at once stayed
    registered forever, and in background loops, which then never stopped).
    Call it after awaiting redis-py wherever a task must end when cancelled.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


STOP_TIMEOUT_S = 2.0


async def cancel_and_wait(tasks: list[asyncio.Task], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Cancel ``tasks`` and wait for them, but no longer than ``timeout_s``:
    shutdown must end even if a cancel got lost (see ``raise_lost_cancel``)."""
    for task in tasks:
        task.cancel()
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:
            logging.getLogger(__name__).error("task %s did not stop when cancelled", task)
