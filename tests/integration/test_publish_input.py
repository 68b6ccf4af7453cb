"""What a publish request may carry: its credentials and its lines, each bad
case with its exact answer, on a node with API keys and viewer tokens on."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.producing import ndjson, publish, tokens
from tests.support import Cluster

pytestmark = pytest.mark.timeout(60)

KEY = "publish-test-key"


@pytest.fixture(scope="module")
def web(redis_url):
    with Cluster(redis_url, api_keys=KEY, secret="publish-test-secret") as cluster:
        cluster.web()
        yield cluster.procs[0].url


def create(url: str) -> dict:
    response = httpx.post(
        f"{url}/v1/jobs",
        json={"producer": "external", "model": "agent"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()


def text_of(url: str, job: dict) -> str:
    response = httpx.get(
        f"{url}/v1/jobs/{job['id']}", params={"token": job["viewer_token"]}, timeout=10
    )
    return str(response.json()["text"])


def test_creating_an_external_job_needs_an_api_key(web):
    response = httpx.post(f"{web}/v1/jobs", json={"producer": "external"}, timeout=10)
    assert response.status_code == 401


def test_publishing_needs_the_producer_token(web):
    job = create(web)
    response = httpx.post(f"{web}{job['publish_url']}", content=ndjson(*tokens("a")), timeout=10)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json() == {
        "error": {
            "code": "producer_token_required",
            "message": "publishing needs the job's producer token:"
            " Authorization: Bearer <producer_token>",
        }
    }


@pytest.mark.parametrize(
    ("credential", "message"),
    [
        ("wrong", "the producer token is not valid for this job"),
        ("other job", "the producer token is not valid for this job"),
        ("viewer", "a viewer token does not allow publishing; use the job's producer_token"),
        ("api key", "an API key does not allow publishing; use the job's producer_token"),
    ],
)
def test_no_other_credential_allows_publishing(web, credential, message):
    job = create(web)
    token = {
        "wrong": "x" * 43,
        "other job": create(web)["producer_token"],
        "viewer": job["viewer_token"],
        "api key": KEY,
    }[credential]
    response = publish(web, job, ndjson(*tokens("a")), after=0, token=token)
    assert response.status_code == 403
    assert response.json() == {"error": {"code": "forbidden", "message": message}}
    assert text_of(web, job) == ""


def test_a_producer_token_allows_nothing_else(web):
    job = create(web)
    bearer = {"Authorization": f"Bearer {job['producer_token']}"}
    watched = httpx.get(f"{web}/v1/jobs/{job['id']}", headers=bearer, timeout=10)
    assert watched.status_code == 403
    cancelled = httpx.delete(f"{web}/v1/jobs/{job['id']}", headers=bearer, timeout=10)
    assert cancelled.status_code == 401
    created = httpx.post(f"{web}/v1/jobs", json={"prompt": "x"}, headers=bearer, timeout=10)
    assert created.status_code == 401


LONG = "é" * 40_000  # 80,000 bytes of UTF-8
BAD_LINES = [
    ("not json", '{"type": "token", "text": "a"', None, "line 3 is not valid JSON"),
    (
        "unknown type",
        {"type": "image", "url": "x"},
        "type",
        "line 3: type must be one of: token, reasoning, tool_call, event, done, error; got 'image'",
    ),
    (
        "reserved name",
        {"type": "event", "name": "done", "data": {}},
        "name",
        "line 3: name must be 1 to 64 characters of a-z, 0-9, _, . and -, starting with a"
        " letter, and not one of: done, error, keepalive, message, reasoning, start, token,"
        " tool_call; got 'done'",
    ),
    (
        "malformed name",
        {"type": "event", "name": "Bad Name", "data": {}},
        "name",
        "line 3: name must be 1 to 64 characters of a-z, 0-9, _, . and -, starting with a"
        " letter, and not one of: done, error, keepalive, message, reasoning, start, token,"
        " tool_call; got 'Bad Name'",
    ),
    (
        "oversize text",
        {"type": "token", "text": LONG},
        "text",
        "line 3: text must be at most 65536 bytes, got 80000",
    ),
    ("missing text", {"type": "token"}, "text", "line 3: text is required in a token item"),
]


@pytest.mark.parametrize(
    ("bad", "param", "message"),
    [case[1:] for case in BAD_LINES],
    ids=[case[0] for case in BAD_LINES],
)
def test_a_bad_line_is_refused_and_the_lines_before_it_kept(web, bad, param, message):
    job = create(web)
    body = ndjson(*tokens("kept ", "too"), bad, *tokens("never"))
    response = publish(web, job, body, after=0)
    assert response.status_code == 400
    error = {"code": "invalid_line", "message": message, "line": 3, "last_event_id": "3"}
    if param is not None:
        error["param"] = param
    assert response.json() == {"error": error}
    assert text_of(web, job) == "kept too"
    # The producer carries on after the lines that landed.
    assert publish(web, job, ndjson(*tokens("!")), after=3).json()["last_event_id"] == "4"


def test_a_line_over_one_mib_is_refused(web):
    job = create(web)
    huge = json.dumps({"type": "token", "text": "a" * (1024 * 1024)})
    response = publish(web, job, ndjson(*tokens("kept"), "", huge), after=0)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "invalid_line",
        "message": "line 3 is longer than 1048576 bytes (1 MiB)",
        "line": 3,
        "last_event_id": "2",
    }
    assert text_of(web, job) == "kept"


def test_a_body_over_one_mib_is_fine_when_its_lines_are_not(web):
    job = create(web)
    lines = tokens(*(f"{n:05d}" + "x" * 20_000 for n in range(80)))  # 1.6 MB in all
    response = publish(web, job, ndjson(*lines, {"type": "done"}), after=0)
    assert response.status_code == 200, response.text
    assert response.json() == {"last_event_id": "82", "status": "completed"}
    assert len(text_of(web, job)) == 80 * 20_005


def test_a_malformed_tokencast_after_is_refused(web):
    job = create(web)
    response = httpx.post(
        f"{web}{job['publish_url']}",
        content=ndjson(*tokens("a")),
        headers={"Authorization": f"Bearer {job['producer_token']}", "Tokencast-After": "-1"},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "Tokencast-After"
