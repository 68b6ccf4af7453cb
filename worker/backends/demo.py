"""The ``demo`` model: readable, deterministic text with no model behind it.

Its output is a pure function of (prompt, max_tokens, seed): the same request
always gives the same tokens, so tests and demos can compare texts exactly.
A conversation (``messages``) is answered as if its last user message were
the prompt.
It answers at a natural length between 75 % and 125 % of ``max_tokens``,
ending with ``stop`` when that is shorter than ``max_tokens``, else with
``length``. ``temperature`` is ignored. ``demo.reasoning_tokens`` reasoning
events come first, and ``demo.tool_call`` makes it call that tool after the
text, its arguments in a few fragments, finishing with ``tool_calls``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

from services.errors import BackendError
from services.jobs import JobSpec
from worker.backends.base import Job

MODEL = "demo"
DEFAULT_TOKENS_PER_SECOND = 20.0
ECHO_WORDS = 12

WORDS = """
stream token viewer model answer signal broker window river garden lantern
window quiet bright careful simple patient curious steady gentle rapid clear
paper orbit harbor meadow engine pattern signal thread canvas silver amber
cloud forest island valley summit ember echo prism vector kernel packet
socket buffer channel ledger beacon compass anchor bridge tunnel circuit
gather weave follow notice measure balance shape carry listen return build
open share write render resume deliver arrive wander settle gather explain
the a of and to in with for on across through under between beyond near
every each many several some few quietly slowly clearly truly often always
""".split()


def prompt_of(spec: JobSpec | Job) -> str:
    """The prompt, or the text of the conversation's last user message ("" without one)."""
    if spec.prompt is not None:
        return spec.prompt
    for message in reversed(spec.messages or []):
        if message["role"] == "user":
            return _text(message["content"])
    return ""


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content


def _rng(prompt: str, spec: JobSpec | Job) -> random.Random:
    material = f"{prompt}\x00{spec.max_tokens}\x00{spec.seed}".encode()
    return random.Random(hashlib.sha256(material).digest())


def demo_tokens(spec: JobSpec | Job) -> tuple[Iterator[str], int, str]:
    """The token texts, their count, and the finish reason."""
    prompt = prompt_of(spec)
    rng = _rng(prompt, spec)
    natural = max(1, round(spec.max_tokens * rng.uniform(0.75, 1.25)))
    count = min(natural, spec.max_tokens)
    finish_reason = "stop" if natural < spec.max_tokens else "length"

    def words() -> Iterator[str]:
        yield "You"
        yield " asked:"
        for word in prompt.split()[:ECHO_WORDS]:
            yield " " + word
        yield "\n\n"
        while True:
            for sentence_index in range(rng.randint(2, 4)):
                length = rng.randint(5, 14)
                for i in range(length):
                    word = rng.choice(WORDS)
                    if i == 0:
                        word = word.capitalize()
                        yield word if sentence_index == 0 else " " + word
                    else:
                        yield " " + word
                    if i == length - 1:
                        yield "."
                    elif i > 1 and rng.random() < 0.08:
                        yield ","
            yield "\n\n" if rng.random() < 0.6 else "\n"

    def take() -> Iterator[str]:
        for index, word in enumerate(words()):
            if index >= count:
                return
            yield word

    return take(), count, finish_reason


REASONING_WORDS = """
first consider what the question asks then recall how streams resume after a
dropped connection so the answer should explain each step plainly and check
that nothing is repeated or lost along the way before writing it out
""".split()
ARGUMENT_PIECES = 3  # a tool call's arguments arrive in this many fragments


def demo_reasoning(job: Job, count: int) -> Iterator[str]:
    """``count`` reasoning texts, a pure function of the prompt and the seed."""
    rng = random.Random(hashlib.sha256(f"{prompt_of(job)}\x00{job.seed}".encode()).digest())
    for index in range(count):
        word = rng.choice(REASONING_WORDS)
        yield word.capitalize() if index == 0 else " " + word


def demo_tool_call(job: Job, tool_call: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``tool_call`` fragments of the call ``demo.tool_call`` asks for."""
    material = f"{prompt_of(job)}\x00{job.max_tokens}\x00{job.seed}".encode()
    call_id = "call_" + hashlib.sha256(material).hexdigest()[:24]
    arguments = json.dumps(tool_call["arguments"], ensure_ascii=False)
    size = -(-len(arguments) // ARGUMENT_PIECES)  # ceiling division
    pieces = [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]
    fragments = [{"type": "tool_call", "index": 0, "arguments": piece} for piece in pieces]
    fragments[0].update(id=call_id, name=tool_call["name"])
    return fragments


class DemoBackend:
    """Reasoning (``demo.reasoning_tokens``), then the answer, then a tool call
    (``demo.tool_call``), paced at ``demo.tokens_per_second`` events a second."""

    def models(self) -> list[str]:
        return [MODEL]

    async def generate(self, job: Job) -> AsyncIterator[str | dict[str, Any]]:
        options = job.demo
        tokens_per_second = float(options.get("tokens_per_second", DEFAULT_TOKENS_PER_SECOND))
        fail_after: int | None = options.get("fail_after")
        tokens, _count, finish_reason = demo_tokens(job)
        reasoning = demo_reasoning(job, options.get("reasoning_tokens", 0))
        tool_call = options.get("tool_call")
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0  # events so far, for the pace

        async def paced() -> None:
            nonlocal sent
            sent += 1
            if tokens_per_second > 0:
                # An absolute schedule, so pacing does not drift with write latency.
                await asyncio.sleep(max(started + sent / tokens_per_second - loop.time(), 0))
            else:
                await asyncio.sleep(0)  # let the writer run between tokens

        for text in reasoning:
            await paced()
            yield {"type": "reasoning", "text": text}
        for index, text in enumerate(tokens):
            if fail_after is not None and index >= fail_after:
                raise BackendError(
                    f"the demo model failed after {fail_after} tokens, as demo.fail_after asked"
                )
            await paced()
            yield text
        if tool_call is not None:
            for fragment in demo_tool_call(job, tool_call):
                await paced()
                yield fragment
            finish_reason = "tool_calls"
        yield {"type": "done", "finish_reason": finish_reason}
