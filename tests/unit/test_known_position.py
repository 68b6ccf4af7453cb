"""``GET /v1/jobs/<id>/events`` decides 404, 400, 204 or a stream from what
the node's live subscription to the job knows, asking Redis only when that
is not enough (on the embedded broker)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.config import Settings
from services.events import COMPLETED
from services.jobs import now_iso
from services.redisconn import EmbeddedBroker
from tests.integration.test_hub import bare_job, eventually, write_tokens
from web.app import create_app
from web.context import Context

pytestmark = pytest.mark.timeout(20)

JOB = "KnownPositionJob000001"


@pytest.fixture
async def served() -> AsyncIterator[tuple[Context, object]]:
    app = create_app(Settings(), EmbeddedBroker())
    async with app.test_app() as test_app:
        yield app.extensions["tokencast"], test_app.test_client()


async def test_the_end_of_a_job_this_node_watches_needs_no_redis(served, monkeypatch):
    context, client = served
    writer = await bare_job(context.redis, context.keys, JOB)
    watcher = await context.hub.attach(JOB)  # another stream of this node, still open
    await writer.start("demo", now_iso())
    await write_tokens(writer, [" a", " b"])
    await writer.finish(COMPLETED, "stop", finished_at=now_iso())  # done is id 4
    await eventually(lambda: context.feed.known_position(JOB, 4) is not None, 5)
    asked: list[str] = []
    position = context.store.position

    async def counted_position(job_id: str):
        asked.append(job_id)
        return await position(job_id)

    monkeypatch.setattr(context.store, "position", counted_position)
    path = f"/v1/jobs/{JOB}/events"
    at_end = await client.get(path, headers={"Last-Event-ID": "4"})
    assert at_end.status_code == 204
    assert asked == []  # no HMGET
    rest = await client.get(path, headers={"Last-Event-ID": "2"})
    assert rest.status_code == 200
    body = (await rest.get_data()).decode()
    assert "id: 4\nevent: done\n" in body and "id: 2\n" not in body
    assert asked == []
    past = await client.get(path, headers={"Last-Event-ID": "5"})
    assert past.status_code == 400
    assert (await past.get_json())["error"]["code"] == "invalid_last_event_id"
    # Past what the node saw: Redis decides, exactly (twice: the stream served
    # in front of Quart leaves a refusal to the Quart route, which decides again).
    assert asked == [JOB, JOB]
    context.hub.detach(watcher)
    gone_from_node = await client.get(path, headers={"Last-Event-ID": "4"})
    assert gone_from_node.status_code == 204
    assert asked == [JOB] * 3  # no live topic any more: Redis decides
