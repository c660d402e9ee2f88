"""What one request cost, in USD, as exact Decimals.

The cost is the sum of three parts; each applies when its price and its
measurement are both known, so API and self-hosted models share one rule:

- tokens: ((input - cached - audio in - written) x input_per_mtok
           + cached x (cached_input_per_mtok, or input_per_mtok when unset)
           + audio in x (audio_input_per_mtok, or input_per_mtok when unset)
           + written x (cache_write_input_per_mtok, or input_per_mtok when unset)
           + (output - audio out) x output_per_mtok
           + audio out x (audio_output_per_mtok, or output_per_mtok when unset)) / 1,000,000.
  Cached, audio and cache-written tokens are subsets of input tokens (OpenAI's
  accounting), audio ones capped at what the cached leave, written ones at what
  both leave; audio output tokens are a subset
  of the output; reasoning tokens are part of the output count and are not
  charged again.
- GPU time (self-hosted, `gpu_hour_usd` set): gpu_seconds x gpu_hour_usd / 3600.
- energy (`energy_usd_per_kwh` set): energy_j / 3,600,000 x energy_usd_per_kwh.

Floats (GPU seconds, joules) enter through their shortest decimal repr, so
0.1 s is exactly Decimal("0.1"), never 0.1000000000000000055...
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal

from gateway.context import Usage
from gateway.policy.model import Model

TOKENS_PER_MTOK = Decimal(1_000_000)
SECONDS_PER_HOUR = Decimal(3600)
JOULES_PER_KWH = Decimal(3_600_000)
#: precision of costs in headers and telemetry: 1e-10 USD
USD_QUANTUM = Decimal("1e-10")


def energy_cost_usd(model: Model, energy_j: float) -> Decimal:
    """The USD cost of `energy_j` joules on `model`'s GPUs; 0 when the model has no energy price."""
    if model.energy_usd_per_kwh is None:
        return Decimal(0)
    return _decimal(energy_j, "energy_j") / JOULES_PER_KWH * model.energy_usd_per_kwh


def request_cost_usd(model: Model, usage: Usage, *, gpu_seconds: float | None = None,
                     energy_j: float | None = None) -> Decimal:
    """The USD cost of one request to `model`: tokens, plus GPU time and energy when priced."""
    cost_usd = token_cost_usd(model, usage)
    if model.gpu_hour_usd is not None and gpu_seconds is not None:
        cost_usd += _decimal(gpu_seconds, "gpu_seconds") * model.gpu_hour_usd / SECONDS_PER_HOUR
    if energy_j is not None:
        cost_usd += energy_cost_usd(model, energy_j)
    return cost_usd


def token_cost_usd(model: Model, usage: Usage) -> Decimal:
    """The per-token part of a request's cost under the model's price."""
    price = model.price
    cached = min(usage.cached_input_tokens, usage.input_tokens)
    audio_in = min(usage.audio_input_tokens, usage.input_tokens - cached)
    written = min(usage.cache_write_input_tokens, usage.input_tokens - cached - audio_in)
    audio_out = min(usage.audio_output_tokens, usage.output_tokens)
    micro_usd = ((usage.input_tokens - cached - audio_in - written) * price.input_per_mtok
                 + cached * _or(price.cached_input_per_mtok, price.input_per_mtok)
                 + audio_in * _or(price.audio_input_per_mtok, price.input_per_mtok)
                 + written * _or(price.cache_write_input_per_mtok, price.input_per_mtok)
                 + (usage.output_tokens - audio_out) * price.output_per_mtok
                 + audio_out * _or(price.audio_output_per_mtok, price.output_per_mtok))
    return Decimal(micro_usd) / TOKENS_PER_MTOK


def _or(price: Decimal | None, otherwise: Decimal) -> Decimal:
    return otherwise if price is None else price


def quantize_usd(cost_usd: Decimal) -> Decimal:
    """A cost rounded (half to even) to USD_QUANTUM, for headers and telemetry."""
    return cost_usd.quantize(USD_QUANTUM, rounding=ROUND_HALF_EVEN)


def format_usd(cost_usd: Decimal) -> str:
    """A cost in plain decimal notation, no exponent, no trailing zeros: the x-gateway-cost-usd value."""
    text = format(quantize_usd(cost_usd), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def plain_usd(cost_usd: Decimal) -> str:
    """An exact cost in plain decimal notation (never `1.5E-7`), for the ledger and stats."""
    return format(cost_usd.normalize(), "f")


def _decimal(value: float, name: str) -> Decimal:
    """A finite non-negative measurement as the Decimal of its shortest repr."""
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return value if isinstance(value, Decimal) else Decimal(repr(value))
