"""Fixtures of the matcher service tests (helpers are in tests/matcher/__init__.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
