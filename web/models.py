"""Request bodies, validated strictly, with errors that name the field and its rule."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

MAX_BODY_BYTES = 1024 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_MESSAGES = 1_000
MAX_MESSAGES_TEXT = 400_000  # characters of content, all messages together
MAX_TOOLS = 128
ROLES = ("system", "developer", "user", "assistant", "tool")

M = TypeVar("M", bound=BaseModel)

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class DemoToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    arguments: dict[str, Any]


class DemoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tokens_per_second: float = Field(20.0, ge=0, le=10_000, allow_inf_nan=False)
    fail_after: int | None = Field(None, ge=0)
    reasoning_tokens: int = Field(0, ge=0, le=4_096)
    tool_call: DemoToolCall | None = None


# A conversation in OpenAI's chat format. Fields OpenAI defines that tokencast
# does not take (``refusal``, ``audio``, …) are ignored, so a client may send
# back the messages it was answered with.


class ChatPart(BaseModel):
    """Ignores the fields it does not declare."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(ChatPart):
    type: Literal["text"]
    text: str


class FunctionCall(ChatPart):
    name: str
    arguments: str


class ToolCall(ChatPart):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(ChatPart):
    """One message; the rules between its fields are ``check_message``'s."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, min_length=1)
    tool_call_id: str | None = None

    def text_length(self) -> int:
        if isinstance(self.content, list):
            return sum(len(part.text) for part in self.content)
        return len(self.content or "")

    def as_sent(self) -> dict[str, Any]:
        """The message as the client sent it, less ignored fields and nulls (``content`` kept)."""
        sent = self.model_dump(exclude_unset=True)
        return {key: value for key, value in sent.items() if value is not None or key == "content"}


ToolName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class PassedOn(BaseModel):
    """Keeps the fields it does not declare: a tool goes upstream as it was sent."""

    model_config = ConfigDict(extra="allow", strict=True)


class FunctionTool(PassedOn):
    name: ToolName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(PassedOn):
    type: Literal["function"]
    function: FunctionTool


class Exact(BaseModel):
    """Refuses the fields it does not declare."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NamedFunction(Exact):
    name: str


class NamedToolChoice(Exact):
    type: Literal["function"]
    function: NamedFunction


class JobRequest(BaseModel):
    """The body of ``POST /v1/jobs`` (API.md, "Jobs"); ``validate_job`` checks it whole."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = Field(None, min_length=1, max_length=100_000)
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    model: str | None = Field(None, min_length=1, max_length=200)
    max_tokens: int = Field(256, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=16)
    demo: DemoOptions | None = None
    producer: Literal["worker", "external"] = "worker"


# The rule of each field, as the error message states it.
RULES = {
    "prompt": "a string of 1 to 100,000 characters",
    "messages": (
        f'an array of 1 to {MAX_MESSAGES:,} messages such as {{"role": "user", "content": "hello"}}'
    ),
    "messages[].role": f"one of: {', '.join(ROLES)}",
    "messages[].content": 'a string or an array of text parts ({"type": "text", "text": "…"})',
    "messages[].name": "a string",
    "messages[].tool_calls": (
        'a non-empty array of calls such as {"id": "call_1", "type": "function",'
        ' "function": {"name": "get_weather", "arguments": "{}"}}'
    ),
    "messages[].tool_call_id": "a string",
    "tools": (
        f"an array of at most {MAX_TOOLS} function tools such as"
        ' {"type": "function", "function": {"name": "get_weather"}}'
    ),
    "tools[].function.name": "1 to 64 characters of a-z, A-Z, 0-9, _ and -",
    "tool_choice": (
        '"auto", "none", "required" or {"type": "function", "function": {"name": …}}'
        " naming one of tools"
    ),
    "model": "a string naming a model that GET /v1/models lists",
    "producer": '"worker" or "external"',
    "max_tokens": "an integer from 1 to 32,768",
    "max_completion_tokens": "an integer from 1 to 32,768",
    "temperature": "a number from 0 to 2",
    "seed": f"an integer from {INT64_MIN} to {INT64_MAX}",
    "metadata": (
        "an object of at most 16 entries, with keys of 1 to 64 characters"
        " and string values of at most 512 characters"
    ),
    "demo": (
        "an object with the demo model's options"
        " (tokens_per_second, fail_after, reasoning_tokens, tool_call)"
    ),
    "demo.tokens_per_second": "a number from 0 to 10,000",
    "demo.fail_after": "an integer of at least 0",
    "demo.reasoning_tokens": "an integer from 0 to 4,096",
    "demo.tool_call": ('an object such as {"name": "get_weather", "arguments": {"city": "Paris"}}'),
    "demo.tool_call.name": "1 to 64 characters of a-z, A-Z, 0-9, _ and -",
    "demo.tool_call.arguments": "an object (the call's arguments)",
}


class InvalidField(ValueError):
    """A request field breaks its rule; ``field`` is its dotted path."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; raises ``InvalidField`` otherwise."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise InvalidField(None, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidField(None, "the request body must be a JSON object")
    return body


def validate(model: type[M], body: dict[str, Any]) -> M:
    """Validate ``body``; raises ``InvalidField`` describing the first error."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise describe(exc) from None


def describe(
    exc: ValidationError, rules: dict[str, str] = RULES, prefix: tuple[int | str, ...] = ()
) -> InvalidField:
    """The first error, named by its path under ``prefix``, stated by its rule in ``rules``."""
    error = exc.errors()[0]
    loc = prefix + tuple(error["loc"])
    dotted = field_path(loc)
    if error["type"] == "extra_forbidden":
        return InvalidField(dotted, f"unknown field {dotted!r}")
    if error["type"] == "missing":
        return InvalidField(dotted, f"{dotted} is required")
    for end in range(len(loc), 0, -1):
        rule = rules.get(field_path(loc[:end], indices=False))
        if rule is not None:
            field = field_path(loc[:end])
            return InvalidField(field, f"{field} must be {rule}")
    return InvalidField(dotted, f"{dotted}: {error['msg']}")


def field_path(loc: tuple[int | str, ...], indices: bool = True) -> str:
    """``("messages", 2, "content")`` → ``messages[2].content`` (``messages[].content``)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]" if indices else "[]"
        else:
            path += f".{part}" if path else part
    return path


