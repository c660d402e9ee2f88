"""Per-request SLA tightening from `x-gateway-*` headers: a request may only tighten."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal, InvalidOperation

from gateway.errors import ClientError
from gateway.policy.model import MAX_USD

#: the finest amount a cost ceiling from a header is read to
PICO_USD = Decimal("1E-12")

HEADER_MAX_LATENCY_MS = "x-gateway-max-latency-ms"
HEADER_MAX_TTFT_MS = "x-gateway-max-ttft-ms"
HEADER_MIN_TIER = "x-gateway-min-tier"
HEADER_MAX_COST_USD = "x-gateway-max-cost-usd"
HEADER_MAX_ENERGY_J = "x-gateway-max-energy-j"


@dataclass(frozen=True, slots=True)
class Tighten:
    """SLA limits a request asks for; None leaves the route's own limit."""

    max_latency_ms: float | None = None
    max_ttft_ms: float | None = None
    min_tier: int | None = None
    max_cost_usd: Decimal | None = None
    max_energy_j: float | None = None

    @property
    def empty(self) -> bool:
        """Whether the request asked for nothing."""
        return (self.max_latency_ms is None and self.max_ttft_ms is None
                and self.min_tier is None and self.max_cost_usd is None and self.max_energy_j is None)

    def as_dict(self) -> dict[str, float | int]:
        """The limits asked for, by field name (for `RequestContext.sla_tightened`): the tier an int, the others
        floats."""
        asked = {"max_latency_ms": self.max_latency_ms, "max_ttft_ms": self.max_ttft_ms,
                 "max_cost_usd": self.max_cost_usd, "max_energy_j": self.max_energy_j}
        limits: dict[str, float | int] = {name: float(value) for name, value in asked.items() if value is not None}
        if self.min_tier is not None:
            limits["min_tier"] = self.min_tier
        return limits


NO_TIGHTEN = Tighten()


def _positive(value: str) -> float:
    """A positive, finite number."""
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError("expected a positive number")
    return number


def _tier(value: str) -> int:
    """A non-negative integer tier."""
    number = int(value)
    if number < 0:
        raise ValueError("expected a non-negative integer tier")
    return number


def _usd(value: str) -> Decimal:
    """A non-negative, finite amount of USD, at most MAX_USD as in a policy (`1e999999999` is a Decimal that
    overflows as soon as it is printed or normalised), to the pico-dollar (`1e-900000` would print as 900 KB)."""
    amount = Decimal(value)
    if not amount.is_finite() or amount < 0 or amount > MAX_USD:
        raise ValueError("expected a non-negative amount of USD")
    return amount.quantize(PICO_USD, rounding=ROUND_DOWN).copy_abs()      # `-0` is the ceiling 0


_PARSERS: tuple[tuple[str, str, Callable[[str], object], str], ...] = (
    (HEADER_MAX_LATENCY_MS, "max_latency_ms", _positive, "a positive number of milliseconds"),
    (HEADER_MAX_TTFT_MS, "max_ttft_ms", _positive, "a positive number of milliseconds"),
    (HEADER_MIN_TIER, "min_tier", _tier, "a non-negative integer"),
    (HEADER_MAX_COST_USD, "max_cost_usd", _usd, f"a non-negative amount of USD, at most {MAX_USD:.0f}"),
    (HEADER_MAX_ENERGY_J, "max_energy_j", _positive, "a positive number of joules"),
)


def tighten_from_headers(headers: Mapping[str, str]) -> Tighten:
    """The tightening a request's headers ask for; ClientError names a bad header."""
    asked: dict[str, object] = {}
    for header, field_name, parse, expected in _PARSERS:
        raw = headers.get(header)
        if raw is None:
            continue
        try:
            asked[field_name] = parse(raw.strip())
        except (ValueError, InvalidOperation) as exc:
            raise ClientError(f"invalid {header} header {raw!r}: expected {expected}",
                              param=header, code="invalid_header") from exc
    return Tighten(**asked) if asked else NO_TIGHTEN
