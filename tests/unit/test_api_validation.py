"""Every rule of POST /v1/jobs, checked on the embedded broker (fast, no Redis)."""

import json

import pytest

from services.config import Settings
from services.redisconn import EmbeddedBroker
from web.app import create_app


@pytest.fixture
async def client():
    app = create_app(Settings(max_queued_jobs=3), EmbeddedBroker())
    async with app.test_app() as test_app:
        yield test_app.test_client()


async def post(client, body: str | bytes, content_type="application/json"):
    response = await client.post("/v1/jobs", data=body, headers={"Content-Type": content_type})
    return response.status_code, await response.get_json()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{bad", 400, "the request body is not valid JSON"),
        ("[1]", 400, "the request body must be a JSON object"),
        ('{"prompt": "x", "temperature": NaN}', 400, "the request body is not valid JSON"),
        ("{}", 400, "give exactly one of prompt and messages (got neither)"),
        ('{"prompt": ""}', 400, "prompt must be a string of 1 to 100,000 characters"),
        ('{"prompt": 5}', 400, "prompt must be a string of 1 to 100,000 characters"),
        ('{"prompt": "x", "max_tokens": 0}', 400, "max_tokens must be an integer from 1 to 32,768"),
        (
            '{"prompt": "x", "max_tokens": -1}',
            400,
            "max_tokens must be an integer from 1 to 32,768",
        ),
        (
            '{"prompt": "x", "max_tokens": 1000000000}',
            400,
            "max_tokens must be an integer from 1 to 32,768",
        ),
        (
            '{"prompt": "x", "max_tokens": "ten"}',
            400,
            "max_tokens must be an integer from 1 to 32,768",
        ),
        (
            '{"prompt": "x", "max_tokens": true}',
            400,
            "max_tokens must be an integer from 1 to 32,768",
        ),
        (
            '{"prompt": "x", "max_tokens": 5.0}',
            400,
            "max_tokens must be an integer from 1 to 32,768",
        ),
        ('{"prompt": "x", "temperature": 2.5}', 400, "temperature must be a number from 0 to 2"),
        ('{"prompt": "x", "temperature": "hot"}', 400, "temperature must be a number from 0 to 2"),
        ('{"prompt": "x", "seed": "s"}', 400, "seed must be an integer from"),
        ('{"prompt": "x", "metadata": {"a": 1}}', 400, "metadata must be an object of at most 16"),
        ('{"prompt": "x", "metadata": {"": "v"}}', 400, "metadata must be an object of at most 16"),
        ('{"prompt": "x", "metadata": []}', 400, "metadata must be an object of at most 16"),
        (
            '{"prompt": "x", "demo": {"tokens_per_second": -1}}',
            400,
            "demo.tokens_per_second must be a number from 0 to 10,000",
        ),
        (
            '{"prompt": "x", "demo": {"tokens_per_second": 10001}}',
            400,
            "demo.tokens_per_second must be a number from 0 to 10,000",
        ),
        (
            '{"prompt": "x", "demo": {"fail_after": -1}}',
            400,
            "demo.fail_after must be an integer of at least 0",
        ),
        ('{"prompt": "x", "demo": {"speed": 1}}', 400, "unknown field 'demo.speed'"),
        ('{"prompt": "x", "foo": 1}', 400, "unknown field 'foo'"),
        (
            '{"prompt": "x", "model": "gpt-9"}',
            404,
            "model 'gpt-9' does not exist; GET /v1/models lists: demo",
        ),
    ],
)
async def test_bad_job_requests(client, body, status, message):
    got_status, got = await post(client, body)
    assert got_status == status
    assert got["error"]["message"].startswith(message)


async def test_error_names_the_field(client):
    _, body = await post(client, '{"prompt": "x", "max_tokens": 0}')
    assert body == {
        "error": {
            "code": "invalid_request",
            "message": "max_tokens must be an integer from 1 to 32,768",
            "param": "max_tokens",
        }
    }


async def test_oversize_prompt_and_metadata_limits(client):
    status, body = await post(client, '{"prompt": "' + "a" * 100_001 + '"}')
    assert (status, body["error"]["param"]) == (400, "prompt")
    status, _ = await post(client, '{"prompt": "' + "a" * 100_000 + '"}')
    assert status == 201
    many = ", ".join(f'"k{i}": "v"' for i in range(17))
    status, body = await post(client, '{"prompt": "x", "metadata": {' + many + "}}")
    assert (status, body["error"]["param"]) == (400, "metadata")


async def test_body_over_one_mib_is_413(client):
    status, body = await post(client, b'{"prompt": "' + b"a" * (1024 * 1024) + b'"}')
    assert status == 413
    assert body["error"]["message"] == "the request body is larger than 1048576 bytes (1 MiB)"


async def test_wrong_content_type_is_415(client):
    status, body = await post(client, '{"prompt": "x"}', content_type="text/plain")
    assert status == 415
    assert body["error"]["message"] == "Content-Type must be application/json"


async def test_wrong_method_is_405_with_allow(client):
    response = await client.put("/v1/jobs")
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) >= {"POST"}
    assert (await response.get_json())["error"]["code"] == "method_not_allowed"


