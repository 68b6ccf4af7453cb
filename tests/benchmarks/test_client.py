"""The benchmark client's counting: a measuring instrument must be right first."""

from __future__ import annotations

import time

from tests.benchmarks.client import BUCKET_NS, Client, Stream

HEAD = b"HTTP/1.1 200 \r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class FakeTransport:
    def close(self) -> None:
        pass


def chunk(*events: bytes) -> bytes:
    body = b"".join(events)
    return b"%x\r\n%s\r\n" % (len(body), body)


def token(event_id: int, stamps: list[int], first_id: int | None = None) -> bytes:
    text = "".join(f"@{stamp} " for stamp in stamps)
    merged = f',"first_id":{first_id}' if first_id else ""
    return f'id: {event_id}\nevent: token\ndata: {{"text":"{text}"{merged}}}\n\n'.encode()


def event(event_id: int, name: str, data: str = "{}") -> bytes:
    return f"id: {event_id}\nevent: {name}\ndata: {data}\n\n".encode()


def stream(after: int = 0) -> tuple[Client, Stream]:
    client = Client("127.0.0.1", 1, [(0, "job", after)], None, 0)
    viewer = Stream(client, 0, after, b"")
    viewer.transport = FakeTransport()
    return client, viewer


async def test_single_and_merged_tokens_split_anywhere_are_counted_once():
    client, viewer = stream()
    old = time.time_ns() - 50 * BUCKET_NS
    wire = (
        HEAD
        + chunk(b"retry: 1000\n\n")
        + chunk(event(1, "start", '{"job_id":"x"}'))
        + chunk(token(2, [old]), token(3, [old]))
        + chunk(token(7, [old] * 4, first_id=4))
        + chunk(event(8, "done", '{"status":"completed","tokens":6}'))
        + b"0\r\n\r\n"
    )
    for i in range(0, len(wire), 7):  # TCP may cut anywhere
        viewer.data_received(wire[i : i + 7])
    assert (viewer.unique, viewer.last, viewer.duplicates, viewer.out_of_order) == (8, 8, 0, 0)
    assert viewer.ended and viewer.status == 200
    assert client.tokens == 6
    assert sum(client.histogram) == 6
    assert client.max_latency_ns >= 50 * BUCKET_NS


async def test_gaps_duplicates_and_late_fills_are_told_apart():
    _client, viewer = stream(after=10)
    viewer.data_received(HEAD + chunk(token(11, [1]), token(14, [1])))  # 12, 13 missing
    viewer.data_received(chunk(token(14, [1])))  # duplicate
    viewer.data_received(chunk(token(12, [1])))  # late, out of order
    viewer.data_received(chunk(token(16, [1, 1], first_id=15)))
    assert viewer.unique == 5  # 11, 12, 14, 15, 16: 13 is lost
    assert viewer.duplicates == 1
    assert viewer.out_of_order == 1
    assert viewer.gaps == [[13, 13]]


async def test_a_refused_stream_keeps_its_answer():
    client, viewer = stream()
    viewer.data_received(b'HTTP/1.1 503 \r\ncontent-length: 9\r\n\r\n{"a": 1}\n')
    assert viewer.ended and viewer.status == 503
    assert client.refusals == {503: '{"a": 1}\n'}
