"""/metrics of a node with several web processes sums them all."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_serve_workers import serve_workers
from tests.support import Cluster

pytestmark = pytest.mark.timeout(60)


def jobs_created(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tokencast_jobs_created_total":
                return float(sample.value)
    return 0.0


def test_metrics_are_summed_across_the_processes_of_a_node(redis_url):
    cluster = Cluster(redis_url)
    try:
        parent, _children = serve_workers(cluster, 2)
        with httpx.Client(base_url=parent.url, timeout=5) as client:
            for _ in range(8):  # new connections: the kernel spreads them over both
                response = client.post(
                    "/v1/jobs", json={"prompt": "m"}, headers={"Connection": "close"}
                )
                assert response.status_code == 201
        # Whichever process answers, it reports the node's total.
        assert {jobs_created(parent.url) for _ in range(6)} == {8.0}
    finally:
        cluster.close()
