"""One viewer's feed: subscribe, then replay the log, then go live.

The order is the invariant (DESIGN.md, 2): the viewer is registered with the
hub and its subscription is live *before* the log is read, so an event
published in between is in the buffer, and ids already sent are dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from services import metrics
from services.errors import BrokerUnavailable
from services.eventlog import EventLog
from services.events import DONE, FAILED, Event, done_data
from services.history import FinishedLogs
from services.hub import Hub, Viewer
from services.redisconn import raise_lost_cancel
from services.resume import coalesce, next_run

logger = logging.getLogger(__name__)

# Events read from the log per step while catching up: bounds the memory a
# slow or late viewer costs, whatever the job's length.
LOG_PAGE = 1000

LOG_LOST = {
    "code": "log_lost",
    "message": "the broker lost this job's events (it restarted without persistence)",
}

KEEPALIVE = None  # what the feed yields when nothing was sent for a keepalive interval


class Feed:
    """Opens viewer sessions; holds what every session of a node shares."""

    def __init__(
        self,
        hub: Hub,
        log: EventLog,
        job_exists: Callable[[str], Awaitable[bool]],
        *,
        keepalive_s: float,
        grace_s: float,
        stopping: Callable[[], bool] = lambda: False,
        history: FinishedLogs | None = None,
    ):
        self.hub = hub
        self.log = log
        self.history = history
        self.job_exists = job_exists
        self.keepalive_s = keepalive_s
        self.grace_s = grace_s
        self.stopping = stopping

    async def open(self, job_id: str, after: int, finished: bool = False) -> FeedSession | None:
        """Register a viewer with the hub (before any history is read), or
        ``None`` when the broker cannot be reached: the stream then ends and
        the client reconnects."""
        try:
            viewer = await self.hub.attach(job_id)
        except BrokerUnavailable as exc:
            logger.warning("job %s: stream ends, %s", job_id, exc)
            return None
        metrics.OPEN_STREAMS.inc()
        if after:
            metrics.RESUMES.inc()
        return FeedSession(self, viewer, after, finished)

    async def _read_log(self, viewer: Viewer, sent: int, finished: bool = False) -> list[Event]:
        if finished and self.history is not None:
            finished_log = await self.history.get(viewer.job_id)
            if finished_log is not None:
                return finished_log.after(sent)  # the rest of the job, merged, shared
        events = await self.log.read(viewer.job_id, sent, LOG_PAGE)
        if len(events) == LOG_PAGE:
            viewer.lagging = True  # more to read before going live
        if not events and not await self.job_exists(viewer.job_id):
            metrics.LOGS_LOST.inc()
            logger.error(
                "job %s: its log is gone (broker data lost); ending with log_lost", viewer.job_id
            )
            # Every event but the first (start) and the last (done) is a token.
            lost = done_data(FAILED, None, max(sent - 1, 0), LOG_LOST)
            return [Event(sent + 1, DONE, lost)]
        run, _gap = next_run(events, sent)
        return coalesce(run)


class FeedSession:
    """One viewer's feed: ``next()`` gives the next batch of events to send.

    A batch is a list of events in id order (merged tokens when read from
    the log); ``None`` asks for a keepalive, at most once per ``keepalive_s``
    of quiet; ``[]`` means the feed has ended: after the terminal event, when
    the broker has been unreachable for longer than ``grace_s``, or when the
    node shuts down (the client then reconnects and resumes). ``close()``
    must follow, whatever happens.

    ``next()`` is a plain coroutine, not an async generator: a cancelled
    request (the client left) must unwind through it reliably, and a
    cancellation thrown through nested async generators was seen to be lost,
    leaving the stream registered forever.
    """

    def __init__(self, feed: Feed, viewer: Viewer, after: int, finished: bool = False):
        self.feed = feed
        self.viewer = viewer
        self.sent = after  # ``viewer.lagging`` starts true: the first step reads the log
        self.finished = finished  # the job had ended when the stream opened
        self.quiet_since = 0.0
        self._quiet_from_now()
        self.outage_since: float | None = None
        self.ended = False

    def _quiet_from_now(self) -> None:
        """Something was just sent: the next keepalive, and the hub's tick
        that wakes the viewer for it, are ``keepalive_s`` away."""
        self.quiet_since = time.monotonic()
        self.viewer.tick_after = self.quiet_since + self.feed.keepalive_s

    async def next(self) -> list[Event] | None:
        feed, viewer = self.feed, self.viewer
        while not self.ended and not feed.stopping():
            batch: list[Event] = []
            if viewer.lagging:
                viewer.lagging = False
                try:
                    batch = await feed._read_log(viewer, self.sent, self.finished)
                    raise_lost_cancel()
                    self.outage_since = None
                except BrokerUnavailable:
                    viewer.lagging = True
                    self.outage_since = self.outage_since or time.monotonic()
                    if time.monotonic() - self.outage_since > feed.grace_s:
                        break
                    viewer.tick_after = 0.0  # retry at the hub's next tick
                    await viewer.wait()  # the hub's resubscribe, or its next tick
            else:
                await viewer.wait()
                events = viewer.take(self.sent)
                if events and events[0].id == self.sent + 1:
                    batch = events  # consecutive ids: exactly what comes next
                elif events:  # fell behind the job's live buffer, or pub/sub skipped ids
                    viewer.lagging = True
                    metrics.CATCH_UPS.inc()
                elif feed.hub.disconnected_for(viewer.job_id) > feed.grace_s:
                    break
            if batch:
                self._quiet_from_now()
                self.sent = batch[-1].id
                self.ended = batch[-1].name == DONE
                metrics.EVENTS_SENT.inc(len(batch))
                if batch[0].appended_ms:  # live, not read from the log
                    lag_s = time.time() - batch[0].appended_ms / 1000
                    metrics.PUBLISH_TO_SEND.observe(max(lag_s, 0.0))
                return batch
            if time.monotonic() - self.quiet_since >= feed.keepalive_s:
                self._quiet_from_now()
                return KEEPALIVE
        self.ended = True
        return []

    def close(self) -> None:
        metrics.OPEN_STREAMS.dec()
        self.feed.hub.detach(self.viewer)
