"""The ``openai`` backend against a fake OpenAI-compatible server speaking the real wire format.

First the backend in this process (each upstream behaviour, each failure),
then through real ``tokencast serve`` and ``worker`` processes and the
official client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from services.config import Settings
from services.errors import BackendError
from services.items import Finish
from services.jobs import JobSpec
from tests.fakes.upstream import (
    CONVERSATION,
    PIECES,
    SCENARIOS,
    TEXT,
    WEATHER,
    FakeUpstream,
)
from tests.integration.test_openai_api import chat_stream, content
from tests.support import Cluster, core_for_test, free_port, job_state, wait_finished, wait_until
from worker.backends.base import Job
from worker.backends.demo import DemoBackend
from worker.backends.openai import OpenAIBackend, Produced
from worker.runner import Worker

pytestmark = pytest.mark.timeout(60)

FIRST_TOKEN_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 0.5


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.close()


def backend_for(base_url: str) -> OpenAIBackend:
    # Local names are the scenario names, and "chat" maps to the "ok" scenario.
    models = (("chat", "ok"), *((name, name) for name in SCENARIOS))
    return OpenAIBackend(
        Settings(
            upstream_base_url=base_url,
            upstream_api_key="sk-test",
            upstream_models=models,
            upstream_first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S,
            upstream_idle_timeout_s=IDLE_TIMEOUT_S,
        )
    )


async def generate(base_url: str, model: str, **spec) -> tuple[list[Produced], str | BackendError]:
    """The items before ``Finish`` (once, last), then its finish reason; or the failure."""
    backend = backend_for(base_url)
    generation = backend.generate(
        Job.from_spec("job", JobSpec(prompt="say hi", model=model, **spec))
    )
    items: list[Produced] = []
    try:
        async for item in generation:
            items.append(item)
    except BackendError as exc:
        assert not any(isinstance(item, Finish) for item in items)
        return items, exc
    finally:
        await backend.aclose()
    *items, finish = items
    assert isinstance(finish, Finish)
    assert not any(isinstance(item, Finish) for item in items)
    return items, finish.finish_reason


async def test_each_upstream_delta_becomes_a_token(upstream):
    tokens, finish = await generate(upstream.base_url, "chat", temperature=0.5, seed=7)
    # The role-only first chunk, empty deltas and the usage chunk give no token; the
    # character cut between two writes arrives whole.
    assert tokens == PIECES
    assert "".join(tokens) == "Grüße aus 東京 🎉! Fin."
    assert finish == "stop"
    [request] = upstream.requests
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.body == {
        "model": "ok",
        "messages": [{"role": "user", "content": "say hi"}],
        "max_tokens": 256,
        "stream": True,
        "temperature": 0.5,
        "seed": 7,
    }


async def test_upstream_length_is_the_job_finish_reason(upstream):
    tokens, finish = await generate(upstream.base_url, "chat", max_tokens=3)
    assert tokens == PIECES[:3]
    assert finish == "length"


def where(base_url: str) -> str:
    return f"the upstream model server at {base_url}"


FAILURES = [
    (
        "mute",
        [],
        "upstream_timeout",
        "{where} sent nothing within 2 s of the request"
        " (TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS)",
    ),
    (
        "silent",
        [],
        "upstream_timeout",
        "{where} sent nothing within 2 s of the request"
        " (TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS)",
    ),
    (
        "stall",
        ["Hello", " there"],
        "upstream_timeout",
        "{where} stopped sending for 0.5 s in the middle of the answer"
        " (TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS)",
    ),
    (
        "bad-request",
        [],
        "backend_error",
        "{where} answered HTTP 400: max_tokens is too large: this model supports at most 4096 tokens",
    ),
    (
        "unavailable",
        [],
        "backend_error",
        "{where} answered HTTP 503: the model is loading, try again (tried 3 times)",
    ),
    (
        "malformed",
        ["Hello"],
        "backend_error",
        '{where} sent a malformed chunk: {{"choices": [{{"delta": {{"content": "unterminated',
    ),
    (
        "cut",
        ["Hello"],
        "backend_error",
        "{where} ended the stream before the answer was finished (no finish_reason)",
    ),
    (
        "drop",
        ["Hello"],
        "backend_error",
        "the connection to {where} broke mid-answer: peer closed connection without sending"
        " complete message body (incomplete chunked read)",
    ),
    (
        "error-midway",
        ["Hello"],
        "backend_error",
        "{where} reported an error mid-answer: the GPU fell over",
    ),
]


@pytest.mark.parametrize(("model", "tokens", "code", "message"), FAILURES, ids=lambda v: str(v))
async def test_each_upstream_failure_ends_with_a_code_and_a_clear_message(
    upstream, model, tokens, code, message
):
    got, failure = await generate(upstream.base_url, model)
    assert got == tokens
    assert isinstance(failure, BackendError)
    assert failure.code == code
    assert failure.message == message.format(where=where(upstream.base_url))


async def test_retried_only_while_opening(upstream):
    # Retryable statuses are retried before anything was generated …
    upstream.flaky = 2
    tokens, finish = await generate(upstream.base_url, "chat")
    assert tokens == PIECES and finish == "stop"
    assert len(upstream.requests) == 3
    # … a client error is not, nor is anything once the answer has begun.
    for model in ("bad-request", "stall", "drop", "cut", "malformed"):
        before = len(upstream.requests)
        await generate(upstream.base_url, model)
        assert len(upstream.requests) == before + 1, model


async def test_connection_refused():
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    tokens, failure = await generate(base_url, "chat")
    assert tokens == []
    assert isinstance(failure, BackendError)
    assert failure.code == "backend_error"
    assert failure.message == (
        f"could not connect to {where(base_url)}: connection refused (tried 3 times)"
    )


@pytest.mark.parametrize("waiting_on", ["the log", "the upstream"])
async def test_cancelling_the_consumer_closes_the_upstream_request(upstream, waiting_on):
    backend = backend_for(upstream.base_url)
    generation = backend.generate(JobSpec(prompt="x", model="slow"))
    first_token = asyncio.Event()

    async def consume() -> None:
        async for _text in generation:
            first_token.set()
            if waiting_on == "the log":
                # Like the worker's pump awaiting an append: the generation sits at a yield.
                await asyncio.Event().wait()

    task = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(first_token.wait(), 5)
        [request] = upstream.requests
        assert not request.closed.is_set()
        task.cancel()
        assert await asyncio.to_thread(request.closed.wait, 2), "upstream request still open"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await backend.aclose()


class Closing:
    """A backend of two models that counts its closes."""

    def __init__(self) -> None:
        self.closes = 0

    def models(self) -> list[str]:
        return ["one", "two"]

    def generate(self, spec: JobSpec) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        self.closes += 1


async def test_a_stopping_worker_closes_its_backends_once(upstream, redis, keys):
    settings = Settings(key_prefix=keys.prefix, upstream_base_url=upstream.base_url)
    openai_backend, closing = backend_for(upstream.base_url), Closing()
    backends = {"chat": openai_backend, "ok": openai_backend, "one": closing, "two": closing}
    worker = Worker(core_for_test(redis, keys), settings, {**backends, "demo": DemoBackend()})
    running = asyncio.create_task(worker.run())
    for _ in range(250):  # until its consumer group is made: it is running
        if await redis.exists(keys.queue()):
            break
        await asyncio.sleep(0.02)
    assert not openai_backend.client.is_closed()
    worker.stop()
    await asyncio.wait_for(running, 10)
    assert openai_backend.client.is_closed()  # the upstream connections with it
    assert closing.closes == 1


# Through real processes.

# A job the upstream finishes ends with a Finish item: the log must take items.


@pytest.fixture(scope="module")
def cluster(redis_url) -> Iterator[tuple[FakeUpstream, str]]:
    """A fake upstream, and a web node and a worker serving three of its models."""
    fake = FakeUpstream().start()
    node = Cluster(
        redis_url,
        upstream_base_url=fake.base_url,
        upstream_models="chat=ok,slow,bad-request",
        upstream_first_token_timeout_seconds=str(FIRST_TOKEN_TIMEOUT_S),
        upstream_idle_timeout_seconds=str(IDLE_TIMEOUT_S),
    )
    try:
        web = node.web()
        node.worker()
        yield fake, web.url
    finally:
        node.close()
        fake.close()


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_list_has_the_upstream_models(cluster):
    _fake, url = cluster
    with sdk(url) as client:
        assert [model.id for model in client.models.list()] == [
            "demo",
            "chat",
            "slow",
            "bad-request",
        ]


def test_a_chat_completion_streams_the_upstream_answer(cluster):
    fake, url = cluster
    with sdk(url) as client:
        with chat_stream(client, model="chat", messages=[{"role": "user", "content": "hi"}]) as (
            job_id,
            stream,
        ):
            chunks = list(stream)
    assert content(chunks) == TEXT
    assert chunks[-1].choices[0].finish_reason == "stop"
    state = wait_finished(url, job_id)
    assert (state["status"], state["text"], state["tokens"]) == ("completed", TEXT, len(PIECES))
    request = fake.requests_for("ok")[-1]
    assert request.body["messages"] == [{"role": "user", "content": "hi"}]


def test_cancel_closes_the_upstream_request(cluster):
    fake, url = cluster
    with sdk(url) as client:
        with chat_stream(client, model="slow") as (job_id, stream):
            while not (next(stream).choices[0].delta.content or ""):
                pass  # until the first token
            [request] = fake.requests_for("slow")
            assert httpx.delete(f"{url}/v1/jobs/{job_id}").status_code == 202
            last = list(stream)[-1]
    assert last.choices[0].finish_reason == "stop"
    assert request.closed.wait(2), "the upstream request outlived the job"
    state = job_state(url, job_id)
    assert state["status"] == "cancelled"
    assert state["text"] == "".join(f" t{i}" for i in range(state["tokens"]))


def test_an_upstream_failure_reaches_every_viewer(cluster):
    fake, url = cluster
    message = (
        f"{where(fake.base_url)} answered HTTP 400:"
        " max_tokens is too large: this model supports at most 4096 tokens"
    )
    with sdk(url) as client:
        stream = client.chat.completions.create(
            model="bad-request", messages=[{"role": "user", "content": "x"}], stream=True
        )
        with pytest.raises(openai.APIError) as raised:
            list(stream)
    assert raised.value.message == message
    assert raised.value.code == "backend_error"
    job_id = stream.response.headers["x-tokencast-job"]
    state = wait_until(lambda: job_state(url, job_id)["finished_at"] and job_state(url, job_id), 5)
    assert state["error"] == {"code": "backend_error", "message": message}


def upstream_body(fake: FakeUpstream, marker: str) -> dict:
    """The body of the one upstream request whose messages mention ``marker``."""
    [request] = [r for r in fake.requests_for("ok") if marker in str(r.body["messages"])]
    return request.body


def test_a_conversation_with_tools_arrives_upstream_as_sent(cluster):
    fake, url = cluster
    conversation = [*CONVERSATION[:3], {**CONVERSATION[3], "content": "18C, said POST /v1/jobs"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {"model": "chat", "messages": conversation, "tools": [WEATHER], "tool_choice": choice}
    created = httpx.post(f"{url}/v1/jobs", json=body, timeout=10)
    assert created.status_code == 201, created.text
    state = wait_finished(url, created.json()["id"])
    assert (state["status"], state["text"]) == ("completed", TEXT)
    sent = upstream_body(fake, "said POST /v1/jobs")
    assert sent["messages"] == conversation  # every role, content and tool_call_id
    assert sent["tools"] == [WEATHER]
    assert sent["tool_choice"] == choice
    assert sent["max_tokens"] == 256


def test_the_sdk_chat_request_arrives_upstream_as_sent(cluster):
    fake, url = cluster
    conversation = [*CONVERSATION[:3], {**CONVERSATION[3], "content": "18C, said the SDK"}]
    with sdk(url) as client:
        completion = client.chat.completions.create(
            model="chat",
            messages=conversation,
            tools=[WEATHER],
            tool_choice="required",
            max_completion_tokens=50,
        )
    assert completion.choices[0].message.content == TEXT
    sent = upstream_body(fake, "said the SDK")
    assert sent["messages"] == conversation
    assert (sent["tools"], sent["tool_choice"], sent["max_tokens"]) == ([WEATHER], "required", 50)
