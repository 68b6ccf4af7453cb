"""The bench's reading of ``INFO commandstats``: per command, between two samples."""

from __future__ import annotations

from typing import Any

from tests.benchmarks import commandstats

BEFORE = (
    "# Commandstats\r\n"
    "cmdstat_evalsha:calls=10,usec=500,usec_per_call=50.00,rejected_calls=0,failed_calls=0\r\n"
    "cmdstat_info:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n"
)
AFTER = (
    "# Commandstats\r\n"
    "cmdstat_client|setname:calls=1,usec=2,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n"
    "cmdstat_evalsha:calls=30,usec=1700,usec_per_call=56.67,rejected_calls=0,failed_calls=0\r\n"
    "cmdstat_info:calls=4,usec=120,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n"
    "cmdstat_xadd:calls=20,usec=60,usec_per_call=3.00,rejected_calls=0,failed_calls=0\r\n"
)


class FakeRedis:
    def __init__(self, answer: str):
        self.answer = answer

    def cli(self, *args: str) -> str:
        assert args == ("INFO", "commandstats")
        return self.answer


def sample(answer: str) -> dict[str, float]:
    fake: Any = FakeRedis(answer)
    return commandstats.sample(fake)


def test_commands_between_two_samples_leave_out_the_bench_own_info():
    ran = commandstats.between(sample(BEFORE), sample(AFTER))
    assert ran == {"evalsha": (20, 1200), "xadd": (20, 60), "client|setname": (1, 2)}


def test_the_costliest_commands_come_first_per_stream_if_asked():
    ran = {"xadd": (20.0, 60.0), "evalsha": (20.0, 1200.0)}
    assert commandstats.costliest(ran) == "evalsha 20 x 60.0 us, xadd 20 x 3.0 us"
    assert commandstats.costliest(ran, per=10) == "evalsha 2.0 x 60.0 us, xadd 2.0 x 3.0 us"
