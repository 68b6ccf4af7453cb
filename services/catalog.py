"""The models workers serve, as every web node sees them.

Web nodes know ``demo`` and the upstream models from their settings, but not
the models of ``TOKENCAST_BACKENDS``: they never import a backend. So each
worker advertises the models it serves in one sorted set (``Keys.models``):
member the model's name, score the time (ms) its advertisement expires,
``ttl_s`` ahead. Workers refresh it every ``ttl_s / 3`` and only ever raise a
score (``ZADD GT``), so a model is listed while any worker serving it lives.
A web node reads the set at most once per ``CACHE_S``: a model whose workers
are all gone stops being listed within ``ttl_s + CACHE_S``. Clocks of workers
and web nodes are taken to agree (NTP), as for viewer counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from services.errors import BrokerUnavailable
from services.keys import Keys
from services.redisconn import Redis, broker_errors

log = logging.getLogger(__name__)

CACHE_S = 1.0  # how long a web node reuses what it read
REFRESHES_PER_TTL = 3


class ModelCatalog:
    """Writes a worker's advertisements (``advertise``), reads them for web
    nodes (``advertised``); the one owner of ``Keys.models``."""

    def __init__(self, redis: Redis, keys: Keys, *, cache_s: float = CACHE_S):
        self.redis = redis
        self.key = keys.models()
        self.cache_s = cache_s
        self._names: list[str] = []
        self._read_at: float | None = None

    async def advertise(self, models: Iterable[str], ttl_s: float) -> None:
        """Say these models are served for the next ``ttl_s`` seconds; drop
        expired advertisements. Raises ``BrokerUnavailable``."""
        now_ms = int(time.time() * 1000)
        expiry_ms = now_ms + int(ttl_s * 1000)
        with broker_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self.key, dict.fromkeys(models, expiry_ms), gt=True)
                pipe.zremrangebyscore(self.key, "-inf", now_ms)
                await pipe.execute()

    async def advertise_forever(self, models: Iterable[str], ttl_s: float) -> None:
        """``advertise`` every ``ttl_s / 3`` until cancelled, riding out broker outages."""
        names = list(models)
        while True:
            try:
                await self.advertise(names, ttl_s)
            except BrokerUnavailable as exc:
                log.warning("could not advertise models: %s", exc)
            await asyncio.sleep(ttl_s / REFRESHES_PER_TTL)

    async def advertised(self) -> list[str]:
        """The models some live worker serves, sorted; at most ``cache_s`` old.

        With the broker unreachable, the last list read (empty before any):
        creating a job needs the broker anyway, and fails on its own.
        """
        if self._read_at is not None and time.monotonic() - self._read_at < self.cache_s:
            return self._names
        try:
            with broker_errors():
                names: list[str] = await self.redis.zrangebyscore(  # type: ignore[assignment]
                    self.key, int(time.time() * 1000), "+inf"
                )
        except BrokerUnavailable:
            return self._names
        self._names, self._read_at = sorted(names), time.monotonic()
        return self._names
