"""A job's local viewers and its recent live events, shared by all of them.

A ``Topic`` is created by the hub for each job with viewers on this node; a
``Viewer`` is one open stream's place in it. Each owns its own state: the
topic its buffer, its viewers, whether its subscription is live (the hub's
shard tells it), the catch-up reads its viewers share and what they showed
of the log's end; the viewer whether it must read the log first and when its
keepalive is due (its feed tells it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple

from services.events import DONE, Event

# Live events a job keeps for its viewers: a viewer further behind catches
# up from the log (also at most TOKENCAST_VIEWER_BUFFER events).
KEEP_LIVE_MS = 2000
# A finished catch-up read is given to the job's other viewers resuming from
# the same id for this long. Any age would be correct (``Topic.catch_up_read``
# says why), and one the buffer no longer continues is not given
# (``Topic._reusable``); the bound keeps the buffer likely to continue it (it
# holds the last 2 s of events, KEEP_LIVE_MS) and kept pages from outliving
# the storm that read them. A reconnect storm arrives over seconds, so 200 ms
# still turns one read per viewer into at most five a second per resume id:
# 10,000 viewers opening on one job (make bench S3) sent 10,000 XRANGEs.
SHARED_READ_S = 0.2
# Reads kept per job (different resume ids): a handful is a storm's worth.
MAX_SHARED_READS = 8


class LogPage(NamedTuple):
    """One catch-up read of a job's log after some id: its events (tokens
    merged), whether more are left to read, and whether the job is gone (no
    log, no job: the broker lost its data). Shared by every viewer that
    resumed from that id: read-only, like the events in it."""

    events: list[Event]
    more: bool
    gone: bool
    end: int  # the id it read up to (the id it read after, when it found none)


# Reads the log of job ``job_id`` after id ``after``.
ReadLog = Callable[[str, int], Coroutine[Any, Any, LogPage]]


class SharedRead:
    """A catch-up read under way or done, and the subscription epoch it was sent in."""

    __slots__ = ("epoch", "finished_at", "task")

    def __init__(self, task: asyncio.Task[LogPage], epoch: int):
        self.task = task
        self.epoch = epoch
        self.finished_at: float | None = None  # time.monotonic() when it succeeded


class Viewer:
    """One open stream's wake-up: it reads its job's live events from the
    job's shared buffer (``Topic``), after the last id it sent.

    Its state changes only through its methods: the hub wakes it or asks a
    resync, its feed marks it lagging and says when its keepalive is due.
    """

    __slots__ = ("_wakeup", "job_id", "lagging", "tick_after", "topic")

    def __init__(self, topic: Topic):
        self.topic = topic
        self.job_id = topic.job_id
        self._wakeup = asyncio.Event()
        # A new viewer starts lagging: it reads the log before anything live.
        self.lagging = True
        # The hub's tick wakes the viewer once ``time.monotonic()`` passes
        # this (its next keepalive), or at every tick while pub/sub is down.
        self.tick_after = 0.0

    # The hub's side.

    def resync(self) -> None:
        """Make the viewer re-read the log after the last id it sent."""
        self.lagging = True
        self._wakeup.set()

    def tick(self) -> None:
        self._wakeup.set()

    # The feed's side.

    def start_catch_up(self) -> None:
        """The feed starts reading the log. The mark is cleared first, so a
        resync asked while the log is being read marks the viewer again. And
        the step after the read looks at the buffer at once: a shared read
        (``Topic.catch_up_read``) may end before events whose wake-up this
        viewer already used up."""
        self.lagging = False
        self._wakeup.set()

    def mark_lagging(self) -> None:
        """Read the log again before anything live: the viewer fell behind
        the buffer, or more of the log is left to read."""
        self.lagging = True

    def retry_catch_up(self) -> None:
        """The log could not be read: try again at the hub's next tick."""
        self.lagging = True
        self.tick_after = 0.0
        self._wakeup.clear()

    def keepalive_due_at(self, deadline: float) -> None:
        """Have the hub's tick wake the viewer once ``time.monotonic()``
        passes ``deadline`` (while pub/sub is up and nothing arrives)."""
        self.tick_after = deadline

    async def wait(self) -> None:
        """Until live events arrive, a resync is asked, or the hub's tick: no
        timer per wait, which would cost more than the event itself."""
        await self._wakeup.wait()

    def take(self, after: int) -> list[Event]:
        """The job's buffered live events after id ``after``: consecutive
        ids, oldest first. If the viewer fell behind the buffer, they start
        past ``after + 1``: the caller then catches up from the log."""
        self._wakeup.clear()
        return self.topic.since(after)


