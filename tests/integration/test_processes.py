"""Several processes on one Redis: two web nodes, dying workers, the terminal client."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.support import (
    ROOT,
    Cluster,
    aread_stream,
    create_job,
    free_port,
    job_state,
    read_stream,
    wait_finished,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(redis_url):
    with Cluster(redis_url, lease_seconds="2") as cluster:
        yield cluster


async def test_two_web_nodes_serve_one_job_identically(cluster):
    a, b = cluster.web(), cluster.web()
    cluster.worker()
    job_id = create_job(a.url, max_tokens=150, demo={"tokens_per_second": 150})
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=60) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=60) as on_b,
    ):
        viewers = [aread_stream(on_a, job_id) for _ in range(10)]
        viewers += [aread_stream(on_b, job_id) for _ in range(10)]
        results = await asyncio.wait_for(asyncio.gather(*viewers), 60)
    state = job_state(b.url, job_id)
    for got in results:
        assert got.covered_ids == list(range(1, int(state["last_event_id"]) + 1))
        assert got.text == state["text"]
    assert job_state(a.url, job_id) == state


def test_worker_killed_after_tokens_ends_the_job_with_worker_lost_within_the_lease(cluster):
    web = cluster.web()
    worker = cluster.worker()
    job_id = create_job(web.url, max_tokens=400, demo={"tokens_per_second": 20})
    wait_until(lambda: job_state(web.url, job_id)["tokens"] >= 3, 10, what="some tokens")
    worker.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    # No worker is left: the web node's reaper ends the job.
    got = read_stream(web.url, job_id, timeout=15)
    elapsed = time.monotonic() - killed_at
    state = job_state(web.url, job_id)
    assert elapsed < 2.0, f"terminal event {elapsed:.1f}s after the kill (lease 2 s)"
    assert got.done["status"] == "failed"
    assert got.done["error"]["code"] == "worker_lost"
    assert got.done["tokens"] == state["tokens"] >= 3
    assert got.covered_ids == list(range(1, int(state["last_event_id"]) + 1))
    assert state["status"] == "failed"
    assert state["error"]["code"] == "worker_lost"


def test_worker_killed_before_any_token_is_retried_by_another_worker(cluster):
    web = cluster.web()
    doomed = cluster.worker(worker_concurrency="1")
    # One token every 2 s: the worker has started the job but sent no token.
    job_id = create_job(web.url, max_tokens=3, seed=7, demo={"tokens_per_second": 0.5})
    wait_until(lambda: job_state(web.url, job_id)["status"] == "running", 10, what="start")
    doomed.signal(signal.SIGKILL)
    doomed.wait(5)
    survivor = cluster.worker()
    got = read_stream(web.url, job_id, timeout=30)
    state = job_state(web.url, job_id)
    names = [name for _id, name, _data in got.events]
    assert names.count("start") == 1  # the retry continues the same log
    assert names[-1] == "done"
    assert got.done["status"] == "completed"
    assert got.covered_ids == list(range(1, int(state["last_event_id"]) + 1))
    assert state["text"] == got.text
    assert survivor.process.poll() is None


def test_a_job_started_on_a_killed_node_is_watched_from_another(cluster):
    a, b = cluster.web(), cluster.web()
    cluster.worker()
    job_id = create_job(a.url, max_tokens=40, demo={"tokens_per_second": 40})
    a.signal(signal.SIGKILL)
    got = read_stream(b.url, job_id)
    assert got.done["status"] == "completed"
    assert got.text == job_state(b.url, job_id)["text"]


def run_cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(*args: str, env: dict) -> subprocess.Popen:
    """A terminal client running in the background, its output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_submit_watch_prints_the_text_and_exits_by_status(cluster):
    web = cluster.web()
    cluster.worker()
    env = cluster.env(URL=web.url)
    result = run_cli("submit", "hello cli", "--watch", "--max-tokens", "30", env=env)
    assert result.returncode == 0, result.stderr
    first_line, *rest = result.stderr.splitlines()
    job_id = first_line.removeprefix("job ")
    assert first_line == f"job {job_id}"
    state = job_state(web.url, job_id)
    assert result.stdout == state["text"] + "\n"
    assert rest[-1] == f"status completed ({state['finish_reason']}, {state['tokens']} tokens)"

    # Without --watch: the id on stdout, for scripts.
    result = run_cli("submit", "just queue it", env=env)
    assert result.returncode == 0
    assert result.stdout.strip() == result.stderr.splitlines()[0].removeprefix("job ")

    failing = create_job(web.url, max_tokens=20, demo={"tokens_per_second": 0, "fail_after": 2})
    result = run_cli("watch", failing, env=env)
    assert result.returncode == 1
    assert "backend_error" in result.stderr.splitlines()[-1]

    slow = create_job(web.url, max_tokens=500, demo={"tokens_per_second": 5})
    watcher = start_cli("watch", slow, env=env)
    wait_until(lambda: job_state(web.url, slow)["tokens"] >= 2, 10, what="tokens")
    httpx.delete(f"{web.url}/v1/jobs/{slow}")
    assert watcher.wait(10) == 2
    watcher.stdout.close()
    watcher.stderr.close()

    result = run_cli("watch", "AAAAAAAAAAAAAAAAAAAAAA", env=env)
    assert result.returncode == 1
    assert "404" in result.stderr


