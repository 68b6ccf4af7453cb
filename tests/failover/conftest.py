from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.failover.support import SentinelGroup


@pytest.fixture
def sentinels() -> Iterator[SentinelGroup]:
    """A master, its replica and three sentinels watching them, of this test's own."""
    group = SentinelGroup().start()
    try:
        yield group
    finally:
        group.close()
