"""Yes/no switches given as environment variables."""

from __future__ import annotations

from collections.abc import Mapping

#: the words that turn a switch on (any case, spaces around ignored); anything else, or unset, is off
ON_WORDS = frozenset({"1", "true", "yes", "on"})


def env_flag(environ: Mapping[str, str], key: str) -> bool:
    """Whether the environment turns the switch `key` on."""
    return environ.get(key, "").strip().lower() in ON_WORDS
