"""POST /v1/chat/completions: what it accepts, the job it asks for, and its errors in
OpenAI's shape. On the embedded broker, with no worker (fast, no Redis)."""

import json

import pytest

from services.config import Settings
from services.jobs import JobSpec
from services.redisconn import EmbeddedBroker
from tests.fakes.upstream import CONVERSATION, WEATHER
from web.api import spec_from
from web.app import create_app
from web.models import InvalidField
from web.openai import parse_chat
from worker.backends.demo import demo_tokens

USER = {"role": "user", "content": "hello"}


@pytest.fixture
async def client():
    settings = Settings(
        max_queued_jobs=1,
        upstream_base_url="http://127.0.0.1:9/v1",
        upstream_models=(("qwen", "qwen-plus"),),
    )
    app = create_app(settings, EmbeddedBroker())
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def post(client, body, content_type="application/json"):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    response = await client.post(
        "/v1/chat/completions", data=data, headers={"Content-Type": content_type}
    )
    return response.status_code, await response.get_json()


TURNS = [*CONVERSATION, {"role": "user", "content": "and again", "name": "ann"}]


def test_messages_tools_and_tool_choice_reach_the_job_as_sent():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    _chat, job = parse_chat({"messages": TURNS, "tools": [WEATHER], "tool_choice": choice})
    spec = spec_from(job, "demo")
    assert spec.prompt is None
    assert spec.messages == TURNS
    assert spec.tools == [WEATHER]
    assert spec.tool_choice == choice


def test_fields_openai_defines_and_tokencast_does_not_take_are_left_out():
    assistant = {"role": "assistant", "content": "Hi", "refusal": None, "tool_calls": None}
    _chat, job = parse_chat({"messages": [USER, assistant, USER]})
    assert spec_from(job, "demo").messages == [USER, {"role": "assistant", "content": "Hi"}, USER]


def test_the_demo_model_answers_the_last_user_message():
    _chat, job = parse_chat({"messages": TURNS, "max_tokens": 20, "seed": 3})
    conversation = spec_from(job, "demo")
    prompt = JobSpec(prompt="and again", model="demo", max_tokens=20, seed=3)
    assert list(demo_tokens(conversation)[0]) == list(demo_tokens(prompt)[0])
    parts = JobSpec(prompt=None, model="demo", messages=CONVERSATION[:2])
    assert "".join(demo_tokens(parts)[0]).startswith("You asked: How warm is it in Paris?\n\n")


def test_openai_fields_and_extensions_become_the_job():
    chat, job = parse_chat(
        {
            "model": "demo",
            "messages": [{"role": "developer", "content": "x", "name": "ignored"}, USER],
            "max_completion_tokens": 12,
            "temperature": 0.2,
            "seed": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
            "metadata": {"run": "7"},
            "demo": {"tokens_per_second": 0},
            # OpenAI's other optional fields are ignored.
            "n": 1,
            "top_p": 0.9,
            "user": "someone",
            "response_format": {"type": "text"},
            "logprobs": False,
            "presence_penalty": 0,
            "store": False,
        }
    )
    assert chat.stream is True and chat.stream_options.include_usage is True
    assert (job.prompt, job.model, job.max_tokens) == (None, "demo", 12)
    assert [message.role for message in job.messages] == ["developer", "user"]
    assert (job.temperature, job.seed, job.metadata) == (0.2, 5, {"run": "7"})
    assert job.demo.tokens_per_second == 0


def test_null_fields_mean_their_defaults():
    chat, job = parse_chat(
        {"messages": [USER], "max_tokens": None, "temperature": None, "stream": None, "seed": None}
    )
    assert (chat.stream, job.model, job.max_tokens, job.temperature) == (None, None, 256, None)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({}, "messages", "messages is required"),
        ({"messages": "hi"}, "messages", "messages must be an array of 1 to 1,000 messages"),
        (
            {"messages": [{"content": "x"}]},
            "messages[0].role",
            "messages[0].role is required",
        ),
        (
            {"messages": [{"role": "function", "content": "x"}]},
            "messages[0].role",
            "messages[0].role must be one of: system, developer, user, assistant, tool",
        ),
        (
            {"messages": [USER, {"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[1].content",
            'messages[1].content must be a string or an array of text parts ({"type": "text",',
        ),
        ({"messages": [USER], "stream": "yes"}, "stream", "stream must be true or false"),
        (
            {"messages": [USER], "stream_options": True},
            "stream_options",
            'stream_options must be an object such as {"include_usage": true}',
        ),
        (
            {"messages": [USER], "max_completion_tokens": 40_000},
            "max_completion_tokens",
            "max_completion_tokens must be an integer from 1 to 32,768",
        ),
        (
            {"messages": [USER], "metadata": {"k": 1}},
            "metadata",
            "metadata must be an object of at most 16 entries",
        ),
        (
            {"messages": [{"role": "user", "content": "a" * 400_001}]},
            "messages",
            "messages must have at most 400,000 characters of text in all (got 400,001)",
        ),
        (
            {"messages": [USER], "tool_choice": "any"},
            "tool_choice",
            'tool_choice must be "auto", "none", "required" or',
        ),
    ],
)
def test_bad_fields_are_named_with_their_rule(body, param, message):
    with pytest.raises(InvalidField) as raised:
        parse_chat(body)
    assert raised.value.field == param
    assert raised.value.message.startswith(message)


async def test_errors_are_in_openai_shape(client):
    status, body = await post(client, {"model": "demo", "messages": [], "max_tokens": 5})
    assert status == 400
    assert body == {
        "error": {
            "message": 'messages must be an array of 1 to 1,000 messages such as {"role": "user",'
            ' "content": "hello"}',
            "type": "invalid_request_error",
            "param": "messages",
            "code": "invalid_request",
        }
    }


async def test_unknown_model_is_404_model_not_found(client):
    status, body = await post(client, {"model": "gpt-9", "messages": [USER]})
    assert status == 404
    assert body["error"] == {
        "message": "model 'gpt-9' does not exist; GET /v1/models lists: demo, qwen",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


async def test_demo_options_for_another_model_are_400(client):
    status, body = await post(client, {"model": "qwen", "messages": [USER], "demo": {}})
    assert status == 400
    assert body["error"]["param"] == "demo"
    assert body["error"]["message"] == "demo options apply to the demo model only"


async def test_body_and_content_type_errors(client):
    status, body = await post(client, "{bad")
    assert (status, body["error"]["message"]) == (400, "the request body is not valid JSON")
    status, body = await post(client, {"messages": [USER]}, content_type="text/plain")
    assert (status, body["error"]["type"]) == (415, "invalid_request_error")
    status, body = await post(client, b'{"messages": "' + b"a" * (1024 * 1024) + b'"}')
    assert (status, body["error"]["code"]) == (413, "body_too_large")


async def test_full_queue_is_429_rate_limit_error(client):
    response = await client.post("/v1/jobs", json={"prompt": "x"})  # fills the queue of one
    assert response.status_code == 201
    response = await client.post("/v1/chat/completions", json={"messages": [USER]})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "5"
    error = (await response.get_json())["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "queue_full"
    assert error["message"].startswith("1 jobs are already waiting for a worker")


async def test_format_openai_rejects_a_bad_include_usage(client):
    response = await client.post("/v1/jobs", json={"prompt": "x"})
    job_id = (await response.get_json())["id"]
    response = await client.get(f"/v1/jobs/{job_id}/events?format=openai&include_usage=yes")
    assert response.status_code == 400
    assert (await response.get_json())["error"]["message"] == "include_usage must be true or false"
