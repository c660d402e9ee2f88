"""Grafana's value formats for the units the dashboards use: USD, percent, seconds, joules, watts, req/s."""

from __future__ import annotations

import math

SI_UP = ((1e9, "G"), (1e6, "M"), (1e3, "k"))
SHORT_UP = ((1e9, " Bil"), (1e6, " Mil"), (1e3, " K"))


def auto_decimals(value: float) -> int:
    """Enough decimals to show three significant digits, at most eight."""
    magnitude = abs(value)
    if magnitude == 0 or magnitude >= 100:
        return 0
    if magnitude >= 10:
        return 1
    if magnitude >= 1:
        return 2
    return min(8, 2 - math.floor(math.log10(magnitude)))


def _number(value: float, decimals: int | None) -> str:
    return f"{value:.{auto_decimals(value) if decimals is None else decimals}f}"


def _scaled(value: float, base: str, decimals: int | None, steps=SI_UP) -> str:
    for factor, prefix in steps:
        if abs(value) >= factor:
            return f"{_number(value / factor, decimals)} {prefix.strip()}{base}".replace("  ", " ")
    return f"{_number(value, decimals)} {base}".rstrip()


def _seconds(value: float, decimals: int | None) -> str:
    magnitude = abs(value)
    if magnitude >= 3600:
        return f"{_number(value / 3600, decimals)} h"
    if magnitude >= 60:
        return f"{_number(value / 60, decimals)} min"
    if magnitude >= 1 or magnitude == 0:
        return f"{_number(value, decimals)} s"
    if magnitude >= 1e-3:
        return f"{_number(value * 1e3, decimals)} ms"
    return f"{_number(value * 1e6, decimals)} µs"


def format_value(value: float, unit: str, decimals: int | None = None) -> str:
    """`value` as Grafana shows it in `unit`; NaN and infinities as Grafana spells them."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if unit == "currencyUSD":
        sign = "-" if value < 0 else ""
        return f"{sign}${_number(abs(value), decimals)}"
    if unit == "percentunit":
        return f"{_number(value * 100, decimals)}%"
    if unit == "percent":
        return f"{_number(value, decimals)}%"
    if unit == "s":
        return _seconds(value, decimals)
    if unit == "ms":
        return _seconds(value / 1000, decimals)
    if unit == "joule":
        return _scaled(value, "J", decimals)
    if unit == "watt":
        return _scaled(value, "W", decimals)
    if unit == "reqps":
        return f"{_scaled(value, '', decimals, SHORT_UP)} req/s".replace("  ", " ")
    if unit == "short":
        return _scaled(value, "", decimals, SHORT_UP)
    return _number(value, decimals)
