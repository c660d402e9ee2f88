"""Counters summed in plain dicts on the hot path, handed to the SDK only when metrics are collected.

The OpenTelemetry SDK's synchronous `Counter.add` costs several microseconds
(attribute validation, hashing, a lock) and a request adds to a dozen
counters. Here an add is one tuple and one dict update; the SDK reads the
running sums through an observable instrument when a reader collects, which is
exactly what a cumulative counter reports. Collection runs on the exporter's
thread: copying the dict's items is one C call under the GIL, so it never sees
a dict in the middle of a change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from gateway.telemetry.histograms import CARDINALITY_LIMIT, OVERFLOW_KEY


class Sums:
    """A running sum per attribute set, exported as an observable (up-down) counter."""

    __slots__ = ("_sums",)

    def __init__(self, meter: Meter, name: str, *, unit: str, description: str, monotonic: bool = True) -> None:
        self._sums: dict[tuple, float] = {}
        create = meter.create_observable_counter if monotonic else meter.create_observable_up_down_counter
        create(name, callbacks=[self._observe], unit=unit, description=description)

    def add(self, amount: float, attributes: Mapping[str, Any]) -> None:
        """Add `amount` to the sum of this attribute set (the same signature as Counter.add)."""
        key = tuple(attributes.items())
        sums = self._sums
        if key not in sums and len(sums) >= CARDINALITY_LIMIT:
            key = OVERFLOW_KEY              # as the SDK does past its cardinality limit
        sums[key] = sums.get(key, 0) + amount

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(total, dict(key)) for key, total in list(self._sums.items())]
