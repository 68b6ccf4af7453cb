"""Structured logs of real ``tokencast serve`` and ``worker`` processes
(TOKENCAST_LOG_FORMAT=json): an access line per request with its job id and
request id, and no prompt, key or token anywhere unless asked for."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support import Cluster, Process, wait_until

pytestmark = pytest.mark.timeout(90)

PROMPT = "the quiet lighthouse keeper counts seventeen gulls"
KEY = "k-logs-test-4821"
SECRET = "s3cret-for-the-log-tests"


def log_lines(proc: Process) -> list[dict]:
    """Every line the process wrote, each of which must be a JSON object."""
    return [json.loads(line) for line in proc.log().splitlines() if line.strip()]


def access_line(proc: Process, request_id: str) -> dict:
    def find() -> dict | None:
        return next(
            (
                line
                for line in log_lines(proc)
                if line["logger"] == "tokencast.access" and line["request_id"] == request_id
            ),
            None,
        )

    found: dict = wait_until(find, 10, what=f"the access line of request {request_id}")
    return found


def create_job(
    url: str, request_id: str | None = None, headers: dict | None = None
) -> httpx.Response:
    headers = {**(headers or {}), **({"X-Request-ID": request_id} if request_id else {})}
    body = {"prompt": PROMPT, "max_tokens": 5, "demo": {"tokens_per_second": 0}}
    response = httpx.post(f"{url}/v1/jobs", json=body, headers=headers, timeout=10)
    assert response.status_code == 201, response.text
    return response


@pytest.fixture
def cluster(redis_url):
    with Cluster(redis_url, log_format="json") as cluster:
        yield cluster


def test_access_lines_carry_the_job_and_request_ids_and_nothing_secret(cluster):
    web = cluster.web(api_keys=KEY, secret=SECRET)
    worker = cluster.worker(api_keys=KEY, secret=SECRET)
    created = create_job(web.url, "create-1", {"Authorization": f"Bearer {KEY}"})
    assert created.headers["X-Request-ID"] == "create-1"
    job_id, token = created.json()["id"], created.json()["viewer_token"]

    with (
        httpx.Client(base_url=web.url, timeout=30) as client,
        client.stream(
            "GET",
            f"/v1/jobs/{job_id}/events",
            params={"token": token},
            headers={"X-Request-ID": "stream-1"},
        ) as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["X-Request-ID"] == "stream-1"
        body = stream.read().decode()
    assert "event: done" in body
    state = httpx.get(f"{web.url}/v1/jobs/{job_id}", params={"token": token}, timeout=10)
    assert state.status_code == 200
    generated = state.headers["X-Request-ID"]  # none was sent: the node made one
    assert len(generated) == 32

    requests = [
        ("create-1", "POST", "/v1/jobs", 201),
        ("stream-1", "GET", f"/v1/jobs/{job_id}/events", 200),
        (generated, "GET", f"/v1/jobs/{job_id}", 200),
    ]
    for request_id, method, path, status in requests:
        line = access_line(web, request_id)
        assert (line["method"], line["path"], line["status"]) == (method, path, status)
        assert line["job_id"] == job_id
        assert line["node_id"] and line["level"] == "INFO"
        assert line["duration_ms"] >= 0
    stream_line = access_line(web, "stream-1")
    assert stream_line["events"] == body.count("\nid: ") + body.startswith("id: ")
    assert stream_line["bytes"] == len(body.encode())

    created_line = next(
        line for line in log_lines(web) if line["message"].startswith("job created")
    )
    assert (created_line["job_id"], created_line["request_id"]) == (job_id, "create-1")
    assert "prompt" not in created_line

    for proc in (web, worker):
        text = proc.log()
        assert log_lines(proc), "the process logged nothing"
        for secret in (PROMPT, KEY, SECRET, token, "token="):
            assert secret not in text, f"{secret!r} in the log of {proc.args}"


def test_prompts_are_logged_at_creation_when_asked(cluster):
    web = cluster.web(log_prompts="1")
    job_id = create_job(web.url, "create-2").json()["id"]
    access_line(web, "create-2")
    created = [line for line in log_lines(web) if line.get("prompt") == PROMPT]
    assert [(line["job_id"], line["request_id"]) for line in created] == [(job_id, "create-2")]
