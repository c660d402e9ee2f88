"""Telemetry settings read once from the standard OTEL_* environment variables.

The environment is passed in (a mapping), so tests and several gateways in
one process each get their own settings. Exporters are configured only when
an OTLP endpoint is given or OTEL_{TRACES,METRICS}_EXPORTER names `otlp`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from opentelemetry.util.re import parse_env_headers

from gateway.switches import env_flag

if TYPE_CHECKING:
    from gateway.policy.model import Telemetry as PolicyTelemetry

logger = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http/protobuf")
#: the spec's default protocol
DEFAULT_PROTOCOL = "http/protobuf"
DEFAULT_ENDPOINTS = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318"}
CONTENT_ON = frozenset({"true", "span_only", "span_and_event"})


@dataclass(frozen=True)
class SignalExport:
    """Where and how one signal (traces or metrics) is exported over OTLP."""

    protocol: str
    endpoint: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None      # the Python SDK reads OTEL_EXPORTER_OTLP_TIMEOUT as seconds
    insecure: bool | None = None


@dataclass(frozen=True)
class BatchSettings:
    """BatchSpanProcessor bounds (OTEL_BSP_*)."""

    max_queue_size: int = 2048
    schedule_delay_ms: float = 5000.0
    max_export_batch_size: int = 512
    export_timeout_ms: float = 30000.0


@dataclass(frozen=True)
class TelemetryConfig:
    """Everything the telemetry layer needs to start, parsed once."""

    disabled: bool = False
    service_name: str = "inference-gateway"
    resource_attributes: dict[str, str] = field(default_factory=dict)
    traces: SignalExport | None = None
    metrics: SignalExport | None = None
    sampler: str = "parentbased_always_on"
    sampler_arg: float = 1.0
    batch: BatchSettings = field(default_factory=BatchSettings)
    metric_interval_ms: float = 60000.0
    metric_timeout_ms: float = 30000.0
    temporality: str = "cumulative"
    prometheus: bool = False
    capture_content: bool = False
    tenant_allowlist: tuple[str, ...] = ()
    tenant_top_n: int = 20

    @classmethod
    def from_env(cls, policy: PolicyTelemetry | None = None, service_name: str = "inference-gateway",
                 environ: Mapping[str, str] | None = None) -> TelemetryConfig:
        """Read the OTEL_* variables (and GATEWAY_PROMETHEUS) from `environ`."""
        env = environ if environ is not None else {}
        if env_flag(env, "OTEL_SDK_DISABLED"):
            return cls(disabled=True)
        resource = parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
        name = env.get("OTEL_SERVICE_NAME") or resource.get("service.name") or service_name
        return cls(
            service_name=name, resource_attributes=resource,
            traces=signal_export(env, "traces"), metrics=signal_export(env, "metrics"),
            sampler=env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower(),
            sampler_arg=_number(env, "OTEL_TRACES_SAMPLER_ARG", 1.0),
            batch=BatchSettings(
                max_queue_size=int(_positive(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)),
                schedule_delay_ms=_positive(env, "OTEL_BSP_SCHEDULE_DELAY", 5000),
                max_export_batch_size=int(_positive(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)),
                export_timeout_ms=_positive(env, "OTEL_BSP_EXPORT_TIMEOUT", 30000)),
            metric_interval_ms=_positive(env, "OTEL_METRIC_EXPORT_INTERVAL", 60000),
            metric_timeout_ms=_positive(env, "OTEL_METRIC_EXPORT_TIMEOUT", 30000),
            temporality=env.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "cumulative").strip().lower(),
            prometheus=bool(policy and policy.prometheus) or env_flag(env, "GATEWAY_PROMETHEUS")
            or "prometheus" in _exporters(env, "metrics"),
            capture_content=capture_content(env, policy),
            tenant_allowlist=tuple(policy.tenant_labels) if policy else (),
            tenant_top_n=policy.tenant_label_top_n if policy else 20,
        )


#: the exporters OTEL_{TRACES,METRICS}_EXPORTER may name, by signal
EXPORTERS = {"traces": frozenset({"otlp", "none"}), "metrics": frozenset({"otlp", "none", "prometheus"})}


def signal_export(env: Mapping[str, str], signal: str) -> SignalExport | None:
    """The OTLP export of one signal, or None when no endpoint is configured or OTEL_{SIGNAL}_EXPORTER, the whole
    list of the signal's exporters as the specification reads it, leaves `otlp` out (`prometheus` alone: metrics
    are scraped, not pushed as well)."""
    names = _exporters(env, signal)
    upper = signal.upper()
    if unknown := sorted(names - EXPORTERS[signal]):
        logger.warning("OTEL_%s_EXPORTER: unsupported exporter(s) %s ignored (supported: %s)", upper,
                       ", ".join(unknown), ", ".join(sorted(EXPORTERS[signal])))
    specific = env.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "").strip()
    generic = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if names and ("otlp" not in names or "none" in names):
        return None                 # the list names every exporter the signal has: OTLP is not among them
    if not (names or specific or generic):
        return None                 # no list and no endpoint: nothing configured
    protocol = _per_signal(env, upper, "PROTOCOL") or DEFAULT_PROTOCOL
    if protocol not in PROTOCOLS:
        logger.warning("unsupported OTLP protocol %r for %s; using %s", protocol, signal, DEFAULT_PROTOCOL)
        protocol = DEFAULT_PROTOCOL
    if specific:
        endpoint = specific
    elif protocol == "grpc":
        endpoint = generic or DEFAULT_ENDPOINTS["grpc"]
    else:
        endpoint = f"{(generic or DEFAULT_ENDPOINTS[protocol]).rstrip('/')}/v1/{signal}"
    timeout = _timeout_s(env, upper)
    insecure = _per_signal(env, upper, "INSECURE")
    return SignalExport(
        protocol=protocol, endpoint=endpoint,
        headers=parse_env_headers(_per_signal(env, upper, "HEADERS"), liberal=True),
        timeout_s=timeout,
        insecure=insecure.lower() == "true" if insecure else None)


def parse_resource_attributes(text: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES: `key=value` pairs, comma separated, values percent-encoded."""
    attributes: dict[str, str] = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    return attributes


