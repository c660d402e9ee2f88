"""The bench's sections: each module has TITLE, NEEDS (processes), KEYS (its rows) and run(stack, options)."""

from __future__ import annotations

from types import ModuleType

from bench.report import title_number
from bench.sections import cache, features, latency, memory, replay, scaling, streaming, throughput

#: section name (as --only takes it) -> module
SECTION_MODULES: dict[str, ModuleType] = {
    "memory": memory, "latency": latency, "throughput": throughput, "streaming": streaming,
    "cache": cache, "scaling": scaling, "features": features, "replay": replay,
}


def table_order(sections: tuple[str, ...]) -> tuple[str, ...]:
    """The named sections in the order the results table shows them (by the number in their title)."""
    return tuple(sorted(sections, key=lambda name: title_number(SECTION_MODULES[name].TITLE)))


def expected_keys(sections: tuple[str, ...]) -> list[str]:
    """Every row id the named sections produce, in the results table's order."""
    return [key for name in table_order(sections) for key in SECTION_MODULES[name].KEYS]
