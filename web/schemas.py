"""The HTTP API's response shapes and the OpenAPI document built from them.

Request bodies are documented with the very models that validate them
(``web.models.JobRequest``, ``web.openai.ChatRequest``), so the document and
the validation cannot drift; the response models here mirror what the routes
return, and tests compare real responses against them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, WithJsonSchema
from quart import Quart
from quart_schema import QuartSchema

from services.events import JobStatus

# Documented inline, as a plain list of the values (no schema of its own).
Status = Annotated[
    JobStatus,
    WithJsonSchema(
        {"enum": [status.value for status in JobStatus], "title": "Status", "type": "string"}
    ),
]


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable code, e.g. invalid_request, job_not_found")
    message: str = Field(description="What was wrong, naming the field and its limit")
    param: str | None = Field(None, description="The field at fault, when there is one")


class ErrorBody(BaseModel):
    error: ErrorDetail


class JobCreated(BaseModel):
    id: str = Field(description="22 URL-safe characters (128 random bits)")
    status: Literal[JobStatus.QUEUED]
    model: str
    created_at: str = Field(description="UTC, e.g. 2026-11-24T10:00:00.000Z")
    events_url: str
    watch_url: str
    viewer_token: str | None = Field(description="Set when viewer authentication is on")


class JobError(BaseModel):
    code: str
    message: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="The concatenated arguments so far; whole JSON once done")


class ToolCallBody(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class JobStateBody(BaseModel):
    id: str
    status: Status
    model: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    tokens: int
    last_event_id: str
    text: str = Field(description="The whole text generated so far")
    reasoning: str = Field(description="The reasoning generated so far, or an empty string")
    tool_calls: list[ToolCallBody] = Field(
        description="The calls assembled from the tool_call events so far (empty when none)"
    )
    error: JobError | None
    finish_reason: Literal["stop", "length", "tool_calls", "cancelled"] | None
    viewers: int = Field(description="Event streams open on this job, across every web node")
    metadata: dict[str, str]


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class EventsQuery(BaseModel):
    last_event_id: str | None = Field(
        None,
        description="Resume after this id (1 to 19 ASCII digits); the Last-Event-ID header wins",
    )
    format: Literal["native", "openai"] | None = Field(None, description="openai: chat chunks")
    include_usage: bool | None = Field(None, description="openai format: add the usage chunk")
    token: str | None = Field(None, description="The job's viewer token, when required")


def install_openapi(app: Quart) -> None:
    """Serve ``/openapi.json`` and a docs page at ``/docs``."""
    QuartSchema(
        app,
        info={"title": "tokencast", "version": "0.1.0"},
        swagger_ui_path="/docs",
        redoc_ui_path=None,
        scalar_ui_path=None,
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
    )
