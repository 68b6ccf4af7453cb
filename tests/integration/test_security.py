"""API keys, viewer tokens and metrics, on real processes (API.md, "Security", "Operations")."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from itsdangerous import URLSafeTimedSerializer
from prometheus_client.parser import text_string_to_metric_families

from services.viewer_tokens import SALT
from tests.support import Cluster, read_stream, wait_finished, wait_until

pytestmark = pytest.mark.timeout(90)

KEY = "k-test-123"
SECRET = "s3cret-for-tests"


@pytest.fixture(scope="module")
def secured(redis_url):
    with Cluster(redis_url, api_keys=f"other-key,{KEY}", secret=SECRET) as cluster:
        cluster.web()
        cluster.worker()
        yield cluster.procs[0].url


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create(url: str, headers: dict[str, str] | None = None, **body) -> httpx.Response:
    body.setdefault("prompt", "secret prompt text")
    body.setdefault("max_tokens", 5)
    body.setdefault("demo", {"tokens_per_second": 0})
    return httpx.post(f"{url}/v1/jobs", json=body, headers=headers or {}, timeout=10)


def test_creating_needs_an_api_key(secured):
    missing = create(secured)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json() == {
        "error": {
            "code": "unauthorized",
            "message": "this endpoint needs an API key: Authorization: Bearer <key>",
        }
    }
    wrong = create(secured, auth("nope"))
    assert wrong.status_code == 401
    assert wrong.json()["error"]["message"] == "the API key is not valid"
    assert create(secured, auth(KEY)).status_code == 201
    assert create(secured, auth("other-key")).status_code == 201


def test_open_endpoints_stay_open(secured):
    for path in ("/v1/models", "/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{secured}{path}").status_code == 200, path


def test_created_job_carries_its_viewer_token(secured):
    body = create(secured, auth(KEY)).json()
    token = body["viewer_token"]
    assert token
    assert body["events_url"] == f"/v1/jobs/{body['id']}/events?token={token}"
    assert body["watch_url"] == f"/watch/{body['id']}?token={token}"


def test_watching_needs_the_jobs_viewer_token(secured):
    job_a = create(secured, auth(KEY)).json()
    job_b = create(secured, auth(KEY)).json()
    a_id, a_token = job_a["id"], job_a["viewer_token"]
    for path in (f"/v1/jobs/{a_id}", f"/v1/jobs/{a_id}/events", f"/watch/{a_id}"):
        missing = httpx.get(f"{secured}{path}")
        assert missing.status_code == 401, path
        assert missing.json()["error"]["code"] == "viewer_token_required"
        assert httpx.get(f"{secured}{path}", params={"token": a_token}).status_code == 200, path
        assert httpx.get(f"{secured}{path}", headers=auth(a_token)).status_code == 200, path
        # B's token does not open A.
        other = httpx.get(f"{secured}{path}", params={"token": job_b["viewer_token"]})
        assert other.status_code == 403, path
        assert other.json()["error"]["message"] == "the viewer token is for another job"
        forged = httpx.get(f"{secured}{path}", params={"token": a_token[:-4] + "AAAA"})
        assert forged.status_code == 403
        assert forged.json()["error"]["message"] == "the viewer token is not valid"
        # Whoever holds an API key may watch too.
        assert httpx.get(f"{secured}{path}", headers=auth(KEY)).status_code == 200, path


def test_an_expired_viewer_token_is_refused(secured):
    job = create(secured, auth(KEY)).json()

    class Yesterday(URLSafeTimedSerializer):
        def __init__(self):
            super().__init__(SECRET, salt=SALT)
            signer = self.signer

            class OldSigner(signer):  # type: ignore[misc, valid-type]
                def get_timestamp(self) -> int:
                    return int(time.time()) - 2 * 86400

            self.signer = OldSigner

    expired = Yesterday().dumps(job["id"])
    response = httpx.get(f"{secured}/v1/jobs/{job['id']}/events", params={"token": expired})
    assert response.status_code == 403
    assert response.json()["error"]["message"] == "the viewer token has expired"


def test_cancelling_needs_an_api_key_not_a_viewer_token(secured):
    job = create(secured, auth(KEY), max_tokens=300, demo={"tokens_per_second": 5}).json()
    url = f"{secured}/v1/jobs/{job['id']}"
    assert httpx.delete(url).status_code == 401
    assert httpx.delete(url, headers=auth(job["viewer_token"])).status_code == 401
    assert httpx.delete(url, headers=auth(KEY)).status_code == 202


def test_chat_completions_needs_an_api_key_and_returns_the_viewer_token(secured):
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    refused = httpx.post(f"{secured}/v1/chat/completions", json=body)
    assert refused.status_code == 401
    sdk = openai.OpenAI(base_url=f"{secured}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="the API key is not valid"):
        sdk.chat.completions.create(model="demo", messages=body["messages"], max_tokens=3)
    answered = httpx.post(f"{secured}/v1/chat/completions", json=body, headers=auth(KEY))
    assert answered.status_code == 200
    job_id = answered.headers["X-Tokencast-Job"]
    token = answered.headers["X-Tokencast-Viewer-Token"]
    state = httpx.get(f"{secured}/v1/jobs/{job_id}", params={"token": token})
    assert state.status_code == 200


def test_a_refused_body_leaves_the_connection_usable(secured):
    with httpx.Client(base_url=secured, timeout=10) as client:
        for _ in range(3):  # the same kept-alive connection each time
            refused = client.post("/v1/jobs", json={"prompt": "x" * 50_000})
            assert refused.status_code == 401
        assert client.get("/v1/models").status_code == 200


def counter(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_total" and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    return 0.0


def test_metrics_count_what_happened(redis_url):
    cluster = Cluster(redis_url)
    try:
        web = cluster.web()
        cluster.worker()
        url = web.url
        before = {
            name: counter(url, name)
            for name in ("tokencast_events_sent", "tokencast_resumes", "tokencast_jobs_created")
        }
        # Three viewers of one job, then a resume of its last 2 events. A
        # viewer that connects late gets the first events merged: count what
        # each one received.
        job = httpx.post(
            f"{url}/v1/jobs",
            json={"prompt": "m", "max_tokens": 10, "seed": 3, "demo": {"tokens_per_second": 3.3}},
        ).json()
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: read_stream(url, job["id"]), range(3)))
        state = wait_finished(url, job["id"])
        events = int(state["last_event_id"])
        assert all(got.covered_ids == list(range(1, events + 1)) for got in results)
        resumed = read_stream(url, job["id"], last_event_id=events - 2)
        assert resumed.covered_ids == [events - 1, events]
        sent = sum(len(got.events) for got in results) + len(resumed.events)
        wait_until(
            lambda: counter(url, "tokencast_events_sent") - before["tokencast_events_sent"] == sent,
            5,
            what="events_sent",
        )
        assert counter(url, "tokencast_resumes") - before["tokencast_resumes"] == 1
        assert counter(url, "tokencast_bytes_sent") > 3 * events * len("id: 1\nevent: token\n")
        assert counter(url, "tokencast_jobs_created") - before["tokencast_jobs_created"] == 1
        text = httpx.get(f"{url}/metrics").text
        assert "tokencast_open_streams 0.0" in text
        assert "tokencast_publish_to_send_seconds_count" in text
        assert "tokencast_queue_depth" in text
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def limited(redis_url):
    cluster = Cluster(
        redis_url,
        api_keys="key-a,key-b",
        create_rate_per_minute="3",
        max_streams_per_client="2",
        max_streams="3",
        cors_origins="http://allowed.example",
        trust_proxy="1",
    )
    try:
        cluster.web()
        yield cluster.procs[0].url
    finally:
        cluster.close()


def test_job_creation_rate_per_api_key(limited):
    for _ in range(3):
        assert create(limited, auth("key-a")).status_code == 201
    refused = create(limited, auth("key-a"))
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.json()["error"] == {
        "code": "rate_limited",
        "message": "more than 3 jobs created this minute (TOKENCAST_CREATE_RATE_PER_MINUTE)",
    }
    assert create(limited, auth("key-b")).status_code == 201  # another key, its own budget


def test_open_streams_per_client_and_per_node(limited):
    job_id = create(limited, auth("key-b")).json()["id"]  # no worker: it stays queued
    events = f"{limited}/v1/jobs/{job_id}/events"
    with httpx.Client(timeout=10) as client:
        first = client.send(client.build_request("GET", events), stream=True)
        second = client.send(client.build_request("GET", events), stream=True)
        refused = client.get(events)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "2"
        assert refused.json()["error"]["message"] == (
            "2 streams are already open from your address on this node"
            " (TOKENCAST_MAX_STREAMS_PER_CLIENT)"
        )
        first.close()

        def opens() -> bool:
            response = client.send(client.build_request("GET", events), stream=True)
            response.close()
            return response.status_code == 200

        wait_until(opens, 5, what="the closed stream's slot to free")
        second.close()
    wait_until(
        lambda: "tokencast_open_streams 0.0" in httpx.get(f"{limited}/metrics").text,
        5,
        what="the node to notice the closed streams",
    )
    # Behind a trusted proxy each client is its forwarded address; the node's
    # own limit (3 streams) answers 503, so a load balancer moves on.
    with httpx.Client(timeout=10) as client:
        held = [
            client.send(
                client.build_request(
                    "GET", events, headers={"X-Forwarded-For": f"203.0.113.9, 10.0.0.{n}"}
                ),
                stream=True,
            )
            for n in range(3)
        ]
        assert [response.status_code for response in held] == [200, 200, 200]
        full = client.get(events, headers={"X-Forwarded-For": "10.0.0.9"})
        assert full.status_code == 503
        assert full.headers["Retry-After"] == "2"
        assert full.json()["error"]["code"] == "too_many_streams"
        for response in held:
            response.close()


def test_cors_preflight_and_headers(limited):
    preflight = httpx.options(
        f"{limited}/v1/jobs",
        headers={
            "Origin": "http://allowed.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://allowed.example"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    allowed = httpx.get(f"{limited}/v1/models", headers={"Origin": "http://allowed.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://allowed.example"
    refused = httpx.get(f"{limited}/v1/models", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers


def test_oversize_headers_are_refused_and_the_node_stays_healthy(limited):
    response = httpx.get(f"{limited}/v1/models", headers={"X-Big": "a" * 100_000})
    assert response.status_code in (400, 431)
    assert httpx.get(f"{limited}/healthz").status_code == 200


def test_worker_metrics_port(redis_url):
    from tests.support import free_port

    port = free_port()
    cluster = Cluster(redis_url)
    try:
        web = cluster.web()
        cluster.worker(worker_metrics_port=str(port), worker_concurrency="4")
        job = httpx.post(
            f"{web.url}/v1/jobs",
            json={"prompt": "w", "max_tokens": 3, "demo": {"tokens_per_second": 0}},
        ).json()
        wait_finished(web.url, job["id"])
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: counter(url, "tokencast_jobs_finished", status="completed") == 1,
            5,
            what="jobs_finished",
        )
        families = {
            f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        }
        slots = {s.labels["state"]: s.value for s in families["tokencast_worker_slots"].samples}
        assert slots == {"busy": 0.0, "idle": 4.0}
    finally:
        cluster.close()
