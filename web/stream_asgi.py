"""``GET /v1/jobs/<id>/events`` served straight from ASGI, in front of Quart.

Opening a stream is what a reconnect storm is made of (every viewer of a
dead node at once), and Quart's share of it is most of what tokencast itself
adds to Hypercorn's: a request object, two contexts, two tasks per request
and a wrapper per chunk sent. Measured with 5,000 streams opened 256 at a
time on one process: a bare ASGI stream costs Hypercorn 576 us of CPU and
18 KB per stream, a minimal Quart streaming route 980 us and 30 KB.

So this middleware serves the route itself when the answer is a stream
(or a ``204``), with the same decision (``web.stream.plan_stream``) and the
same bytes (``web.stream.planned_stream``) as the Quart route. Every other
answer (an error, a cross-origin request that needs CORS headers) is left
to the Quart route, which decides again and answers as it always has: one
place renders errors, and only a refused request pays for deciding twice.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import parse_qsl

from services.logs import ASGIApp
from web.context import Context
from web.limits import address_of
from web.sse import HEADERS
from web.stream import NoContent, StreamAsk, StreamPlan, plan_stream, planned_stream

EVENTS_PATH = re.compile(r"/v1/jobs/([^/]+)/events")
RESPONSE_HEADERS = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]


class EventStreams:
    """Wraps the Quart app: answers event-stream requests that get a stream."""

    def __init__(self, app: ASGIApp, context: Context):
        self.app = app
        self.context = context

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        match = (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and EVENTS_PATH.fullmatch(scope["path"])
        )
        ask = self._ask(scope, match.group(1)) if match else None
        plan = None
        if ask is not None:
            try:
                plan = await plan_stream(self.context, ask)
            except Exception:
                plan = None  # the Quart route raises it again, and answers it
        if isinstance(plan, NoContent):
            # Every EventSource of a job reconnects once it has ended: a storm too.
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        elif isinstance(plan, StreamPlan):
            await self._stream(plan, receive, send)
        else:
            await self.app(scope, receive, send)

    def _ask(self, scope: Any, job_id: str) -> StreamAsk | None:
        """The request's ask, or ``None`` when it needs the Quart route (CORS)."""
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        settings = self.context.settings
        if settings.cors_origins and b"origin" in headers:
            return None  # quart-cors adds the CORS headers
        peer = scope.get("client")
        forwarded = headers.get(b"x-forwarded-for", b"").decode("latin-1")
        last_event_id = headers.get(b"last-event-id")
        return StreamAsk(
            job_id,
            None if last_event_id is None else last_event_id.decode("latin-1"),
            query(scope["query_string"]),
            headers.get(b"authorization", b"").decode("latin-1"),
            address_of(settings.trust_proxy, forwarded, peer[0] if peer else None),
        )

    async def _stream(self, plan: StreamPlan, receive: Any, send: Any) -> None:
        """Send the planned stream until it ends or the client leaves."""
        body = planned_stream(self.context, plan)
        serving = asyncio.current_task()
        assert serving is not None
        # Nothing is read from the client after its request; the one thing
        # that can come is its leaving, which must end the stream at once.
        watch = asyncio.create_task(_cancel_on_disconnect(receive, serving))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": RESPONSE_HEADERS})
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.done():
                raise  # not the client leaving: the server is stopping
            serving.uncancel()
        finally:
            watch.cancel()
            await body.aclose()


async def _cancel_on_disconnect(receive: Any, serving: asyncio.Task) -> None:
    """Cancel ``serving`` when the client leaves (this task is then done)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    serving.cancel()


def query(raw: bytes) -> dict[str, str]:
    """The query's parameters, the first of each name (as Quart's ``request.args.get``)."""
    params: dict[str, str] = {}
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        params.setdefault(name, value)
    return params
