"""The Node clients users have, run as ``node`` processes against real
``tokencast serve`` and ``worker`` processes: the official ``openai`` npm
package, the Vercel AI SDK (``ai`` with ``@ai-sdk/openai-compatible``) and
the ``eventsource`` package on the native stream. The scripts and their pinned
packages are in ``tests/clients/node`` (``npm ci --prefix tests/clients/node``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.upstream import ANSWER, TEXT, THOUGHT, WEATHER, FakeUpstream
from tests.support import ROOT, Cluster, Process, create_job, wait_finished

CLIENTS = ROOT / "tests" / "clients" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(
        not (CLIENTS / "node_modules").is_dir(),
        reason="the Node clients are not installed: npm ci --prefix tests/clients/node",
    ),
]

QUESTION = [{"role": "user", "content": "How warm is it in Paris?"}]
# The fake upstream's tool-call model: its call of get_weather, as each client shows it.
CALL_ID, CALL_ARGUMENTS = "call_abc", '{"city":"Paris"}'


def run(script: str, *args: str, timeout: float = 60) -> Any:
    """Run one client script to its end; its stdout is one JSON object."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, script, *args], cwd=CLIENTS, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"node {script} exited {done.returncode}:\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cluster(redis_url: str) -> Iterator[Cluster]:
    """A web node and a worker, with the fake upstream's models beside ``demo``."""
    fake = FakeUpstream().start()
    models = "ok=ok,call=tool-call"
    try:
        with Cluster(redis_url, upstream_base_url=fake.base_url, upstream_models=models) as nodes:
            nodes.worker()
            yield nodes
    finally:
        fake.close()


@pytest.fixture(scope="module")
def url(cluster: Cluster) -> str:
    return cluster.web().url


def chat(url: str, model: str, **request: Any) -> Any:
    body = {"model": model, "messages": QUESTION, **request}
    return run("openai_chat.mjs", url, json.dumps(body))


# The official openai npm package.


def test_the_openai_package_streams_an_upstream_text(url):
    result = chat(url, "ok")
    assert result["text"] == TEXT  # 2-, 3- and 4-byte characters intact
    assert result["finish_reason"] == "stop"
    assert result["chunk_ids"] == [f"chatcmpl-{result['job']}"]
    assert result["final"] == {"content": TEXT, "tool_calls": [], "finish_reason": "stop"}
    assert wait_finished(url, result["job"])["text"] == TEXT


def test_the_openai_package_streams_a_demo_job_with_its_options(url):
    request = {"max_tokens": 12, "demo": {"tokens_per_second": 0}}
    result = chat(url, "demo", **request)
    state = wait_finished(url, result["job"])
    assert result["text"] == state["text"]
    assert result["text"].startswith("You asked: How warm is it in Paris?")
    assert result["final"]["content"] == state["text"]
    assert result["finish_reason"] == result["final"]["finish_reason"] == state["finish_reason"]
    assert result["chunk_ids"] == [f"chatcmpl-{result['job']}"]


def test_the_openai_package_assembles_the_tool_call(url):
    result = chat(url, "call", tools=[WEATHER])
    call = {"id": CALL_ID, "name": "get_weather", "arguments": CALL_ARGUMENTS}
    assert (result["reasoning"], result["text"], result["tool_calls"]) == (THOUGHT, ANSWER, [call])
    assert result["finish_reason"] == "tool_calls"
    assert result["final"] == {
        "content": ANSWER,
        "tool_calls": [call],
        "finish_reason": "tool_calls",
    }


# The Vercel AI SDK.


def test_the_ai_sdk_streams_an_upstream_text(url):
    result = run("ai_stream_text.mjs", url, "ok", "How warm is it in Paris?")
    assert (result["streamed_text"], result["text"]) == (TEXT, TEXT)
    assert (result["tool_calls"], result["finish_reason"]) == ([], "stop")
    assert "error" not in result["part_types"]


