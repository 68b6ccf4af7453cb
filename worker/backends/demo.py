"""The ``demo`` model: readable, deterministic text with no model behind it.

Its output is a pure function of (prompt, max_tokens, seed): the same request
always gives the same tokens, so tests and demos can compare texts exactly.
A conversation (``messages``) is answered as if its last user message were
the prompt.
It answers at a natural length between 75 % and 125 % of ``max_tokens``,
ending with ``stop`` when that is shorter than ``max_tokens``, else with
``length``. ``temperature`` is ignored.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

from services.errors import BackendError
from services.jobs import JobSpec

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


def prompt_of(spec: JobSpec) -> str:
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


def _rng(prompt: str, spec: JobSpec) -> random.Random:
    material = f"{prompt}\x00{spec.max_tokens}\x00{spec.seed}".encode()
    return random.Random(hashlib.sha256(material).digest())


def demo_tokens(spec: JobSpec) -> tuple[Iterator[str], int, str]:
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


class DemoGeneration:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.tokens_per_second = float(
            spec.demo.get("tokens_per_second", DEFAULT_TOKENS_PER_SECOND)
        )
        self.fail_after: int | None = spec.demo.get("fail_after")
        self.finish_reason = "stop"

    async def __aiter__(self) -> AsyncIterator[str]:
        tokens, _count, finish_reason = demo_tokens(self.spec)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index, text in enumerate(tokens):
            if self.fail_after is not None and index >= self.fail_after:
                raise self._failure()
            if self.tokens_per_second > 0:
                # An absolute schedule, so pacing does not drift with write latency.
                delay = started + (index + 1) / self.tokens_per_second - loop.time()
                await asyncio.sleep(max(delay, 0))
            else:
                await asyncio.sleep(0)  # let the writer run between tokens
            yield text
        self.finish_reason = finish_reason

    def _failure(self) -> BackendError:
        return BackendError(
            f"the demo model failed after {self.fail_after} tokens, as demo.fail_after asked"
        )


class DemoBackend:
    def models(self) -> list[str]:
        return [MODEL]

    def generate(self, spec: JobSpec) -> DemoGeneration:
        return DemoGeneration(spec)
