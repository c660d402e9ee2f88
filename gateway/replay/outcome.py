"""What happened to each replayed request, and to the whole replay of one policy."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from gateway.policy.model import Policy


@dataclass(slots=True)
class Outcome:
    """What happened to one replayed request; times are virtual seconds."""

    index: int                          # position in arrival order
    arrival_s: float
    input_tokens: int
    output_tokens: int
    route: str | None = None
    status: str = "ok"                  # ok | cache_hit | rejected | failed
    #: rejected: unknown_tenant | forbidden | no_route | context | sla; failed: timeout | queue_timeout | circuit_open
    reason: str | None = None
    model: str | None = None            # the model that answered
    models_tried: tuple[str, ...] = ()
    planned_sla_met: bool | None = None  # the router predicted some candidate meets the SLA
    queue_s: float = 0.0
    ttft_s: float | None = None         # answered streams only: a whole answer's first byte is its end
    latency_s: float | None = None
    cost_usd: Decimal = Decimal(0)      # every attempt's, failed ones included
    energy_j: float | None = None       # every attempt's; None unless each model tried has a power assumption
    sla_ok: bool | None = None          # the simulated latency and TTFT met the route's SLA

    @property
    def label(self) -> str:
        """The answering model, `cache hit`, or `rejected:<reason>` / `failed:<reason>`."""
        if self.status == "ok":
            return self.model
        return "cache hit" if self.status == "cache_hit" else f"{self.status}:{self.reason}"


@dataclass
class ReplayResult:
    """One policy's replay: an outcome per request, in arrival order."""

    policy: Policy
    seed: int
    outcomes: list[Outcome]
    refused_in_trace: int = 0           # lines refused before routing in the traffic: not replayed
    #: requests a header-matched route could take: given the route their line recorded, or (none usable)
    #: matched without headers
    routed_by_recorded_route: int = 0
    matched_without_headers: int = 0
    estimated_output: int = 0           # calls that failed in the trace, replayed with their route's median output
