"""Per-client limits: a job-creation rate shared by every web node through
Redis, and open streams per client address on one node."""

from __future__ import annotations

import hashlib
import time
from collections import Counter

from services.errors import RateLimited
from services.keys import Keys
from services.redisconn import Redis, broker_errors

WINDOW_S = 60


async def over_limit(redis: Redis, keys: Keys, subject: str, per_minute: int) -> float | None:
    """Count one use by ``subject``; the seconds to wait when it is over
    ``per_minute`` in the current minute, else ``None``."""
    now = time.time()
    window = int(now // WINDOW_S)
    # Hashed, so an API key never appears in Redis.
    key = keys.rate(hashlib.sha256(subject.encode()).hexdigest()[:24], window)
    with broker_errors():
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, WINDOW_S * 2)
            count, _ = await pipe.execute()
    if int(count) <= per_minute:
        return None
    return (window + 1) * WINDOW_S - now


class StreamsPerClient:
    """Open streams per client address on this node, at most ``limit`` each."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open: Counter[str] = Counter()

    def check(self, address: str) -> None:
        """Raise ``RateLimited`` if ``address`` has no stream left."""
        if self.open[address] >= self.limit:
            raise RateLimited(
                f"{self.limit} streams are already open from your address on this node"
                " (TOKENCAST_MAX_STREAMS_PER_CLIENT)",
                2,
            )

    def opened(self, address: str) -> None:
        self.open[address] += 1

    def closed(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]
