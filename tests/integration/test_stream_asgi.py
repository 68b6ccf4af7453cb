"""The events route served in front of Quart (``web.stream_asgi``) against the
Quart route it stands in for, on a real node: the same answers, byte for byte."""

from __future__ import annotations

import httpx
import pytest

from tests.support import Cluster, create_job, wait_finished

pytestmark = pytest.mark.timeout(60)

PAGE = "http://page.example"


@pytest.fixture(scope="module")
def cors_node(redis_url: str):
    # With CORS on, a request with an Origin goes to the Quart route (for its
    # CORS headers), one without is streamed in front of it.
    with Cluster(redis_url, cors_origins=PAGE) as cluster:
        cluster.web()
        cluster.worker()
        yield cluster


def fetch(url: str, origin: str | None = None, **headers: str) -> httpx.Response:
    if origin:
        headers["Origin"] = origin
    return httpx.get(url, headers=headers, timeout=20)


@pytest.mark.parametrize(
    ("query", "last_event_id"),
    [
        ("", None),
        ("?format=openai&include_usage=true", None),
        ("", "7"),
        ("?last_event_id=3", None),
    ],
)
def test_both_routes_send_the_same_stream(cors_node, query, last_event_id):
    url = cors_node.procs[0].url
    job_id = create_job(url, prompt="same bytes", max_tokens=12, demo={"tokens_per_second": 0})
    wait_finished(url, job_id)
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events_url = f"{url}/v1/jobs/{job_id}/events{query}"
    front = fetch(events_url, **headers)
    quart = fetch(events_url, PAGE, **headers)
    assert quart.headers["access-control-allow-origin"] == PAGE  # the Quart route answered
    assert "access-control-allow-origin" not in front.headers
    assert front.status_code == quart.status_code == 200
    assert front.content == quart.content
    assert b"data: " in front.content
    for name in ("content-type", "cache-control", "x-accel-buffering"):
        assert front.headers[name] == quart.headers[name]
    assert front.headers["x-request-id"] and quart.headers["x-request-id"]
    assert "content-length" not in front.headers


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA/events", {}, 404, "job_not_found"),
        ("/v1/jobs/{job}/events", {"Last-Event-ID": "x"}, 400, "invalid_last_event_id"),
        ("/v1/jobs/{job}/events", {"Last-Event-ID": "999"}, 400, "invalid_last_event_id"),
        ("/v1/jobs/{job}/events?format=xml", {}, 400, "invalid_request"),
        ("/v1/jobs/{job}/events?format=openai&include_usage=maybe", {}, 400, "invalid_request"),
    ],
)
def test_refusals_are_the_quart_routes(cors_node, path, headers, status, code):
    url = cors_node.procs[0].url
    job_id = create_job(url, prompt="refused", max_tokens=3, demo={"tokens_per_second": 0})
    wait_finished(url, job_id)
    front = fetch(url + path.format(job=job_id), **headers)
    quart = fetch(url + path.format(job=job_id), PAGE, **headers)
    assert front.status_code == quart.status_code == status
    assert front.json() == quart.json()
    assert front.json()["error"]["code"] == code


def test_the_end_of_a_finished_job_is_204_on_both(cors_node):
    url = cors_node.procs[0].url
    job_id = create_job(url, prompt="end", max_tokens=3, demo={"tokens_per_second": 0})
    state = wait_finished(url, job_id)
    last = {"Last-Event-ID": str(state["last_event_id"])}
    front = fetch(f"{url}/v1/jobs/{job_id}/events", **last)
    quart = fetch(f"{url}/v1/jobs/{job_id}/events", PAGE, **last)
    assert front.status_code == quart.status_code == 204
    assert front.content == quart.content == b""
    assert front.headers["x-request-id"]
