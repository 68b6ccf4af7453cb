"""Redis behind Sentinel: clients of whichever server is the master now.

redis-py's Sentinel pool asks the sentinels for the master's address each
time it opens a connection, so after a promotion new connections go to the
new master. What it does during a failover, and what that becomes here:

- the old master, demoted, answers ``READONLY``: the pool drops that
  connection and raises ``ConnectionError``;
- a server still loading its data answers ``LOADING``: ``BusyLoadingError``,
  a ``ConnectionError``;
- no sentinel knows a healthy master (between the master's death and the
  promotion): ``MasterNotFoundError``, a ``ConnectionError`` too.

All three are in ``BROKER_IO_ERRORS``: handled as a dropped connection is
(``pool_options``' retries), then the broker is unavailable (503 with
``Retry-After``).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import BlockingConnectionPool, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from services.redisconn import Redis, pool_options

# A sentinel answers at once or is down: ask the next one, without retrying
# it (redis-py's default retries cost seconds per dead sentinel).
SENTINEL_TIMEOUT_S = 2.0


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool that, like ``connect()``'s, waits up to its
    ``timeout`` for a free connection instead of failing past its size."""


class SentinelMaster:
    """Clients of the master named ``master``, found through ``sentinels``.

    ``url`` gives the password, user name and database; its host and port
    are ignored (the sentinels say where the master is).
    """

    def __init__(self, sentinels: tuple[tuple[str, int], ...], master: str, url: str):
        self.master = master
        self.sentinel = Sentinel(
            list(sentinels),
            sentinel_kwargs={
                "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                "socket_timeout": SENTINEL_TIMEOUT_S,
                "retry": Retry(NoBackoff(), 0),
            },
        )
        options: dict[str, Any] = dict(parse_url(url))
        options.pop("host", None)
        options.pop("port", None)
        # rediss://: the pool picks its own (Sentinel-aware) TLS connection class.
        options["ssl"] = options.pop("connection_class", None) is SSLConnection
        self.url_options = options

    def client(self, *, decode: bool = True, retry: bool = True, **options: Any) -> Redis:
        """A pooled client with ``connect()``'s limits, timeouts and retries:
        each new connection goes to the server the sentinels name then."""
        return self.sentinel.master_for(
            self.master,
            connection_pool_class=BlockingSentinelConnectionPool,
            **pool_options(decode, retry),
            **self.url_options,
            **options,
        )

    async def aclose(self) -> None:
        """Close the connections to the sentinels (clients close their own)."""
        await self.sentinel.aclose()
