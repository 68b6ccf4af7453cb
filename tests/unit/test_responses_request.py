"""``POST /v1/responses``'s body: the job it asks for, and its errors (API.md, "OpenAI Responses API")."""

from __future__ import annotations

import pytest

from web.models import InvalidField
from web.responses_request import (
    IGNORED_FIELDS,
    parse_responses,
    responses_tool,
    responses_tool_choice,
)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


def test_a_string_input_with_instructions_is_a_system_and_a_user_message():
    req, job = parse_responses(
        {"model": "demo", "input": "hello", "instructions": "Be terse.", "max_output_tokens": 40}
    )
    assert [m.as_sent() for m in job.messages or []] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hello"},
    ]
    assert job.max_tokens == 40
    assert job.model == "demo"
    assert req.stream is None and req.background is None


def test_items_become_the_conversation_with_tool_calls_and_results():
    _, job = parse_responses(
        {
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
                },
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                 "arguments": '{"city": "Paris"}', "id": "fc_1", "status": "completed"},
                {"type": "function_call", "call_id": "call_2", "name": "get_weather",
                 "arguments": '{"city": "Lyon"}'},
                {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
                {"type": "function_call_output", "call_id": "call_2", "output": "20C"},
            ],
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"},
        }
    )  # fmt: skip
    assert [m.as_sent() for m in job.messages or []] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Checking."}],
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "20C"},
    ]  # fmt: skip
    assert [tool.model_dump(exclude_unset=True) for tool in job.tools or []] == [
        {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    ]
    assert job.tool_choice is not None
    assert job.tool_choice.model_dump() == {"type": "function", "function": {"name": "get_weather"}}


def test_a_call_without_an_assistant_message_before_it_gets_one():
    _, job = parse_responses(
        {
            "input": [
                {"role": "user", "content": "hi"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            ]
        }
    )
    assert (job.messages or [])[1].as_sent() == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }


def test_tools_and_tool_choice_echo_back_in_responses_style():
    _, job = parse_responses({"input": "hi", "tools": [WEATHER], "tool_choice": "required"})
    chat_tool = (job.tools or [])[0].model_dump(exclude_unset=True)
    assert responses_tool(chat_tool) == WEATHER
    assert responses_tool_choice({"type": "function", "function": {"name": "x"}}) == {
        "type": "function",
        "name": "x",
    }
    assert responses_tool_choice(None) == "auto"
    assert job.tool_choice == "required"


def test_openai_fields_tokencast_does_not_use_are_accepted():
    body = {name: None for name in IGNORED_FIELDS}
    body.update({"input": "hi", "top_p": 0.5, "reasoning": {"effort": "low"}, "store": False})
    parse_responses({**body, "stream": True, "background": True, "metadata": {"a": "b"}})
    assert {"top_p", "reasoning", "previous_response_id", "text", "user"} <= IGNORED_FIELDS


def test_demo_options_pass_through():
    _, job = parse_responses({"input": "hi", "demo": {"tokens_per_second": 0, "fail_after": 3}})
    assert job.demo is not None and job.demo.fail_after == 3


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"input": "hi", "frobnicate": 1}, "frobnicate", "unknown field 'frobnicate'"),
        ({}, "input", "input must be a string, or an array of 1 to 1,000 items"),
        ({"input": []}, "input", "input must be a string, or an array of 1 to 1,000 items"),
        ({"input": 3}, "input", "input must be a string, or an array"),
        ({"input": ["hi"]}, "input[0]", "input[0] must be an object"),
        ({"input": [{"type": "input_image"}]}, "input[0].type", "input[0].type must be one of"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role", "input[0].role must be one of"),
        ({"input": [{"role": "user"}]}, "input[0].content", "input[0].content is required"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "url": "x"}]}]},
            "input[0].content",
            "input[0].content must be a string or an array of text parts",
        ),
        (
            {"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
            "input[0].arguments",
            "input[0].arguments is required",
        ),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens must be an integer from 1 to 32,768"),
        ({"input": "hi", "temperature": 3}, "temperature", "temperature must be a number from 0 to 2"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type", "tools[0].type must be \"function\""),
        ({"input": "hi", "tools": [{**WEATHER, "name": "bad name"}]}, "tools[0].name", "tools[0].name must be 1 to 64"),
        ({"input": "hi", "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
        (
            {"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}},
            "tool_choice",
            "tool_choice names the tool 'other', which is not in tools",
        ),
        ({"input": "hi", "metadata": {"k": 1}}, "metadata", "metadata must be an object of at most 16"),
        ({"input": "hi", "stream": "yes"}, "stream", "stream must be true or false"),
        ({"input": "hi", "demo": {"fail_after": -1}}, "demo.fail_after", "demo.fail_after must be"),
        ({"input": "x" * 400_001}, "input", "input must have at most 400,000 characters"),
    ],
)  # fmt: skip
def test_errors_name_the_field_as_this_request_names_it(body, field, message):
    with pytest.raises(InvalidField) as caught:
        parse_responses(body)
    assert caught.value.field == field
    assert caught.value.message.startswith(message), caught.value.message
