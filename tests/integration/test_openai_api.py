"""The official ``openai`` client against real ``tokencast serve`` and ``worker`` processes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from openai._streaming import SSEDecoder
from openai.types.chat import ChatCompletionChunk

from services.jobs import JobSpec
from tests.support import Cluster, create_job, job_state, wait_finished
from web.openai_format import unix_seconds
from worker.backends.demo import demo_tokens

pytestmark = pytest.mark.timeout(60)

FAST = {"tokens_per_second": 0}
HELLO = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello there"},
]


@pytest.fixture(scope="module")
def url(node: Cluster) -> str:
    return node.procs[0].url


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30) as sdk:
        yield sdk


def content(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@contextlib.contextmanager
def chat_stream(
    client: openai.OpenAI, **body: Any
) -> Iterator[tuple[str, Iterator[ChatCompletionChunk]]]:
    """A streamed chat completion: its job id, and its chunks as they come."""
    body.setdefault("messages", HELLO)
    with client.chat.completions.with_streaming_response.create(stream=True, **body) as response:
        yield response.headers["x-tokencast-job"], iter(response.parse())


def test_streaming_assembles_the_job_text(client, url):
    with chat_stream(
        client,
        model="demo",
        max_tokens=30,
        extra_body={"demo": {"tokens_per_second": 200}, "metadata": {"team": "tests"}},
    ) as (job_id, stream):
        chunks = list(stream)
    state = job_state(url, job_id)
    assert state["status"] == "completed"
    assert state["metadata"] == {"team": "tests"}
    assert content(chunks) == state["text"]
    # The demo model answers the last user message.
    assert state["text"].startswith("You asked: hello there\n\n")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices[0].finish_reason == state["finish_reason"]
    assert chunks[-1].choices[0].delta.content is None
    assert {c.id for c in chunks} == {f"chatcmpl-{job_id}"}
    assert {c.model for c in chunks} == {"demo"}
    assert {c.created for c in chunks} == {unix_seconds(state["created_at"])}
    assert len(chunks) == state["tokens"] + 2  # start, one per token, finish


def test_include_usage_ends_with_the_usage_chunk(client, url):
    with chat_stream(
        client,
        model="demo",
        max_completion_tokens=12,
        stream_options={"include_usage": True},
        extra_body={"demo": FAST},
    ) as (job_id, stream):
        chunks = list(stream)
    state = job_state(url, job_id)
    usage = chunks[-1]
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage.completion_tokens == state["tokens"]
    assert all(c.usage is None for c in chunks[:-1])
    assert content(chunks) == state["text"]


def test_non_streaming_returns_the_whole_text(client, url):
    response = client.chat.completions.with_raw_response.create(
        model="demo", messages=HELLO, max_tokens=25, seed=4, extra_body={"demo": FAST}
    )
    job_id = response.headers["x-tokencast-job"]
    completion = response.parse()
    state = job_state(url, job_id)
    assert completion.id == f"chatcmpl-{job_id}"
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == state["text"]
    assert completion.choices[0].finish_reason == state["finish_reason"]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == state["tokens"]


def test_models_list(client):
    assert [model.id for model in client.models.list()] == ["demo"]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"messages": []},
            "messages",
            'messages must be an array of 1 to 1,000 messages such as {"role": "user",'
            ' "content": "hello"}',
        ),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "messages[0].role must be one of: system, developer, user, assistant, tool",
        ),
        (
            {"messages": [*HELLO, {"role": "tool", "content": "18C"}]},
            "messages[2].tool_call_id",
            "messages[2].tool_call_id is required in a tool message",
        ),
        (
            {"messages": HELLO, "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            "tool_choice names the function 'f', which is not in tools",
        ),
        (
            {"messages": HELLO, "max_tokens": 0},
            "max_tokens",
            "max_tokens must be an integer from 1 to 32,768",
        ),
        (
            {"messages": HELLO, "temperature": 3},
            "temperature",
            "temperature must be a number from 0 to 2",
        ),
    ],
)
def test_a_bad_request_raises_bad_request_error(client, body, param, message):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="demo", **body)
    assert raised.value.status_code == 400
    assert raised.value.param == param
    assert raised.value.type == "invalid_request_error"
    assert raised.value.body["message"].startswith(message)


def test_an_unknown_model_raises_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-nope", messages=HELLO)
    assert raised.value.code == "model_not_found"
    assert raised.value.body["message"] == (
        "model 'gpt-nope' does not exist; GET /v1/models lists: demo"
    )


def test_the_wire_format_exactly(url):
    demo = {"tokens_per_second": 20}  # slow enough that every token comes live, unmerged
    body = {
        "model": "demo",
        "messages": HELLO,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "demo": demo,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        job_id = response.headers["x-tokencast-job"]
        raw = response.read().decode()
    state = job_state(url, job_id)
    texts, count, _finish = demo_tokens(
        JobSpec(prompt="hello there", model="demo", max_tokens=3, demo=demo)
    )
    head = (
        f'"id":"chatcmpl-{job_id}","object":"chat.completion.chunk",'
        f'"created":{unix_seconds(state["created_at"])},"model":"demo"'
    )

    def chunk(event_id: int, delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        choices = json.dumps([choice], separators=(",", ":"), ensure_ascii=False)
        return f'id: {event_id}\ndata: {{{head},"choices":{choices},"usage":null}}\n\n'

    tokens = list(enumerate(texts, start=2))
    done_id = count + 2
    usage = (
        f'"usage":{{"prompt_tokens":0,"completion_tokens":{state["tokens"]},'
        f'"total_tokens":{state["tokens"]},"completion_tokens_details":{{"reasoning_tokens":0}}}}'
    )
    expected = (
        chunk(1, {"role": "assistant", "content": ""})
        + "".join(chunk(event_id, {"content": text}) for event_id, text in tokens)
        + chunk(done_id, {}, state["finish_reason"])
        + f'id: {done_id}\ndata: {{{head},"choices":[],{usage}}}\n\n'
        + "data: [DONE]\n\n"
    )
    assert raw == expected  # no retry: line, an id: on every chunk, none on [DONE]


def test_a_second_viewer_joins_with_last_event_id(client, url):
    with chat_stream(
        client, model="demo", max_tokens=60, extra_body={"demo": {"tokens_per_second": 50}}
    ) as (job_id, first):
        seen = [next(first) for _ in range(10)]  # the start chunk and 9 tokens: id 10
        assert job_state(url, job_id)["status"] == "running"
        # The official client reads the events URL too.
        joined = client.get(
            f"/jobs/{job_id}/events",
            cast_to=ChatCompletionChunk,
            stream=True,
            stream_cls=openai.Stream[ChatCompletionChunk],
            options={"params": {"format": "openai"}, "headers": {"Last-Event-ID": "10"}},
        )
        later = list(joined)
        rest = list(first)
    state = job_state(url, job_id)
    assert content(seen) + content(rest) == state["text"]
    assert content(later) == content(rest)
    assert later[-1] == rest[-1]  # the same finish chunk
    assert {c.id for c in later} == {f"chatcmpl-{job_id}"}
    # Ids: the joiner's chunks cover exactly 11 … the last event, merged or not.
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        connect_sse(
            http,
            "GET",
            f"/v1/jobs/{job_id}/events",
            params={"format": "openai"},
            headers={"Last-Event-ID": "10"},
        ) as source,
    ):
        events = list(source.iter_sse())
    covered = []
    for sse in events[:-1]:
        data = json.loads(sse.data)
        covered.extend(range(data.get("first_id", int(sse.id)), int(sse.id) + 1))
    assert covered == list(range(11, int(state["last_event_id"]) + 1))
    assert "first_id" in json.loads(events[0].data)  # history arrives merged
    assert events[-1].data == "[DONE]"


def test_a_client_that_goes_away_does_not_cancel_the_job(client, url):
    with chat_stream(
        client, model="demo", max_tokens=40, extra_body={"demo": {"tokens_per_second": 40}}
    ) as (job_id, chunks):
        next(chunks), next(chunks)
    state = wait_finished(url, job_id)
    assert state["status"] == "completed"


FAILED_MESSAGE = "the demo model failed after 3 tokens, as demo.fail_after asked"


def test_a_failed_job_streams_an_error_and_the_client_raises(client, url):
    stream = client.chat.completions.create(
        model="demo",
        messages=HELLO,
        stream=True,
        extra_body={"demo": {"tokens_per_second": 0, "fail_after": 3}},
    )
    got = []
    with pytest.raises(openai.APIError) as raised:
        got.extend(stream)
    assert raised.value.message == FAILED_MESSAGE
    assert raised.value.code == "backend_error"
    assert raised.value.type == "server_error"
    job_id = stream.response.headers["x-tokencast-job"]
    assert content(got) == job_state(url, job_id)["text"]
    # On the wire: the error object with the done event's id, then the end (no [DONE]).
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events?format=openai") as response:
        raw = response.read().decode()
    error = {"message": FAILED_MESSAGE, "type": "server_error", "code": "backend_error"}
    assert raw.endswith(f"id: 5\ndata: {json.dumps({'error': error}, separators=(',', ':'))}\n\n")


def test_a_failed_job_without_streaming_is_502(client, url):
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(
            model="demo", messages=HELLO, extra_body={"demo": {"fail_after": 2, **FAST}}
        )
    assert raised.value.status_code == 502
    assert raised.value.code == "backend_error"
    assert raised.value.message.endswith(
        "the demo model failed after 2 tokens, as demo.fail_after asked"
    )
    job_id = raised.value.response.headers["x-tokencast-job"]
    assert job_state(url, job_id)["status"] == "failed"


# Keepalives between chunks: the official client must read through them.

KEEPALIVE_S = 0.2
PAUSED = {"tokens_per_second": 2}  # 0.5 s between tokens: two keepalives or more in each gap


@pytest.fixture(scope="module")
def paused_url(redis_url: str) -> Iterator[str]:
    """A web node and a worker whose streams send a keepalive after 0.2 s of quiet."""
    with Cluster(redis_url, keepalive_seconds=str(KEEPALIVE_S)) as cluster:
        web = cluster.web()
        cluster.worker()
        yield web.url


def demo_text(prompt: str, max_tokens: int) -> str:
    texts, _count, _finish = demo_tokens(
        JobSpec(prompt=prompt, model="demo", max_tokens=max_tokens)
    )
    return "".join(texts)


def test_the_sdk_reads_a_chat_stream_through_keepalives(paused_url):
    with openai.OpenAI(base_url=f"{paused_url}/v1", api_key="unused", max_retries=0) as sdk:
        stream = sdk.chat.completions.create(
            model="demo", messages=HELLO, max_tokens=4, stream=True, extra_body={"demo": PAUSED}
        )
        chunks = list(stream)  # raised JSONDecodeError at the first keepalive after an id:
    assert content(chunks) == demo_text("hello there", 4)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_the_sdk_decodes_the_openai_events_url_through_keepalives(paused_url):
    job_id = create_job(paused_url, prompt="keep me alive", max_tokens=4, demo=PAUSED)
    raw: list[bytes] = []

    def recorded(response: httpx.Response) -> Iterator[bytes]:
        for data in response.iter_bytes():
            raw.append(data)
            yield data

    chunks = []
    url = f"{paused_url}/v1/jobs/{job_id}/events?format=openai"
    with httpx.stream("GET", url, timeout=30) as response:
        for sse in SSEDecoder().iter_bytes(recorded(response)):
            if sse.data.startswith("[DONE]"):  # as openai.Stream reads it
                break
            chunks.append(ChatCompletionChunk.model_validate(sse.json()))
    assert content(chunks) == demo_text("keep me alive", 4) == job_state(paused_url, job_id)["text"]
    wire = b"".join(raw)
    assert wire.count(b": keepalive\n") >= 4  # the test saw the pauses it is about
    assert b": keepalive\n\n" not in wire
