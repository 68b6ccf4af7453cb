"""A streamed publish through real nginx (deploy/nginx/tokencast.conf): its
lines must reach the node, and the viewers, as they are sent."""

from __future__ import annotations

import asyncio
import shutil
import statistics

import pytest

from deploy.local.cluster import Nginx
from tests.producing import create_external, ndjson, publish, streamed_latency, tokens
from tests.support import Cluster

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed"),
]


@pytest.fixture(scope="module")
def nginx(redis_url):
    with Cluster(redis_url) as cluster:
        nodes = [cluster.web(), cluster.web()]
        proxy = Nginx([node.port for node in nodes if node.port]).start()
        try:
            yield proxy.url
        finally:
            proxy.stop()


def test_a_streamed_body_reaches_viewers_line_by_line_through_nginx(nginx):
    medians = asyncio.run(streamed_latency(nginx))
    assert statistics.median(medians) < 0.050, medians


def test_a_publish_body_over_one_mib_passes_nginx(nginx):
    job = create_external(nginx)
    lines = tokens(*("y" * 30_000 for _ in range(50)))  # 1.5 MB
    response = publish(nginx, job, ndjson(*lines, {"type": "done"}), after=0)
    assert response.status_code == 200, response.text
    assert response.json() == {"last_event_id": "52", "status": "completed"}
