"""The resume merge, as pure functions over lists of events.

A viewer sends history from the log, then live events from the hub; both
sources overlap and the live one may skip ids (after an overflow or a broker
reconnect). ``next_run`` picks out exactly the events to send next, and
``coalesce`` merges consecutive tokens (and reasoning, and fragments of one
tool call) for a viewer that is behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from services.events import KINDS, TOOL_CALL, Event, Merge, token_data, tool_call_data

MAX_EVENT_ID_DIGITS = 19
# How each kind of event that merges does so; the others never merge.
MERGES = {name: kind.merge for name, kind in KINDS.items() if kind.merge is not Merge.NEVER}


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


def coalesce(
    events: list[Event], payload_of: Callable[[Event], dict[str, Any]] = Event.payload
) -> list[Event]:
    """Merge each run of consecutive events that merge (``services.events.KINDS``).

    ``token`` and ``reasoning`` runs merge by kind, ``tool_call`` fragments
    while they keep one ``index``; events of different names never merge.
    A merged event carries the last merged id, the concatenated text (or
    arguments, with the ``id`` and ``name`` of its first fragment, if that
    one has them) and ``first_id``, the id of the first event it merged.
    Single events and events that never merge pass through unchanged.
    ``payload_of`` gives an event's data (a caller that parsed them already
    passes its own).
    """
    merged: list[Event] = []
    run: list[Event] = []
    run_key: object = None

    def flush() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            merged.append(merge_run(run, payload_of))
        run.clear()

    for event in events:
        merge = MERGES.get(event.name)
        if merge is None:
            flush()
            merged.append(event)
            continue
        key = event.name if merge is Merge.RUN else payload_of(event)["index"]
        if run and key != run_key:
            flush()
        run_key = key
        run.append(event)
    flush()
    return merged


def merge_run(run: list[Event], payload_of: Callable[[Event], dict[str, Any]]) -> Event:
    """One event standing for ``run`` (two or more events that merge)."""
    first = run[0]
    if first.name == TOOL_CALL:
        head = payload_of(first)
        arguments = "".join(payload_of(event)["arguments"] for event in run)
        data = tool_call_data(
            head["index"], arguments, head.get("id"), head.get("name"), first_id=first.id
        )
    else:
        text = "".join(payload_of(event)["text"] for event in run)
        data = token_data(text, first_id=first.id)
    return Event(run[-1].id, first.name, data)
