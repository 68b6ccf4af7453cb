"""An EventSource on another origin: allowed by TOKENCAST_CORS_ORIGINS, refused otherwise."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Cluster, free_port, wait_finished

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

PAGE = """<!doctype html><meta charset="utf-8"><title>elsewhere</title>
<pre id="text"></pre><p id="state">connecting</p>
<script>
  const events = new URLSearchParams(location.search).get("events");
  const source = new EventSource(events);
  const text = document.getElementById("text");
  const state = document.getElementById("state");
  source.addEventListener("token", (e) => { text.textContent += JSON.parse(e.data).text; });
  source.addEventListener("done", () => { state.textContent = "done"; source.close(); });
  source.onerror = () => { if (state.textContent !== "done") { state.textContent = "error"; source.close(); } };
</script>
"""


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[callable]:
    """Static servers for the page, each on its own port (so its own origin)."""
    (tmp_path / "index.html").write_text(PAGE)
    servers = []

    def start() -> str:
        port = free_port()
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_cross_origin_event_source(redis_url, context, page_server):
    allowed_origin = page_server()
    other_origin = page_server()
    cluster = Cluster(redis_url, cors_origins=allowed_origin)
    try:
        web = cluster.web()
        cluster.worker()
        job_id = httpx.post(
            f"{web.url}/v1/jobs",
            json={"prompt": "from afar", "max_tokens": 15, "demo": {"tokens_per_second": 30}},
        ).json()["id"]
        events = f"{web.url}/v1/jobs/{job_id}/events"

        allowed = context.new_page()
        allowed.goto(f"{allowed_origin}/index.html?events={events}")
        allowed.wait_for_function("document.getElementById('state').textContent === 'done'")
        assert allowed.inner_text("#text") == wait_finished(web.url, job_id)["text"]

        refused = context.new_page()
        refused.goto(f"{other_origin}/index.html?events={events}")
        refused.wait_for_function("document.getElementById('state').textContent === 'error'")
        assert refused.inner_text("#text") == ""
    finally:
        cluster.close()
