"""External producers over HTTP, on a real web node and Redis (API.md, "Producers")."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

import httpx
import pytest

from tests.producing import create_external, ndjson, publish, streamed_latency, tokens
from tests.support import Cluster, read_stream, wait_until

pytestmark = pytest.mark.timeout(90)

LEASE_S = 3


@pytest.fixture(scope="module")
def web(redis_url):
    with Cluster(redis_url, lease_seconds=str(LEASE_S)) as cluster:
        cluster.web()
        yield cluster.procs[0].url


def state(url: str, job: dict) -> dict:
    return httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=10).json()


def events(url: str, job: dict) -> list[tuple[int, str, dict]]:
    """What a late viewer gets: the whole log (consecutive tokens merged)."""
    return read_stream(url, job["id"]).events


def test_an_external_job_is_created_queued_with_its_token(web):
    job = create_external(web, model="my agent v2", prompt="for the record")
    assert job["producer"] == "external"
    assert job["status"] == "queued"
    assert job["model"] == "my agent v2"
    assert job["publish_url"] == f"/v1/jobs/{job['id']}/publish"
    assert len(job["producer_token"]) >= 32
    got = state(web, job)
    assert (got["status"], got["producer"], got["last_event_id"]) == ("queued", "external", "0")
    assert create_external(web)["model"] == "demo"  # neither prompt nor messages: fine


def test_a_model_label_must_be_printable(web):
    response = httpx.post(
        f"{web}/v1/jobs", json={"producer": "external", "model": "bad\nlabel"}, timeout=10
    )
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_request",
        "message": "model must be a label of 1 to 128 printable characters for an external job",
        "param": "model",
    }


def test_publishes_append_in_order_and_done_completes(web):
    job = create_external(web, model="agent")
    first = publish(web, job, ndjson(*tokens("Hel", "lo")), after=0)
    assert first.status_code == 200
    assert first.json() == {"last_event_id": "3", "status": "running"}  # start, Hel, lo
    assert state(web, job)["status"] == "running"
    second = publish(web, job, ndjson(*tokens(", world"), {"type": "done"}), after=3)
    assert second.json() == {"last_event_id": "5", "status": "completed"}
    got = state(web, job)
    assert (got["text"], got["tokens"], got["finish_reason"]) == ("Hello, world", 3, "stop")
    log = events(web, job)
    assert [name for _, name, _ in log] == ["start", "token", "done"]
    assert log[1] == (4, "token", {"text": "Hello, world", "first_id": 2})
    assert log[0][2]["model"] == "agent"
    assert log[-1][2] == {
        "status": "completed",
        "finish_reason": "stop",
        "tokens": 3,
        "reasoning_tokens": 0,
    }
    after_end = publish(web, job, ndjson(*tokens("more")), after=5)
    assert after_end.status_code == 409
    assert after_end.json()["error"]["code"] == "job_finished"


def test_an_error_line_fails_the_job_with_its_code(web):
    job = create_external(web)
    failure = {"type": "error", "code": "my_agent_failed", "message": "the search tool timed out"}
    response = publish(web, job, ndjson(*tokens("a"), failure), after=0)
    assert response.json() == {"last_event_id": "3", "status": "failed"}
    done = events(web, job)[-1][2]
    assert done["status"] == "failed"
    assert done["error"] == {"code": "my_agent_failed", "message": "the search tool timed out"}


def test_a_retry_appends_nothing_twice(web):
    job = create_external(web)
    body = ndjson(*tokens("one ", "two "))
    assert publish(web, job, body, after=0).json()["last_event_id"] == "3"
    retried = publish(web, job, body, after=0)  # its answer was "lost"
    assert retried.status_code == 200
    assert retried.json() == {"last_event_id": "3", "status": "running"}
    assert publish(web, job, ndjson(*tokens("three")), after=3).json()["last_event_id"] == "4"
    assert state(web, job)["text"] == "one two three"


def test_a_retried_final_request_is_answered_as_it_was(web):
    job = create_external(web)
    body = ndjson(*tokens("x"), {"type": "done"})
    assert publish(web, job, body, after=0).json() == {"last_event_id": "3", "status": "completed"}
    assert publish(web, job, body, after=0).json() == {"last_event_id": "3", "status": "completed"}


def test_tokencast_after_out_of_order(web):
    job = create_external(web)
    publish(web, job, ndjson(*tokens("a", "b")), after=0)  # the log ends at 3
    publish(web, job, ndjson(*tokens("c")), after=3)  # 4; the last request followed 3
    for after in (0, 2, 5, 99):
        response = publish(web, job, ndjson(*tokens("z")), after=after)
        assert response.status_code == 409, after
        assert response.json()["error"] == {
            "code": "out_of_order",
            "message": f"Tokencast-After: {after} is neither the end of the job's log (4) nor"
            " where the last publish request started; publish what follows event 4",
            "last_event_id": "4",
        }
    assert state(web, job)["text"] == "abc"


def test_a_cut_connection_retried_doubles_and_loses_nothing(web):
    """The producer's connection drops mid-body (some lines landed); it sends
    the whole request again with the same Tokencast-After."""
    job = create_external(web)
    texts = [f"w{n} " for n in range(40)]
    body = ndjson(*tokens(*texts), {"type": "done"})
    head = f"POST {job['publish_url']} HTTP/1.1\r\nHost: x\r\nTokencast-After: 0\r\n"
    head += f"Authorization: Bearer {job['producer_token']}\r\nTransfer-Encoding: chunked\r\n\r\n"
    part = ndjson(*tokens(*texts[:15])) + b'{"type": "tok'  # and half a line
    host, port = web.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + f"{len(part):x}\r\n".encode() + part + b"\r\n")
        wait_until(lambda: state(web, job)["tokens"] == 15, 10, what="the first 15 lines")
    retried = publish(web, job, body, after=0)
    assert retried.status_code == 200, retried.text
    assert retried.json() == {"last_event_id": str(len(texts) + 2), "status": "completed"}
    got = state(web, job)
    assert got["text"] == "".join(texts)
    assert read_stream(web, job["id"]).covered_ids == list(range(1, len(texts) + 3))


def test_a_cancel_stops_the_producer(web):
    job = create_external(web)
    publish(web, job, ndjson(*tokens("a")), after=0)
    cancel = httpx.delete(f"{web}/v1/jobs/{job['id']}", timeout=10)
    assert cancel.status_code == 202
    assert events(web, job)[-1][2] == {
        "status": "cancelled",
        "finish_reason": "cancelled",
        "tokens": 1,
        "reasoning_tokens": 0,
    }
    response = publish(web, job, ndjson(*tokens("b")), after=2)
    assert response.status_code == 409
    assert response.json()["error"] == {
        "code": "job_cancelled",
        "message": f"job {job['id']} was cancelled; stop publishing",
        "last_event_id": "3",
    }


def test_a_queued_external_job_cancels_at_once(web):
    job = create_external(web)
    assert httpx.delete(f"{web}/v1/jobs/{job['id']}", timeout=10).status_code == 202
    response = publish(web, job, ndjson(*tokens("b")), after=0)
    assert response.json()["error"]["code"] == "job_cancelled"


@pytest.mark.parametrize("published", [True, False])
def test_silence_past_the_lease_is_producer_lost(web, published):
    job = create_external(web)
    started = time.monotonic()
    if published:
        publish(web, job, ndjson(*tokens("a")), after=0)
    wait_until(lambda: state(web, job)["status"] == "failed", LEASE_S + 5, what="producer_lost")
    assert time.monotonic() - started >= LEASE_S - 0.1
    done = events(web, job)[-1][2]
    assert done["error"] == {
        "code": "producer_lost",
        "message": "the producer stopped publishing to this job (nothing arrived for"
        " TOKENCAST_LEASE_SECONDS)",
    }
    assert done["tokens"] == (1 if published else 0)


def test_empty_publishes_keep_the_job_alive(web):
    job = create_external(web)
    after = 0
    for _ in range(5):  # twice the lease in all
        response = publish(web, job, b"", after=after)
        assert response.status_code == 200
        after = int(response.json()["last_event_id"])
        time.sleep(LEASE_S * 0.4)
    assert state(web, job)["status"] == "running"
    assert after == 1  # the start event alone
    publish(web, job, ndjson({"type": "done"}), after=1)


def test_concurrent_publishes_never_interleave(web):
    """A second request takes the job over; the first is refused at its next line."""

    async def scenario():
        job = create_external(web)
        headers = {"Authorization": f"Bearer {job['producer_token']}"}
        first_may_go_on = asyncio.Event()

        async def slow_body():
            yield ndjson(*tokens("a"))
            await first_may_go_on.wait()
            yield ndjson(*tokens("late"))

        async with httpx.AsyncClient(base_url=web, timeout=30) as client:
            first = asyncio.create_task(
                client.post(
                    job["publish_url"],
                    content=slow_body(),
                    headers={**headers, "Tokencast-After": "0"},
                )
            )
            await asyncio.to_thread(
                wait_until, lambda: state(web, job)["tokens"] == 1, 10, what="the first line"
            )
            second = await client.post(
                job["publish_url"], content=ndjson(*tokens("b")), headers=headers
            )
            first_may_go_on.set()
            return job, await first, second

    job, first, second = asyncio.run(scenario())
    assert second.json() == {"last_event_id": "3", "status": "running"}
    assert first.status_code == 409
    assert first.json()["error"]["code"] == "publish_conflict"
    assert state(web, job)["text"] == "ab"


def test_a_streamed_body_reaches_viewers_line_by_line(web):
    medians = asyncio.run(streamed_latency(web))
    assert statistics.median(medians) < 0.050, medians


def test_every_kind_of_line_lands_as_its_event(web):
    job = create_external(web, model="agent")
    body = ndjson(
        {"type": "reasoning", "text": "The user wants"},
        *tokens("Hel", "lo"),
        {
            "type": "tool_call",
            "index": 0,
            "id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":',
        },
        {"type": "event", "name": "citation", "data": {"url": "https://example.org"}},
    )
    assert publish(web, job, body, after=0).json()["last_event_id"] == "6"
    more = ndjson(
        {"type": "tool_call", "index": 0, "arguments": ' "Paris"}'},
        {"type": "done", "finish_reason": "tool_calls"},
    )
    assert publish(web, job, more, after=6).json() == {"last_event_id": "8", "status": "completed"}
    got = state(web, job)
    assert (got["reasoning"], got["text"]) == ("The user wants", "Hello")
    assert got["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    log = events(web, job)
    assert [name for _, name, _ in log] == [
        "start",
        "reasoning",
        "token",
        "tool_call",
        "citation",
        "tool_call",
        "done",
    ]
    assert log[4] == (6, "citation", {"url": "https://example.org"})
    assert log[-1][2] == {
        "status": "completed",
        "finish_reason": "tool_calls",
        "tokens": 2,
        "reasoning_tokens": 1,
    }


def test_a_tool_call_without_its_id_is_a_bad_line(web):
    job = create_external(web)
    body = ndjson(*tokens("a"), {"type": "tool_call", "index": 0, "arguments": "{}"})
    response = publish(web, job, body, after=0)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_line",
        "message": "line 2: the first tool_call fragment of index 0 must carry id and name",
        "param": "id",
        "line": 2,
        "last_event_id": "2",
    }
    assert state(web, job)["text"] == "a"


def test_a_retry_skips_landed_lines_of_every_kind(web):
    job = create_external(web)
    body = ndjson(
        {"type": "reasoning", "text": "r"},
        {"type": "event", "name": "step", "data": {"n": 1}},
        *tokens("t"),
    )
    assert publish(web, job, body, after=0).json()["last_event_id"] == "4"
    assert publish(web, job, body, after=0).json()["last_event_id"] == "4"
    got = state(web, job)
    assert (got["reasoning"], got["text"], got["last_event_id"]) == ("r", "t", "4")
