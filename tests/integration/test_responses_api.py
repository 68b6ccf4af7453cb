"""The official ``openai`` client's Responses API against real web nodes and a worker.

Two web nodes share one Redis: a stream read on one is resumed on the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai._streaming import SSEDecoder

from services.jobs import JobSpec
from tests.support import Cluster, job_state, wait_finished, wait_until
from worker.backends.demo import demo_tokens

pytestmark = pytest.mark.timeout(60)

FAST = {"tokens_per_second": 0}
STEADY = {"tokens_per_second": 40}
KEEPALIVE_S = 0.2
QUESTION = "what is a token stream"


@pytest.fixture(scope="module")
def cluster(redis_url: str) -> Iterator[Cluster]:
    with Cluster(redis_url, keepalive_seconds=str(KEEPALIVE_S)) as cluster:
        cluster.web()
        cluster.web()
        cluster.worker()
        yield cluster


@pytest.fixture(scope="module")
def url(cluster: Cluster) -> str:
    return cluster.procs[0].url


def sdk(base_url: str, **options: Any) -> openai.OpenAI:
    options.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=f"{base_url}/v1", max_retries=0, timeout=30, **options)


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with sdk(url) as client:
        yield client


@pytest.fixture
def other(cluster: Cluster) -> Iterator[openai.OpenAI]:
    """A client of the second web node."""
    with sdk(cluster.procs[1].url) as client:
        yield client


def demo_texts(question: str, max_tokens: int) -> tuple[list[str], str]:
    """The demo model's tokens for a one-message input, and its finish reason."""
    spec = JobSpec(
        prompt=None,
        model="demo",
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": question}],
    )
    texts, _count, finish = demo_tokens(spec)
    return list(texts), finish


def max_tokens_ending(finish: str) -> int:
    """A ``max_output_tokens`` for which the demo model ends ``QUESTION`` with ``finish``."""
    return next(m for m in range(8, 80) if demo_texts(QUESTION, m)[1] == finish)


def long_background_response(client: openai.OpenAI) -> Any:
    """A background response that runs for several seconds (cancel it when done with it)."""
    return client.responses.create(
        model="demo",
        input=QUESTION,
        max_output_tokens=500,
        background=True,
        extra_body={"demo": STEADY},
    )


def job_of(response_id: str) -> str:
    assert response_id.startswith("resp_")
    return response_id.removeprefix("resp_")


