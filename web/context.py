"""The per-process objects every route uses, built when the server starts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from quart import current_app

from services.catalog import ModelCatalog
from services.config import Settings
from services.core import Core, build_core
from services.eventlog import EventLog
from services.feed import Feed
from services.history import FinishedLogs
from services.hub import Hub
from services.jobs import JobStore
from services.keys import Keys
from services.limits import StreamsPerClient
from services.producers import ExternalJobs
from services.redisconn import Broker, ReadyProbe, Redis, cancel_and_wait
from services.viewer_tokens import ViewerTokens


@dataclass
class Context:
    """The web tier's objects over the process's ``core``.

    A context that ``owns_core`` (a web node) runs the core's reaper and
    closes its client on ``stop()``; under ``tokencast dev`` the composition
    root owns the core it shares with the worker, which runs the reaper.
    """

    settings: Settings
    core: Core
    hub: Hub
    ready: ReadyProbe
    owns_core: bool = True
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
            retention_s=self.settings.retention_s,
            stopping=lambda: self.draining,
            history=self.history,
        )

    @property
    def redis(self) -> Redis:
        return self.core.redis

    @property
    def keys(self) -> Keys:
        return self.core.keys

    @property
    def store(self) -> JobStore:
        return self.core.store

    @property
    def log(self) -> EventLog:
        return self.core.log

    @property
    def producers(self) -> ExternalJobs:
        """External jobs' claims, leases and ends (``services.producers``)."""
        return self.core.producers

    @property
    def catalog(self) -> ModelCatalog:
        """The models workers serve (``services.catalog``), read at most once a second."""
        return self.core.catalog

    @classmethod
    def build(cls, settings: Settings, broker: Broker, core: Core | None = None) -> Context:
        """The web tier over ``core``, or over a core of its own if none is given."""
        owns_core = core is None
        if core is None:
            core = build_core(settings, broker, reaper_owner=f"reaper-web-{settings.node_id}")
        hub = Hub(
            broker,
            core.redis,
            core.keys,
            core.viewers,
            node_id=settings.node_id,
            viewer_buffer=settings.viewer_buffer,
            # Keepalives go out at most half an interval late; a long outage
            # is noticed within a few seconds.
            tick_s=min(max(settings.keepalive_s / 2, 0.05), 5.0),
        )
        tokens = (
            ViewerTokens(settings.secret, settings.viewer_token_ttl_s) if settings.secret else None
        )
        return cls(
            settings,
            core,
            hub,
            ReadyProbe(core.redis, core.keys.ready_probe(), settings.node_id),
            owns_core=owns_core,
            viewer_tokens=tokens,
            history=FinishedLogs(core.log),
            client_streams=StreamsPerClient(settings.max_streams_per_client),
        )

    async def start(self) -> None:
        await self.hub.start()
        if self.owns_core:
            self.tasks.append(asyncio.create_task(self.core.reaper.run(), name="reaper"))

    def start_draining(self) -> None:
        """Refuse new streams and readiness from now on, and wake every open
        stream so it ends at once."""
        self.draining = True
        self.hub.close_all()

    async def stop(self) -> None:
        await cancel_and_wait(self.tasks)
        await self.hub.stop()
        if self.owns_core:
            await self.core.aclose()


def ctx() -> Context:
    context: Context = current_app.extensions["tokencast"]
    return context
