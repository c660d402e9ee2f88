"""Instruments read at collection time from other layers: GPU readings, energy totals, cache errors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.semconv._incubating.metrics import hw_metrics

from gateway.telemetry.genai import MODEL_SELECTED, TENANT

#: hw.* instrument name -> unit (semantic conventions for hardware)
HW_UNITS = {hw_metrics.HW_POWER: "W", hw_metrics.HW_ENERGY: "J",
            hw_metrics.HW_GPU_UTILIZATION: "1", hw_metrics.HW_GPU_MEMORY_UTILIZATION: "1"}


def observe_gpus(meter: Meter, monitor) -> None:
    """hw.power, hw.energy, hw.gpu.utilization, hw.gpu.memory.utilization per GPU; energy split per model."""
    for name, unit in HW_UNITS.items():
        create = meter.create_observable_counter if name == hw_metrics.HW_ENERGY else meter.create_observable_gauge
        create(name, unit=unit, callbacks=[_hw_callback(monitor, name)])
    meter.create_observable_counter("gateway.energy.measured", unit="J", callbacks=[
        _per_model(monitor, lambda t: t.measured_j)], description="GPU energy measured per model (models sharing GPUs: per pool, labelled with their names joined by '+').")
    meter.create_observable_counter("gateway.energy.idle", unit="J", callbacks=[
        _per_model(monitor, lambda t: t.idle_j)], description="GPU energy with no request in flight, per model.")
    meter.create_observable_gauge("gateway.energy.idle_to_active", unit="1", callbacks=[
        _per_model(monitor, lambda t: t.idle_to_active_ratio)],
        description="Seconds a model's GPUs were idle per second they were active.")


def _hw_callback(monitor, metric: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        for reading in monitor.snapshot():
            value = reading.hw_values().get(metric)
            if value is not None:
                yield Observation(value, reading.hw_attributes())
    return observe


def _per_model(monitor, value_of) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        for model in monitor.models():
            value = value_of(monitor.totals(model))
            if value is not None:
                yield Observation(value, {MODEL_SELECTED: model})
    return observe


def observe_cache_errors(meter: Meter, read_errors: Callable[[], int]) -> None:
    """gateway.cache.errors: cache lookups and writes answered without Redis (it failed, timed out, or was
    being left alone after it could not be reached): it grows with traffic during an outage."""
    meter.create_observable_counter("gateway.cache.errors", unit="{error}",
                                    description="Cache lookups and writes answered without Redis: failed, timed out, "
                                                "or skipped during a back-off.",
                                    callbacks=[lambda _options: [Observation(read_errors())]])


def observe_ledger_errors(meter: Meter, read_errors: Callable[[], int]) -> None:
    """gateway.ledger.write_errors: ledger lines lost to a write that failed (a full disk, say)."""
    meter.create_observable_counter("gateway.ledger.write_errors", unit="{line}",
                                    description="Ledger lines lost to a write that failed.",
                                    callbacks=[lambda _options: [Observation(read_errors())]])


def observe_store_failures(meter: Meter, read_failures: Callable[[], Mapping[str, int]]) -> None:
    """gateway.store.failures by part (limits, budgets, outcomes, estimates, energy): admissions and budget checks
    or charges answered without Redis, per `store.on_store_failure`, outcome calls, shared-estimate syncs and
    GPU energy exchanges that failed (the cache's own are gateway.cache.errors)."""
    meter.create_observable_counter(
        "gateway.store.failures", unit="{call}", callbacks=[
            lambda _options: [Observation(count, {"gateway.store.part": part}) for part, count in read_failures().items()]],
        description="Rate-limit and budget store calls, outcome reports and bookings, shared-estimate syncs and "
                    "GPU energy exchanges, answered without Redis: failed, timed out, refused, or skipped during a "
                    "back-off.")


def observe_policy(meter: Meter, current_policy: Callable[[], object]) -> None:
    """What the policy declares, as gauges dashboards divide by: each model's max_concurrency, each budget."""
    meter.create_observable_gauge("gateway.model.max_concurrency", unit="{request}", callbacks=[
        lambda _options: [Observation(model.max_concurrency, {MODEL_SELECTED: name})
                          for name, model in current_policy().models.items()]],
        description="In-flight requests a model is declared to take (saturation = gateway.in_flight / this).")
    meter.create_observable_gauge("gateway.budget.limit", unit="USD", callbacks=[
        lambda _options: list(_budget_limits(current_policy()))],
        description="Each tenant's budget per period (day, month), from the policy.")


def _budget_limits(policy) -> Iterable[Observation]:
    for name, tenant in policy.tenants.items():
        for period, limit in (("day", tenant.budget.usd_per_day), ("month", tenant.budget.usd_per_month)):
            if limit is not None:
                yield Observation(float(limit), {TENANT: name, "gateway.budget.period": period})


def observe_slots(meter: Meter, waiting: Callable[[], Mapping[str, int]]) -> None:
    """gateway.queue.waiting: calls of this process waiting for a call slot now, per model."""
    meter.create_observable_gauge("gateway.queue.waiting", unit="{call}", callbacks=[
        lambda _options: [Observation(count, {MODEL_SELECTED: name}) for name, count in waiting().items()]],
        description="Calls waiting in the gateway for a slot on a saturated model (routing.queue_timeout_ms).")


def observe_background(meter: Meter, watched: Callable[[], Mapping[str, int]]) -> None:
    """gateway.background.watched: background responses of this process being generated now, per model, whose
    requests are booked once they end."""
    meter.create_observable_gauge("gateway.background.watched", unit="{response}", callbacks=[
        lambda _options: [Observation(count, {MODEL_SELECTED: name}) for name, count in watched().items()]],
        description="Background responses being generated, watched by the gateway until they end.")


def observe_reloads(meter: Meter, status: Callable[[], object]) -> None:
    """gateway.policy.reloads by result (ok, failed): a failed reload keeps the old policy, and shows here."""
    meter.create_observable_counter("gateway.policy.reloads", unit="{reload}", callbacks=[
        lambda _options: [Observation(status().reloads, {"gateway.policy.reload.result": "ok"}),
                          Observation(status().failures, {"gateway.policy.reload.result": "failed"})]],
        description="Policy reloads since start, by result.")
