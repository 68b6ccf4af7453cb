"""What a client through Sentinel raises when its master is demoted under it."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from services.errors import BrokerUnavailable
from services.redisconn import broker_errors
from services.sentinel import SentinelMaster
from tests.failover.support import MASTER_NAME, sentinel_available

pytestmark = [
    pytest.mark.failover,
    pytest.mark.skipif(not sentinel_available(), reason="redis-sentinel is not installed"),
]

WRITE_SCRIPT = "return redis.call('SET', KEYS[1], ARGV[1])"


@pytest.mark.parametrize("write", ["command", "script"])
async def test_a_demoted_master_is_broker_unavailable_not_a_response_error(sentinels, write):
    addresses = tuple(("127.0.0.1", sentinel.port) for sentinel in sentinels.sentinels)
    sentinel = SentinelMaster(addresses, MASTER_NAME, "redis://127.0.0.1:1/0")
    client = sentinel.client()
    try:
        await client.set("key", "before")  # a pooled connection to the master
        # The roles swap behind the sentinels' back: that connection stays
        # open, and the old master now answers writes with READONLY.
        sentinels.replica.cli("REPLICAOF", "NO", "ONE")
        sentinels.master.cli("REPLICAOF", "127.0.0.1", str(sentinels.replica.port))
        with pytest.raises(BrokerUnavailable) as info, broker_errors():
            if write == "command":
                await client.set("key", "after")
            else:
                await client.eval(WRITE_SCRIPT, 1, "key", "after")
        assert isinstance(info.value.__cause__, RedisConnectionError)
        assert "The previous master is now a slave" in str(info.value)
    finally:
        await client.aclose()
        await sentinel.aclose()
