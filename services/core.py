"""The core of a process: the shared objects over one broker client, built in one place.

A process (a web node, a worker, or ``tokencast dev``, which is both) holds
one ``Core``: one client and pool, one ``LogAppender`` (so every append of
the process shares its round trips), one queue, one job store, its external jobs, one reaper
and one model catalog.
Objects that need a collaborator are handed it here; none builds its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.catalog import ModelCatalog
from services.config import Settings
from services.eventlog import EventLog, LogAppender
from services.jobs import JobStore
from services.keys import Keys
from services.producers import ExternalJobs
from services.queue import JobQueue
from services.reaper import Reaper
from services.redisconn import Broker, Redis
from services.viewers import ViewerCounts


@dataclass(frozen=True)
class Core:
    """The shared objects of one process; ``aclose()`` closes its client."""

    redis: Redis
    keys: Keys
    queue: JobQueue
    appender: LogAppender
    log: EventLog
    viewers: ViewerCounts
    store: JobStore
    producers: ExternalJobs  # jobs published over HTTP
    reaper: Reaper
    catalog: ModelCatalog  # the models workers serve, as they advertise them

    async def aclose(self) -> None:
        await self.redis.aclose()


def assemble(
    redis: Redis,
    keys: Keys,
    *,
    retention_s: float,
    max_queued_jobs: int,
    lease_s: float,
    reaper_owner: str,
) -> Core:
    """A core over ``redis``: what ``build_core`` does from settings (tests call it directly)."""
    queue = JobQueue(redis, keys)
    appender = LogAppender(redis)
    viewers = ViewerCounts(redis, keys)
    producers = ExternalJobs(redis, keys, queue, appender, lease_s=lease_s, retention_s=retention_s)
    store = JobStore(
        redis,
        keys,
        queue,
        viewers,
        appender,
        producers,
        retention_s=retention_s,
        max_queued_jobs=max_queued_jobs,
    )
    reaper = Reaper(
        keys, queue, appender, owner=reaper_owner, lease_s=lease_s, retention_s=retention_s
    )
    log = EventLog(redis, keys)
    catalog = ModelCatalog(redis, keys)
    return Core(redis, keys, queue, appender, log, viewers, store, producers, reaper, catalog)


def build_core(settings: Settings, broker: Broker, *, reaper_owner: str) -> Core:
    """The core of one process, on a new client of ``broker``; its reaper
    takes jobs over as ``reaper_owner``."""
    return assemble(
        broker.client(),
        Keys(settings.key_prefix),
        retention_s=settings.retention_s,
        max_queued_jobs=settings.max_queued_jobs,
        lease_s=settings.lease_s,
        reaper_owner=reaper_owner,
    )
