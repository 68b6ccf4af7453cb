"""One viewer's feed: subscribe, then replay the log, then go live.

The order is the invariant (DESIGN.md, 2): the viewer is registered with the
hub and its subscription is live *before* the log is read, so an event
published in between is in the buffer, and ids already sent are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from services import metrics
from services.errors import BrokerUnavailable
from services.eventlog import EventLog
from services.events import DONE, FAILED, Event, done_data
from services.hub import Hub, Viewer
from services.resume import coalesce, next_run

logger = logging.getLogger(__name__)

# Events read from the log per step while catching up: bounds the memory a
# slow or late viewer costs, whatever the job's length.
LOG_PAGE = 1000
BROKER_RETRY_S = 0.5

LOG_LOST = {
    "code": "log_lost",
    "message": "the broker lost this job's events (it restarted without persistence)",
}

KEEPALIVE = None  # what the feed yields when nothing was sent for a keepalive interval


class Feed:
    """Yields batches of events for one viewer, after id ``after``.

    A batch is a list of events in id order (merged tokens when read from the
    log); ``None`` asks for a keepalive, at most once per ``keepalive_s`` of
    quiet. The feed ends after the terminal event, when the broker has been
    unreachable for longer than ``grace_s``, or when ``stopping()`` turns true
    (node shutdown): the client then reconnects and resumes.
    """

    def __init__(
        self,
        hub: Hub,
        log: EventLog,
        job_exists: Callable[[str], Awaitable[bool]],
        *,
        keepalive_s: float,
        grace_s: float,
        stopping: Callable[[], bool] = lambda: False,
    ):
        self.hub = hub
        self.log = log
        self.job_exists = job_exists
        self.keepalive_s = keepalive_s
        self.grace_s = grace_s
        self.stopping = stopping
        self.catch_ups = 0

    async def watch(self, job_id: str, after: int) -> AsyncIterator[list[Event] | None]:
        """The viewer's batches: registered with the hub first, then history, then live."""
        try:
            viewer = await self.hub.attach(job_id)
        except BrokerUnavailable as exc:
            logger.warning("job %s: stream ends, %s", job_id, exc)
            return  # the client reconnects and resumes
        metrics.OPEN_STREAMS.inc()
        if after:
            metrics.RESUMES.inc()
        try:
            async for batch in self._events(viewer, after):
                if batch:
                    metrics.EVENTS_SENT.inc(len(batch))
                    if batch[0].appended_ms:  # live, not read from the log
                        lag_s = time.time() - batch[0].appended_ms / 1000
                        metrics.PUBLISH_TO_SEND.observe(max(lag_s, 0.0))
                yield batch
        finally:
            metrics.OPEN_STREAMS.dec()
            self.hub.detach(viewer)

    async def _events(self, viewer: Viewer, after: int) -> AsyncIterator[list[Event] | None]:
        # ``viewer.lagging`` starts true: the first step reads the log.
        sent = after
        quiet_since = time.monotonic()
        outage_since: float | None = None
        while not self.stopping():
            batch: list[Event] = []
            if viewer.lagging:
                viewer.lagging = False
                try:
                    batch = await self._read_log(viewer, sent)
                    outage_since = None
                except BrokerUnavailable:
                    viewer.lagging = True
                    outage_since = outage_since or time.monotonic()
                    if time.monotonic() - outage_since > self.grace_s:
                        return
                    # The hub wakes the viewer when it has resubscribed.
                    await viewer.wait(BROKER_RETRY_S)
            elif await viewer.wait(min(self.keepalive_s, BROKER_RETRY_S * 4)):
                batch, gap = next_run(viewer.take(), sent)
                if gap:
                    viewer.lagging = True
            elif self.hub.disconnected_for(viewer.job_id) > self.grace_s:
                return
            if batch:
                yield batch
                quiet_since = time.monotonic()
                sent = batch[-1].id
                if batch[-1].name == DONE:
                    return
            elif time.monotonic() - quiet_since >= self.keepalive_s:
                yield KEEPALIVE
                quiet_since = time.monotonic()

    async def _read_log(self, viewer: Viewer, sent: int) -> list[Event]:
        self.catch_ups += 1
        events = await self.log.read(viewer.job_id, sent, LOG_PAGE)
        if len(events) == LOG_PAGE:
            viewer.lagging = True  # more to read before going live
        if not events and not await self.job_exists(viewer.job_id):
            # Every event but the first (start) and the last (done) is a token.
            lost = done_data(FAILED, None, max(sent - 1, 0), LOG_LOST)
            return [Event(sent + 1, DONE, lost)]
        run, _gap = next_run(events, sent)
        return coalesce(run)