def capture_content(env: Mapping[str, str], policy: PolicyTelemetry | None) -> bool:
    """Message content is captured when the env var says so, or the policy does and the env var is unset."""
    value = env.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")
    if value is not None and value.strip():
        return value.strip().lower() in CONTENT_ON
    return bool(policy and policy.capture_content)


def _exporters(env: Mapping[str, str], signal: str) -> set[str]:
    return {name.strip().lower() for name in env.get(f"OTEL_{signal.upper()}_EXPORTER", "").split(",") if name.strip()}


def _per_signal(env: Mapping[str, str], upper: str, key: str) -> str:
    return (env.get(f"OTEL_EXPORTER_OTLP_{upper}_{key}") or env.get(f"OTEL_EXPORTER_OTLP_{key}") or "").strip()


def _timeout_s(env: Mapping[str, str], upper: str) -> float | None:
    """OTEL_EXPORTER_OTLP_{SIGNAL_}TIMEOUT in seconds; None (the exporter's default) when unset or not a positive
    number, which is named in a warning."""
    text = _per_signal(env, upper, "TIMEOUT")
    if not text:
        return None
    try:
        timeout_s = float(text)
    except ValueError:
        timeout_s = math.nan
    if not 0 < timeout_s < math.inf:
        logger.warning("ignoring OTEL_EXPORTER_OTLP_%s_TIMEOUT / OTEL_EXPORTER_OTLP_TIMEOUT=%r: not a positive "
                       "number of seconds", upper, text)
        return None
    return timeout_s


#: the largest count or time in milliseconds taken from the environment (the SDK's queues are sized by it)
_MOST = float(1 << 31)


def _positive(env: Mapping[str, str], key: str, default: float) -> float:
    """A count or a time in milliseconds that must be positive: one that is not (zero, negative, infinite, past
    2**31) is named in a warning and treated as unset, as the specification asks, rather than fail the start."""
    value = _number(env, key, default)
    if not 0 < value <= _MOST:
        logger.warning("ignoring %s=%r: not a positive number; using %s", key, env.get(key), default)
        return float(default)
    return value


def _number(env: Mapping[str, str], key: str, default: float) -> float:
    text = env.get(key, "").strip()
    if not text:
        return float(default)
    try:
        return float(text)
    except ValueError:
        logger.warning("ignoring %s=%r: not a number", key, text)
        return float(default)
