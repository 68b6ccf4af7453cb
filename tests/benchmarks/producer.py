"""The benchmark's external producer: jobs published over HTTP, as a user's service would.

One uvloop process creates ``"producer": "external"`` jobs with ``POST
/v1/jobs`` and holds one ``POST /v1/jobs/<id>/publish`` per job open for the
whole generation: HTTP/1.1 written by hand on a plain connection, one chunk
per NDJSON line, so the producer itself stays cheap. Every token's text is
its send time, ``"@<time.time_ns()> "`` (as ``publisher.py``'s), so a viewer
measures line-to-viewer latency the way it measures S2's.

It takes the publisher's orders over a pipe: ``("prepare", spec)`` → the
jobs created and their publish requests open (each has written its
``start``) → ``("ready", job_ids)``; ``("go",)`` → ``("published", report)``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

from tests.benchmarks.publisher import PublishSpec, paced

DONE_LINE = b'{"type": "done"}\n'


def chunk(line: bytes) -> bytes:
    """One line as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(line), line)


class Publish:
    """One job's open publish request: lines written as chunks, then the answer."""

    def __init__(self, host: str, port: int, job_id: str, token: str):
        self.host, self.port = host, port
        self.job_id, self.token = job_id, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.tokens = 0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(
            (
                f"POST /v1/jobs/{self.job_id}/publish HTTP/1.1\r\n"
                f"Host: {self.host}:{self.port}\r\n"
                f"Authorization: Bearer {self.token}\r\n"
                "Content-Type: application/x-ndjson\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        await self.writer.drain()

    async def stream(self, spec: PublishSpec, offset_s: float) -> int:
        """Send ``spec.tokens`` paced tokens and ``done``; the job's last event id."""
        assert self.writer is not None and self.reader is not None
        await asyncio.sleep(offset_s)
        write = self.writer.write
        async for text in paced(spec.tokens, spec.rate):
            write(chunk(b'{"type": "token", "text": "%s"}\n' % text.encode()))
            self.tokens += 1
        write(chunk(DONE_LINE) + b"0\r\n\r\n")
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = json.loads(await self.reader.readexactly(length))
        self.writer.close()
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"publish to {self.job_id}: {head.split(b' ', 2)[1:]} {body}")
        return int(body["last_event_id"])


async def create(host: str, port: int, count: int) -> list[tuple[str, str]]:
    """``count`` external jobs, on one keep-alive connection: (job id, producer token)."""
    reader, writer = await asyncio.open_connection(host, port)
    body = b'{"producer": "external", "model": "bench", "prompt": "bench"}'
    jobs = []
    for _ in range(count):
        writer.write(
            f"POST /v1/jobs HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        answer = json.loads(await reader.readexactly(length))
        if not head.startswith(b"HTTP/1.1 201"):
            raise RuntimeError(f"POST /v1/jobs: {answer}")
        jobs.append((answer["id"], answer["producer_token"]))
    writer.close()
    return jobs


async def prepare(host: str, port: int, spec: PublishSpec) -> list[Publish]:
    publishes = [Publish(host, port, *job) for job in await create(host, port, spec.jobs)]
    await asyncio.gather(*(p.open() for p in publishes))
    return publishes


async def publish(publishes: list[Publish], spec: PublishSpec) -> dict[str, Any]:
    cpu, started = time.process_time(), time.time()
    final_ids = await asyncio.gather(
        *(p.stream(spec, i / spec.jobs / spec.rate) for i, p in enumerate(publishes))
    )
    return {
        "final_ids": list(final_ids),
        "tokens": sum(p.tokens for p in publishes),
        "seconds": time.time() - started,
        "cpu_s": time.process_time() - cpu,
    }


def run(conn: Connection, host: str, port: int) -> None:
    """The producer process's entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench's main process stops us
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        spec: PublishSpec = conn.recv()[1]
        publishes = loop.run_until_complete(prepare(host, port, spec))
        conn.send(("ready", [p.job_id for p in publishes]))
        conn.recv()  # go
        conn.send(("published", loop.run_until_complete(publish(publishes, spec))))
    finally:
        loop.close()
