"""The per-process objects every route uses, built when the server starts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from quart import current_app

from services.config import Settings
from services.eventlog import EventLog
from services.feed import Feed
from services.history import FinishedLogs
from services.hub import Hub
from services.jobs import JobStore
from services.keys import Keys
from services.limits import StreamsPerClient
from services.reaper import Reaper
from services.redisconn import Broker, ReadyProbe, Redis, cancel_and_wait
from services.viewer_tokens import ViewerTokens


@dataclass
class Context:
    settings: Settings
    redis: Redis
    keys: Keys
    store: JobStore
    log: EventLog
    hub: Hub
    reaper: Reaper
    ready: ReadyProbe
    viewer_tokens: ViewerTokens | None = None
    history: FinishedLogs | None = None
    client_streams: StreamsPerClient = field(
        default_factory=lambda: StreamsPerClient(Settings.max_streams_per_client)
    )
    draining: bool = False
    tasks: list[asyncio.Task] = field(default_factory=list)
    feed: Feed = field(init=False)

    def __post_init__(self) -> None:
        # One feed for the node: every stream shares it, and its finished-log cache.
        self.feed = Feed(
            self.hub,
            self.log,
            self.store.exists,
            keepalive_s=self.settings.keepalive_s,
            grace_s=self.settings.broker_grace_s,
            stopping=lambda: self.draining,
            history=self.history,
        )

    @classmethod
    def build(cls, settings: Settings, broker: Broker) -> Context:
        redis = broker.client()
        keys = Keys(settings.key_prefix)
        hub = Hub(
            broker,
            redis,
            keys,
            node_id=settings.node_id,
            viewer_buffer=settings.viewer_buffer,
            # Keepalives go out at most half an interval late; a long outage
            # is noticed within a few seconds.
            tick_s=min(max(settings.keepalive_s / 2, 0.05), 5.0),
        )
        store = JobStore(
            redis,
            keys,
            retention_s=settings.retention_s,
            max_queued_jobs=settings.max_queued_jobs,
            lease_s=settings.lease_s,
        )
        reaper = Reaper(
            redis,
            keys,
            owner=f"reaper-web-{settings.node_id}",
            lease_s=settings.lease_s,
            retention_s=settings.retention_s,
        )
        tokens = (
            ViewerTokens(settings.secret, settings.viewer_token_ttl_s) if settings.secret else None
        )
        log = EventLog(redis, keys)
        return cls(
            settings,
            redis,
            keys,
            store,
            log,
            hub,
            reaper,
            ReadyProbe(redis, keys.ready_probe(), settings.node_id),
            viewer_tokens=tokens,
            history=FinishedLogs(log),
            client_streams=StreamsPerClient(settings.max_streams_per_client),
        )

    async def start(self) -> None:
        await self.hub.start()
        self.tasks.append(asyncio.create_task(self.reaper.run(), name="reaper"))

    async def stop(self) -> None:
        await cancel_and_wait(self.tasks)
        await self.hub.stop()
        await self.redis.aclose()


def ctx() -> Context:
    context: Context = current_app.extensions["tokencast"]
    return context
