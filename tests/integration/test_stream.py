"""The event stream end to end: real web node and worker processes on a real Redis."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from httpx_sse import connect_sse

from tests.support import (
    aread_stream,
    create_job,
    dispatched,
    job_state,
    read_stream,
    wait_finished,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

FAST = {"tokens_per_second": 0}


def test_stream_headers_retry_line_and_complete_event_sequence(node):
    url = node.procs[0].url
    job_id = create_job(url, prompt="hello", max_tokens=20, demo={"tokens_per_second": 200})
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        raw = response.read().decode()
    assert raw.startswith("retry: 1000\n\n")
    got = read_stream(url, job_id)
    state = job_state(url, job_id)
    names = [name for _id, name, _data in got.events]
    assert names[0] == "start" and names[-1] == "done"
    assert set(names[1:-1]) == {"token"}
    assert got.covered_ids == list(range(1, state["tokens"] + 3))
    assert got.text == state["text"]
    assert got.text.startswith("You asked: hello\n\n")
    assert got.done == {
        "status": "completed",
        "finish_reason": got.done["finish_reason"],
        "tokens": state["tokens"],
        "reasoning_tokens": 0,
    }
    assert state["status"] == "completed"
    assert state["last_event_id"] == str(state["tokens"] + 2)
    start = got.events[0][2]
    assert start == {"job_id": job_id, "model": "demo", "created_at": state["created_at"]}


def test_live_viewer_gets_each_event_as_it_happens(node):
    url = node.procs[0].url
    # 30 to 40 tokens over about 2 s: a viewer that connects late on a busy
    # machine still sees most of them live.
    job_id = create_job(url, max_tokens=40, seed=3, demo={"tokens_per_second": 20})
    got = read_stream(url, job_id)
    assert got.covered_ids == list(range(1, got.ids[-1] + 1))
    # Whatever was published before the viewer connected may come merged in
    # its first frame; from then on it is live: one event per token.
    live = got.events[2:]
    assert len(live) >= 20
    assert all("first_id" not in data for _id, _name, data in live)


def test_resume_from_every_position_of_a_finished_job_and_204_after_the_end(node):
    url = node.procs[0].url
    job_id = create_job(url, max_tokens=30, demo=FAST)
    state = wait_finished(url, job_id)
    last = int(state["last_event_id"])
    full = read_stream(url, job_id)
    for after in range(last):
        got = read_stream(url, job_id, last_event_id=after)
        assert got.covered_ids == list(range(after + 1, last + 1)), after
        assert got.events[-1] == full.events[-1]
    assert read_stream(url, job_id, last_event_id=last).status == 204
    too_far = httpx.get(f"{url}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(last + 1)})
    assert too_far.status_code == 400
    assert too_far.json()["error"]["message"] == (
        f"Last-Event-ID {last + 1} is past the job's last event ({last})"
    )


def test_query_parameter_resume_and_header_wins(node):
    url = node.procs[0].url
    job_id = create_job(url, max_tokens=8, demo=FAST)
    last = int(wait_finished(url, job_id)["last_event_id"])
    response = httpx.get(f"{url}/v1/jobs/{job_id}/events", params={"last_event_id": last})
    assert response.status_code == 204
    response = httpx.get(
        f"{url}/v1/jobs/{job_id}/events",
        params={"last_event_id": last},
        headers={"Last-Event-ID": str(last - 1)},
    )
    assert response.status_code == 200
    assert response.text.endswith("event: done\ndata: " + response.text.split("data: ")[-1])
    assert f"id: {last}\n" in response.text and f"id: {last - 1}\n" not in response.text


def test_resume_from_the_middle_of_a_running_job(node):
    url = node.procs[0].url
    job_id = create_job(url, max_tokens=40, seed=1, demo={"tokens_per_second": 40})
    first_part: list[int] = []
    last_id = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
            for sse in filter(dispatched, source.iter_sse()):
                last_id = int(sse.id)
                first = sse.json().get("first_id") or last_id
                first_part.extend(range(first, last_id + 1))
                if len(first_part) >= 6:
                    break  # the connection drops mid-job
    assert job_state(url, job_id)["status"] == "running"
    rest = read_stream(url, job_id, last_event_id=last_id)
    state = job_state(url, job_id)
    assert first_part + rest.covered_ids == list(range(1, int(state["last_event_id"]) + 1))


async def test_hundred_concurrent_viewers_receive_the_identical_stream(node):
    url = node.procs[0].url
    job_id = create_job(url, max_tokens=200, demo={"tokens_per_second": 200})
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        viewers = [aread_stream(client, job_id) for _ in range(100)]
        results = await asyncio.wait_for(asyncio.gather(*viewers), 60)
    state = job_state(url, job_id)
    expected = list(range(1, int(state["last_event_id"]) + 1))
    for got in results:
        assert got.covered_ids == expected
        assert got.text == state["text"]
        assert got.done["status"] == "completed"


async def test_late_joiner_gets_history_then_live(node):
    url = node.procs[0].url
    job_id = create_job(url, max_tokens=80, demo={"tokens_per_second": 40})
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        early = asyncio.create_task(aread_stream(client, job_id))
        await asyncio.sleep(1.0)
        late = await aread_stream(client, job_id)
        early_got = await early
    state = job_state(url, job_id)
    assert late.text == early_got.text == state["text"]
    assert late.covered_ids == early_got.covered_ids
    # The history arrived merged (few frames), the rest live (single tokens).
    assert "first_id" in late.events[1][2]
    assert len(late.events) < len(early_got.events)


def test_viewer_count_in_job_state(node):
    url = node.procs[0].url
    job_id = create_job(url, max_tokens=200, demo={"tokens_per_second": 20})
    streams = []
    try:
        for _ in range(3):
            response = httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=30)
            streams.append(response)
            response.__enter__()
        wait_until(lambda: job_state(url, job_id)["viewers"] == 3, 5, what="3 viewers")
        streams.pop().__exit__(None, None, None)
        wait_until(lambda: job_state(url, job_id)["viewers"] == 2, 5, what="2 viewers")
    finally:
        for response in streams:
            response.__exit__(None, None, None)
        httpx.delete(f"{url}/v1/jobs/{job_id}")


def test_cancel_ends_the_stream_within_250_ms(node):
    url = node.procs[0].url
    job_id = create_job(url, max_tokens=500, demo={"tokens_per_second": 10})
    with httpx.Client(base_url=url, timeout=30) as client:
        with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
            events = filter(dispatched, source.iter_sse())
            for sse in events:
                if sse.event == "token":
                    break
            started = time.monotonic()
            response = httpx.delete(f"{url}/v1/jobs/{job_id}")
            assert response.status_code == 202
            assert response.json()["id"] == job_id
            done = next(sse for sse in events if sse.event == "done")
            elapsed = time.monotonic() - started
    assert elapsed < 0.25, f"cancel took {elapsed * 1000:.0f} ms"
    state = job_state(url, job_id)
    assert state["status"] == "cancelled"
    assert state["finish_reason"] == "cancelled"
    assert done.json() == {
        "status": "cancelled",
        "finish_reason": "cancelled",
        "tokens": state["tokens"],
        "reasoning_tokens": 0,
    }
    again = httpx.delete(f"{url}/v1/jobs/{job_id}")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_finished"


def test_fail_after_ends_with_backend_error(node):
    url = node.procs[0].url
    job_id = create_job(url, max_tokens=50, demo={"tokens_per_second": 0, "fail_after": 4})
    got = read_stream(url, job_id)
    state = job_state(url, job_id)
    assert [name for _id, name, _data in got.events].count("done") == 1
    expected_error = {
        "code": "backend_error",
        "message": "the demo model failed after 4 tokens, as demo.fail_after asked",
    }
    assert got.done == {
        "status": "failed",
        "finish_reason": None,
        "tokens": 4,
        "reasoning_tokens": 0,
        "error": expected_error,
    }
    assert state["status"] == "failed"
    assert state["error"] == expected_error
    assert state["tokens"] == 4


def test_keepalive_comment_while_nothing_happens(redis_url):
    from tests.support import Cluster

    cluster = Cluster(redis_url, keepalive_seconds="0.3")
    try:
        web = cluster.web()  # no worker: the job stays queued and silent
        job_id = create_job(web.url)
        lines = []
        with httpx.stream("GET", f"{web.url}/v1/jobs/{job_id}/events", timeout=10) as response:
            for line in response.iter_lines():
                lines.append(line)
                if line == ": keepalive":
                    break
        assert lines[:2] == ["retry: 1000", ""]
        assert lines[-1] == ": keepalive"
        # Cancelling a queued job ends it at once, without any worker.
        assert httpx.delete(f"{web.url}/v1/jobs/{job_id}").status_code == 202
        got = read_stream(web.url, job_id)
        assert got.events == [
            (
                1,
                "done",
                {
                    "status": "cancelled",
                    "finish_reason": "cancelled",
                    "tokens": 0,
                    "reasoning_tokens": 0,
                },
            )
        ]
    finally:
        cluster.close()


BAD_REQUESTS = [
    ("POST", "/v1/jobs", {"content": "{bad"}, 400),
    ("POST", "/v1/jobs", {"json": {"prompt": 3}}, 400),
    ("POST", "/v1/jobs", {"json": {}}, 400),
    ("POST", "/v1/jobs", {"json": {"prompt": ""}}, 400),
    ("POST", "/v1/jobs", {"json": {"prompt": "a" * 100_001}}, 400),
    ("POST", "/v1/jobs", {"json": {"prompt": "x", "max_tokens": 0}}, 400),
    ("POST", "/v1/jobs", {"json": {"prompt": "x", "max_tokens": -1}}, 400),
    ("POST", "/v1/jobs", {"json": {"prompt": "x", "max_tokens": 10**9}}, 400),
    ("POST", "/v1/jobs", {"json": {"prompt": "x", "max_tokens": "ten"}}, 400),
    ("POST", "/v1/jobs", {"json": {"prompt": "x", "model": "nope"}}, 404),
    ("GET", "/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA", {}, 404),
    ("GET", "/v1/jobs/" + "x" * 10_000, {}, 404),
    ("GET", "/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA/events", {}, 404),
]


def oversize_body_status(url: str) -> tuple[int, str]:
    """Announce a 2 MB body and send only its start, as a client would before
    the server's early 413 arrives: the node answers without reading it all."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2000000\r\n\r\n" + b'{"prompt": "' + b"a" * 1000
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body)["error"]["code"]


