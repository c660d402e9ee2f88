"""Request cost: token prices with cached input, GPU-hour and energy prices, exact Decimals, header format."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.context import Usage
from gateway.cost import format_usd, plain_usd, quantize_usd, request_cost_usd
from gateway.policy.model import Model, Price

API_MODEL = Model(name="large", endpoint="http://127.0.0.1:1/v1", upstream_model="large",
                  price=Price(input_per_mtok=Decimal("2.50"), output_per_mtok=Decimal("10.00"),
                              cached_input_per_mtok=Decimal("1.25")))
SELF_HOSTED = Model(name="local", endpoint="http://127.0.0.1:2/v1", upstream_model="local",
                    gpu_hour_usd=Decimal("2.40"), energy_usd_per_kwh=Decimal("0.12"))


def test_api_price_with_cached_input():
    """(600 x 2.50 + 400 cached x 1.25 + 200 x 10.00) / 1e6 is exactly 0.004 USD."""
    usage = Usage(input_tokens=1000, output_tokens=200, cached_input_tokens=400, reasoning_tokens=50)
    assert request_cost_usd(API_MODEL, usage) == Decimal("0.004")


def test_cached_tokens_default_to_the_input_price_and_are_capped():
    """Without a cached price cached tokens pay the input price; more cached than input counts as all."""
    model = Model(name="m", endpoint="e", upstream_model="m",
                  price=Price(input_per_mtok=Decimal("3"), output_per_mtok=Decimal("15")))
    assert request_cost_usd(model, Usage(1000, 100, cached_input_tokens=400)) == Decimal("0.0045")
    capped = request_cost_usd(API_MODEL, Usage(input_tokens=100, output_tokens=0, cached_input_tokens=500))
    assert capped == Decimal("0.000125")


def test_audio_tokens_pay_the_audio_prices_and_default_to_the_text_ones():
    """gpt-4o-audio's prices (2.50 / 10 text, 40 / 80 audio): 1,000 input of which 300 cached (1.25) and 200
    audio, 500 output of which 400 audio: (500 x 2.50 + 300 x 1.25 + 200 x 40 + 100 x 10 + 400 x 80) / 1e6;
    without audio prices the audio tokens pay the text ones; audio is capped at what the cached tokens leave."""
    audio = Model(name="a", endpoint="e", upstream_model="a", price=Price(
        input_per_mtok=Decimal("2.50"), output_per_mtok=Decimal("10"), cached_input_per_mtok=Decimal("1.25"),
        audio_input_per_mtok=Decimal("40"), audio_output_per_mtok=Decimal("80")))
    usage = Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=300, audio_input_tokens=200,
                  audio_output_tokens=400)
    assert request_cost_usd(audio, usage) == Decimal("0.042625")
    assert request_cost_usd(API_MODEL, usage) == request_cost_usd(API_MODEL, Usage(1000, 500, cached_input_tokens=300))
    capped = Usage(input_tokens=100, output_tokens=0, cached_input_tokens=80, audio_input_tokens=100)
    assert request_cost_usd(audio, capped) == (80 * Decimal("1.25") + 20 * Decimal(40)) / Decimal(1_000_000)


def test_gpu_hour_and_energy_price():
    """1.5 GPU-s at 2.40 USD/h is 0.001 USD; 360 J at 0.12 USD/kWh adds 0.000012 USD."""
    usage = Usage(input_tokens=500, output_tokens=500)
    assert request_cost_usd(SELF_HOSTED, usage, gpu_seconds=1.5) == Decimal("0.001")
    assert request_cost_usd(SELF_HOSTED, usage, gpu_seconds=1.5, energy_j=360.0) == Decimal("0.001012")
    assert request_cost_usd(SELF_HOSTED, usage) == Decimal(0)


def test_token_prices_add_to_gpu_prices():
    """A self-hosted model that also sets token prices pays both."""
    model = Model(name="m", endpoint="e", upstream_model="m", gpu_hour_usd=Decimal("3.6"),
                  price=Price(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("2")))
    cost = request_cost_usd(model, Usage(input_tokens=1000, output_tokens=1000), gpu_seconds=1.0)
    assert cost == Decimal("0.003") + Decimal("0.001")


def test_energy_without_an_energy_price_costs_nothing():
    """Measured joules cost nothing when the model has no energy price."""
    model = Model(name="m", endpoint="e", upstream_model="m", gpu_hour_usd=Decimal("1"))
    assert request_cost_usd(model, Usage(), energy_j=1e9) == Decimal(0)


def test_zero_usage_costs_zero():
    """No tokens, no GPU time and no energy cost exactly nothing."""
    assert request_cost_usd(API_MODEL, Usage()) == Decimal(0)
    assert request_cost_usd(SELF_HOSTED, Usage(), gpu_seconds=0.0, energy_j=0.0) == Decimal(0)


def test_decimal_arithmetic_has_no_float_drift():
    """0.1 GPU-s at 3.6 USD/h is exactly 0.0001 USD, and a thousand 1-token costs sum exactly."""
    model = Model(name="m", endpoint="e", upstream_model="m", gpu_hour_usd=Decimal("3.6"),
                  price=Price(input_per_mtok=Decimal("0.1")))
    assert 0.1 * 3.6 / 3600 != 0.0001
    assert request_cost_usd(model, Usage(), gpu_seconds=0.1) == Decimal("0.0001")
    total = sum((request_cost_usd(model, Usage(input_tokens=1)) for _ in range(1000)), Decimal(0))
    assert total == Decimal("0.0001")


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_invalid_measurements_are_rejected(bad):
    """Negative or non-finite GPU seconds and joules are programming errors, not costs."""
    with pytest.raises(ValueError, match="gpu_seconds"):
        request_cost_usd(SELF_HOSTED, Usage(), gpu_seconds=bad)
    with pytest.raises(ValueError, match="energy_j"):
        request_cost_usd(SELF_HOSTED, Usage(), energy_j=bad)


def test_quantize_usd_rounds_half_even_to_1e_10():
    """Costs are rounded to ten decimal places, ties to even."""
    assert quantize_usd(Decimal("0.00000000005")) == Decimal("0E-10")
    assert quantize_usd(Decimal("0.00000000015")) == Decimal("2E-10")
    assert quantize_usd(Decimal("1.23456789012345")) == Decimal("1.2345678901")


@pytest.mark.parametrize(("cost", "text"), [
    (Decimal("1E-7"), "0.0000001"),
    (Decimal("0.004"), "0.004"),
    (Decimal("12.50"), "12.5"),
    (Decimal("1E+3"), "1000"),
    (Decimal("0"), "0"),
    (Decimal("-0"), "0"),
    (Decimal("3E-12"), "0"),
    (Decimal("0.00000000015"), "0.0000000002"),
])
def test_format_usd_is_plain_decimal(cost, text):
    """The header value is plain decimal notation with no exponent and no trailing zeros."""
    assert format_usd(cost) == text
    assert "E" not in format_usd(cost).upper()


def test_a_cost_below_the_header_precision_is_kept_exact():
    """A request's cost is exact, not rounded to the header's 1e-10 USD: a thousand such requests add up."""
    model = Model(name="m", endpoint="e", upstream_model="m", price=Price(input_per_mtok=Decimal("0.00003")))
    cost = request_cost_usd(model, Usage(input_tokens=1))
    assert cost == Decimal("3E-11")                 # 0.00003 USD / 1e6 tokens
    assert sum((cost for _ in range(1000)), Decimal(0)) == Decimal("3E-8")


@pytest.mark.parametrize(("cost", "text"), [
    (Decimal("1.5E-7"), "0.00000015"),
    (Decimal("3E-11"), "0.00000000003"),
    (Decimal("12.50"), "12.5"),
    (Decimal("1E+3"), "1000"),
])
def test_plain_usd_is_exact_plain_decimal(cost, text):
    """The ledger's cost is the exact value in plain decimal notation: no exponent, no rounding, no trailing zeros."""
    assert plain_usd(cost) == text
