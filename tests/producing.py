"""Helpers for tests of external producers: jobs, publish requests, and a
streamed publish timed against its viewers.

The viewers of a timed publish run in a process of their own
(``python -m tests.producing <url> <job id> <viewers>``), so that reading
their streams does not hold back the producer's lines; both note times on
the machine's monotonic clock, which every process shares.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time

import httpx


def create_external(base_url: str, **body) -> dict:
    """Create an external job; its create answer (with ``producer_token``)."""
    body.setdefault("producer", "external")
    response = httpx.post(f"{base_url}/v1/jobs", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()


def ndjson(*lines: dict | str) -> bytes:
    """One line per item: a dict as JSON, a str as it is (for bad lines)."""
    return b"".join(
        (line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines
    )


def tokens(*texts: str) -> list[dict]:
    return [{"type": "token", "text": text} for text in texts]


def publish(
    base_url: str,
    job: dict,
    body: bytes,
    after: int | None = None,
    token: str | None = None,
) -> httpx.Response:
    headers = {
        "Authorization": f"Bearer {token or job['producer_token']}",
        "Content-Type": "application/x-ndjson",
    }
    if after is not None:
        headers["Tokencast-After"] = str(after)
    return httpx.post(f"{base_url}{job['publish_url']}", content=body, headers=headers, timeout=30)


async def timed_viewer(
    client: httpx.AsyncClient,
    job_id: str,
    arrived: dict[int, float],
    connected: asyncio.Semaphore,
) -> None:
    """Read the raw stream, noting when each token's text (``t<n> ``) arrives."""
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        connected.release()
        buffer = ""
        async for chunk in response.aiter_text():
            now = time.monotonic()
            buffer += chunk
            *frames, buffer = buffer.split("\n\n")
            for frame in frames:
                if "event: done" in frame:
                    return
                if "event: token" in frame:
                    data = json.loads(frame.rpartition("data: ")[2])
                    for word in data["text"].split():
                        arrived.setdefault(int(word[1:]), now)


async def watch_timed(url: str, job_id: str, viewers: int) -> None:
    """The viewers' process: prints ``ready`` once every stream is open, then
    each viewer's arrival times as one JSON line when the job is done."""
    limits = httpx.Limits(max_connections=viewers + 5)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60), limits=limits) as client:
        arrivals: list[dict[int, float]] = [{} for _ in range(viewers)]
        connected = asyncio.Semaphore(0)
        tasks = [timed_viewer(client, job_id, got, connected) for got in arrivals]
        watching = asyncio.gather(*tasks)
        for _ in range(viewers):
            await connected.acquire()
        print("ready", flush=True)
        await asyncio.wait_for(watching, 60)
    print(json.dumps(arrivals), flush=True)


async def streamed_latency(
    base_url: str, count: int = 2000, rate: float = 200, viewers: int = 20
) -> list[float]:
    """Publish ``count`` token lines in one chunked body at ``rate`` lines/s to
    a new external job watched by ``viewers``; every viewer's median delay
    (s) between a line being sent and its token arriving."""
    job = create_external(base_url, model="latency-test")
    watch = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.producing",
        base_url,
        job["id"],
        str(viewers),
        stdout=subprocess.PIPE,
    )
    sent: dict[int, float] = {}

    async def body():
        start = time.monotonic()
        for n in range(count):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[n] = time.monotonic()
            yield json.dumps({"type": "token", "text": f"t{n} "}).encode() + b"\n"
        yield b'{"type": "done"}\n'

    try:
        assert watch.stdout is not None
        assert await asyncio.wait_for(watch.stdout.readline(), 30) == b"ready\n"
        headers = {"Authorization": f"Bearer {job['producer_token']}", "Tokencast-After": "0"}
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            response = await client.post(job["publish_url"], content=body(), headers=headers)
        assert response.status_code == 200, response.text
        assert response.json() == {"last_event_id": str(count + 2), "status": "completed"}
        out, _ = await asyncio.wait_for(watch.communicate(), 60)
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    medians = []
    for got in json.loads(out):
        arrived = {int(n): t for n, t in got.items()}
        assert sorted(arrived) == list(range(count))  # every token, once
        medians.append(statistics.median(arrived[n] - sent[n] for n in range(count)))
    return medians


if __name__ == "__main__":
    asyncio.run(watch_timed(sys.argv[1], sys.argv[2], int(sys.argv[3])))
