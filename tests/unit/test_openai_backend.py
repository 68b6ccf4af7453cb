"""Configuring the upstream backend: its settings and which models it serves."""

import re

import pytest
from openai.types.chat import ChatCompletionChunk

from services.config import Settings
from services.errors import BackendError, SettingsError
from services.items import ToolCallFragment
from services.jobs import JobSpec
from worker.backends.base import Job, close_backends
from worker.backends.demo import DemoBackend
from worker.backends.openai import OpenAIBackend
from worker.main import backends_for


def test_upstream_timeouts_from_the_environment():
    settings = Settings.from_env(
        {
            "TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS": "90",
            "TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS": "2.5",
        }
    )
    assert settings.upstream_first_token_timeout_s == 90.0
    assert settings.upstream_idle_timeout_s == 2.5
    defaults = Settings.from_env({})
    assert (defaults.upstream_first_token_timeout_s, defaults.upstream_idle_timeout_s) == (60, 30)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS",
            "0",
            "TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS='0' must be at least 0.1",
        ),
        (
            "TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS",
            "soon",
            "TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS='soon' is not a valid float",
        ),
    ],
)
def test_bad_upstream_timeout_names_the_variable(variable, value, message):
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})
    assert str(raised.value) == message


def test_without_an_upstream_only_demo_is_served():
    backends = backends_for(Settings(upstream_models=(("qwen", "qwen-plus"),)))
    assert list(backends) == ["demo"]


def test_upstream_models_are_served_by_the_openai_backend():
    settings = Settings(
        upstream_base_url="http://127.0.0.1:11434/v1",
        upstream_models=(("llama", "llama3.2:1b"), ("demo", "shadowed"), ("qwen", "qwen-plus")),
    )
    backends = backends_for(settings)
    assert sorted(backends) == ["demo", "llama", "qwen"] == sorted(settings.models)
    assert isinstance(backends["demo"], DemoBackend)  # the upstream cannot take demo's name
    assert isinstance(backends["llama"], OpenAIBackend)
    assert backends["llama"] is backends["qwen"]  # one client, one connection pool


def backend(base_url: str = "http://127.0.0.1:8000/v1") -> OpenAIBackend:
    return OpenAIBackend(
        Settings(upstream_base_url=base_url, upstream_models=(("q", "qwen-plus"),))
    )


def test_the_upstream_request_of_a_prompt():
    generation = backend().generate(
        Job.from_spec("job", JobSpec(prompt="hi", model="q", max_tokens=9))
    )
    # temperature and seed are left to the upstream's defaults when the job sets none.
    assert generation.request == {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 9,
        "stream": True,
    }


def test_the_upstream_request_of_a_conversation_with_tools():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    spec = JobSpec(prompt=None, model="q", messages=messages, tools=tools, tool_choice="required")
    assert backend().generate(Job.from_spec("job", spec)).request == {
        "model": "qwen-plus",
        "messages": messages,
        "max_tokens": 256,
        "stream": True,
        "tools": tools,
        "tool_choice": "required",
    }


@pytest.mark.parametrize(
    ("base_url", "field"),
    [
        ("https://api.openai.com/v1", "max_completion_tokens"),
        ("https://my-team.openai.azure.com/openai/v1", "max_completion_tokens"),
        ("http://127.0.0.1:11434/v1", "max_tokens"),
        ("https://dashscope-intl.aliyuncs.com/compatible-mode/v1", "max_tokens"),
        ("https://api.openai.com.example.net/v1", "max_tokens"),
    ],
)
def test_the_answer_is_bounded_by_the_field_the_server_takes(base_url, field):
    request = (
        backend(base_url)
        .generate(Job.from_spec("job", JobSpec(prompt="hi", model="q", max_tokens=9)))
        .request
    )
    other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
    assert request[field] == 9
    assert other not in request


def upstream_chunk(**delta) -> ChatCompletionChunk:
    """A chunk as the client reads it off the wire: unknown delta fields kept."""
    choice = {"index": 0, "delta": delta, "finish_reason": None}
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return ChatCompletionChunk.model_validate({**head, "choices": [choice]})


def call(index: int, **fields) -> dict:
    return {"index": index, **fields}


def test_a_first_fragment_without_an_id_gets_one():
    generation = backend().generate(Job.from_spec("job", JobSpec(prompt="hi", model="q")))
    named = {"name": "get_weather", "arguments": '{"ci'}
    [fragment] = generation._items(upstream_chunk(tool_calls=[call(0, function=named)]))
    assert isinstance(fragment, ToolCallFragment)
    assert (fragment.index, fragment.name, fragment.arguments) == (0, "get_weather", '{"ci')
    assert fragment.id is not None and re.fullmatch(r"call_[0-9a-f]{24}", fragment.id)
    # Later fragments: arguments only, and none without arguments.
    later = [call(0, id="x", function=named), call(0, function={"arguments": ""})]
    assert generation._items(upstream_chunk(tool_calls=later)) == [ToolCallFragment(0, '{"ci')]


@pytest.mark.parametrize(
    ("fragment", "why"),
    [
        (
            call(0, id="call_1", function={"arguments": "{}"}),
            "a tool call's first fragment has no name",
        ),
        (
            call(0, id="call_1", function={"name": "get weather"}),
            "name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -",
        ),
        (
            call(128, id="call_1", function={"name": "f"}),
            "index must be an integer from 0 to 127",
        ),
    ],
)
def test_a_tool_call_the_log_cannot_take_fails_the_job(fragment, why):
    generation = backend().generate(Job.from_spec("job", JobSpec(prompt="hi", model="q")))
    with pytest.raises(BackendError) as raised:
        generation._items(upstream_chunk(tool_calls=[fragment]))
    assert raised.value.message.startswith(
        f"the upstream model server at http://127.0.0.1:8000/v1 sent a malformed chunk ({why}): {{"
    )


def test_reasoning_that_is_not_text_is_malformed():
    generation = backend().generate(Job.from_spec("job", JobSpec(prompt="hi", model="q")))
    with pytest.raises(BackendError, match=r"sent a malformed chunk: .*\"reasoning\":7"):
        generation._items(upstream_chunk(reasoning=7))


async def test_a_failing_close_is_logged_and_the_others_still_close(caplog):
    class Failing:
        async def aclose(self) -> None:
            raise RuntimeError("socket already gone")

    failing, upstream = Failing(), backend()
    await close_backends([failing, DemoBackend(), upstream])  # demo has no aclose
    assert upstream.client.is_closed()
    [record] = caplog.records
    assert record.getMessage() == f"closing backend {failing!r} failed"
    assert record.exc_info is not None and str(record.exc_info[1]) == "socket already gone"
