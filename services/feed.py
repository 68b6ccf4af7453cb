"""One viewer's feed: subscribe, then replay the log, then go live.

The order is the invariant (DESIGN.md, 2), and this module is where it is kept:

1. Subscribe: ``Feed.open`` registers the viewer with the hub, and
   ``Hub.attach`` returns once the job's subscription is live. From then on,
   every event published is in the job's live buffer.
2. Replay: a new ``Viewer`` starts lagging, so the first step of
   ``FeedSession.next`` reads the log after the viewer's Last-Event-ID (a page
   at a time, merged). An event published during that read is in the buffer.
   Viewers of one job resuming from one id share a read (``Topic.catch_up_read``
   says when that is sound).
3. Live: then each step takes the buffered events after the last id sent, so
   ids already sent are dropped. A gap (the viewer fell behind the buffer,
   or pub/sub skipped ids) or a resubscribe sends it back to 2.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services import metrics
from services.errors import BrokerUnavailable
from services.eventlog import EventLog
from services.events import DONE, FAILED, Event, done_data
from services.history import FinishedLogs
from services.hub import Hub
from services.jobs import StreamPosition
from services.resume import coalesce, next_run
from services.topic import LogPage, Topic, Viewer

logger = logging.getLogger(__name__)

# Events read from the log per step while catching up: bounds the memory a
# slow or late viewer costs, whatever the job's length.
LOG_PAGE = 1000

LOG_LOST = {
    "code": "log_lost",
    "message": "the broker lost this job's events (it restarted without persistence)",
}


# What ``FeedSession.next`` gives: a batch to send, a keepalive, or the end.


@dataclass(slots=True)
class Batch:
    """Events to send, in id order, following id ``after`` (tokens read from
    the log come merged). Not frozen: one is built per batch sent, and a
    frozen dataclass costs twice as much to build. ``events`` may be shared
    with the job's other viewers (a shared read, a finished log): never
    change the list or its events."""

    events: list[Event]
    after: int


@dataclass(frozen=True, slots=True)
class Keepalive:
    """Nothing was sent for ``keepalive_s``: send a keepalive."""


@dataclass(frozen=True, slots=True)
class End:
    """The feed has ended; ``close()`` follows."""


KEEPALIVE = Keepalive()
END = End()
Step = Batch | Keepalive | End


class Feed:
    """Opens viewer sessions. One per node, shared by all its streams
    (``web.context.Context.feed``), with what they share: the hub, the log,
    the cache of finished logs and the node's settings."""

    def __init__(
        self,
        hub: Hub,
        log: EventLog,
        job_exists: Callable[[str], Awaitable[bool]],
        *,
        keepalive_s: float,
        grace_s: float,
        retention_s: float,
        stopping: Callable[[], bool] = lambda: False,
        history: FinishedLogs | None = None,
    ):
        self.hub = hub
        self.log = log
        self.history = history
        self.job_exists = job_exists
        self.keepalive_s = keepalive_s
        self.grace_s = grace_s
        self.retention_s = retention_s
        self.stopping = stopping

    def known_position(self, job_id: str, after: int) -> StreamPosition | None:
        """Where the job's log ends, as far as this node's live subscription
        to it tells, for a stream to open after id ``after``; ``None`` when
        it cannot tell for sure (then ask ``JobStore.position``).

        Exact enough to decide what ``JobStore.position`` decides (404, 400
        past the end, 204 at the end, finished or not) and no more: the job
        exists, ``after`` is not past the log's end, and it is finished only
        when its ``done`` was seen. ``last_event_id`` of a running job may be
        below the log's end (events on their way); of a finished one it is
        exact.
        """
        topic = self.hub.topic(job_id)
        if topic is None or not topic.ready.is_set():
            return None
        # Nothing seen under this subscription yet (not even that the job
        # exists), or ``after`` may be past the end: only Redis can tell.
        if not topic.known_id or after > topic.known_id:
            return None
        if topic.done_at is None:
            return StreamPosition(topic.known_id, False)
        # The job's keys expire ``retention_s`` after its ``done`` was
        # appended; half of it leaves the done's way here a wide margin.
        if time.monotonic() - topic.done_at < self.retention_s / 2:
            return StreamPosition(topic.known_id, True)
        return None

    async def open(
        self, job_id: str, after: int, finished: bool = False, ahead: bool = False
    ) -> FeedSession | None:
        """Register a viewer with the hub (before any history is read), or
        ``None`` when the broker cannot be reached: the stream then ends and
        the client reconnects. ``ahead``: ``after`` is past the log's end
        (right after a failover, its writer restores what the broker lost):
        the session waits up to ``grace_s`` for the log to reach it, then ends."""
        try:
            viewer = await self.hub.attach(job_id)  # 1. subscribed: from here on, buffered
        except BrokerUnavailable as exc:
            logger.warning("job %s: stream ends, %s", job_id, exc)
            return None
        metrics.OPEN_STREAMS.inc()
        if after:
            metrics.RESUMES.inc()
        session = FeedSession(self, viewer, after, finished)  # 2. replays the log, 3. then live
        if ahead:
            session.ahead_until = time.monotonic() + self.grace_s
        return session

    async def log_reaches(self, job_id: str, event_id: int) -> bool:
        """The job's log holds event ``event_id`` (``False`` when the broker cannot tell)."""
        try:
            return bool(await self.log.read(job_id, event_id - 1, 1))
        except BrokerUnavailable:
            return False

    async def read_log(
        self, topic: Topic, sent: int, finished: bool = False
    ) -> tuple[list[Event], bool]:
        """The job's events after id ``sent``, read from the log (or the
        finished-log cache when ``finished``) with tokens merged, and whether
        more are left to read: at most ``LOG_PAGE`` are read at once. A log
        that is gone gives a ``done`` event with ``log_lost``. Raises
        ``BrokerUnavailable``."""
        job_id = topic.job_id
        if finished and self.history is not None:
            finished_log = await self.history.get(job_id)
            if finished_log is not None:
                return finished_log.after(sent), False  # the rest of the job, merged, shared
        page = await topic.catch_up_read(sent, self._read_page)
        if page.gone:
            metrics.LOGS_LOST.inc()
            logger.error("job %s: its log is gone (broker data lost); ending with log_lost", job_id)
            # Every event but the first (start) and the last (done) is a token.
            lost = done_data(FAILED, None, max(sent - 1, 0), LOG_LOST)
            return [Event(sent + 1, DONE, lost)], False
        return page.events, page.more

    async def _read_page(self, job_id: str, sent: int) -> LogPage:
        events = await self.log.read(job_id, sent, LOG_PAGE)
        gone = not events and not await self.job_exists(job_id)
        run, _gap = next_run(events, sent)
        end = run[-1].id if run else sent
        return LogPage(coalesce(run), len(events) == LOG_PAGE, gone, end)


