"""Structured logs (services/logs.py) and the Grafana dashboard that reads the metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram

from services import logs, metrics
from services.cli import main
from services.config import Settings
from services.errors import SettingsError

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tokencast.json"

SECRETS = ("sk-upstream-abcdef", "api-key-123456", "signing-secret-xyz", "redis-pass-789")


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """The root logger, configured as `tokencast` does it (JSON), writing here."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffer = io.StringIO()
    logs.configure(settings(), buffer)
    try:
        yield buffer
    finally:
        logs.configure(Settings(), io.StringIO())  # also resets the prompt switch
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "node_id": "node-a",
        "log_format": "json",
        "api_keys": (SECRETS[1],),
        "secret": SECRETS[2],
        "upstream_api_key": SECRETS[0],
        "redis_url": f"redis://:{SECRETS[3]}@redis.internal:6379/0",
    }
    return Settings(**{**base, **overrides})  # type: ignore[arg-type]


def lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


async def call(app, path: str = "/v1/jobs/x", query: bytes = b"", headers=()) -> list[dict]:
    """Run one request through ``app``; returns the ASGI messages it sent."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": query,
        "headers": list(headers),
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await logs.AccessLog(app)(scope, receive, send)
    return sent


def stream_app(job_id: str = "JOB-1"):
    async def app(scope, receive, send) -> None:
        logs.set_job_id(job_id)
        logging.getLogger("tokencast.test").info("inside the request")
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # Like web/stream.py: the stream reports the events it writes.
        for chunk, events in (
            (b"retry: 1000\n\n", 0),
            (b"id: 1\nevent: start\ndata: {}\n\n", 1),
            (b": keepalive\n\n", 0),
        ):
            logs.count_events(events)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        body = b"id: 2\nevent: token\ndata: {}\n\nid: 3\nevent: done\ndata: {}\n\n"
        logs.count_events(2)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


# JSON lines and their ids.


async def test_request_lines_carry_node_request_and_job_ids(output):
    sent = await call(
        stream_app(), query=b"token=viewer-token-value", headers=[(b"x-request-id", b"req-42")]
    )
    app_line, access = lines(output)
    assert set(app_line) == {"ts", "level", "logger", "message", "node_id", "request_id", "job_id"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", app_line["ts"])
    assert (app_line["level"], app_line["logger"], app_line["message"]) == (
        "INFO",
        "tokencast.test",
        "inside the request",
    )
    for line in (app_line, access):
        assert (line["node_id"], line["request_id"], line["job_id"]) == (
            "node-a",
            "req-42",
            "JOB-1",
        )
    assert access["logger"] == "tokencast.access"
    assert (access["method"], access["path"], access["status"]) == ("GET", "/v1/jobs/x", 200)
    assert isinstance(access["duration_ms"], float)
    assert (access["events"], access["bytes"]) == (3, sum(len(m.get("body", b"")) for m in sent))
    assert (b"x-request-id", b"req-42") in sent[0]["headers"]
    assert "viewer-token-value" not in output.getvalue()
    assert "token=" not in output.getvalue()


@pytest.mark.parametrize(
    "given", [None, b"", b"has space", b"new\nline", b"x" * 129, "caf\u00e9".encode()]
)
async def test_a_request_id_that_is_not_sane_is_replaced(output, given):
    headers = [(b"x-request-id", given)] if given is not None else []
    sent = await call(stream_app(), headers=headers)
    echoed = dict(sent[0]["headers"])[b"x-request-id"].decode()
    assert re.fullmatch(r"[0-9a-f]{32}", echoed)
    assert all(line["request_id"] == echoed for line in lines(output))


async def test_one_access_line_per_request_even_when_the_app_fails(output):
    async def broken(scope, receive, send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await call(broken, path="/v1/models")
    (access,) = lines(output)
    assert (access["path"], access["status"], access["job_id"]) == ("/v1/models", 0, None)
    assert "events" not in access  # not a stream


async def test_a_task_started_in_a_request_stops_naming_it_once_it_ends(output):
    spawned: list[asyncio.Task] = []
    release = asyncio.Event()

    async def background() -> None:
        await release.wait()
        logging.getLogger("tokencast.test").info("after the request")

    async def app(scope, receive, send) -> None:
        logs.set_job_id("JOB-2")
        spawned.append(asyncio.create_task(background()))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    await call(app)
    release.set()
    await asyncio.wait_for(spawned[0], 5)
    access, late = lines(output)
    assert access["job_id"] == "JOB-2"
    assert (late["message"], late["request_id"], late["job_id"]) == (
        "after the request",
        None,
        None,
    )


async def test_job_ids_outside_requests(output):
    log = logging.getLogger("tokencast.test")

    async def worker_job() -> None:
        logs.set_job_id("JOB-W")
        log.info("generating")

    await asyncio.create_task(worker_job())
    with logs.job_scope("JOB-R"):
        log.info("reaping")
    log.info("idle")
    assert [(line["message"], line["job_id"], line["request_id"]) for line in lines(output)] == [
        ("generating", "JOB-W", None),
        ("reaping", "JOB-R", None),
        ("idle", None, None),
    ]


def test_exceptions_are_one_json_line(output):
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("tokencast.test").exception("it failed")
    (line,) = lines(output)
    assert line["level"] == "ERROR"
    assert "Traceback" in line["exception"] and "ValueError: bad thing" in line["exception"]


# Nothing secret.

LEAKY_MESSAGES = [
    "GET /v1/jobs/abc/events?token=eyJ0b2tlbi.signed-value&last_event_id=3",
    "redirect to /watch/abc?format=openai&token=eyJ0b2tlbi.signed-value",
    "headers: {'Authorization': 'Bearer eyJ0b2tlbi.signed-value', 'Accept': '*/*'}",
    'headers: {"authorization": "Basic eyJ0b2tlbi.signed-value"}',
    "Authorization: Bearer eyJ0b2tlbi.signed-value",
    "upstream said: invalid bearer eyJ0b2tlbi.signed-value",
    "connecting to redis://user:eyJ0b2tlbi.signed-value@redis:6379/0",
]


@pytest.mark.parametrize("kind", ["json", "text"])
@pytest.mark.parametrize("message", LEAKY_MESSAGES)
def test_the_formatter_never_prints_tokens_or_authorization(kind, message):
    formatter = logs.JsonFormatter() if kind == "json" else logs.TextFormatter()
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, message, None, None)
    try:
        raise RuntimeError(message)
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    out = formatter.format(record)
    assert "eyJ0b2tlbi" not in out and "signed-value" not in out
    assert "[redacted]" in out
    if kind == "json":
        assert json.loads(out)["message"].count("[redacted]") == 1


def test_configured_secrets_are_never_printed(output):
    log = logging.getLogger("tokencast.test")
    for value in SECRETS:
        log.warning("the value is %s (raw)", value)
        log.warning("quoted: %r", {"key": value})
    text = output.getvalue()
    assert all(value not in text for value in SECRETS)
    assert text.count("[redacted]") == 2 * len(SECRETS)
    assert all(isinstance(line, dict) for line in lines(output))  # still valid JSON


def test_harmless_text_is_left_alone():
    redact = logs.Redactor()
    for text in (
        "job abc: worker lost after 12 tokens, failing it",
        "tokens=42 max_tokens=256",
        "GET /v1/jobs/abc/events 200 12.5ms",
        "redis://redis.internal:6379/0",
    ):
        assert redact(text) == text


def test_prompts_are_logged_only_when_asked(output):
    logs.job_created("JOB-P", "demo", "a very private prompt")
    assert "a very private prompt" not in output.getvalue()
    (created,) = lines(output)
    assert (created["message"], created["job_id"], created["model"]) == (
        "job created (model demo)",
        "JOB-P",
        "demo",
    )
    logs.configure(settings(log_prompts=True), output)
    logs.job_created("JOB-Q", "demo", "a very private prompt")
    assert lines(output)[-1]["prompt"] == "a very private prompt"


def test_text_format(output):
    logs.configure(settings(log_format="text"), output)
    with logs.job_scope("JOB-T"):
        logging.getLogger("tokencast.test").info("plain %s", "words")
    assert re.fullmatch(
        r"\S+ \S+ INFO tokencast\.test node=node-a job=JOB-T: plain words\n", output.getvalue()
    )


def test_configure_twice_does_not_double_lines(output):
    logs.configure(settings(), output)
    logging.getLogger("tokencast.test").info("once")
    assert len(lines(output)) == 1


# Settings.


@pytest.mark.parametrize(("raw", "expected"), [("", "text"), ("json", "json"), ("JSON", "json")])
def test_log_format_setting(raw, expected):
    assert Settings.from_env({"TOKENCAST_LOG_FORMAT": raw}).log_format == expected
    assert Settings.from_env({}).log_prompts is False
    assert Settings.from_env({"TOKENCAST_LOG_PROMPTS": "1"}).log_prompts is True


def test_a_bad_log_format_fails_naming_the_variable():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"TOKENCAST_LOG_FORMAT": "xml"})
    assert str(info.value) == "TOKENCAST_LOG_FORMAT='xml' must be one of: text, json"
    with pytest.raises(SettingsError, match="TOKENCAST_LOG_PROMPTS"):
        Settings.from_env({"TOKENCAST_LOG_PROMPTS": "maybe"})


def test_a_bad_log_format_stops_the_process_at_start(monkeypatch, capsys):
    monkeypatch.setenv("TOKENCAST_LOG_FORMAT", "yaml")
    assert main(["worker"]) == 2
    assert "TOKENCAST_LOG_FORMAT='yaml'" in capsys.readouterr().err


# The Grafana dashboard (deploy/grafana/tokencast.json).


def exposed_series() -> dict[str, str]:
    """Each metric of services/metrics.py → the series a query must use."""
    series = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            series[value._name] = f"{value._name}_total"
        elif isinstance(value, Histogram):
            series[value._name] = f"{value._name}_bucket"
        elif isinstance(value, Gauge):
            series[value._name] = value._name
    return series


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_charts_every_metric():
    series = exposed_series()
    assert len(series) >= 11
    exprs = "\n".join(dashboard_exprs())
    missing = [name for name, used in series.items() if not re.search(rf"\b{used}\b", exprs)]
    assert not missing, f"the dashboard has no panel for {missing}"
    for histogram in (
        "tokencast_publish_to_send_seconds",
        "tokencast_upstream_first_token_seconds",
    ):
        for q in ("0.5", "0.99"):
            assert f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket" in exprs


def test_the_dashboard_takes_its_prometheus_datasource_as_a_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
