"""Viewer counts across web nodes.

Each node reports, per job, how many streams it has open, as one field of
the job's ``viewers`` hash: ``node id → "<count> <expiry ms>"``. A node
refreshes its entries well before they expire, so the entries of a node that
died stop counting within ``ENTRY_TTL_S`` and no count is stuck high.
"""

from __future__ import annotations

import time

from services.keys import Keys
from services.redisconn import Redis, broker_errors

ENTRY_TTL_S = 25.0  # API.md: a dead node stops counting within 30 s
REFRESH_S = 8.0


class ViewerCounts:
    def __init__(self, redis: Redis, keys: Keys):
        self.redis = redis
        self.keys = keys

    async def report(self, counts: dict[str, int], node_id: str) -> None:
        """Publish this node's stream count for each job in ``counts`` (0 removes it)."""
        expiry_ms = int((time.time() + ENTRY_TTL_S) * 1000)
        with broker_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id, count in counts.items():
                    key = self.keys.viewers(job_id)
                    if count > 0:
                        pipe.hset(key, node_id, f"{count} {expiry_ms}")
                        pipe.pexpire(key, int(ENTRY_TTL_S * 1000))
                    else:
                        pipe.hdel(key, node_id)
                await pipe.execute()

    async def total(self, job_id: str) -> int:
        """Open streams on this job across live nodes."""
        with broker_errors():
            entries: dict[str, str] = await self.redis.hgetall(  # type: ignore[assignment]
                self.keys.viewers(job_id)
            )
        now_ms = time.time() * 1000
        total = 0
        for value in entries.values():
            count, _, expiry = value.partition(" ")
            if float(expiry) > now_ms:
                total += int(count)
        return total
