"""Request bodies, validated strictly, with errors that name the field and its rule."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

MAX_BODY_BYTES = 1024 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

M = TypeVar("M", bound=BaseModel)

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class DemoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tokens_per_second: float = Field(20.0, ge=0, le=10_000, allow_inf_nan=False)
    fail_after: int | None = Field(None, ge=0)


class JobRequest(BaseModel):
    """The body of ``POST /v1/jobs`` (API.md, "Jobs")."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=100_000)
    model: str | None = Field(None, min_length=1, max_length=200)
    max_tokens: int = Field(256, ge=1, le=32_768)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=16)
    demo: DemoOptions | None = None


# The rule of each field, as the error message states it.
RULES = {
    "prompt": "a string of 1 to 100,000 characters",
    "model": "a string naming a model that GET /v1/models lists",
    "max_tokens": "an integer from 1 to 32,768",
    "max_completion_tokens": "an integer from 1 to 32,768",
    "temperature": "a number from 0 to 2",
    "seed": f"an integer from {INT64_MIN} to {INT64_MAX}",
    "metadata": (
        "an object of at most 16 entries, with keys of 1 to 64 characters"
        " and string values of at most 512 characters"
    ),
    "demo": "an object with the demo model's options (tokens_per_second, fail_after)",
    "demo.tokens_per_second": "a number from 0 to 10,000",
    "demo.fail_after": "an integer of at least 0",
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


def describe(exc: ValidationError) -> InvalidField:
    error = exc.errors()[0]
    path = [str(part) for part in error["loc"]]
    dotted = ".".join(path)
    if error["type"] == "extra_forbidden":
        return InvalidField(dotted, f"unknown field {dotted!r}")
    if error["type"] == "missing":
        return InvalidField(dotted, f"{dotted} is required")
    for end in range(len(path), 0, -1):
        field = ".".join(path[:end])
        if field in RULES:
            return InvalidField(field, f"{field} must be {RULES[field]}")
    return InvalidField(dotted, f"{dotted}: {error['msg']}")
