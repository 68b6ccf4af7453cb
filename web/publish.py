"""``POST /v1/jobs/<id>/publish``: an external producer's events, as NDJSON.

The body is read as it arrives, never whole: the lines of each chunk are
appended in one atomic step as soon as the chunk is in, so viewers see a
token within milliseconds of its line reaching the node. A bad line stops
the request with ``400`` naming its line number and field; the lines before
it stay appended. The job's lifecycle (claims, leases, exactly-once retries)
is ``services.producers``'s.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, jsonify, request
from quart.wrappers import Request

from services.errors import Fenced, JobFinished
from services.eventlog import EventItem, JobWriter
from services.events import COMPLETED, FAILED, JobStatus
from services.items import Failure, Finish, InvalidItem, Item, parse_item
from services.jobs import now_iso
from services.producers import Claimed, Refused
from services.queue import RENEW_FRACTION
from services.viewer_tokens import Verdict
from web.api import job_id_or_404
from web.auth import bearer, is_api_key
from web.context import ctx

bp = Blueprint("publish", __name__)

MAX_LINE_BYTES = 1024 * 1024
PUBLISH_PATH = re.compile(r"/v1/jobs/[^/]+/publish")
AFTER_HEADER = "Tokencast-After"
AFTER_VALUE = re.compile(r"[0-9]{1,19}")


class PublishRequest(Request):
    """Quart's request, without its 1 MiB body limit on the publish route: a
    streamed generation's body has no length limit (each line has one)."""

    def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any):
        if PUBLISH_PATH.fullmatch(path):
            kwargs["max_content_length"] = None
        super().__init__(method, scheme, path, *args, **kwargs)


class PublishError(Exception):
    """Ends a publish request with this answer; ``line`` names the bad line."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        line: int | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.line, self.param = line, param


def publish_error(exc: PublishError, last_event_id: int | None) -> Response:
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.param is not None:
        body["param"] = exc.param
    if exc.line is not None:
        body["line"] = exc.line
    if last_event_id is not None:
        body["last_event_id"] = str(last_event_id)
    response = jsonify({"error": body})
    response.status_code = exc.status
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    # The rest of the body is not read: the connection cannot carry another request.
    response.headers["Connection"] = "close"
    return response


@bp.post("/v1/jobs/<job_id>/publish")
async def publish(job_id: str) -> Response:
    job_id = job_id_or_404(job_id)
    claimed: Claimed | None = None
    writer: JobWriter | None = None
    try:
        await check_producer_token(job_id)
        claim = await ctx().producers.claim(job_id, tokencast_after(), now_iso())
        if isinstance(claim, Refused):
            return await refused(job_id, claim)
        claimed = claim
        writer = ctx().producers.writer(job_id, claimed)
        if claimed.last_event_id == 0:
            await writer.start(claimed.model, claimed.created_at)
        status = await Publication(job_id, writer, claimed).run(request.body)
    except PublishError as exc:
        return publish_error(exc, writer.last_id if writer else None)
    except (Fenced, JobFinished):
        return publish_error(await why_fenced(job_id), writer.last_id if writer else None)
    return jsonify({"last_event_id": str(writer.last_id), "status": status})


async def check_producer_token(job_id: str) -> None:
    """Only the job's producer token allows publishing; it is checked first."""
    token = bearer()
    if token is None:
        raise PublishError(
            401,
            "producer_token_required",
            "publishing needs the job's producer token: Authorization: Bearer <producer_token>",
        )
    producers = ctx().producers
    if await producers.token_matches(job_id, token):
        return
    if not await ctx().store.exists(job_id):
        raise not_found(job_id)
    viewer_tokens = ctx().viewer_tokens
    if is_api_key(token):
        message = "an API key does not allow publishing; use the job's producer_token"
    elif viewer_tokens and viewer_tokens.check(token, job_id) is Verdict.VALID:
        message = "a viewer token does not allow publishing; use the job's producer_token"
    else:
        message = "the producer token is not valid for this job"
    raise PublishError(403, "forbidden", message)


def tokencast_after() -> int | None:
    value = request.headers.get(AFTER_HEADER, "")
    if not value:
        return None
    if not AFTER_VALUE.fullmatch(value):
        raise PublishError(
            400,
            "invalid_request",
            f"{AFTER_HEADER} must be an event id (1 to 19 digits; 0 before the first publish)",
            param=AFTER_HEADER,
        )
    return int(value)


async def refused(job_id: str, claim: Refused) -> Response:
    """The answer to a request that may not publish (or a retry that all landed)."""
    if claim.reason == "finished" and claim.landed >= 0:
        # A retry of the request that ended the job: answered as if it just succeeded.
        lines = 0
        async for batch in read_lines(request.body):
            lines += len(batch)
        if lines <= claim.landed:
            return jsonify({"last_event_id": str(claim.last_event_id), "status": claim.status})
    errors = {
        "gone": PublishError(
            404, "job_not_found", f"no job with id {job_id!r} (unknown, or expired)"
        ),
        "cancelled": cancelled_error(job_id),
        "finished": PublishError(409, "job_finished", f"job {job_id} has already finished"),
        "lost": PublishError(
            409, "job_finished", f"job {job_id} is ending: nothing was published for too long"
        ),
        "out_of_order": PublishError(
            409,
            "out_of_order",
            f"{AFTER_HEADER}: {request.headers.get(AFTER_HEADER)} is neither the end of the"
            f" job's log ({claim.last_event_id}) nor where the last publish request started;"
            f" publish what follows event {claim.last_event_id}",
        ),
    }
    return publish_error(errors[claim.reason], claim.last_event_id)


