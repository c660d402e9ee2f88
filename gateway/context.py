"""Per-request state: one dataclass that every stage reads and fills in.

A request's whole story lives here, so telemetry, the ledger and the
response headers are all derived from one place.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.policy.model import Model, Policy, Route, Tenant

#: gen_ai.operation.name per endpoint kind
OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings", "responses": "chat"}


#: the error type of an attempt whose client left mid-stream: its span and duration say it was cut short,
#: while the tokens it produced still count
CLIENT_DISCONNECTED = "client_disconnected"
#: an attempt the gateway cut short because its drain ran out (as ShuttingDown's code)
SHUTTING_DOWN = "shutting_down"


@dataclass
class Usage:
    """Token counts of one upstream answer."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    audio_input_tokens: int = 0     # of the input tokens, those of audio (priced apart)
    cache_write_input_tokens: int = 0   # of the input tokens, those written to the provider's prompt cache
    audio_output_tokens: int = 0    # of the output tokens, those of audio
    estimated: bool = False     # counted by the gateway, not reported by the upstream


@dataclass
class Attempt:
    """One call to one model, successful or not."""

    model: Model
    started_s: float
    ended_s: float | None = None
    status: int | None = None
    error_type: str | None = None       # short reason when it failed: timeout, http_503, ...
    usage: Usage | None = None
    cost_usd: Decimal = Decimal(0)
    ttft_s: float | None = None
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()
    span: Any = None                    # the CLIENT span, when telemetry is on
    traceparent: str | None = None      # what was injected upstream
    energy_id: str | None = None        # the attempt's id in the energy ledger, when its GPUs are measured
    energy_j: float | None = None
    chunk_gaps_s: Sequence[float] = ()  # a stream's gaps between chunks, for time_per_output_chunk
    queued_s: float = 0.0               # waited for a call slot on a saturated model (routing.queue_timeout_ms)
    queue_result: str | None = None     # granted | timeout | cancelled, when it asked for a call slot
    holds_slot: bool = False            # took a call slot, given back when the attempt ends
    slot_pool: Any = None               # the model's call slots it asked (of the server it calls): given back there
    probe_since_s: float | None = None  # took its model's half-open probe (then): given back if the client leaves
    dispatched: bool = True             # False while it waits for a call slot, and for good if none came


@dataclass
class Candidate:
    """One model the router considered, and its verdict."""

    model: Model
    predicted_latency_ms: float
    predicted_ttft_ms: float
    predicted_cost_usd: Decimal
    kept: bool
    reasons: tuple[str, ...] = ()       # why dropped, empty when kept
    predicted_energy_j: float | None = None     # None: the model's energy is not measured (yet)


@dataclass
class Decision:
    """What the router chose, and why: the same object `policy explain` prints."""

    route: Route
    plan: tuple[Model, ...]             # models to try, in order
    candidates: tuple[Candidate, ...] = ()
    sla_met: bool = True
    explored: bool = False
    note: str = ""
    output_tokens: int = 0              # per choice, as the router predicted with: max_tokens, or the route's usual
    pinned: bool = False                # a continuation of a stored response: its one model, never re-planned


@dataclass
class RequestContext:
    """Everything known about one request as it flows through the stages."""

    http: web.Request
    policy: Policy
    request_id: str
    runtime: Any = None                 # gateway.runtime.Runtime: the policy's indexes
    started_s: float = field(default_factory=time.perf_counter)
    started_unix_s: float = field(default_factory=time.time)
    # identify
    tenant: Tenant | None = None
    # parse
    endpoint: str = "chat"              # chat | completions | embeddings
    body: dict[str, Any] = field(default_factory=dict)
    body_bytes: int = 0                 # the size of the body as read (chunked bodies have no Content-Length)
    requested_model: str = ""
    stream: bool = False
    include_usage: bool = False         # the client asked for the usage chunk
    max_tokens: int | None = None
    choices: int = 1                    # the request's `n` (× its prompts, for a completions batch): answers generated together
    uses: Mapping[str, str] | None = None   # what it uses beyond text: feature -> field (gateway.routing.needs)
    task_id: str | None = None
    workflow: str | None = None
    # count
    prompt_tokens: int = 0
    longest_prompt_tokens: int | None = None    # a batch's longest prompt, which each model's context must hold
    # admit
    reserved_tokens: int = 0
    admission: Any = None               # the limiter's Admission: rate-limit headers, the ticket to give back
    budget_downgrade: bool = False      # the budget is spent and the tenant's policy says downgrade
    # route
    decision: Decision | None = None
    routing_s: float | None = None      # time spent choosing the model
    sla_tightened: dict[str, float | int] = field(default_factory=dict)
    # cache
    cache_status: str = "bypass"        # hit | miss | bypass | stored
    cache_key: str | None = None
    cache_lookup: bool = False          # the request may be answered from the cache (no `no-cache`)
    cache_store: bool = False           # a fresh answer may be written to the cache (no `no-store`)
    cache_read: Any = None              # a remote store's read, started before admission (an asyncio.Task)
    cache_saved_usd: Decimal = Decimal(0)
    cache_model: str | None = None      # on a hit: the model whose stored answer it is
    # call
    attempts: list[Attempt] = field(default_factory=list)
    fallback_state: str = "none"        # none | retried | fallback | exhausted
    fallback_reason: str | None = None  # why the first model did not answer (only when fallback_state is not none)
    response: web.StreamResponse | None = None
    response_body: dict[str, Any] | None = None     # a non-streamed answer, parsed
    stream_record: Any = None           # what a finished stream said, for the cache
    bytes_sent: bool = False
    status: int = 200
    error: Exception | None = None
    cut_by_shutdown: bool = False       # still running when the drain's time ran out: the gateway ended it
    settling: Any = None                # a background response being generated (gateway.background): ends later
    # account
    usage: Usage = field(default_factory=Usage)
    cost_usd: Decimal = Decimal(0)
    energy_j: float | None = None
    ttft_s: float | None = None
    ended_s: float | None = None
    # observe
    span: Any = None                    # the SERVER span, when telemetry is on
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def operation(self) -> str:
        return OPERATIONS[self.endpoint]

    @property
    def route_name(self) -> str | None:
        return self.decision.route.name if self.decision else None

    @property
    def model_selected(self) -> str | None:
        """The model that answered, or the first planned when none did."""
        if self.attempts:
            return self.attempts[-1].model.name
        if self.cache_model is not None:
            return self.cache_model
        if self.decision and self.decision.plan:
            return self.decision.plan[0].name
        return None

    @property
    def cache_refreshed(self) -> bool:
        """Whether the request could use the cache but skipped its lookup (`Cache-Control: no-cache`): its answer
        may be stored, but nothing was looked up."""
        return self.cache_key is not None and not self.cache_lookup

    @property
    def tenant_name(self) -> str:
        return self.tenant.name if self.tenant else "anonymous"

    @property
    def priced_late(self) -> bool:
        """Whether an attempt ran on measured GPUs: its joules, and so the request's whole cost, are known only
        after the response, once the sampler has closed its last interval."""
        return any(attempt.energy_id is not None for attempt in self.attempts)

    @property
    def duration_s(self) -> float:
        return (self.ended_s or time.perf_counter()) - self.started_s
