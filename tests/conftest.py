"""Shared fixtures: real servers on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server():
    """A fresh real redis-server for one test."""
    server = RedisServer().start()
    yield server
    server.stop()
