"""A job's local viewers and its recent live events, shared by all of them.

A ``Topic`` is created by the hub for each job with viewers on this node; a
``Viewer`` is one open stream's place in it. Each owns its own state: the
topic its buffer, its viewers and whether its subscription is live (the hub's
shard tells it); the viewer whether it must read the log first and when its
keepalive is due (its feed tells it).
"""

from __future__ import annotations

import asyncio

from services.events import Event

# Live events a job keeps for its viewers: a viewer further behind catches
# up from the log (also at most TOKENCAST_VIEWER_BUFFER events).
KEEP_LIVE_MS = 2000


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
        resync asked while the log is being read marks the viewer again."""
        self.lagging = False

    def mark_lagging(self) -> None:
        """Read the log again before anything live: the viewer fell behind
        the buffer, or more of the log is left to read."""
        self.lagging = True

    def retry_catch_up(self) -> None:
        """The log could not be read: try again at the hub's next tick."""
        self.lagging = True
        self.tick_after = 0.0

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
        "channel",
        "events",
        "job_id",
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
        self.ready.set()
        self.resync_viewers()

    def unsubscribed(self) -> None:
        self.ready.clear()

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