async def test_full_queue_is_429_with_retry_after(client):
    for _ in range(3):
        assert (await post(client, '{"prompt": "x"}'))[0] == 201
    response = await client.post("/v1/jobs", json={"prompt": "x"})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "5"
    assert "3 jobs are already waiting" in (await response.get_json())["error"]["message"]


async def test_created_job_shape(client):
    response = await client.post("/v1/jobs", json={"prompt": "hi", "metadata": {"team": "a"}})
    body = await response.get_json()
    assert response.status_code == 201
    assert response.headers["Location"] == f"/v1/jobs/{body['id']}"
    assert len(body["id"]) == 22
    assert body == {
        "id": body["id"],
        "status": "queued",
        "model": "demo",
        "created_at": body["created_at"],
        "events_url": f"/v1/jobs/{body['id']}/events",
        "watch_url": f"/watch/{body['id']}",
        "viewer_token": None,
    }
    state = await (await client.get(f"/v1/jobs/{body['id']}")).get_json()
    assert state["metadata"] == {"team": "a"}
    assert state["status"] == "queued"
    assert state["last_event_id"] == "0"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/nope",
        "/v1/jobs/" + "A" * 5000,
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
        "/v1/jobs/%0D%0Ax",
    ],
)
async def test_unknown_or_malformed_job_ids_are_404(client, path):
    for suffix in ("", "/events"):
        response = await client.get(path + suffix)
        assert response.status_code == 404
        assert (await response.get_json())["error"]["code"] in ("job_not_found", "not_found")


async def test_models_list(client):
    body = await (await client.get("/v1/models")).get_json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["demo"]
    assert body["data"][0]["object"] == "model"


USER = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
ASKED = {"role": "assistant", "content": None, "tool_calls": [CALL]}
ANSWERED = {"role": "tool", "tool_call_id": "call_1", "content": "18C"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
CONTENT_RULE = 'must be a string or an array of text parts ({"type": "text", "text": "…"})'
NULL_CONTENT = f"{CONTENT_RULE} (null only for an assistant message with tool_calls)"
MESSAGES_RULE = (
    'messages must be an array of 1 to 1,000 messages such as {"role": "user", "content": "hello"}'
)
TOOLS_RULE = (
    "tools must be an array of at most 128 function tools such as"
    ' {"type": "function", "function": {"name": "get_weather"}}'
)
NAME_RULE = "must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -"
CHOICE_RULE = (
    'tool_choice must be "auto", "none", "required" or'
    ' {"type": "function", "function": {"name": …}} naming one of tools'
)


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {"prompt": "x", "messages": [USER]},
            "prompt",
            "give exactly one of prompt and messages (got both)",
        ),
        ({"messages": []}, "messages", MESSAGES_RULE),
        ({"messages": [USER] * 1001}, "messages", MESSAGES_RULE),
        ({"messages": {"role": "user"}}, "messages", MESSAGES_RULE),
        (
            {"messages": [USER, USER, {"role": "user", "content": 5}]},
            "messages[2].content",
            f"messages[2].content {CONTENT_RULE}",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
            "messages[0].content",
            f"messages[0].content {CONTENT_RULE}",
        ),
        (
            {"messages": [{"role": "user", "content": None}]},
            "messages[0].content",
            f"messages[0].content {NULL_CONTENT}",
        ),
        (
            {"messages": [USER, {"role": "assistant"}]},
            "messages[1].content",
            f"messages[1].content {NULL_CONTENT}",
        ),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "messages[0].role is required"),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "messages[0].role must be one of: system, developer, user, assistant, tool",
        ),
        (
            {"messages": [{**USER, "name": 5}]},
            "messages[0].name",
            "messages[0].name must be a string",
        ),
        (
            {"messages": [USER, {**ASKED, "tool_calls": []}]},
            "messages[1].tool_calls",
            'messages[1].tool_calls must be a non-empty array of calls such as {"id": "call_1",'
            ' "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}',
        ),
        (
            {
                "messages": [
                    USER,
                    {**ASKED, "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}]},
                ]
            },
            "messages[1].tool_calls",
            'messages[1].tool_calls must be a non-empty array of calls such as {"id": "call_1",'
            ' "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}',
        ),
        (
            {"messages": [{**USER, "tool_calls": [CALL]}]},
            "messages[0].tool_calls",
            "messages[0].tool_calls is for assistant messages only",
        ),
        (
            {"messages": [USER, ASKED, {"role": "tool", "content": "18C"}]},
            "messages[2].tool_call_id",
            "messages[2].tool_call_id is required in a tool message",
        ),
        (
            {"messages": [USER, ASKED, {**ANSWERED, "tool_call_id": 1}]},
            "messages[2].tool_call_id",
            "messages[2].tool_call_id must be a string",
        ),
        (
            {"messages": [{**USER, "tool_call_id": "call_1"}]},
            "messages[0].tool_call_id",
            "messages[0].tool_call_id is for tool messages only",
        ),
        (
            {
                "messages": [
                    {"role": "system", "content": "a" * 200_000},
                    {"role": "user", "content": [{"type": "text", "text": "b" * 200_001}]},
                ]
            },
            "messages",
            "messages must have at most 400,000 characters of text in all (got 400,001)",
        ),
        ({"prompt": "x", "tools": [TOOL] * 129}, "tools", TOOLS_RULE),
        ({"prompt": "x", "tools": [{"type": "retrieval"}]}, "tools", TOOLS_RULE),
        (
            {"prompt": "x", "tools": [named("get weather")]},
            "tools[0].function.name",
            f"tools[0].function.name {NAME_RULE}",
        ),
        (
            {"prompt": "x", "tools": [TOOL, named("a" * 65)]},
            "tools[1].function.name",
            f"tools[1].function.name {NAME_RULE}",
        ),
        (
            {"prompt": "x", "tools": [named("")]},
            "tools[0].function.name",
            f"tools[0].function.name {NAME_RULE}",
        ),
        ({"prompt": "x", "tool_choice": "any"}, "tool_choice", CHOICE_RULE),
        ({"prompt": "x", "tool_choice": {"type": "function"}}, "tool_choice", CHOICE_RULE),
        (
            {"prompt": "x", "tools": [TOOL], "tool_choice": named("get_time")},
            "tool_choice",
            "tool_choice names the function 'get_time', which is not in tools",
        ),
        (
            {"prompt": "x", "tool_choice": named("get_weather")},
            "tool_choice",
            "tool_choice names the function 'get_weather', which is not in tools",
        ),
    ],
)
async def test_bad_conversations_name_the_message_and_field(client, body, param, message):
    status, got = await post(client, json.dumps(body))
    assert status == 400
    assert got["error"] == {"code": "invalid_request", "message": message, "param": param}


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "system", "content": "Be brief."}, USER, ASKED, ANSWERED]},
        {"messages": [USER, {"role": "assistant", "tool_calls": [CALL]}, ANSWERED]},
        {
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "hi"}], "name": "d"}
            ]
        },
        {"messages": [USER] * 1000},
        {"messages": [{"role": "user", "content": "a" * 400_000}]},
        {"messages": [USER], "tools": [TOOL] * 128, "tool_choice": named("get_weather")},
        {"prompt": "x", "tools": [named("a" * 64)], "tool_choice": "required"},
        {"prompt": "x", "tool_choice": "none"},
        {"prompt": "x", "tools": [], "tool_choice": "auto"},
    ],
)
async def test_good_conversations_are_accepted(client, body):
    status, got = await post(client, json.dumps(body))
    assert status == 201, got


WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    ("demo", "tools", "field", "message"),
    [
        (
            {"reasoning_tokens": 4097},
            None,
            "demo.reasoning_tokens",
            "demo.reasoning_tokens must be an integer from 0 to 4,096",
        ),
        (
            {"reasoning_tokens": -1},
            None,
            "demo.reasoning_tokens",
            "demo.reasoning_tokens must be an integer from 0 to 4,096",
        ),
        (
            {"reasoning_tokens": 1.5},
            None,
            "demo.reasoning_tokens",
            "demo.reasoning_tokens must be an integer from 0 to 4,096",
        ),
        (
            {"tool_call": "get_weather"},
            None,
            "demo.tool_call",
            'demo.tool_call must be an object such as {"name": "get_weather",'
            ' "arguments": {"city": "Paris"}}',
        ),
        (
            {"tool_call": {"name": "get weather", "arguments": {}}},
            None,
            "demo.tool_call.name",
            "demo.tool_call.name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -",
        ),
        (
            {"tool_call": {"name": "get_weather", "arguments": "{}"}},
            None,
            "demo.tool_call.arguments",
            "demo.tool_call.arguments must be an object (the call's arguments)",
        ),
        (
            {"tool_call": {"name": "get_weather"}},
            None,
            "demo.tool_call.arguments",
            "demo.tool_call.arguments is required",
        ),
        (
            {"tool_call": {"name": "get_weather", "arguments": {}, "id": "x"}},
            None,
            "demo.tool_call.id",
            "unknown field 'demo.tool_call.id'",
        ),
        (
            {"tool_call": {"name": "get_time", "arguments": {}}},
            [WEATHER],
            "demo.tool_call.name",
            "demo.tool_call.name names the function 'get_time', which is not in tools",
        ),
    ],
)
async def test_bad_demo_reasoning_and_tool_call_options(client, demo, tools, field, message):
    body = {"prompt": "x", "demo": demo}
    if tools is not None:
        body["tools"] = tools
    status, got = await post(client, json.dumps(body))
    assert status == 400
    assert got["error"]["message"] == message
    assert got["error"]["param"] == field


async def test_good_demo_reasoning_and_tool_call_options_are_accepted(client):
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    for body in (
        {"prompt": "x", "demo": {"reasoning_tokens": 4096, "tool_call": call}},
        {"prompt": "x", "tools": [WEATHER], "demo": {"reasoning_tokens": 0, "tool_call": call}},
    ):
        status, _ = await post(client, json.dumps(body))
        assert status == 201, body
