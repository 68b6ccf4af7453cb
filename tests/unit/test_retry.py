"""services.retry.Backoff: the delays every retry loop waits."""

from __future__ import annotations

import time

from services.retry import Backoff


async def test_delays_double_up_to_the_cap_and_start_again_after_a_reset():
    backoff = Backoff(0.001, 0.004)
    delays = [backoff.delay]
    for _ in range(3):
        await backoff.wait()
        delays.append(backoff.delay)
    assert delays == [0.001, 0.002, 0.004, 0.004]
    backoff.reset()
    assert backoff.delay == 0.001


async def test_without_a_cap_the_delay_is_fixed():
    backoff = Backoff(0.001)
    await backoff.wait()
    await backoff.wait()
    assert backoff.delay == 0.001


def test_past_the_deadline_when_the_next_wait_would_end_after_it():
    assert not Backoff(0.1).past_deadline()  # no deadline
    assert not Backoff(0.1, deadline=time.monotonic() + 60).past_deadline()
    assert Backoff(0.1, deadline=time.monotonic() + 0.05).past_deadline()