def test_the_ai_sdk_streams_a_demo_job_with_its_options(url):
    options = json.dumps({"tokens_per_second": 0})
    result = run("ai_stream_text.mjs", url, "demo", "hello there", options)
    assert result["response_id"].startswith("chatcmpl-")
    state = wait_finished(url, result["response_id"].removeprefix("chatcmpl-"))
    assert (result["streamed_text"], result["text"]) == (state["text"], state["text"])
    assert result["text"].startswith("You asked: hello there")
    assert result["finish_reason"] == state["finish_reason"]
    assert (result["tool_calls"], result["part_types"].count("error")) == ([], 0)


def test_the_ai_sdk_reports_the_tool_call(url):
    result = run("ai_stream_text.mjs", url, "call", "How warm is it in Paris?")
    assert (result["reasoning"], result["text"]) == (THOUGHT, ANSWER)
    call = {"id": CALL_ID, "name": "get_weather", "input": {"city": "Paris"}}
    assert (result["tool_calls"], result["finish_reason"]) == ([call], "tool-calls")
    assert "tool-call" in result["part_types"]


# Node's eventsource package on the native stream.


class Viewer:
    """``node eventsource_job.mjs``, read one JSON line at a time as events arrive."""

    def __init__(self, url: str, job_id: str):
        assert NODE is not None
        self.process = subprocess.Popen(
            [NODE, "eventsource_job.mjs", url, job_id],
            cwd=CLIENTS,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events: list[tuple[int, str, dict]] = []
        self.errors = 0

    def read_until(self, enough: Any) -> None:
        """Take lines until ``enough(self)`` holds (or the script ends)."""
        assert self.process.stdout is not None
        while not enough(self):
            line = json.loads(self.process.stdout.readline() or '{"eof": true}')
            assert "eof" not in line, "the script ended before its stream did"
            if "id" in line:
                self.events.append((int(line["id"]), line["name"], line["data"]))
            self.errors += "error" in line

    @property
    def closed(self) -> bool:
        return bool(self.events) and self.events[-1][1] == "done"

    def covered_ids(self) -> list[int]:
        """Every id received, merged runs expanded: gap-free and once each when exact."""
        return [
            n
            for event_id, _name, data in self.events
            for n in range(data.get("first_id", event_id), event_id + 1)
        ]

    def text(self) -> str:
        return "".join(data["text"] for _id, name, data in self.events if name == "token")

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def viewers() -> Iterator[list[Viewer]]:
    started: list[Viewer] = []
    try:
        yield started
    finally:
        for viewer in started:
            viewer.close()


def test_eventsource_reads_a_whole_job_with_exact_ids(url, viewers):
    job_id = create_job(url, max_tokens=30, demo={"tokens_per_second": 200})
    viewer = Viewer(url, job_id)
    viewers.append(viewer)
    viewer.read_until(lambda v: v.closed)
    state = wait_finished(url, job_id)
    assert viewer.covered_ids() == list(range(1, int(state["last_event_id"]) + 1))
    assert viewer.events[0][1] == "start"
    assert viewer.text() == state["text"]
    done = viewer.events[-1][2]
    assert (done["status"], done["tokens"]) == ("completed", state["tokens"])
    assert viewer.errors == 0


def test_eventsource_resumes_exactly_after_its_web_node_dies(cluster, viewers):
    web = cluster.web()
    job_id = create_job(web.url, max_tokens=60, demo={"tokens_per_second": 20})
    viewer = Viewer(web.url, job_id)
    viewers.append(viewer)
    viewer.read_until(lambda v: len(v.events) >= 5)
    web.stop()  # SIGKILL: the connection drops mid-stream
    restarted = Process(web.args, web.env, port=web.port)
    cluster.procs.append(restarted)
    restarted.start()  # the same address: the package reconnects with Last-Event-ID
    viewer.read_until(lambda v: v.closed)
    state = wait_finished(web.url, job_id)
    assert viewer.errors >= 1
    assert viewer.covered_ids() == list(range(1, int(state["last_event_id"]) + 1))
    assert viewer.text() == state["text"]
    assert viewer.events[-1][2]["status"] == "completed"
