import pytest

from services.events import Event, token_data
from services.resume import InvalidLastEventId, coalesce, next_run, parse_last_event_id


def tok(i: int, text: str | None = None) -> Event:
    return Event(i, "token", token_data(text if text is not None else f"t{i}"))


@pytest.mark.parametrize(
    ("header", "query", "expected"),
    [
        (None, None, 0),
        ("", None, 0),
        (None, "", 0),
        ("", "", 0),
        ("0", None, 0),
        ("7", None, 7),
        (None, "7", 7),
        ("", "7", 7),  # an empty header counts as absent
        ("5", "9", 5),  # the header wins
        ("9" * 19, None, int("9" * 19)),
    ],
)
def test_parse_last_event_id(header, query, expected):
    assert parse_last_event_id(header, query) == expected


@pytest.mark.parametrize(
    "bad", ["abc", "-1", "+1", "1.5", " 1", "1 ", "1\r\nX: y", "٣", "１", "9" * 20, "0x10"]
)
def test_malformed_last_event_id_is_rejected(bad):
    with pytest.raises(InvalidLastEventId, match="1 to 19 ASCII digits"):
        parse_last_event_id(bad, None)


def test_malformed_header_wins_over_good_query():
    with pytest.raises(InvalidLastEventId):
        parse_last_event_id("x", "3")


def test_next_run_drops_duplicates_and_stops_at_gap():
    events = [tok(3), tok(4), tok(5), tok(7), tok(8)]
    run, gap = next_run(events, sent=3)
    assert [e.id for e in run] == [4, 5]
    assert gap is True


def test_next_run_history_then_live_overlap_is_exactly_once():
    history = [tok(i) for i in range(1, 6)]
    live = [tok(i) for i in range(4, 9)]  # published while history was read
    sent_history, _ = next_run(history, 0)
    sent_live, gap = next_run(live, sent_history[-1].id)
    assert [e.id for e in sent_history + sent_live] == list(range(1, 9))
    assert gap is False


def test_next_run_empty_and_all_old():
    assert next_run([], 5) == ([], False)
    assert next_run([tok(1), tok(2)], 5) == ([], False)


def test_coalesce_merges_runs_of_tokens_only():
    events = [
        Event(1, "start", "{}"),
        tok(2, "a"),
        tok(3, "b"),
        tok(4, "c"),
        Event(5, "done", "{}"),
    ]
    merged = coalesce(events)
    assert [(e.id, e.name) for e in merged] == [(1, "start"), (4, "token"), (5, "done")]
    assert merged[1].payload() == {"text": "abc", "first_id": 2}


def test_coalesce_single_token_is_unchanged():
    single = tok(2, "only")
    assert coalesce([single]) == [single]
    assert "first_id" not in coalesce([single])[0].payload()


def test_coalesce_keeps_unicode_and_newlines():
    merged = coalesce([tok(2, "é\n"), tok(3, '"😀"'), tok(4, "\\")])
    assert merged[0].payload()["text"] == 'é\n"😀"\\'
