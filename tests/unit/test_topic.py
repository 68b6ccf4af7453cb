"""A job's live buffer and its viewers' marks, as plain objects."""

from services.events import Event
from services.topic import Topic


def token(event_id: int, appended_ms: int) -> Event:
    return Event(event_id, "token", '{"text":"x"}', appended_ms)


def test_job_buffer_keeps_recent_live_events_and_gives_each_viewer_the_newer_ones():
    topic = Topic("buffer-job", "channel", "main", limit=10)
    for event_id, appended_ms in [(1, 0), (2, 1000), (3, 2500), (4, 2600), (5, 2700), (6, 3100)]:
        topic.add_event(token(event_id, appended_ms))
    # Older than KEEP_LIVE_MS (2 s) behind the newest: dropped.
    assert [event.id for event in topic.since(0)] == [3, 4, 5, 6]
    assert [event.id for event in topic.since(4)] == [5, 6]
    assert topic.since(6) == []
    # Behind the buffer: what it has starts past id 2, so the viewer re-reads the log.
    assert [event.id for event in topic.since(1)] == [3, 4, 5, 6]
    topic.add_event(Event(5, "token", '{"text":"again"}', 3200))  # a repeat: ignored
    assert [event.id for event in topic.since(0)] == [3, 4, 5, 6]
    assert topic.since(4)[0].data == '{"text":"x"}'
    topic.add_event(token(9, 3300))  # ids skipped: start over
    assert [event.id for event in topic.since(0)] == [9]
    assert [event.id for event in topic.since(6)] == [9]  # starts past 7: a gap


def test_job_buffer_holds_at_most_its_limit():
    topic = Topic("buffer-job", "channel", "main", limit=3)
    for event_id in range(1, 8):
        topic.add_event(token(event_id, 1000))
    assert [event.id for event in topic.since(0)] == [5, 6, 7]


def test_viewers_are_woken_once_per_window_whatever_the_events():
    topic = Topic("wake-job", "channel", "main", limit=10)
    viewer = topic.add_viewer()
    assert topic.add_event(token(1, 1000)) is True  # schedule a wake-up
    assert topic.add_event(token(2, 1001)) is False  # one is due already
    assert topic.add_event(token(2, 1001)) is False  # a repeat
    topic.wake_viewers()
    assert [event.id for event in viewer.take(0)] == [1, 2]
    assert topic.add_event(token(3, 1002)) is True  # a new window


def test_a_resync_during_the_log_read_is_kept_for_the_next_step():
    topic = Topic("resync-job", "channel", "main", limit=10)
    viewer = topic.add_viewer()
    assert viewer.lagging  # a new viewer reads the log first
    viewer.start_catch_up()
    topic.subscribed()  # the hub resubscribed while that read was under way
    assert viewer.lagging  # so it reads the log again
    viewer.start_catch_up()
    assert not viewer.lagging  # then goes live
    viewer.mark_lagging()
    assert viewer.lagging


def test_the_last_viewer_to_leave_empties_the_topic():
    topic = Topic("leave-job", "channel", "main", limit=10)
    first, second = topic.add_viewer(), topic.add_viewer()
    assert topic.remove_viewer(first) is False
    assert topic.remove_viewer(second) is True
