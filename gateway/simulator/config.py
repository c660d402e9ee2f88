"""What one simulated model does: latency, output length, failures, all in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

#: the failure probabilities, in the order a request's one random draw is matched against them
FAULT_RATES = ("rate_limit_rate", "error_rate", "hang_rate", "drop_rate")


@dataclass(frozen=True)
class SimConfig:
    """One simulated model; every field can be changed at runtime through `POST /sim/config`."""

    name: str
    port: int = 0
    ttft_ms: float = 100.0              # time to first token
    tpot_ms: float = 10.0               # time per output token after the first
    jitter: float = 0.0                 # each delay is scaled by uniform(1 - jitter, 1 + jitter)
    mean_output_tokens: int = 64        # when the request sets no max_tokens
    error_rate: float = 0.0             # 500 with an OpenAI error body
    rate_limit_rate: float = 0.0        # 429 with Retry-After
    retry_after_s: float = 1.0
    hang_rate: float = 0.0              # accept, never answer until the client goes away
    drop_rate: float = 0.0              # send part of the answer, then cut the connection
    context_window: int = 8192          # prompt + max_tokens above this gets a 400
    embedding_dims: int = 1536          # when the request sets no `dimensions`
    seed: int = 0
    usage: bool = True                  # false: never report usage, even when the request asks for it

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def updated(self, changes: dict[str, Any]) -> SimConfig:
        """A copy with `changes` applied; raises ValueError on an unknown field or a bad value."""
        unknown = sorted(set(changes) - set(FIELD_TYPES))
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **{key: _coerce(key, value) for key, value in changes.items()})

    def as_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready data."""
        return dataclasses.asdict(self)


FIELD_TYPES: dict[str, type] = {
    f.name: {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)] for f in dataclasses.fields(SimConfig)
}


def _coerce(key: str, value: Any) -> Any:
    """`value` as the type of field `key`; ints are accepted for float fields, nothing else is converted."""
    wanted = FIELD_TYPES[key]
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if wanted is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected bool, got {value!r}")
        return value
    if not isinstance(value, wanted) or isinstance(value, bool):
        raise ValueError(f"{key}: expected {wanted.__name__}, got {value!r}")
    return value


def _problems(config: SimConfig) -> list[str]:
    """Every reason `config` is unusable, as short sentences."""
    problems = [f"{key} must be a finite number" for key, kind in FIELD_TYPES.items()
                if kind is float and not math.isfinite(getattr(config, key))]
    if not config.name:
        problems.append("name must not be empty")
    if not 0 <= config.port <= 65535:
        problems.append("port must be in 0..65535")
    for key in ("ttft_ms", "tpot_ms", "retry_after_s"):
        if getattr(config, key) < 0:
            problems.append(f"{key} must be >= 0")
    for key in ("jitter", *FAULT_RATES):
        if not 0.0 <= getattr(config, key) <= 1.0:
            problems.append(f"{key} must be in 0..1")
    if sum(getattr(config, key) for key in FAULT_RATES) > 1.0 + 1e-9:
        problems.append(f"the failure rates ({', '.join(FAULT_RATES)}) must add up to at most 1")
    for key in ("mean_output_tokens", "context_window", "embedding_dims"):
        if getattr(config, key) < 1:
            problems.append(f"{key} must be >= 1")
    return problems
