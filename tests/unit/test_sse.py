import json

import pytest

from services.events import Event, done_data, token_data
from web.openai_format import ChunkEncoder
from web.sse import KEEPALIVE_FRAME, NATIVE_ENCODING, native_frame, retry_frame


@pytest.mark.parametrize(
    "text",
    ["plain", "two\nlines\r\n", 'say "hi"', "tab\tand\\slash", "ünïcødé", "emoji 😀🎉", "\u2028"],
)
def test_token_text_survives_framing(text):
    frame = native_frame(Event(3, "token", token_data(text))).decode()
    assert frame.endswith("\n\n")
    lines = frame[:-2].split("\n")
    assert lines[0] == "id: 3"
    assert lines[1] == "event: token"
    assert len(lines) == 3, "data must stay on one line"
    assert json.loads(lines[2].removeprefix("data: ")) == {"text": text}


def test_frame_is_encoded_once_and_cached():
    event = Event(1, "done", done_data("completed", "stop", 2))
    first = native_frame(event)
    assert native_frame(event) is first


def test_retry_and_keepalive_frames():
    assert retry_frame(1000) == b"retry: 1000\n\n"
    assert KEEPALIVE_FRAME == b": keepalive\n\n"


def test_each_format_says_its_keepalive():
    assert NATIVE_ENCODING.keepalive == b": keepalive\n\n"
    # No blank line: after an id:, the official client would dispatch it as an empty event.
    assert ChunkEncoder("job", "demo", 0).encoding().keepalive == b": keepalive\n"


def test_message_as_the_append_script_publishes_it():
    event = Event.from_message('12 1795562344313 token {"text":"a b c"}')
    assert event == Event(12, "token", token_data("a b c"))
    assert event.appended_ms == 1795562344313


def test_a_batch_is_joined_once_for_every_viewer_at_the_same_position():
    batch = [Event(5, "token", '{"text":"a"}'), Event(6, "token", '{"text":"b"}')]
    first = NATIVE_ENCODING.frames(batch, 4)
    assert first == (
        b'id: 5\nevent: token\ndata: {"text":"a"}\n\nid: 6\nevent: token\ndata: {"text":"b"}\n\n'
    )
    assert NATIVE_ENCODING.frames(list(batch), 4) is first  # shared, not joined again
    # Another position ending at the same event is another batch.
    assert NATIVE_ENCODING.frames(batch[1:], 5) == b'id: 6\nevent: token\ndata: {"text":"b"}\n\n'