def not_found(job_id: str) -> PublishError:
    return PublishError(404, "job_not_found", f"no job with id {job_id!r} (unknown, or expired)")


def cancelled_error(job_id: str) -> PublishError:
    return PublishError(409, "job_cancelled", f"job {job_id} was cancelled; stop publishing")


async def why_fenced(job_id: str) -> PublishError:
    """The answer for a request whose writer was refused mid-way."""
    state = await ctx().store.get(job_id)
    if state.status is JobStatus.CANCELLED:
        return cancelled_error(job_id)
    if state.finished:
        reason = f" ({state.error['code']})" if state.error else ""
        return PublishError(409, "job_finished", f"job {job_id} has already finished{reason}")
    return PublishError(
        409,
        "publish_conflict",
        f"another publish request to job {job_id} took over; this one's later lines were"
        " not appended",
    )


async def read_lines(body: AsyncIterator[bytes]) -> AsyncIterator[list[tuple[int, bytes]]]:
    """The body's non-blank lines with their numbers (from 1), a list per chunk
    as it arrives. Raises ``PublishError`` at a line longer than 1 MiB."""
    pending = bytearray()
    number = 0
    async for chunk in body:
        pending += chunk
        if b"\n" not in chunk:
            if len(pending) > MAX_LINE_BYTES:
                raise line_too_long(number + 1)
            continue
        *complete, rest = pending.split(b"\n")
        pending = bytearray(rest)
        batch: list[tuple[int, bytes]] = []
        for raw in complete:
            number += 1
            if raw.strip():
                batch.append((number, bytes(raw)))
        yield batch
        if len(pending) > MAX_LINE_BYTES:
            raise line_too_long(number + 1)
    if pending.strip():
        yield [(number + 1, bytes(pending))]


def line_too_long(number: int) -> PublishError:
    return PublishError(
        400,
        "invalid_line",
        f"line {number} is longer than {MAX_LINE_BYTES} bytes (1 MiB)",
        line=number,
    )


def parse_line(number: int, raw: bytes) -> Item:
    """The item of one NDJSON line; raises ``PublishError`` naming the line and field."""
    if len(raw) > MAX_LINE_BYTES:
        raise line_too_long(number)
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise PublishError(
            400, "invalid_line", f"line {number} is not valid JSON", line=number
        ) from None
    try:
        return parse_item(value)
    except InvalidItem as exc:
        raise PublishError(
            400, "invalid_line", f"line {number}: {exc.message}", line=number, param=exc.field
        ) from None


class Publication:
    """One publish request's lines, appended as they arrive."""

    def __init__(self, job_id: str, writer: JobWriter, claimed: Claimed):
        self.job_id = job_id
        self.writer = writer
        self.skip = claimed.skip  # lines a retried request had already landed
        self.status: str = JobStatus.RUNNING
        self.renew_every_s = ctx().settings.lease_s * RENEW_FRACTION
        self.renewed_at = time.monotonic()

    async def run(self, body: AsyncIterator[bytes]) -> str:
        """Append every line; the job's status after them."""
        async for batch in read_lines(body):
            items: list[tuple[int, EventItem]] = []
            try:
                for number, raw in batch:
                    item = parse_line(number, raw)
                    if self.skip > 0:
                        self.skip -= 1
                    elif isinstance(item, Finish | Failure):
                        before, items = items, []
                        await self.append(before)
                        await self.finish(number, item)
                    else:
                        self.check_open(number)
                        items.append((number, item))
            finally:
                before, items = items, []
                await self.append(before)  # the lines before a bad one stay
            if self.renew_due:
                await self.renew()
        if self.status == JobStatus.RUNNING:
            await self.renew()  # the lease counts from the end of each publish
        return self.status

    @property
    def renew_due(self) -> bool:
        """The job is still running and its lease is due for renewal."""
        elapsed = time.monotonic() - self.renewed_at
        return self.status == JobStatus.RUNNING and elapsed >= self.renew_every_s

    def check_open(self, number: int) -> None:
        if self.status != JobStatus.RUNNING:
            raise PublishError(
                409,
                "job_finished",
                f"line {number}: the job ended at an earlier line; nothing may follow it",
                line=number,
            )

    async def append(self, items: list[tuple[int, EventItem]]) -> None:
        if not items:
            return
        before = self.writer.last_id
        try:
            await self.writer.append([item for _, item in items])
        except InvalidItem as exc:  # the writer's own checks (a tool call's id and name)
            number = items[self.writer.last_id - before][0]
            raise PublishError(
                400, "invalid_line", f"line {number}: {exc.message}", line=number, param=exc.field
            ) from None

    async def finish(self, number: int, item: Finish | Failure) -> None:
        self.check_open(number)
        if isinstance(item, Finish):
            await self.writer.finish(COMPLETED, item.finish_reason, finished_at=now_iso())
            self.status = COMPLETED
        else:
            error = {"code": item.code, "message": item.message}
            await self.writer.finish(FAILED, None, error, finished_at=now_iso())
            self.status = FAILED

    async def renew(self) -> None:
        owned, cancel = await ctx().producers.renew(self.job_id, self.writer.owner)
        self.renewed_at = time.monotonic()
        if cancel:
            raise cancelled_error(self.job_id)
        if not owned:
            raise Fenced("the lease moved on")