def test_bad_input_gets_clear_errors_and_the_node_stays_healthy(node):
    url = node.procs[0].url
    with httpx.Client(base_url=url, timeout=10, headers={"content-type": "application/json"}) as c:
        for method, path, kwargs, status in BAD_REQUESTS:
            response = c.request(method, path, **kwargs)
            assert response.status_code == status, (path, kwargs.keys(), response.text[:200])
            assert response.json()["error"]["message"]
        job_id = create_job(url, max_tokens=5, demo=FAST)
        wait_finished(url, job_id)
        for value in ["abc", "-1", "999999", "1\\r\\nX: y", "+1", "1.5"]:
            response = c.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": value})
            assert response.status_code == 400, value
            assert response.json()["error"]["code"] == "invalid_last_event_id"
        response = c.get(f"/v1/jobs/{job_id}/events", params={"last_event_id": "1\r\nX: y"})
        assert response.status_code == 400
        assert oversize_body_status(url) == (413, "body_too_large")
        assert c.get("/readyz").status_code == 200
    # And it still does its job.
    job_id = create_job(url, max_tokens=5, demo=FAST)
    assert read_stream(url, job_id).done["status"] == "completed"


def test_clients_that_leave_at_once_are_forgotten(node):
    """A client that disconnects right after the headers (a reconnect storm
    does this) must not stay counted or subscribed on the node."""
    url = node.procs[0].url
    job_id = create_job(url, max_tokens=5, demo={"tokens_per_second": 0.01})  # stays quiet
    host, port = url.removeprefix("http://").split(":")
    for _ in range(30):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(12) == b"HTTP/1.1 200"
    wait_until(
        lambda: "tokencast_open_streams 0.0" in httpx.get(f"{url}/metrics").text,
        5,
        what="every stream to be closed on the node",
    )
    wait_until(lambda: job_state(url, job_id)["viewers"] == 0, 5, what="0 viewers")
    httpx.delete(f"{url}/v1/jobs/{job_id}")
