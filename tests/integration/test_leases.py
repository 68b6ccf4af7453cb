"""Leases across a broker outage, on a real Redis (``services.queue``'s docstring).

The Redis clock runs on while nobody reaches the server: a lease that ran
out by that clock during an outage counts as renewed when the broker came
back, so its worker has a lease's time to renew; a dead one's job is taken
over one lease TTL later.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from services.queue import LEASE_TTL_FRACTION
from services.reaper import Reaper
from tests.support import core_for_test

pytestmark = pytest.mark.timeout(30)

LEASE_S = 1.0
JOB = "LeaseJob0000000000000a"


async def running_job_whose_lease_ran_out(redis, keys) -> None:
    """A running job (3 tokens sent) whose lease expired by the Redis clock."""
    fields = {"status": "running", "owner": "worker-gone/1", "lease_expires": 1}
    fields |= {"tokens": 3, "attempts": 1, "last_event_id": 4, "queue_entry": ""}
    await redis.hset(keys.job(JOB), mapping=fields)
    await redis.zadd(keys.leases(), {JOB: 1})


def reaper(redis, keys) -> Reaper:
    return core_for_test(redis, keys, lease_s=LEASE_S).reaper


async def test_an_expired_lease_is_taken_over_at_once_while_the_broker_was_reachable(redis, keys):
    seconds, micros = await redis.time()
    await redis.set(keys.reaper_heartbeat(), seconds * 1000 + micros // 1000)  # reapers ran
    await running_job_whose_lease_ran_out(redis, keys)
    assert await reaper(redis, keys).reap_once() == 1
    assert await redis.hget(keys.job(JOB), "error_code") == "worker_lost"


async def test_a_lease_that_ran_out_during_an_outage_counts_as_renewed_when_it_ends(redis, keys):
    the_reaper = reaper(redis, keys)
    await running_job_whose_lease_ran_out(redis, keys)
    await redis.set(keys.reaper_heartbeat(), 1)  # no reaper reached the broker for ages
    assert await the_reaper.reap_once() == 0
    back = time.monotonic()
    assert await redis.hget(keys.job(JOB), "owner") == "worker-gone/1"
    # Its worker renews now, or else it is noticed one lease TTL after the broker's return.
    for _ in range(int(LEASE_S / 0.05)):
        if await the_reaper.reap_once():
            break
        await asyncio.sleep(0.05)  # a reaper's scan interval, shortened
    waited = time.monotonic() - back
    assert LEASE_S * LEASE_TTL_FRACTION - 0.1 < waited < LEASE_S
    assert await redis.hget(keys.job(JOB), "error_code") == "worker_lost"
