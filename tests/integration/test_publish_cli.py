"""``tokencast publish`` fed by a real pipe from another process (API.md, "Command line")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from tests.support import ROOT, Cluster, read_stream, wait_until

pytestmark = pytest.mark.timeout(60)

TEXT = "héllo wörld — 日本語 🎉 ok\n" * 12

# Writes its argument's UTF-8 bytes in odd-sized pieces (cutting characters
# apart), pausing argv[3] seconds now and then, then argv[2] seconds before closing.
WRITER = """
import os, sys, time
data, pause, gap = sys.argv[1].encode(), float(sys.argv[2]), float(sys.argv[3])
sizes, i, n = [1, 3, 5, 7, 2], 0, 0
while i < len(data):
    os.write(1, data[i:i + sizes[n % 5]])
    i += sizes[n % 5]
    n += 1
    if n % 9 == 0:
        time.sleep(gap)
time.sleep(pause)
"""


@pytest.fixture(scope="module")
def web(redis_url):
    with Cluster(redis_url) as cluster:
        cluster.web()
        yield cluster.procs[0].url


class Pipe:
    """``writer | tokencast publish``, with the job id from its first stderr line."""

    def __init__(self, url: str, text: str, pause_s: float = 0.0, gap_s: float = 0.03):
        self.writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, text, str(pause_s), str(gap_s)],
            stdout=subprocess.PIPE,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAST_")}
        self.publisher = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "publish", "--url", url, "--model", "pipe"],
            stdin=self.writer.stdout,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert self.writer.stdout is not None
        self.writer.stdout.close()  # the publisher holds the read end
        assert self.publisher.stderr is not None
        self.first = self.publisher.stderr.readline().strip()
        self.second = self.publisher.stderr.readline().strip()
        self.job_id = self.first.removeprefix("job ")

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        try:
            code = self.publisher.wait(timeout)
            assert self.publisher.stderr is not None
            return code, self.publisher.stderr.read()
        finally:
            self.close()

    def close(self) -> None:
        for proc in (self.writer, self.publisher):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert self.publisher.stderr is not None
        self.publisher.stderr.close()


def state(url: str, job_id: str) -> dict:
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()


def test_a_pipe_reaches_viewers_as_its_exact_text(web):
    pipe = Pipe(web, TEXT)
    assert pipe.first.startswith("job ")
    assert pipe.second == f"watch {web}/watch/{pipe.job_id}"
    code, err = pipe.finish()
    assert code == 0, err
    got = state(web, pipe.job_id)
    assert (got["status"], got["text"], got["model"]) == ("completed", TEXT, "pipe")
    assert got["producer"] == "external"
    assert read_stream(web, pipe.job_id).text == TEXT


def test_ctrl_c_fails_the_job_interrupted(web):
    pipe = Pipe(web, "partial é", pause_s=30)
    wait_until(lambda: state(web, pipe.job_id)["text"] == "partial é", 10, what="the text")
    pipe.publisher.send_signal(signal.SIGINT)
    code, err = pipe.finish()
    assert code == 1, err
    done = read_stream(web, pipe.job_id).done
    assert done is not None
    assert done["error"] == {
        "code": "interrupted",
        "message": "the producer was interrupted (Ctrl-C)",
    }


def test_a_cancel_exits_2(web):
    pipe = Pipe(web, "before the cancel", pause_s=30)
    wait_until(lambda: state(web, pipe.job_id)["tokens"] > 0, 10, what="a token")
    assert httpx.delete(f"{web}/v1/jobs/{pipe.job_id}", timeout=10).status_code == 202
    code, err = pipe.finish(timeout=10)
    assert code == 2, err
    assert "was cancelled; stop publishing" in err
    assert state(web, pipe.job_id)["status"] == "cancelled"


def test_an_unreachable_server_exits_3():
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "publish", "--url", "http://127.0.0.1:9"],
        input=b"x",
        capture_output=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 3, result.stderr


def test_it_resumes_its_publishing_after_the_node_restarts(redis_url):
    """The writer keeps writing while the only web node is replaced: the
    publisher retries each request with its Tokencast-After until a node answers."""
    with Cluster(redis_url) as cluster:
        node = cluster.web()
        pipe = Pipe(node.url, TEXT * 2, gap_s=0.1)  # about 4 s of writing
        try:
            wait_until(lambda: state(node.url, pipe.job_id)["tokens"] >= 3, 10, what="tokens")
            node.stop()
            cluster.web(port=node.port)
            code, err = pipe.finish()
        finally:
            pipe.close()
        assert code == 0, err
        got = state(node.url, pipe.job_id)
        assert (got["status"], got["text"]) == ("completed", TEXT * 2)
        assert read_stream(node.url, pipe.job_id).text == TEXT * 2
