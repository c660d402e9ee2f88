"""The Telemetry object: private tracer and meter providers built from the OTEL_* environment.

Created once in the app's cleanup_ctx and shut down there; several can live
in one process (tests), since none touches the global providers.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

from gateway import __version__
from gateway.telemetry.config import TelemetryConfig
from gateway.telemetry.exporters import (
    CountingBatchSpanProcessor,
    CountingMetricExporter,
    DropCounter,
    otlp_metric_exporter,
    otlp_span_exporter,
)
from gateway.telemetry.genai import SCHEMA_URL
from gateway.telemetry.labels import TenantLabels
from gateway.telemetry.histograms import HistogramExport
from gateway.telemetry.metrics import Instruments, histograms
from gateway.telemetry import observed
from gateway.telemetry.spans import RequestSpans
from gateway.telemetry.tracing import Hooks, NoopHooks, PlainCall

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.context import Attempt, RequestContext
    from gateway.policy.model import Telemetry as PolicyTelemetry

logger = logging.getLogger(__name__)

SCOPE = "inference-gateway"


class Telemetry:
    """Spans, metrics and their export for one gateway process; every hook is a no-op when disabled."""

    def __init__(self, config: TelemetryConfig) -> None:
        self.config = config
        self.dropped_counter = DropCounter()
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        self._registry: CollectorRegistry | None = None
        self._scrape_lock = threading.Lock()
        #: the gateway's meter, for other layers' instruments (GPU power and energy); None when disabled
        self.meter: Meter | None = None
        self._hooks: Hooks | NoopHooks = NoopHooks()
        self._tenant_labels: TenantLabels | None = None
        self._hooks_failed: set[str] = set()
        if not config.disabled:
            self._start()

    @classmethod
    def from_env(cls, policy_telemetry: PolicyTelemetry | None = None, service_name: str = "inference-gateway",
                 environ: Mapping[str, str] = os.environ) -> Telemetry:
        """Telemetry configured by the standard OTEL_* variables of `environ`."""
        return cls(TelemetryConfig.from_env(policy_telemetry, service_name, environ))

    @classmethod
    def disabled(cls) -> Telemetry:
        """Telemetry that records nothing."""
        return cls(TelemetryConfig(disabled=True))

    @property
    def enabled(self) -> bool:
        return not self.config.disabled

    @property
    def dropped(self) -> int:
        """Spans and metric points lost so far (queue full or export failed)."""
        return self.dropped_counter.total()

    def _start(self) -> None:
        config = self.config
        # service.version names the gateway's release unless OTEL_RESOURCE_ATTRIBUTES says otherwise
        resource = Resource.create({SERVICE_VERSION: __version__, **config.resource_attributes,
                                    SERVICE_NAME: config.service_name})
        self.tracer_provider = provider = TracerProvider(
            resource=resource, sampler=sampler(config.sampler, config.sampler_arg), shutdown_on_exit=False)
        processor = None
        if config.traces is not None:
            processor = CountingBatchSpanProcessor(otlp_span_exporter(config.traces), config.batch,
                                                   self.dropped_counter)
            provider.add_span_processor(processor)     # the provider flushes and shuts it down
        scope = InstrumentationScope(SCOPE, __version__, SCHEMA_URL)
        spans = RequestSpans(sampler=provider.sampler, ids=provider.id_generator, resource=provider.resource,
                             scope=scope, processor=processor)
        buckets = histograms()

        def histogram_export(delta: bool) -> HistogramExport:
            return HistogramExport(buckets.values(), scope, resource, delta=delta)

        self.meter_provider = MeterProvider(resource=resource, metric_readers=self._metric_readers(histogram_export),
                                            shutdown_on_exit=False)
        self.meter = meter = self.meter_provider.get_meter(SCOPE, __version__, schema_url=SCHEMA_URL)
        instruments = Instruments(meter, self.dropped_counter.observations, buckets)
        self._tenant_labels = tenants = TenantLabels(config.tenant_allowlist, config.tenant_top_n)
        self._hooks = Hooks(spans, instruments, tenants, config.capture_content)

    def _metric_readers(self, histogram_export: Callable[[bool], HistogramExport]) -> list[MetricReader]:
        config = self.config
        readers: list[MetricReader] = []
        if config.metrics is not None:
            exporter = CountingMetricExporter(otlp_metric_exporter(config.metrics, config.temporality),
                                              self.dropped_counter, histogram_export)
            readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=config.metric_interval_ms,
                                                         export_timeout_millis=config.metric_timeout_ms))
        if config.prometheus:
            reader = self._prometheus_reader(histogram_export(False))
            if reader is not None:
                readers.append(reader)
        return readers

    def _prometheus_reader(self, histograms: HistogramExport) -> MetricReader | None:
        """A Prometheus reader on a private registry, served by the app at /metrics."""
        try:
            from prometheus_client import CollectorRegistry

            from gateway.telemetry.prometheus import GatewayPrometheusReader
        except ImportError:
            logger.warning("Prometheus /metrics needs the opentelemetry-exporter-prometheus package; disabled")
            return None
        self._registry = CollectorRegistry(auto_describe=False)
        return GatewayPrometheusReader(histograms, registry=self._registry)

    @property
    def prometheus_enabled(self) -> bool:
        return self._registry is not None

    def prometheus_text(self) -> bytes:
        """The Prometheus text exposition of every metric; empty when Prometheus is off. Safe from any thread:
        scrapes are made one at a time (the reader hands each collection to one scrape)."""
        if self._registry is None:
            return b""
        from prometheus_client import generate_latest

        with self._scrape_lock:
            return generate_latest(self._registry)

    # the hooks the pipeline calls

    def start_request(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        """Start the SERVER span, continuing the caller's traceparent."""
        try:
            self._hooks.start_request(ctx, headers)
        except Exception:
            self._hook_failed("start_request")

    def plain_call(self, request, request_id: str) -> PlainCall:
        """The spans of a call that generates nothing (a stored response's), its SERVER span started now."""
        try:
            return self._hooks.plain_call(request, request_id)
        except Exception:
            self._hook_failed("plain_call")
            return PlainCall(None, None)

    def route_span(self, ctx: RequestContext) -> AbstractContextManager[Any]:
        """Context manager around routing: the gateway.route span and routing duration."""
        return self._hooks.route_span(ctx)

    def cache_span(self, ctx: RequestContext) -> AbstractContextManager[Any]:
        """Context manager around a cache lookup: the gateway.cache.lookup span."""
        return self._hooks.cache_span(ctx)

    def start_attempt(self, ctx: RequestContext, attempt: Attempt) -> dict[str, str]:
        """Start an attempt's CLIENT span; returns the trace headers to send upstream."""
        try:
            return self._hooks.start_attempt(ctx, attempt)
        except Exception:
            self._hook_failed("start_attempt")
            return {}

    def end_attempt(self, ctx: RequestContext, attempt: Attempt, chunk_gaps_s: Sequence[float] = ()) -> None:
        """End an attempt's CLIENT span and record its metrics (chunk gaps: streams only)."""
        try:
            self._hooks.end_attempt(ctx, attempt, chunk_gaps_s)
        except Exception:
            self._hook_failed("end_attempt")

    def _hook_failed(self, hook: str) -> None:
        """A telemetry hook raised (a mapping bug, an odd value): the request goes on without that telemetry; the
        failure is logged with its traceback, once per hook, and counted as dropped telemetry."""
        self.dropped_counter.add("traces", "hook_failed", 1)
        if hook not in self._hooks_failed:
            self._hooks_failed.add(hook)
            logger.exception("telemetry hook %s failed; requests are served without it", hook)

    def observe_gpus(self, monitor) -> None:
        """Export the GPU readings (hw.*) and per-model energy totals of an energy monitor."""
        if self.meter is not None:
            observed.observe_gpus(self.meter, monitor)

    def label_tenants(self, tenants) -> None:
        """Always label these tenants by name in metrics, past `tenant_label_top_n` (those with a budget: the
        gauge of their budget names them, and their spend must be found under the same name)."""
        if self._tenant_labels is not None:
            self._tenant_labels.allow(tenants)

    def keep_tenant_labels(self, tenants) -> None:
        """The tenants that may still call: the others' top-N places in metric labels are freed."""
        if self._tenant_labels is not None:
            self._tenant_labels.keep_only(tenants)

    def observe_policy(self, current_policy) -> None:
        """Export the policy's declared capacities and budgets (read at each collection, so reloads show)."""
        if self.meter is not None:
            observed.observe_policy(self.meter, current_policy)

    def observe_slots(self, waiting) -> None:
        """Export how many calls wait for a call slot, per model."""
        if self.meter is not None:
            observed.observe_slots(self.meter, waiting)

    def observe_background(self, watched) -> None:
        """Export how many background responses are watched until they end, per model."""
        if self.meter is not None:
            observed.observe_background(self.meter, watched)

    def observe_reloads(self, status) -> None:
        """Export how many policy reloads succeeded and failed."""
        if self.meter is not None:
            observed.observe_reloads(self.meter, status)

    def observe_cache_errors(self, read_errors) -> None:
        """Export the cache store's error count (each one served as a bypass)."""
        if self.meter is not None:
            observed.observe_cache_errors(self.meter, read_errors)

    def observe_ledger_errors(self, read_errors) -> None:
        """Export how many ledger lines a failed write lost."""
        if self.meter is not None:
            observed.observe_ledger_errors(self.meter, read_errors)

    def observe_store_failures(self, read_failures) -> None:
        """Export the rate limiter's and the budgets' store failures (each answered per on_store_failure)."""
        if self.meter is not None:
            observed.observe_store_failures(self.meter, read_failures)

    def record_outcome(self, task) -> None:
        """Count a reported task outcome and its cost (cost per successful task)."""
        self._hooks.record_task(task)

    def finish_request(self, ctx: RequestContext) -> None:
        """End the SERVER span and record the request's metrics (once; for streams, at the end)."""
        try:
            self._hooks.finish_request(ctx)
        except Exception:
            self._hook_failed("finish_request")

    # lifecycle

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        """Export everything recorded so far; False when something did not make it in time."""
        if self.tracer_provider is None or self.meter_provider is None:
            return True
        traces_ok = self.tracer_provider.force_flush(int(timeout_s * 1000))
        metrics_ok = self.meter_provider.force_flush(int(timeout_s * 1000))
        return bool(traces_ok and metrics_ok)

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Flush and stop exporting, waiting at most `timeout_s`; False when it did not finish in time."""
        if self.tracer_provider is None or self.meter_provider is None:
            return True
        worker = threading.Thread(target=self._shutdown_now, args=(timeout_s,), name="telemetry-shutdown",
                                  daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            logger.warning("telemetry shutdown did not finish within %.1f s; some telemetry may be lost", timeout_s)
            return False
        return True

    def _shutdown_now(self, timeout_s: float) -> None:
        assert self.tracer_provider is not None and self.meter_provider is not None
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=timeout_s * 1000)


def sampler(name: str, ratio: float) -> Sampler:
    """The SDK sampler named by OTEL_TRACES_SAMPLER (+ _ARG); unknown names get the default."""
    fixed = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF,
             "parentbased_always_on": DEFAULT_ON, "parentbased_always_off": DEFAULT_OFF}
    if name in fixed:
        return fixed[name]
    if not 0.0 <= ratio <= 1.0:             # the SDK would refuse to start; take the nearest valid ratio
        clamped = min(max(ratio, 0.0), 1.0) if ratio == ratio else 1.0
        logger.warning("OTEL_TRACES_SAMPLER_ARG %r is not a ratio in [0, 1]; using %s", ratio, clamped)
        ratio = clamped
    if name == "traceidratio":
        return TraceIdRatioBased(ratio)
    if name == "parentbased_traceidratio":
        return ParentBasedTraceIdRatio(ratio)
    logger.warning("unknown OTEL_TRACES_SAMPLER %r; using parentbased_always_on", name)
    return DEFAULT_ON
