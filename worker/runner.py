"""The worker loop: claim jobs, run them under a lease, end each with ``done``.

A broker outage fails no job: a running job's appends wait for the broker
for as long as it takes (the writer retries; the log's appends are
idempotent), its lease is renewed the moment the broker answers again, and
the reapers count every lease as renewed when the broker came back
(``services.queue``), so the generation carries on where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time

from services import metrics
from services.config import Settings
from services.core import Core
from services.errors import BackendError, BrokerUnavailable, Fenced, JobFinished
from services.eventlog import JobWriter
from services.events import CANCELLED, COMPLETED, FAILED
from services.jobs import now_iso
from services.logs import set_job_id
from services.queue import RENEW_FRACTION, Claim, NotStarted, Started
from services.redisconn import cancel_and_wait
from services.retry import Backoff
from worker.backends.base import Backend, Job, close_backends
from worker.generate import pump

log = logging.getLogger(__name__)

CANCEL_POLL_S = 0.05  # cancel is honoured within this plus one append (API.md: 250 ms)
CLAIM_BLOCK_MS = 1000
POLL_S = 0.05  # between queue reads on a broker that cannot block (embedded)
BROKER_RETRY_S = 1.0  # between attempts to reach the queue while the broker is down
# Handing a job back at shutdown waits this long for an unreachable broker.
HAND_BACK_TIMEOUT_S = 5.0


WORKER_SHUTDOWN = {
    "code": "worker_lost",
    "message": "the worker shut down before the job finished",
}


class _CancelledByUser(Exception):
    pass


class Worker:
    """Runs up to ``settings.worker_concurrency`` jobs at once."""

    def __init__(
        self,
        core: Core,
        settings: Settings,
        backends: dict[str, Backend],
        *,
        blocking_reads: bool = True,
    ):
        self.settings = settings
        self.keys = core.keys
        self.backends = backends
        self.blocking_reads = blocking_reads
        self.consumer = f"worker-{settings.node_id}"
        self.queue = core.queue
        self.store = core.store
        self.appender = core.appender  # shared: appends of all its jobs go out together
        self.reaper = core.reaper
        self.catalog = core.catalog  # web nodes list the models it serves
        self.running: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Claim and run jobs until ``stop()``; then drain for ``drain_s``."""
        await self._ensure_group()
        reaper = asyncio.create_task(self.reaper.run(), name="reaper")
        advertiser = asyncio.create_task(
            self.catalog.advertise_forever(self.backends, self.settings.lease_s),
            name="advertiser",
        )
        log.info(
            "worker %s ready (%d jobs at once)", self.consumer, self.settings.worker_concurrency
        )
        try:
            await self._claim_loop()
        finally:
            await cancel_and_wait([reaper, advertiser])
            await self._drain()
            await close_backends(self.backends.values())

    async def _ensure_group(self) -> None:
        backoff = Backoff(BROKER_RETRY_S)
        while not self.stopping.is_set():
            try:
                await self.queue.ensure_group()
                return
            except BrokerUnavailable as exc:
                log.warning("broker unreachable at start: %s", exc)
                await backoff.wait()

    def stop(self) -> None:
        self.stopping.set()

    async def _claim_loop(self) -> None:
        next_reclaim = time.monotonic() + self.settings.lease_s
        backoff = Backoff(BROKER_RETRY_S)
        while not self.stopping.is_set():
            free = self.settings.worker_concurrency - len(self.running)
            if free <= 0:
                await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                claims = await self.queue.claim(
                    self.consumer, free, CLAIM_BLOCK_MS if self.blocking_reads else None
                )
                if time.monotonic() >= next_reclaim:
                    claims += await self.queue.reclaim_stale(
                        self.consumer, int(self.settings.lease_s * 1000)
                    )
                    next_reclaim = time.monotonic() + self.settings.lease_s
            except BrokerUnavailable as exc:
                log.warning("queue unreachable: %s", exc)
                await backoff.wait()
                continue
            for claim in claims:
                task = asyncio.create_task(self.run_job(claim), name=f"job-{claim.job_id}")
                self.running.add(task)
                task.add_done_callback(self._job_done)
            self._count_slots()
            if not claims and not self.blocking_reads:
                await asyncio.sleep(POLL_S)

    def _job_done(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        self._count_slots()

    def _count_slots(self) -> None:
        busy = len(self.running)
        metrics.WORKER_SLOTS.labels("busy").set(busy)
        metrics.WORKER_SLOTS.labels("idle").set(self.settings.worker_concurrency - busy)

    async def _drain(self) -> None:
        if not self.running:
            return
        _done, pending = await asyncio.wait(self.running, timeout=self.settings.drain_s)
        for task in pending:
            task.cancel()  # their leases expire; a reaper ends or retries them
        await asyncio.gather(*pending, return_exceptions=True)

    async def run_job(self, claim: Claim) -> None:
        """Run one claimed job to its terminal event, unless another owner takes it."""
        set_job_id(claim.job_id)  # this task's lines name the job
        owner = f"{self.consumer}/{secrets.token_hex(4)}"
        try:
            started = await self.queue.start(claim, owner, self.settings.lease_s, now_iso())
            if isinstance(started, NotStarted):
                if started.ended:  # cancelled while queued, or gone; else running elsewhere
                    await self.queue.settle(claim.job_id, claim.entry_id)
                return
            await self._run_owned(claim, owner, started)
        except (Fenced, JobFinished):
            log.info("job %s: taken over by another owner; stopping", claim.job_id)
        except BrokerUnavailable as exc:
            log.warning("job %s: broker unreachable (%s); its lease will expire", claim.job_id, exc)
        except Exception:
            log.exception("job %s: worker error", claim.job_id)

    async def _run_owned(self, claim: Claim, owner: str, started: Started) -> None:
        job_id = claim.job_id
        spec, created_at, reasoning_tokens = await self.store.submitted(job_id)
        writer = JobWriter(
            self.appender,
            self.keys,
            job_id,
            owner,
            retention_s=self.settings.retention_s,
            last_id=started.last_event_id,
            tokens=started.tokens,
            reasoning_tokens=int(reasoning_tokens or 0),
            retry_s=math.inf,  # an outage fails no job: wait for the broker
        )
        if started.last_event_id == 0:  # a retried job keeps its one start event
            await writer.start(spec.model, created_at)
        backend = self.backends.get(spec.model)
        try:
            if backend is None:
                raise BackendError(f"no backend serves model {spec.model!r}")
            generation = backend.generate(Job.from_spec(job_id, spec))
            source = f"the backend of model {spec.model!r}"
            gen_task = asyncio.create_task(pump(generation, writer, source))
            await self._supervise(gen_task, job_id, owner)
            await writer.finish(COMPLETED, gen_task.result(), finished_at=now_iso())
        except _CancelledByUser:
            await writer.finish(CANCELLED, CANCELLED, finished_at=now_iso())
        except BackendError as exc:
            error = {"code": exc.code, "message": exc.message}
            await writer.finish(FAILED, None, error, finished_at=now_iso())
        except asyncio.CancelledError:
            if self.stopping.is_set():
                await asyncio.shield(self._hand_back(claim, writer))
            raise
        except (Fenced, JobFinished, BrokerUnavailable):
            raise
        except Exception as exc:
            log.exception("job %s: backend crashed", job_id)
            error = {"code": "backend_error", "message": f"the model backend crashed: {exc}"}
            await writer.finish(FAILED, None, error, finished_at=now_iso())
        await self.queue.settle(job_id, claim.entry_id)

    async def _hand_back(self, claim: Claim, writer: JobWriter) -> None:
        """Shutting down with a job unfinished: requeue it if it sent nothing
        but its start (another worker continues its log), else end it now
        rather than leave its viewers waiting for the lease to expire. The
        broker is waited for ``HAND_BACK_TIMEOUT_S`` at most: then the lease
        decides."""
        try:
            async with asyncio.timeout(HAND_BACK_TIMEOUT_S):
                if writer.last_id <= 1:
                    log.info("job %s: handed back to the queue", claim.job_id)
                    await self.queue.requeue(claim.job_id, writer.owner)
                else:
                    await writer.finish(FAILED, None, WORKER_SHUTDOWN, finished_at=now_iso())
                await self.queue.settle(claim.job_id, claim.entry_id)
        except (Fenced, JobFinished, BrokerUnavailable, TimeoutError) as exc:
            log.warning("job %s: could not hand back (%s)", claim.job_id, exc)

    async def _supervise(self, gen_task: asyncio.Task, job_id: str, owner: str) -> None:
        """Wait for the generation while renewing the lease and watching for cancel."""
        renew_every = self.settings.lease_s * RENEW_FRACTION
        next_renew = time.monotonic() + renew_every
        try:
            while True:
                done, _ = await asyncio.wait({gen_task}, timeout=CANCEL_POLL_S)
                if done:
                    gen_task.result()  # raises the backend's error, if any
                    return
                try:
                    if time.monotonic() >= next_renew:
                        owned, cancel = await self.queue.renew(job_id, owner, self.settings.lease_s)
                        next_renew = time.monotonic() + renew_every
                    else:
                        owned, cancel = await self.queue.cancel_requested(job_id, owner)
                except BrokerUnavailable:
                    # Keep generating, and renew on the first poll that
                    # reaches the broker again.
                    next_renew = time.monotonic()
                    continue
                if not owned:
                    raise Fenced(f"job {job_id}: lease lost")
                if cancel:
                    raise _CancelledByUser()
        finally:
            if not gen_task.done():
                gen_task.cancel()
                with contextlib.suppress(BaseException):
                    await gen_task
