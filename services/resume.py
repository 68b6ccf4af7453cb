"""The resume merge, as pure functions over lists of events.

A viewer sends history from the log, then live events from the hub; both
sources overlap and the live one may skip ids (after an overflow or a broker
reconnect). ``next_run`` picks out exactly the events to send next, and
``coalesce`` merges consecutive tokens for a viewer that is behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from services.events import TOKEN, Event, token_data

MAX_EVENT_ID_DIGITS = 19


class InvalidLastEventId(ValueError):
    """The resume position is not 1 to 19 ASCII digits."""


def parse_last_event_id(header: str | None, query: str | None) -> int:
    """The id a viewer resumes after; ``0`` means from the start.

    The header wins over the query parameter whenever it is non-empty, even
    when it is malformed. An empty value counts as absent.
    """
    raw = header if header else query
    if not raw:
        return 0
    if len(raw) > MAX_EVENT_ID_DIGITS or not (raw.isascii() and raw.isdigit()):
        raise InvalidLastEventId(
            f"Last-Event-ID must be 1 to {MAX_EVENT_ID_DIGITS} ASCII digits, got {raw[:40]!r}"
        )
    return int(raw)


def next_run(events: Iterable[Event], sent: int) -> tuple[list[Event], bool]:
    """Events to send after id ``sent``, and whether a gap was found.

    Ids at or below ``sent`` are duplicates and dropped. The run stops at the
    first id that is not the next one (``True`` is returned then: the caller
    re-reads the log, which is the truth).
    """
    run: list[Event] = []
    expected = sent + 1
    for event in events:
        if event.id < expected:
            continue
        if event.id != expected:
            return run, True
        run.append(event)
        expected += 1
    return run, False


def token_text(event: Event) -> str:
    text: str = json.loads(event.data)["text"]
    return text


def coalesce(events: list[Event], text_of: Callable[[Event], str] = token_text) -> list[Event]:
    """Merge each run of consecutive ``token`` events into one.

    A merged event carries the last merged id, the concatenated text and
    ``first_id``, the id of the first event it merged. Single tokens and
    other events pass through unchanged. ``text_of`` gives a token's text
    (a caller that parsed the texts already passes its own).
    """
    merged: list[Event] = []
    run: list[Event] = []

    def flush() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            text = "".join(text_of(event) for event in run)
            merged.append(Event(run[-1].id, TOKEN, token_data(text, first_id=run[0].id)))
        run.clear()

    for event in events:
        if event.name == TOKEN:
            run.append(event)
        else:
            flush()
            merged.append(event)
    flush()
    return merged
