"""Waiting between attempts: the one way retries back off here."""

from __future__ import annotations

import asyncio
import math
import time


class Backoff:
    """Delays of ``min_s``, doubled after each wait up to ``max_s`` (by
    default ``min_s``: a fixed delay), within an optional ``deadline``
    (``time.monotonic()``).

    The caller keeps its own loop, what it catches and what it logs::

        backoff = Backoff(0.1, 1.0, deadline=time.monotonic() + 5)
        while True:
            try:
                return await attempt()
            except BrokerUnavailable:
                if backoff.past_deadline():
                    raise
                await backoff.wait()
    """

    __slots__ = ("deadline", "delay", "max_s", "min_s")

    def __init__(self, min_s: float, max_s: float | None = None, *, deadline: float = math.inf):
        self.min_s = min_s
        self.max_s = min_s if max_s is None else max_s
        self.deadline = deadline
        self.delay = min_s  # the next wait

    def past_deadline(self) -> bool:
        """The next wait would end after the deadline."""
        return time.monotonic() + self.delay > self.deadline

    async def wait(self) -> None:
        """Sleep for the next delay, and double the one after."""
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.max_s)

    def reset(self) -> None:
        """An attempt succeeded: the next failure waits ``min_s`` again."""
        self.delay = self.min_s