def validate_job(body: dict[str, Any]) -> JobRequest:
    """``POST /v1/jobs``'s body, with the rules between fields; raises ``InvalidField``."""
    job = validate(JobRequest, body)
    if job.producer == "external":
        check_external(job)
    elif (job.prompt is None) == (job.messages is None):
        given = "both" if job.prompt is not None else "neither"
        raise InvalidField("prompt", f"give exactly one of prompt and messages (got {given})")
    if job.messages is not None:
        for index, message in enumerate(job.messages):
            check_message(index, message)
        text = sum(message.text_length() for message in job.messages)
        if text > MAX_MESSAGES_TEXT:
            raise InvalidField(
                "messages",
                f"messages must have at most {MAX_MESSAGES_TEXT:,} characters of text"
                f" in all (got {text:,})",
            )
    demo_call = job.demo.tool_call if job.demo else None
    if demo_call is not None and job.tools is not None:
        if demo_call.name not in {tool.function.name for tool in job.tools}:
            raise InvalidField(
                "demo.tool_call.name",
                f"demo.tool_call.name names the function {demo_call.name!r}, which is not in tools",
            )
    if isinstance(job.tool_choice, NamedToolChoice):
        name = job.tool_choice.function.name
        if name not in {tool.function.name for tool in job.tools or []}:
            raise InvalidField(
                "tool_choice", f"tool_choice names the function {name!r}, which is not in tools"
            )
    return job


MAX_LABEL_CHARS = 128


def check_external(job: JobRequest) -> None:
    """An external job: ``prompt`` and ``messages`` are for the record (at most
    one of them), and ``model`` is a free label."""
    if job.prompt is not None and job.messages is not None:
        raise InvalidField("prompt", "give at most one of prompt and messages (got both)")
    label = job.model
    if label is not None and not (len(label) <= MAX_LABEL_CHARS and label.isprintable()):
        raise InvalidField(
            "model",
            f"model must be a label of 1 to {MAX_LABEL_CHARS} printable characters"
            " for an external job",
        )
    if job.demo is not None:
        raise InvalidField("demo", "demo options apply to the demo model's worker jobs only")


def check_message(index: int, message: Message) -> None:
    """The rules between a message's fields, which depend on its role."""
    at = f"messages[{index}]"
    assistant, tool = message.role == "assistant", message.role == "tool"
    if message.content is None and not (assistant and message.tool_calls):
        raise InvalidField(
            f"{at}.content",
            f"{at}.content must be {RULES['messages[].content']}"
            " (null only for an assistant message with tool_calls)",
        )
    if message.tool_calls is not None and not assistant:
        raise InvalidField(f"{at}.tool_calls", f"{at}.tool_calls is for assistant messages only")
    if tool and message.tool_call_id is None:
        raise InvalidField(f"{at}.tool_call_id", f"{at}.tool_call_id is required in a tool message")
    if message.tool_call_id is not None and not tool:
        raise InvalidField(f"{at}.tool_call_id", f"{at}.tool_call_id is for tool messages only")