class Topic:
    """The local viewers of one job, whether its subscription is live, and
    its recent live events, shared by all its viewers.

    One buffer per job instead of one per viewer: an event costs one append
    however many viewers watch, and the viewers are woken once per linger
    window. Measured with 1,000 viewers of a 500 tokens/s job (make bench
    S1): pushing each event to each viewer kept the pub/sub reader 100-400 ms
    behind Redis.
    """

    __slots__ = (
        "_reads",
        "channel",
        "done_at",
        "epoch",
        "events",
        "job_id",
        "known_id",
        "limit",
        "ready",
        "shard_name",
        "viewers",
        "wake_due",
    )

    def __init__(self, job_id: str, channel: str, shard_name: str, limit: int):
        self.job_id = job_id
        self.channel = channel
        self.shard_name = shard_name  # the hub's pub/sub connection that carries it
        self.viewers: set[Viewer] = set()
        self.ready = asyncio.Event()  # set while the subscription is live
        self.events: list[Event] = []
        self.limit = limit
        self.wake_due = False  # the hub wakes this job's viewers after LINGER_S
        # Bumped by each subscribe and each loss: what was learned under
        # another subscription (another broker, after a failover) is not used.
        self.epoch = 0
        self._reads: dict[int, SharedRead] = {}  # by the id they read after; this epoch's only
        # What this epoch showed of the log's end: the newest id seen (live,
        # or read after the subscription went live), and when a live ``done``
        # arrived (``time.monotonic()``).
        self.known_id = 0
        self.done_at: float | None = None

    def add_viewer(self) -> Viewer:
        viewer = Viewer(self)
        self.viewers.add(viewer)
        return viewer

    def remove_viewer(self, viewer: Viewer) -> bool:
        """Forget ``viewer``; ``True`` when no viewer is left."""
        self.viewers.discard(viewer)
        return not self.viewers

    def subscribed(self) -> None:
        """Live from here on; whatever was published before is in the log."""
        self._new_epoch()
        self.ready.set()
        self.resync_viewers()

    def unsubscribed(self) -> None:
        self._new_epoch()
        self.ready.clear()

    def _new_epoch(self) -> None:
        self.epoch += 1
        self._reads.clear()
        self.known_id = 0
        self.done_at = None

    def resync_viewers(self) -> None:
        for viewer in self.viewers:
            viewer.resync()

    def add_event(self, event: Event) -> bool:
        """Keep ``event``. The buffer always holds consecutive ids, so a
        viewer's share of it is one slice. ``True`` when the viewers are to
        be woken for it and no wake-up is due yet: the caller schedules one,
        then calls ``wake_viewers``."""
        events = self.events
        if events and event.id != events[-1].id + 1:
            if event.id <= events[-1].id:
                return False  # a repeat: the buffer has it
            events.clear()  # pub/sub skipped ids: viewers before the gap re-read the log
        events.append(event)
        self.known_id = max(self.known_id, event.id)
        if event.name == DONE:
            self.done_at = time.monotonic()
        # Events older than KEEP_LIVE_MS, or past the limit, are only for
        # viewers that far behind, who catch up from the log instead.
        oldest = event.appended_ms - KEEP_LIVE_MS
        stale = 0
        while events[stale].appended_ms < oldest:
            stale += 1
        stale = max(stale, len(events) - self.limit)
        if stale:
            del events[:stale]
        if self.wake_due:
            return False
        self.wake_due = True
        return True

    def wake_viewers(self) -> None:
        self.wake_due = False
        for viewer in self.viewers:
            viewer.tick()

    def since(self, after: int) -> list[Event]:
        """The buffered events after id ``after``; they start past
        ``after + 1`` when the viewer fell behind the buffer."""
        events = self.events
        if not events or events[-1].id <= after:
            return []
        return events[max(after + 1 - events[0].id, 0) :]

    def catch_up_read(self, after: int, read: ReadLog) -> Awaitable[LogPage]:
        """The log after id ``after``, as ``read`` reads it, shared with the
        job's other viewers that resume from ``after``: a read under way is
        joined, one done less than SHARED_READ_S ago is given again.

        Why a read may be shared, with any viewer of this job, also one that
        attached after it was sent: it was sent after the current
        subscription went live, so every event it missed was published after
        the SUBSCRIBE took effect in Redis and reaches this topic's buffer.
        The buffer always keeps its newest event (trimming drops only older
        ones), so the viewer's next ``take`` (at once: see
        ``Viewer.start_catch_up``) either continues from the read's last id
        or shows a gap, and the viewer re-reads the log. A read sent
        before the subscription went live, or under a previous one (a lost
        connection, a resubscribe), gives no such promise: it is never
        shared, and a new epoch drops the reads of the old one.
        """
        if not self.ready.is_set():
            return read(self.job_id, after)  # for its own viewer only
        shared = self._reads.get(after)
        if shared is not None and shared.finished_at is not None:
            if not self._reusable(shared.task.result(), shared.finished_at):
                del self._reads[after]
                shared = None
        if shared is None:
            shared = self._start_read(after, read)
        return asyncio.shield(shared.task)

    def _reusable(self, page: LogPage, finished_at: float) -> bool:
        """A finished read is given again while it is recent, and only if it
        leaves its viewer where a new read would: more is left to read from
        its end, or the buffer goes on from there. One that ends before the
        buffer starts would only send its viewer back to the log, and an
        empty one would do so without end."""
        if time.monotonic() - finished_at > SHARED_READ_S:
            return False
        if page.more:
            return True
        events = self.events
        return not events or events[0].id <= page.end + 1

    def _start_read(self, after: int, read: ReadLog) -> SharedRead:
        # Its own task: a viewer that leaves mid-read must not cancel it for the others.
        shared = SharedRead(asyncio.ensure_future(read(self.job_id, after)), self.epoch)
        if len(self._reads) >= MAX_SHARED_READS:
            del self._reads[next(iter(self._reads))]  # the oldest
        self._reads[after] = shared
        shared.task.add_done_callback(lambda _task: self._read_done(after, shared))
        return shared

    def _read_done(self, after: int, shared: SharedRead) -> None:
        task = shared.task
        failed = task.cancelled() or task.exception() is not None
        if shared.epoch != self.epoch:
            return  # its epoch's reads were dropped with it
        if failed:
            if self._reads.get(after) is shared:
                del self._reads[after]  # the next viewer tries again
            return
        shared.finished_at = time.monotonic()
        page = task.result()
        # A read ending with ``done`` tells the log's end, not how long ago it
        # came (the job's retention runs from then): only a live one counts.
        if page.events and page.events[-1].name != DONE:
            self.known_id = max(self.known_id, page.events[-1].id)
