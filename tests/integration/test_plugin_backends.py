"""Backends of TOKENCAST_BACKENDS in real ``tokencast worker`` processes.

The backends are modules in ``tests/plugins``, importable only through the
workers' PYTHONPATH: the web nodes here have neither that nor the setting,
so they list and accept the models from what the workers advertise.
"""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import (
    ROOT,
    Cluster,
    Process,
    create_job,
    read_stream,
    wait_finished,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

PLUGINS = ROOT / "tests" / "plugins"
BACKENDS = "example_backend:backend,probe_backend:ProbeBackend"
LEASE_S = 2.0
LISTING_BOUND_S = LEASE_S + 1.0  # README: the lease, plus a web node's 1 s cache


def plugin_worker(cluster: Cluster, backends: str = BACKENDS, wait: bool = True) -> Process:
    env = {**cluster.env(backends=backends), "PYTHONPATH": str(PLUGINS)}
    proc = Process(["worker"], env).start(wait=wait)
    cluster.procs.append(proc)
    return proc


def listed(base_url: str) -> list[str]:
    response = httpx.get(f"{base_url}/v1/models", timeout=10)
    assert response.status_code == 200, response.text
    return [model["id"] for model in response.json()["data"]]


@pytest.fixture(scope="module")
def plugins(redis_url):
    with Cluster(redis_url, lease_seconds=str(LEASE_S)) as cluster:
        web = cluster.web()
        assert "TOKENCAST_BACKENDS" not in web.env and "PYTHONPATH" not in web.env
        plugin_worker(cluster)
        wait_until(lambda: "probe" in listed(web.url), 10, what="the plugin models listed")
        yield web


def test_plugin_models_are_listed_beside_demo_on_a_web_node_that_never_imported_them(plugins):
    assert listed(plugins.url) == ["demo", "probe", "weather"]


def test_a_job_for_a_plugin_model_runs_with_the_job_it_describes(plugins):
    job_id = create_job(plugins.url, model="probe", prompt="hello there", max_tokens=7)
    received = read_stream(plugins.url, job_id)
    assert received.text == f"job {job_id} of probe: hello there"
    assert received.done is not None
    assert (received.done["status"], received.done["finish_reason"]) == ("completed", "stop")


def test_the_readme_example_streams_its_text_and_finishes_with_its_tool_call(plugins):
    job_id = create_job(plugins.url, model="weather", prompt="weather in Paris?")
    received = read_stream(plugins.url, job_id)
    assert received.text == "Let me look that up."
    assert received.done is not None
    assert (received.done["status"], received.done["finish_reason"]) == (
        "completed",
        "tool_calls",
    )


def test_the_readme_example_streams_reasoning_and_a_tool_call(plugins):
    job_id = create_job(plugins.url, model="weather", prompt="weather in Paris?")
    received = read_stream(plugins.url, job_id)
    reasoning = "".join(data["text"] for _id, name, data in received.events if name == "reasoning")
    assert reasoning == "The user asks about the weather."
    calls = [data for _id, name, data in received.events if name == "tool_call"]
    assert "".join(call["arguments"] for call in calls) == '{"city": "Paris"}'
    assert (calls[0]["id"], calls[0]["name"]) == ("call_1", "get_weather")
    state = wait_finished(plugins.url, job_id)
    assert state["tool_calls"] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]


def test_a_plugins_custom_event_arrives(plugins):
    job_id = create_job(plugins.url, model="probe", prompt="hello", max_tokens=9)
    received = read_stream(plugins.url, job_id)
    custom = [(name, data) for _id, name, data in received.events if name == "probe.note"]
    assert custom == [("probe.note", {"max_tokens": 9})]


