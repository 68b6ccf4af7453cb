import asyncio

import pytest

from services.errors import BackendError
from services.jobs import JobSpec
from worker.backends.base import Job
from worker.backends.demo import DemoBackend, demo_tokens


def spec(**kw) -> Job:
    kw.setdefault("prompt", "tell me about streams")
    kw.setdefault("model", "demo")
    kw.setdefault("demo", {"tokens_per_second": 0})
    return Job.from_spec("job-1", JobSpec(**kw))


async def generate(s: Job) -> tuple[list[str], str]:
    """The answer's texts and the finish reason of the done item, which comes last."""
    items = [item async for item in DemoBackend().generate(s)]
    assert items[-1]["type"] == "done"
    return items[:-1], items[-1]["finish_reason"]


async def test_demo_is_a_pure_function_of_prompt_max_tokens_and_seed():
    a, _ = await generate(spec(seed=1))
    b, _ = await generate(spec(seed=1))
    c, _ = await generate(spec(seed=2))
    d, _ = await generate(spec(seed=1, prompt="another prompt"))
    assert a == b
    assert a != c
    assert a != d


async def test_demo_text_is_readable_with_newlines_and_echoes_the_prompt():
    tokens, _ = await generate(spec(max_tokens=400))
    text = "".join(tokens)
    assert text.startswith("You asked: tell me about streams\n\n")
    assert "\n" in text[40:]
    assert "." in text
    assert all(token for token in tokens)


@pytest.mark.parametrize("max_tokens", [1, 2, 10, 256, 1000])
async def test_demo_respects_max_tokens_and_reports_finish_reason(max_tokens):
    tokens, reason = await generate(spec(max_tokens=max_tokens))
    _, count, expected_reason = demo_tokens(spec(max_tokens=max_tokens))
    assert len(tokens) == count <= max_tokens
    assert reason == expected_reason
    assert reason == ("length" if len(tokens) == max_tokens else "stop")


async def test_demo_ends_with_stop_for_some_seeds_and_length_for_others():
    reasons = {demo_tokens(spec(seed=seed))[2] for seed in range(20)}
    assert reasons == {"stop", "length"}


async def test_fail_after_raises_backend_error_after_that_many_tokens():
    got = []
    with pytest.raises(BackendError, match="failed after 3 tokens") as info:
        async for token in DemoBackend().generate(
            spec(demo={"tokens_per_second": 0, "fail_after": 3})
        ):
            got.append(token)
    assert len(got) == 3
    assert info.value.code == "backend_error"


async def test_tokens_per_second_paces_the_stream():
    loop = asyncio.get_running_loop()
    start = loop.time()
    tokens, _ = await generate(spec(max_tokens=10, seed=5, demo={"tokens_per_second": 100}))
    elapsed = loop.time() - start
    assert elapsed >= (len(tokens) - 1) / 100


async def test_reasoning_then_answer_then_a_tool_call_in_fragments():
    call = {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}
    job = spec(
        max_tokens=12,
        seed=4,
        demo={"tokens_per_second": 0, "reasoning_tokens": 5, "tool_call": call},
    )
    items = [item async for item in DemoBackend().generate(job)]
    kinds = [item["type"] if isinstance(item, dict) else "token" for item in items]
    answer, _count, _finish = demo_tokens(job)
    answer = list(answer)
    fragments = [item for item, kind in zip(items, kinds, strict=True) if kind == "tool_call"]
    assert kinds == ["reasoning"] * 5 + ["token"] * len(answer) + ["tool_call"] * len(fragments) + [
        "done"
    ]
    assert items[5 : 5 + len(answer)] == answer
    assert items[-1] == {"type": "done", "finish_reason": "tool_calls"}
    assert len(fragments) == 3
    assert fragments[0]["id"].startswith("call_") and fragments[0]["name"] == "get_weather"
    assert all("id" not in f and "name" not in f and f["index"] == 0 for f in fragments[1:])
    assert "".join(f["arguments"] for f in fragments) == '{"city": "Paris", "days": [1, 2]}'
    # A pure function of the request: the same items again, call id included.
    assert [item async for item in DemoBackend().generate(job)] == items
    reasoning = "".join(item["text"] for item in items[:5])
    assert reasoning[0].isupper() and len(reasoning.split()) == 5


async def test_without_the_options_there_is_no_reasoning_and_no_call():
    items = [item async for item in DemoBackend().generate(spec(max_tokens=5))]
    assert all(isinstance(item, str) for item in items[:-1])
    assert items[-1]["type"] == "done"
