"""The reaper: ends or retries jobs whose worker stopped renewing its lease.

Web nodes and workers both run one, so a job ends even when every worker is
gone. Taking a job over is atomic (``JobQueue.takeover``), so many reapers
never act on one job twice.

A broker outage ends no lease by itself: each pass starts with the reapers'
shared heartbeat (``JobQueue.heartbeat``), which tells when the broker was
last back from an outage, and every lease counts as renewed at that moment.
A worker that died during the outage is noticed one lease TTL (0.7 of
TOKENCAST_LEASE_SECONDS) after the broker returns.
"""

from __future__ import annotations

import asyncio
import logging

from services.errors import BrokerUnavailable, Fenced, JobFinished
from services.eventlog import JobWriter, LogAppender
from services.events import CANCELLED, FAILED
from services.jobs import now_iso
from services.keys import Keys
from services.logs import job_scope
from services.producers import PRODUCER_LOST
from services.queue import JobQueue, TakenOver

log = logging.getLogger(__name__)

SCAN_INTERVAL_S = 0.5
MAX_ATTEMPTS = 2  # a job that sent no token yet is retried once

WORKER_LOST = {
    "code": "worker_lost",
    "message": "the worker generating this job stopped responding",
}


class Reaper:
    def __init__(
        self,
        keys: Keys,
        queue: JobQueue,
        appender: LogAppender,
        *,
        owner: str,
        lease_s: float,
        retention_s: float,
    ):
        self.keys = keys
        self.owner = owner
        self.lease_s = lease_s
        self.retention_s = retention_s
        self.queue = queue
        self.appender = appender

    async def run(self) -> None:
        """Scan forever; broker outages are waited out. (Its broker calls
        raise a cancel they swallowed: ``broker_errors``.)"""
        while True:
            try:
                await self.reap_once()
            except BrokerUnavailable:
                pass
            except Exception:
                log.exception("reaper pass failed")
            await asyncio.sleep(SCAN_INTERVAL_S)

    async def reap_once(self) -> int:
        """Handle every job whose lease has expired; returns how many were taken over."""
        handled = 0
        broker_back_ms = await self.queue.heartbeat()
        for job_id in await self.queue.expired():
            with job_scope(job_id):
                handled += await self._reap(job_id, broker_back_ms)
        return handled

    async def _reap(self, job_id: str, broker_back_ms: int) -> int:
        taken = await self.queue.takeover(job_id, self.owner, self.lease_s, broker_back_ms)
        if taken is None:
            return 0
        nothing_sent = taken.last_event_id <= 1  # at most its start: a retry repeats nothing
        if taken.external:
            await self._end(job_id, taken, PRODUCER_LOST)  # never retried: nobody else can publish
        elif not taken.cancel_requested and nothing_sent and taken.attempts < MAX_ATTEMPTS:
            log.warning("job %s: worker lost before any token, retrying", job_id)
            await self.queue.requeue(job_id, self.owner)
        else:
            await self._end(job_id, taken)
        await self.queue.settle(job_id, taken.entry_id)
        return 1

    async def _end(self, job_id: str, taken: TakenOver, lost: dict[str, str] = WORKER_LOST) -> None:
        writer = JobWriter(
            self.appender,
            self.keys,
            job_id,
            self.owner,
            retention_s=self.retention_s,
            last_id=taken.last_event_id,
            tokens=taken.tokens,
            reasoning_tokens=taken.reasoning_tokens,
        )
        try:
            if taken.cancel_requested:
                await writer.finish(CANCELLED, CANCELLED, finished_at=now_iso())
            else:
                log.warning("job %s: %s after %d tokens", job_id, lost["code"], taken.tokens)
                await writer.finish(FAILED, None, lost, finished_at=now_iso())
        except (Fenced, JobFinished):
            pass  # someone else settled it meanwhile
