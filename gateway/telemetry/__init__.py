"""The telemetry layer: OpenTelemetry GenAI spans and metrics, exported over OTLP and Prometheus."""

from gateway.telemetry.config import TelemetryConfig
from gateway.telemetry.labels import TenantLabels
from gateway.telemetry.setup import Telemetry

__all__ = ["Telemetry", "TelemetryConfig", "TenantLabels"]