def text_of(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def numbers(events: list[Any]) -> list[int]:
    return [e.sequence_number for e in events]


def test_a_streamed_response_is_the_jobs_text(client, url):
    max_tokens = max_tokens_ending("stop")
    events = list(
        client.responses.create(
            model="demo",
            input=QUESTION,
            instructions="Be brief.",
            max_output_tokens=max_tokens,
            metadata={"team": "tests"},
            stream=True,
            extra_body={"demo": FAST},
        )
    )
    state = wait_finished(url, job_of(events[0].response.id))
    assert state["text"] == "".join(demo_texts(QUESTION, max_tokens)[0])
    assert text_of(events) == state["text"]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    final = events[-1].response
    assert final.output_text == state["text"]
    assert final.status == "completed"
    assert final.instructions == "Be brief."
    assert final.metadata == {"team": "tests"}
    assert final.max_output_tokens == max_tokens
    assert final.usage is not None and final.usage.output_tokens == state["tokens"]
    assert final.output[0].id == f"msg_{state['id']}"
    assert numbers(events) == sorted(set(numbers(events)))


def test_the_stream_helper_accumulates_output_text(client, url):
    with client.responses.stream(model="demo", input=QUESTION, extra_body={"demo": FAST}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    state = job_state(url, job_of(final.id))
    assert final.output_text == "".join(deltas) == state["text"]


def test_the_headers_name_the_job(client):
    raw = client.responses.with_raw_response.create(
        model="demo", input="hi", extra_body={"demo": FAST}
    )
    assert raw.parse().id == f"resp_{raw.headers['x-tokencast-job']}"
    assert "x-tokencast-viewer-token" not in raw.headers


def test_without_stream_the_whole_response(client, url):
    response = client.responses.create(model="demo", input=QUESTION, extra_body={"demo": FAST})
    state = job_state(url, job_of(response.id))
    assert state["status"] == "completed"
    assert response.output_text == state["text"]
    assert response.usage is not None and response.usage.output_tokens == state["tokens"]
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()


def test_background_answers_at_once_then_retrieve_gives_the_rest(client, url):
    response = client.responses.create(
        model="demo", input=QUESTION, background=True, extra_body={"demo": STEADY}
    )
    assert response.status in ("queued", "in_progress")
    assert response.output == []
    final = wait_until(
        lambda: (r := client.responses.retrieve(response.id)).status == "completed" and r,
        30,
        what="the response to complete",
    )
    assert final.output_text == job_state(url, job_of(response.id))["text"]


def test_length_is_an_incomplete_response(client):
    max_tokens = max_tokens_ending("length")
    events = list(
        client.responses.create(
            model="demo",
            input=QUESTION,
            max_output_tokens=max_tokens,
            stream=True,
            extra_body={"demo": FAST},
        )
    )
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert text_of(events) == "".join(demo_texts(QUESTION, max_tokens)[0])
    assert client.responses.retrieve(last.response.id).status == "incomplete"


def test_a_failed_job_is_response_failed_with_its_code(client, url):
    events = list(
        client.responses.create(
            model="demo",
            input=QUESTION,
            stream=True,
            extra_body={"demo": {"fail_after": 3, **FAST}},
        )
    )
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed"
    assert last.response.error.code == "backend_error"
    assert last.response.error.message.endswith("failed after 3 tokens, as demo.fail_after asked")
    assert text_of(events) == "".join(demo_texts(QUESTION, 256)[0][:3])
    assert job_state(url, job_of(last.response.id))["status"] == "failed"
    assert client.responses.retrieve(last.response.id).status == "failed"


def test_a_background_stream_resumes_on_the_other_node_from_any_number(client, other, url):
    max_tokens = 40
    stream = client.responses.create(
        model="demo",
        input=QUESTION,
        max_output_tokens=max_tokens,
        background=True,
        stream=True,
        extra_body={"demo": STEADY},
    )
    head = []
    for event in stream:
        head.append(event)
        if len(head) == 9:
            break
    stream.close()
    rid = head[0].response.id
    tokens, _ = demo_texts(QUESTION, max_tokens)
    live = [*numbers(head), 25, 27, 99, 123]  # received numbers, and ones inside events
    resumed = {
        after: list(other.responses.retrieve(rid, stream=True, starting_after=after))
        for after in live
    }
    wait_finished(url, job_of(rid))
    whole = list(other.responses.retrieve(rid, stream=True))
    assert text_of(whole) == "".join(tokens)
    for after, rest in resumed.items():
        assert numbers(rest) == sorted(set(numbers(rest))) and min(numbers(rest)) > after
        # Deltas may be merged differently; every other event is numbered and built alike.
        others = [e.model_dump() for e in rest if not e.type.endswith(".delta")]
        assert others == [
            e.model_dump()
            for e in whole
            if e.sequence_number > after and not e.type.endswith(".delta")
        ], after
        # Token i is event i + 2 (after start), its delta numbered 10·id + 9.
        sent = sum(1 for i in range(len(tokens)) if (i + 2) * 10 + 9 <= after)
        assert text_of(rest) == "".join(tokens[sent:]), after
        assert rest[-1].type == "response.completed"
    assert text_of(head) + text_of(resumed[numbers(head)[-1]]) == "".join(tokens)


def test_the_stream_helper_resumes_by_filtering_the_whole_stream(client, other, url):
    response = client.responses.create(
        model="demo", input=QUESTION, background=True, extra_body={"demo": FAST}
    )
    wait_finished(url, job_of(response.id))
    with other.responses.stream(response_id=response.id, starting_after=30) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert min(numbers(events)) > 30
    assert final.output_text == job_state(url, job_of(response.id))["text"]


def test_a_resume_after_the_final_event_is_an_empty_stream(client, url):
    events = list(
        client.responses.create(model="demo", input="hi", stream=True, extra_body={"demo": FAST})
    )
    rid, last = events[-1].response.id, events[-1].sequence_number
    assert list(client.responses.retrieve(rid, stream=True, starting_after=last)) == []
    with httpx.stream(
        "GET", f"{url}/v1/responses/{rid}?stream=true", headers={"Last-Event-ID": str(last - 1)}
    ) as response:
        assert response.status_code == 200
        blocks = list(SSEDecoder().iter_bytes(response.iter_bytes()))
    assert [(b.id, b.event) for b in blocks] == [(str(last), "response.completed")]


def test_cancel_answers_cancelled_and_the_stream_ends_incomplete(client, other, url):
    response = long_background_response(client)
    wait_until(lambda: job_state(url, job_of(response.id))["tokens"] >= 2, 30, what="tokens")
    cancelled = other.responses.cancel(response.id)
    assert cancelled.status == "cancelled"
    assert client.responses.cancel(response.id).status == "cancelled"  # again: the same
    events = list(client.responses.retrieve(response.id, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.status == "cancelled"
    assert text_of(events) == job_state(url, job_of(response.id))["text"]
    assert client.responses.retrieve(response.id).status == "cancelled"


def test_cancelling_a_finished_response_is_400(client):
    response = client.responses.create(model="demo", input="hi", extra_body={"demo": FAST})
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.cancel(response.id)
    assert "already finished (status completed)" in raised.value.message


def test_the_sdk_reads_through_keepalives(client):
    paused = {"tokens_per_second": 2}  # 0.5 s between tokens: two keepalives or more in each gap
    events = list(
        client.responses.create(
            model="demo", input="hi", max_output_tokens=4, stream=True, extra_body={"demo": paused}
        )
    )  # a blank line after a keepalive would raise JSONDecodeError here
    assert text_of(events) == "".join(demo_texts("hi", 4)[0])


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": "hi", "bogus": 1}, "bogus", "unknown field 'bogus'"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens must be"),
        ({"input": [{"type": "input_image"}]}, "input[0].type", "input[0].type must be one of"),
    ],
)
def test_errors_in_openai_shape(url, body, param, message):
    response = httpx.post(f"{url}/v1/responses", json={"model": "demo", **body}, timeout=10)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"].startswith(message)


def test_unknown_responses_are_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_Qajb9HAkvQ5X_kFYoKCFZA")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("chatcmpl-nothing")


def test_an_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.create(model="gpt-nothing", input="hi")
    assert raised.value.code == "model_not_found"


KEY = "k-responses-test"


@pytest.fixture(scope="module")
def secured(redis_url: str) -> Iterator[str]:
    """A node with API keys and viewer authentication on."""
    with Cluster(redis_url, api_keys=KEY, secret="s3cret-for-responses") as cluster:
        web = cluster.web()
        cluster.worker()
        yield web.url


def test_api_keys_and_viewer_tokens_as_for_chat_completions(secured):
    with sdk(secured) as anonymous, pytest.raises(openai.AuthenticationError):
        anonymous.responses.create(model="demo", input="hi")
    with sdk(secured, api_key=KEY) as creator:
        raw = creator.responses.with_raw_response.create(
            model="demo", input="hi", background=True, extra_body={"demo": FAST}
        )
        rid, token = raw.parse().id, raw.headers["x-tokencast-viewer-token"]
        assert rid == f"resp_{raw.headers['x-tokencast-job']}"
        assert creator.responses.retrieve(rid).id == rid  # an API key may watch too
    with sdk(secured, api_key=token) as viewer:
        events = list(viewer.responses.retrieve(rid, stream=True))
        assert events[-1].type == "response.completed"
        with pytest.raises(openai.AuthenticationError):
            viewer.responses.cancel(rid)  # a viewer token does not allow cancelling
    with (
        sdk(secured, api_key="not-a-token") as stranger,
        pytest.raises(openai.PermissionDeniedError),
    ):
        stranger.responses.retrieve(rid)
    response = httpx.get(f"{secured}/v1/responses/{rid}", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_bad_resume_positions_are_400(client, url):
    response = long_background_response(client)
    stream_url = f"{url}/v1/responses/{response.id}?stream=true"
    for query, param, message in [
        ("stream=true&starting_after=-1", "starting_after", "starting_after must be a sequence"),
        ("stream=true&starting_after=99999", "starting_after", "starting_after 99999 is past the"),
        ("stream=maybe", "stream", "stream must be true or false"),
    ]:
        answer = httpx.get(f"{url}/v1/responses/{response.id}?{query}", timeout=10)
        assert answer.status_code == 400, query
        error = answer.json()["error"]
        assert (error["param"], error["type"]) == (param, "invalid_request_error")
        assert error["message"].startswith(message), error["message"]
    answer = httpx.get(stream_url, headers={"Last-Event-ID": "1.5"}, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "Last-Event-ID"
    client.responses.cancel(response.id)
