"""``POST /v1/responses``'s body: validated, and turned into the job it asks for.

The conversation (``instructions``, then ``input``) becomes the job's
``messages`` in the chat format, Responses-style function tools and
``tool_choice`` become chat-style ones; the job is then validated like any
other (``validate_job``), its errors named as the Responses request names
the fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from web.models import (
    MAX_MESSAGES,
    MAX_TOOLS,
    ChatPart,
    Exact,
    InvalidField,
    JobRequest,
    PassedOn,
    describe,
    validate_job,
)

# Fields OpenAI defines for this request that tokencast accepts and ignores.
IGNORED_FIELDS = frozenset(
    {
        "access_programs",
        "background_options",
        "context_management",
        "conversation",
        "image",
        "include",
        "max_tool_calls",
        "moderation",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "stream_options",
        "text",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    }
)

RULES = {
    "model": "a string naming a model that GET /v1/models lists",
    "input": (
        "a string, or an array of 1 to 1,000 items: messages"
        ' ({"role": "user", "content": "…"}), function_call and function_call_output items'
    ),
    "input[].type": "one of: message, function_call, function_call_output, reasoning",
    "input[].role": "one of: user, assistant, system, developer",
    "input[].content": ('a string or an array of text parts ({"type": "input_text", "text": "…"})'),
    "input[].call_id": "a string",
    "input[].name": "a string",
    "input[].arguments": "a string (the call's arguments as JSON)",
    "input[].output": 'a string or an array of text parts ({"type": "input_text", "text": "…"})',
    "instructions": "a string",
    "max_output_tokens": "an integer from 1 to 32,768",
    "temperature": "a number from 0 to 2",
    "tools": (
        f"an array of at most {MAX_TOOLS} function tools such as"
        ' {"type": "function", "name": "get_weather", "parameters": {…}}'
        " (tokencast serves function tools only)"
    ),
    "tools[].type": '"function" (tokencast serves function tools only)',
    "tools[].name": "1 to 64 characters of a-z, A-Z, 0-9, _ and -",
    "tool_choice": (
        '"auto", "none", "required" or {"type": "function", "name": …} naming one of tools'
    ),
    "metadata": (
        "an object of at most 16 entries, with keys of 1 to 64 characters"
        " and string values of at most 512 characters"
    ),
    "stream": "true or false",
    "background": "true or false",
    "store": "true or false",
    "demo": "an object with the demo model's options",
}

# How the job's fields are named in this request.
RENAMED = {"max_tokens": "max_output_tokens", "messages": "input"}


class TextContent(ChatPart):
    type: Literal["input_text", "output_text"]
    text: str


Content = str | list[TextContent]


class MessageItem(ChatPart):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(ChatPart):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(ChatPart):
    type: Literal["function_call_output"]
    call_id: str
    output: Content


class ReasoningItem(ChatPart):
    """An earlier response's reasoning, sent back with its output: dropped."""

    type: Literal["reasoning"]


ITEMS: dict[str, type[ChatPart]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}

ToolName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionTool(PassedOn):
    type: Literal["function"]
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedChoice(Exact):
    type: Literal["function"]
    name: str


class ResponsesRequest(BaseModel):
    """The fields tokencast takes (``IGNORED_FIELDS`` are dropped first; others are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    input: str | Annotated[list[Any], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    metadata: dict[str, Any] | None = None
    stream: bool | None = None
    background: bool | None = None
    store: bool | None = None
    demo: dict[str, Any] | None = None


def parse_responses(body: dict[str, Any]) -> tuple[ResponsesRequest, JobRequest]:
    """The request and the job it asks for; raises ``InvalidField`` naming this request's field."""
    taken = {name: value for name, value in body.items() if name not in IGNORED_FIELDS}
    try:
        req = ResponsesRequest.model_validate(taken)
    except ValidationError as exc:
        raise describe(exc, RULES) from None
    fields: dict[str, Any] = {"messages": conversation(req.instructions, req.input)}
    if req.max_output_tokens is not None:
        fields["max_tokens"] = req.max_output_tokens
    if req.tools:
        fields["tools"] = [chat_tool(tool) for tool in req.tools]
    if req.tool_choice is not None:
        fields["tool_choice"] = chat_tool_choice(req.tool_choice)
    for name in ("model", "temperature", "metadata", "demo"):
        if getattr(req, name) is not None:
            fields[name] = getattr(req, name)
    try:
        return req, validate_job(fields)
    except InvalidField as exc:
        raise renamed(exc) from None


def conversation(instructions: str | None, given: str | list[Any] | None) -> list:
    """``instructions`` and ``input`` as chat messages (the system message first)."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    for index, raw in enumerate(given if isinstance(given, list) else []):
        item = input_item(index, raw)
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": chat_content(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # parallel calls: one message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            content = chat_content(item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": content})
    if not messages:
        raise InvalidField("input", f"input must be {RULES['input']}")
    return messages


def input_item(index: int, raw: Any) -> ChatPart:
    at = f"input[{index}]"
    if not isinstance(raw, dict):
        raise InvalidField(at, f"{at} must be an object: a message or a function_call item")
    kind = raw.get("type", "message")
    model = ITEMS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise InvalidField(f"{at}.type", f"{at}.type must be {RULES['input[].type']}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise describe(exc, RULES, ("input", index)) from None


def chat_content(content: Content) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": part.text} for part in content]


def chat_tool(tool: FunctionTool) -> dict[str, Any]:
    """``{"type": "function", "name", …}`` → ``{"type": "function", "function": {"name", …}}``."""
    function = tool.model_dump(exclude_unset=True)
    del function["type"]
    return {"type": "function", "function": function}


def chat_tool_choice(choice: str | NamedChoice) -> str | dict[str, Any]:
    if isinstance(choice, NamedChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


def responses_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A job's chat-style tool as the response object echoes it."""
    function = tool.get("function", {})
    return {
        "type": "function",
        "name": function.get("name"),
        "description": function.get("description"),
        "parameters": function.get("parameters"),
        "strict": function.get("strict"),
    }


def responses_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any]:
    if isinstance(choice, dict):
        return {"type": "function", "name": choice.get("function", {}).get("name")}
    return choice or "auto"


def renamed(exc: InvalidField) -> InvalidField:
    """A job field's error, with the field named as this request names it."""
    name = exc.field or ""
    for job_name, ours in RENAMED.items():
        if name == job_name or name.startswith((f"{job_name}[", f"{job_name}.")):
            name = ours + name[len(job_name) :]
            message = exc.message.replace(job_name, ours, 1)
            return InvalidField(name, message)
    if name.startswith("tools["):
        return InvalidField(name.replace(".function", ""), exc.message.replace(".function", ""))
    if name == "tool_choice":
        return InvalidField(name, exc.message.replace("the function", "the tool"))
    return exc