def test_cli_cannot_reach_the_server_exits_3(cluster):
    env = cluster.env(URL=f"http://127.0.0.1:{free_port()}")
    result = run_cli("submit", "anyone there?", env=env)
    assert result.returncode == 3
    assert "cannot reach" in result.stderr


def test_cli_watch_resumes_after_the_node_restarts(cluster):
    port = free_port()
    web = cluster.web(port=port)
    cluster.worker()
    env = cluster.env(URL=web.url)
    job_id = create_job(web.url, max_tokens=120, demo={"tokens_per_second": 30})
    watcher = start_cli("watch", job_id, env=env)
    wait_until(lambda: job_state(web.url, job_id)["tokens"] >= 20, 10, what="20 tokens")
    web.signal(signal.SIGKILL)
    web.wait(5)
    restarted = cluster.web(port=port)  # the client reconnects to the same address
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 0, err
    state = wait_finished(restarted.url, job_id)
    assert out == state["text"] + "\n"  # nothing lost, nothing repeated
    assert "reconnecting…" in err


def test_worker_sigterm_finishes_hands_back_or_ends_its_jobs(cluster):
    web = cluster.web()
    worker = cluster.worker(drain_seconds="1.5", worker_concurrency="3")
    quick = create_job(web.url, max_tokens=10, demo={"tokens_per_second": 10})
    slow = create_job(web.url, max_tokens=500, demo={"tokens_per_second": 10})
    silent = create_job(web.url, max_tokens=1, demo={"tokens_per_second": 0.25})
    wait_until(lambda: job_state(web.url, slow)["tokens"] >= 2, 10, what="tokens")
    wait_until(lambda: job_state(web.url, silent)["status"] == "running", 10, what="start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(5) == 0
    # Finished within the drain time.
    assert wait_finished(web.url, quick, 5)["status"] == "completed"
    # Had sent tokens: ended at once, not left to the lease.
    state = wait_finished(web.url, slow, 1)
    assert state["status"] == "failed"
    assert state["error"] == {
        "code": "worker_lost",
        "message": "the worker shut down before the job finished",
    }
    # Had sent none: handed back, and another worker completes it on the same log.
    assert job_state(web.url, silent)["status"] == "queued"
    cluster.worker()
    got = read_stream(web.url, silent, timeout=30)
    assert got.done["status"] == "completed"
    assert [name for _id, name, _data in got.events].count("start") == 1
