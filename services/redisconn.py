"""Redis clients, and the one place redis-py's I/O errors become ours.

What counts as "the broker is unavailable" (``BROKER_IO_ERRORS``): a dropped
or refused connection, a timeout, a server still loading its data
(``LOADING``, redis-py's ``BusyLoadingError``) and a server that is no longer
the master (``READONLY`` after a failover, ``MASTERDOWN`` from a replica that
lost it). All of them mean "retry shortly": the web tier answers ``503`` with
``Retry-After``, writers wait them out. Any other ``ResponseError`` is a bug
and stays one.

A command that meets a connection a restart broke is sent again once on a
fresh connection (redis-py's retry, which disconnects and reconnects), so a
pool full of connections to the old server costs each request at most one
reconnect, never a failure.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry  # the asyncio one: redis.retry.Retry never retries here
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MasterDownError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.errors import BrokerUnavailable

if TYPE_CHECKING:
    from services.sentinel import SentinelMaster

# The broker is down, restarting, loading (BusyLoadingError is a
# ConnectionError), failing over or unreachable.
BROKER_IO_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    MasterDownError,
    OSError,
)

# Error replies of the same kind that redis-py has no class for: a blocked
# XREADGROUP is cut with this when its server is demoted to a replica.
UNAVAILABLE_REPLIES = ("UNBLOCKED",)

# Sent again on a fresh connection. Not a timeout: the command may have run,
# and waiting SOCKET_TIMEOUT_S twice helps nobody.
RETRIED_ERRORS = (RedisConnectionError, ReadOnlyError, MasterDownError)

Redis = aredis.Redis


# Connections per client. A burst of requests (a reconnect storm) waits up to
# POOL_WAIT_S for one instead of opening hundreds, each with its own
# handshake; past that, the request gets 503 and retries elsewhere.
POOL_SIZE = 64
POOL_WAIT_S = 5.0
# A command without an answer for this long fails (pub/sub's wait for the
# next message is not a command: it blocks for as long as it takes).
SOCKET_TIMEOUT_S = 10.0


def retry_once() -> Retry:
    """Send a command again once, on a fresh connection, after ``RETRIED_ERRORS``."""
    return Retry(ExponentialBackoff(cap=0.5, base=0.01), retries=1, supported_errors=RETRIED_ERRORS)


def pool_options(decode: bool, retry: bool = True) -> dict[str, Any]:
    """How a pooled client talks to Redis (limits, timeouts, retries): the
    same for ``connect()`` and for clients through Sentinel.

    With ``retry``, a command that fails with one of ``RETRIED_ERRORS`` is
    sent once more on a fresh connection: a pool holding connections to a
    Redis that restarted reconnects instead of failing the request that found
    the stale connection. Without it, the first error is raised.
    """
    return dict(
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_S,
        decode_responses=decode,
        socket_connect_timeout=2,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=15,
        retry=retry_once() if retry else Retry(NoBackoff(), retries=0),
    )


def connect(url: str, *, decode: bool = True, retry: bool = True, **options: Any) -> Redis:
    """A pooled client for ``url`` (at most ``POOL_SIZE`` connections), as
    ``pool_options`` describes."""
    pool = aredis.BlockingConnectionPool.from_url(url, **pool_options(decode, retry), **options)
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
                retry=retry_once(),
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
        No retry: redis-py would reconnect and resubscribe silently, and the
        hub, never told, would not recover what was published meanwhile.
        """
        if self.sentinel is not None:
            return self.sentinel.client(decode=False, retry=False, protocol=2)
        url = self.url if shard == MAIN_SHARD else f"redis://{shard}"
        return connect(url, decode=False, retry=False, protocol=2)


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


# KEYS: a key.  ARGV: a value.  A write through a script, as serving requests needs.
READY_PROBE_SCRIPT = "redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000) return 1"


class ReadyProbe:
    """Proves that ``client`` can serve requests now: a pooled connection that
    works, a server that has loaded its data, accepts writes (a master, not a
    demoted one) and runs scripts (loaded again if the server forgot them).
    A PING proves only the first of these."""

    def __init__(self, client: Redis, key: str, writer: str):
        self._script = client.register_script(READY_PROBE_SCRIPT)
        self._key = key
        self._writer = writer

    async def check(self) -> None:
        """Returns when the broker can serve; raises ``BrokerUnavailable``."""
        with broker_errors():
            await self._script(keys=[self._key], args=[self._writer])


def is_broker_unavailability(exc: BaseException) -> bool:
    """A redis-py error that means the broker is unavailable (not a plain
    ``OSError`` of something else), for a path that did not translate it."""
    return isinstance(exc, RedisError) and isinstance(exc, BROKER_IO_ERRORS)


class _BrokerErrors:
    """``broker_errors()``: stateless, so one instance serves every call."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        if exc_type is None:
            raise_lost_cancel()
            return
        if issubclass(exc_type, BROKER_IO_ERRORS):
            raise_lost_cancel()
            raise BrokerUnavailable(f"the broker is unreachable: {exc}") from exc
        if issubclass(exc_type, ResponseError) and str(exc).startswith(UNAVAILABLE_REPLIES):
            raise_lost_cancel()
            raise BrokerUnavailable(f"the broker is failing over: {exc}") from exc


_BROKER_ERRORS = _BrokerErrors()


def broker_errors() -> _BrokerErrors:
    """Wrap every await of a redis-py command: ``with broker_errors(): await ...``.

    Turns ``BROKER_IO_ERRORS`` and ``UNAVAILABLE_REPLIES`` into
    ``BrokerUnavailable``, and raises a cancel the command swallowed
    (``raise_lost_cancel``), so a task asked to stop stops at its next broker
    call without each caller checking. It costs no await and no allocation.
    """
    return _BROKER_ERRORS


def raise_lost_cancel() -> None:
    """Raise ``CancelledError`` if this task was asked to stop but the request
    never reached it.

    A cancel that arrives during a redis-py command can come back as a normal
    return (seen on the stream path, where a client that left at once stayed
    registered forever, and in background loops, which then never stopped).
    ``broker_errors()`` calls it after every command; call it by hand only
    after an await it does not wrap (a pub/sub read, a yield to the server).
    """
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop: nothing to cancel
        return
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