def test_chat_completions_accepts_a_plugin_model(plugins):
    response = httpx.post(
        f"{plugins.url}/v1/chat/completions",
        json={"model": "probe", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    job_id = response.headers["X-Tokencast-Job"]
    assert response.json()["choices"][0]["message"]["content"] == f"job {job_id} of probe: hi"


def test_an_unknown_model_lists_the_plugin_models_too(plugins):
    response = httpx.post(
        f"{plugins.url}/v1/jobs", json={"prompt": "x", "model": "nope"}, timeout=10
    )
    assert response.status_code == 404
    assert response.json()["error"]["message"] == (
        "model 'nope' does not exist; GET /v1/models lists: demo, probe, weather"
    )


def test_an_exception_in_the_plugin_fails_the_job_with_its_message(plugins):
    job_id = create_job(plugins.url, model="probe", prompt="raise")
    received = read_stream(plugins.url, job_id)
    assert received.text == "partial "
    assert received.done is not None
    assert received.done["status"] == "failed"
    assert received.done["error"] == {
        "code": "backend_error",
        "message": "the probe broke on purpose",
    }


def test_a_bad_item_fails_the_job_naming_the_plugin_and_the_item(plugins):
    job_id = create_job(plugins.url, model="probe", prompt="bad item")
    received = read_stream(plugins.url, job_id)
    assert received.text == "fine "
    assert received.done is not None
    assert received.done["error"] == {
        "code": "backend_error",
        "message": "backend probe_backend:ProbeBackend yielded a bad item"
        " {'type': 'tokn', 'text': 'x'}: type must be one of: token, reasoning, tool_call,"
        " event, done, error; got 'tokn'",
    }


def test_cancelling_cancels_the_plugins_iterator(plugins, tmp_path):
    marker = tmp_path / "closed"
    job_id = create_job(
        plugins.url, model="probe", prompt="forever", metadata={"marker": str(marker)}
    )
    wait_until(
        lambda: httpx.get(f"{plugins.url}/v1/jobs/{job_id}").json()["tokens"] >= 3,
        10,
        what="ticks",
    )
    assert not marker.exists()
    assert httpx.delete(f"{plugins.url}/v1/jobs/{job_id}").status_code == 202
    assert wait_finished(plugins.url, job_id)["status"] == "cancelled"
    wait_until(marker.exists, 5, what="the plugin's finally")
    assert marker.read_text() == "closed"


@pytest.mark.parametrize(
    ("backends", "reason"),
    [
        (
            "no_such_module:backend",
            "cannot import 'no_such_module': ModuleNotFoundError: No module named"
            " 'no_such_module' (is it on the worker's PYTHONPATH?)",
        ),
        ("probe_backend:missing", "module 'probe_backend' has no attribute 'missing'"),
        (
            "probe_backend:ProbeBackend,example_backend:backend,probe_backend:ProbeBackend",
            "model 'probe' is already served by the backend probe_backend:ProbeBackend",
        ),
    ],
)
def test_a_bad_reference_stops_the_worker_with_one_clear_line(redis_url, backends, reason):
    with Cluster(redis_url) as cluster:
        worker = plugin_worker(cluster, backends, wait=False)
        assert worker.wait(30) == 2
        reference = backends.split(",")[-1]
        assert worker.log().strip().splitlines()[-1] == (
            f"tokencast: bad setting: TOKENCAST_BACKENDS: cannot load {reference!r}: {reason}"
        )
        assert "Traceback" not in worker.log()


def test_a_model_stops_being_listed_within_the_bound_once_its_workers_stop(redis_url):
    with Cluster(redis_url, lease_seconds=str(LEASE_S)) as cluster:
        web = cluster.web()
        first, second = plugin_worker(cluster), plugin_worker(cluster)
        wait_until(lambda: "probe" in listed(web.url), 10, what="the plugin models listed")
        first.stop()  # SIGKILL: no chance to say goodbye
        time.sleep(LISTING_BOUND_S + 0.5)  # what the bound allows, and more
        assert listed(web.url) == ["demo", "probe", "weather"]  # the second serves them
        second.signal(signal.SIGTERM)
        assert second.wait(15) == 0
        gone_at = time.monotonic()
        wait_until(lambda: listed(web.url) == ["demo"], 10, what="the plugin models unlisted")
        assert time.monotonic() - gone_at <= LISTING_BOUND_S
        response = httpx.post(
            f"{web.url}/v1/jobs", json={"prompt": "x", "model": "probe"}, timeout=10
        )
        assert response.status_code == 404


def test_the_readme_example_is_the_tested_file():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Writing a backend") :]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet == (PLUGINS / "example_backend.py").read_text()


def test_the_plugins_import_nothing_from_tokencast():
    for path in PLUGINS.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            alias.name.partition(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").partition(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert not imported & {"services", "web", "worker", "tests"}, path


# A project with its own `services` package (README, "Writing a backend").

TOKENCAST = Path(sys.executable).parent / "tokencast"  # the command users run
WEATHER = 'def forecast(city):\n    return f"sunny in {city}"\n'
PLUGIN = """from {package} import forecast


class Backend:
    def models(self):
        return ["forecast"]

    async def generate(self, job):
        yield forecast("Paris")


backend = Backend()
"""


@pytest.fixture
def project(tmp_path):
    """A user's project: its own top-level `services` package, the same
    nested in `acme`, and a backend importing from each."""
    for package in (tmp_path / "services", tmp_path / "acme", tmp_path / "acme" / "services"):
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "weather.py").write_text(WEATHER)
    (tmp_path / "own_services.py").write_text(PLUGIN.format(package="services.weather"))
    (tmp_path / "nested_services.py").write_text(PLUGIN.format(package="acme.services.weather"))
    return tmp_path


def run_tokencast_worker(cluster: Cluster, project: Path, backends: str) -> subprocess.Popen:
    """``tokencast worker`` as a user starts it, from the project's directory."""
    env = {**cluster.env(backends=backends), "PYTHONPATH": str(project)}
    with (project / "worker.log").open("wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [str(TOKENCAST), "worker"], env=env, cwd=project, stdout=log, stderr=subprocess.STDOUT
        )


def test_a_backend_importing_its_projects_own_services_stops_the_worker_saying_why(
    redis_url, project
):
    with Cluster(redis_url) as cluster:
        worker = run_tokencast_worker(cluster, project, "own_services:backend")
        try:
            assert worker.wait(30) == 2
        finally:
            worker.kill()
            worker.wait()
    assert (project / "worker.log").read_text().strip().splitlines() == [
        "tokencast: bad setting: TOKENCAST_BACKENDS: cannot load 'own_services:backend':"
        " it imports services.weather, from its project's own 'services' package"
        f" ({project / 'services'}); in a worker 'services' is tokencast's package, and one"
        " process cannot import two packages of one name: rename yours or put it inside a"
        " package of your own (README, Writing a backend)"
    ]


def test_a_backend_of_such_a_project_runs_once_its_package_is_nested(redis_url, project):
    with Cluster(redis_url) as cluster:
        web = cluster.web()
        worker = run_tokencast_worker(cluster, project, "nested_services:backend")
        try:
            wait_until(lambda: "forecast" in listed(web.url), 15, what="the backend listed")
            job_id = create_job(web.url, model="forecast")
            assert read_stream(web.url, job_id).text == "sunny in Paris"
        finally:
            worker.kill()
            worker.wait()
