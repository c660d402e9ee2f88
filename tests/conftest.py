"""Shared fixtures: real servers on 127.0.0.1."""

from __future__ import annotations

import pytest

from gateway.policy.model import Telemetry as PolicyTelemetry
from gateway.telemetry import Telemetry
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.redis_cluster import RedisCluster, cluster_binaries
from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server():
    """A fresh real redis-server for one test."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis_server():
    """One real redis-server for a whole test module (its tests keep to their own keys)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def receiver():
    """One real OTLP receiver (gRPC and HTTP) on 127.0.0.1, shared by a module's gateways."""
    server = OtlpReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster():
    """One real 3-master Redis Cluster for the whole run (tests keep to their own keys, or flush them)."""
    if cluster_binaries() is None:
        pytest.skip("redis-server and redis-cli are not installed (Debian: apt-get install redis-server)")
    running = RedisCluster.on_free_ports().start()
    yield running
    running.stop()


@pytest.fixture
def make_telemetry():
    """Builds Telemetry objects from an env dict and shuts them all down afterwards."""
    made: list[Telemetry] = []

    def make(env: dict[str, str], policy: PolicyTelemetry | None = None) -> Telemetry:
        telemetry = Telemetry.from_env(policy, environ={"OTEL_METRIC_EXPORT_INTERVAL": "60000", **env})
        made.append(telemetry)
        return telemetry

    yield make
    for telemetry in made:
        telemetry.shutdown(timeout_s=2)