class FeedSession:
    """One viewer's feed: ``next()`` gives what to send next.

    A ``Batch``; or ``KEEPALIVE``, at most once per ``keepalive_s`` of quiet;
    or ``END``: after the terminal event, when the broker has been
    unreachable for longer than ``grace_s``, when it opened past the log's
    end and the log did not reach it within ``grace_s``, or when the node
    shuts down (the client then reconnects and resumes). ``close()`` must follow, whatever
    happens.

    ``next()`` is a plain coroutine, not an async generator: a cancelled
    request (the client left) must unwind through it reliably, and a
    cancellation thrown through nested async generators was seen to be lost,
    leaving the stream registered forever.
    """

    def __init__(self, feed: Feed, viewer: Viewer, after: int, finished: bool = False):
        self.feed = feed
        self.viewer = viewer
        self.sent = after  # the last id sent
        self.finished = finished  # the job had ended when the stream opened
        self.quiet_since = 0.0
        self._quiet_from_now()
        self.outage_since: float | None = None
        self.ahead_until: float | None = None  # see ``Feed.open``
        self.ended = False

    def _quiet_from_now(self) -> None:
        """Something was just sent: the next keepalive, and the hub's tick
        that wakes the viewer for it, are ``keepalive_s`` away."""
        self.quiet_since = time.monotonic()
        self.viewer.keepalive_due_at(self.quiet_since + self.feed.keepalive_s)

    async def next(self) -> Step:
        feed, viewer = self.feed, self.viewer
        while not self.ended and not feed.stopping():
            events: list[Event] = []
            if viewer.lagging:  # replay (a new viewer starts here), then live
                viewer.start_catch_up()
                try:
                    events, more = await feed.read_log(viewer.topic, self.sent, self.finished)
                    self.outage_since = None
                    if more:
                        viewer.mark_lagging()
                except BrokerUnavailable:
                    now = time.monotonic()
                    self.outage_since = self.outage_since or now
                    if now - self.outage_since > feed.grace_s:
                        break
                    viewer.retry_catch_up()
                    await viewer.wait()  # the hub's resubscribe, or its next tick
            else:
                await viewer.wait()
                live = viewer.take(self.sent)
                if live and live[0].id == self.sent + 1:
                    events = live  # consecutive ids: exactly what comes next
                elif live:  # fell behind the job's live buffer, or pub/sub skipped ids
                    viewer.mark_lagging()
                    metrics.CATCH_UPS.inc()
                elif feed.hub.disconnected_for(viewer.job_id) > feed.grace_s:
                    break
                elif self.ahead_until and time.monotonic() > self.ahead_until:
                    if not await feed.log_reaches(viewer.job_id, self.sent):
                        break  # never restored: the client's reconnect gets the 400
                    self.ahead_until = None
            if events:
                batch = Batch(events, self.sent)
                self._quiet_from_now()
                self.sent = events[-1].id
                self.ended = events[-1].name == DONE
                metrics.EVENTS_SENT.inc(len(events))
                if events[0].appended_ms:  # live, not read from the log
                    lag_s = time.time() - events[0].appended_ms / 1000
                    metrics.PUBLISH_TO_SEND.observe(max(lag_s, 0.0))
                return batch
            if time.monotonic() - self.quiet_since >= feed.keepalive_s:
                self._quiet_from_now()
                return KEEPALIVE
        self.ended = True
        return END

    def close(self) -> None:
        metrics.OPEN_STREAMS.dec()
        self.feed.hub.detach(self.viewer)
