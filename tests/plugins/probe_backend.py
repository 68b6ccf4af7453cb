"""A backend for the tests: it does what the job's prompt asks."""

import asyncio
import pathlib


class ProbeBackend:
    def models(self):
        return ["probe"]

    async def generate(self, job):
        try:
            if job.prompt == "raise":
                yield "partial "
                raise RuntimeError("the probe broke on purpose")
            if job.prompt == "bad item":
                yield "fine "
                yield {"type": "tokn", "text": "x"}
            while job.prompt == "forever":
                yield "tick "
                await asyncio.sleep(0.05)
            yield f"job {job.id} of {job.model}: {job.messages[-1]['content']}"
            yield {"type": "event", "name": "probe.note", "data": {"max_tokens": job.max_tokens}}
        finally:
            mark_closed(job.metadata.get("marker"))


def mark_closed(marker):
    """Tell the test this generation's finally ran."""
    if marker:
        pathlib.Path(marker).write_text("closed")
