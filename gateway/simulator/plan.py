"""How one request will be answered: its failure (if any), output length and delays, drawn from a seeded RNG."""

from __future__ import annotations

import random
from dataclasses import dataclass

from gateway.errors import ClientError
from gateway.simulator.config import FAULT_RATES, SimConfig
from gateway.simulator.parse import SimRequest

#: the fault each rate in FAULT_RATES injects
FAULTS = dict(zip(FAULT_RATES, ("rate_limit", "error", "hang", "drop"), strict=True))
#: the request field that carries the prompt, per kind: a context-length error names it, in its text and param
PROMPT_FIELDS = {"chat": "messages", "completions": "prompt", "embeddings": "input", "responses": "input"}
#: the output length when max_tokens is absent is normal around the mean with this relative spread
OUTPUT_SPREAD = 0.25


@dataclass(frozen=True)
class Plan:
    """The simulator's decisions for one request."""

    fault: str | None               # rate_limit | error | hang | drop | None
    output_tokens: int
    finish_reason: str              # stop | length
    ttft_s: float
    tpot_s: float

    @property
    def total_s(self) -> float:
        """How long a non-streamed answer takes: TTFT + (n - 1) x TPOT."""
        return self.ttft_s + max(self.output_tokens - 1, 0) * self.tpot_s


def plan_answer(config: SimConfig, rng: random.Random, request: SimRequest) -> Plan:
    """Decide how to answer `request`; raises ClientError when it exceeds the context window."""
    check_context(config, request)
    fault = draw_fault(config, rng)
    output_tokens, finish_reason = draw_output(config, rng, request)
    return Plan(fault, output_tokens, finish_reason,
                ttft_s=jittered(config.ttft_ms, config.jitter, rng) / 1000,
                tpot_s=jittered(config.tpot_ms, config.jitter, rng) / 1000)


def check_context(config: SimConfig, request: SimRequest) -> None:
    """Reject a prompt (plus max_tokens) longer than the context window, as OpenAI does; a completions batch and
    embeddings are checked prompt by prompt (input by input), each one being read on its own."""
    prompt_tokens = request.context_tokens
    requested = prompt_tokens + (request.max_tokens or 0)
    if requested <= config.context_window and prompt_tokens < config.context_window:
        return
    field = PROMPT_FIELDS[request.kind]
    raise ClientError(
        f"This model's maximum context length is {config.context_window} tokens. However, you requested "
        f"{requested} tokens ({prompt_tokens} in the {field}, {request.max_tokens or 0} in the completion). "
        f"Please reduce the length of the {field} or completion.", param=field, code="context_length_exceeded")


def draw_fault(config: SimConfig, rng: random.Random) -> str | None:
    """One draw against the failure rates, which partition [0, 1) in FAULT_RATES order."""
    point = rng.random()
    for rate_name, fault in FAULTS.items():
        point -= getattr(config, rate_name)
        if point < 0:
            return fault
    return None


def draw_output(config: SimConfig, rng: random.Random, request: SimRequest) -> tuple[int, str]:
    """(output tokens, finish reason): max_tokens when given, else a draw around the mean."""
    if request.kind == "embeddings":
        return 0, "stop"
    if request.max_tokens is not None:
        return request.max_tokens, "length"
    mean = config.mean_output_tokens
    natural = max(1, round(rng.gauss(mean, mean * OUTPUT_SPREAD)))
    room = config.context_window - request.context_tokens
    return (natural, "stop") if natural <= room else (room, "length")


def jittered(value: float, jitter: float, rng: random.Random) -> float:
    """`value` scaled by uniform(1 - jitter, 1 + jitter); exactly `value` when jitter is 0."""
    return value * rng.uniform(1 - jitter, 1 + jitter) if jitter else value
