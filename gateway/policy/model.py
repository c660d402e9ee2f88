"""The policy as frozen dataclasses: what `gateway.policy.load` produces.

Every key an SRE can write in a policy YAML file has a field here, with its
unit in the name. Defaults are the documented defaults (README, "Policy
reference"). Money is `Decimal`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

#: the largest amount of money a policy may name (a price, a ceiling, a budget), or a request's header: beyond any
#: real figure, and within what the gateway's decimal arithmetic carries exactly
MAX_USD = 1e9

Endpoint = Literal["chat", "completions", "embeddings", "responses"]
ENDPOINTS: tuple[str, ...] = ("chat", "completions", "embeddings", "responses")
#: what a route's `match.endpoints` holds when not written: the Responses API is taken only by routes that name
#: it, whose model servers serve `/v1/responses` (a server without it answers 404, which would open its circuit)
DEFAULT_ENDPOINTS: tuple[str, ...] = ("chat", "completions", "embeddings")


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input_per_mtok: Decimal = Decimal(0)
    output_per_mtok: Decimal = Decimal(0)
    #: price of prompt tokens served from the provider's prompt cache; default: input price
    cached_input_per_mtok: Decimal | None = None
    #: price of prompt tokens written to the provider's prompt cache (OpenAI's `cache_write_tokens`, Anthropic's
    #: `cache_creation_input_tokens`, 1.25x its input price); default: input price
    cache_write_input_per_mtok: Decimal | None = None
    #: prices of audio tokens, in and out (gpt-4o-audio's are many times its text's); default: the text prices
    audio_input_per_mtok: Decimal | None = None
    audio_output_per_mtok: Decimal | None = None


@dataclass(frozen=True)
class LatencyPrior:
    """What the SRE expects of a model before the gateway has measured it."""

    ttft_ms: float = 500.0
    tpot_ms: float = 20.0


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    first_byte_s: float = 60.0
    total_s: float = 600.0


@dataclass(frozen=True)
class GpuSource:
    """Where the GPUs serving a model are measured."""

    source: Literal["nvml", "dcgm"]
    ids: tuple[str, ...] = ()
    url: str | None = None          # DCGM exporter /metrics URL
    hostname: str | None = None     # DCGM `Hostname` label to match
    idle_w: float | None = None     # idle power per GPU; learned when absent


@dataclass(frozen=True)
class Model:
    name: str
    endpoint: str
    upstream_model: str
    provider: str = "openai"
    api_key_env: str | None = None
    size_b: float = 0.0
    tier: int = 1
    #: what the model takes beyond text (gateway.routing.needs.FEATURES); None: anything
    supports: tuple[str, ...] | None = None
    context_window: int = 8192
    max_concurrency: int = 64
    price: Price = field(default_factory=Price)
    gpu_hour_usd: Decimal | None = None
    energy_usd_per_kwh: Decimal | None = None
    latency_prior: LatencyPrior = field(default_factory=LatencyPrior)
    encoding: str = "o200k_base"
    timeouts: Timeouts = field(default_factory=Timeouts)
    gpus: GpuSource | None = None

    @property
    def server(self) -> tuple[str, str]:
        """(endpoint, upstream model): the server a call goes to and the model it runs there, which the model's
        latency, load and answers are of."""
        return self.endpoint, self.upstream_model

    @property
    def gpu_count(self) -> int:
        """GPUs a request on this model occupies, for its GPU-time price: the ids named, else 1."""
        return len(self.gpus.ids) if self.gpus is not None and self.gpus.ids else 1


@dataclass(frozen=True)
class HeaderMatch:
    name: str                       # lower-case header name
    value: str                      # exact value, or a regex when `regex` is true
    regex: bool = False


@dataclass(frozen=True)
class Match:
    """Which requests a route takes. Empty tuples match anything."""

    models: tuple[str, ...] = ("*",)            # requested model aliases; `*` globs allowed
    endpoints: tuple[str, ...] = DEFAULT_ENDPOINTS
    tenants: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()
    prompt_tokens_min: int | None = None
    prompt_tokens_max: int | None = None


@dataclass(frozen=True)
class Sla:
    p95_latency_ms: float | None = None
    p95_ttft_ms: float | None = None
    min_tier: int = 0
    max_cost_usd: Decimal | None = None
    max_energy_j: float | None = None
    on_violation: Literal["best_effort", "reject"] = "best_effort"


@dataclass(frozen=True)
class CacheRule:
    enabled: bool = False
    ttl_s: int = 3600
    mode: Literal["exact"] = "exact"
    nondeterministic: bool = False


@dataclass(frozen=True)
class Route:
    name: str
    match: Match
    candidates: tuple[str, ...]
    sla: Sla = field(default_factory=Sla)
    fallback: tuple[str, ...] = ()
    cache: CacheRule = field(default_factory=CacheRule)
    #: expected output tokens when the request gives no max_tokens
    default_output_tokens: int = 256


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent: int | None = None


@dataclass(frozen=True)
class Budget:
    usd_per_day: Decimal | None = None
    usd_per_month: Decimal | None = None
    on_exhausted: Literal["reject", "downgrade"] = "reject"

    @property
    def limited(self) -> bool:
        """Whether a day or a month limit is set (spend is then charged and checked)."""
        return self.usd_per_day is not None or self.usd_per_month is not None


#: a tenant's priority when the policy gives none, and an anonymous caller's
DEFAULT_PRIORITY = 1


@dataclass(frozen=True)
class Tenant:
    name: str
    keys_sha256: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()                # allow list; empty: every route
    models: tuple[str, ...] = ()                # allowed aliases; empty: every alias
    limits: Limits = field(default_factory=Limits)
    budget: Budget = field(default_factory=Budget)
    priority: int = DEFAULT_PRIORITY        # higher waits less for a saturated model's call slot


@dataclass(frozen=True)
class Server:
    max_body_bytes: int = 20 * 1024 * 1024      # OpenAI takes images up to 20 MB, inline as data URLs
    #: the largest model answer read into memory whole (a non-streamed answer, an error body); past it a 502
    max_answer_bytes: int = 256 * 1024 * 1024
    #: /metrics answers the admin token alone (its series name every tenant, its spend, budgets and workflows)
    metrics_admin_only: bool = False
    grace_period_s: float = 15.0
    #: the longest a client may keep a request waiting while it sends it: its head, from a new connection or from
    #: its first byte, and each gap in its body (a stalled client is answered 408, its connection closed)
    client_timeout_s: float = 60.0
    #: admin token: its SHA-256 in the policy, or the name of an environment variable holding it
    admin_token_sha256: str | None = None
    admin_token_env: str | None = "GATEWAY_ADMIN_TOKEN"


@dataclass(frozen=True)
class Breaker:
    failure_threshold: int = 5
    open_s: float = 30.0


@dataclass(frozen=True)
class Routing:
    explore_share: float = 0.0
    latency_window_s: float = 300.0
    prior_weight: int = 5           # pseudo-samples the latency prior counts for
    breaker: Breaker = field(default_factory=Breaker)
    max_attempts: int = 4
    #: > 0: a model's max_concurrency caps this process's calls on it, the rest wait this long, by tenant priority
    queue_timeout_ms: float = 0.0
    #: every process sends its latency samples to Redis and routes by all of them (needs a Redis)
    share_estimates: bool = False
    #: how long the model and tenant of each stored Responses API answer are remembered (`gateway.routing.pins`)
    stored_response_ttl_s: int = 86_400


@dataclass(frozen=True)
class Store:
    redis_url: str | None = None    # GATEWAY_REDIS_URL wins over this
    on_store_failure: Literal["allow", "deny"] = "allow"
    timeout_ms: float = 100.0
    key_prefix: str = "gw"
    cluster: bool = False           # Redis Cluster (GATEWAY_REDIS_CLUSTER=1 wins)
    max_connections: int = 256


@dataclass(frozen=True)
class Telemetry:
    capture_content: bool = False
    tenant_labels: tuple[str, ...] = ()         # tenants kept as metric labels; others `other`
    tenant_label_top_n: int = 20
    prometheus: bool = False


@dataclass(frozen=True)
class Ledger:
    path: str | None = None
    max_bytes: int = 64 * 1024 * 1024
    backups: int = 5


@dataclass(frozen=True)
class Energy:
    sample_interval_s: float = 0.25


@dataclass(frozen=True)
class Policy:
    version: int
    models: dict[str, Model]
    routes: tuple[Route, ...]
    tenants: dict[str, Tenant] = field(default_factory=dict)
    server: Server = field(default_factory=Server)
    routing: Routing = field(default_factory=Routing)
    store: Store = field(default_factory=Store)
    telemetry: Telemetry = field(default_factory=Telemetry)
    ledger: Ledger = field(default_factory=Ledger)
    energy: Energy = field(default_factory=Energy)
    #: where it came from, and the SHA-256 of the file's bytes
    source: str = "<memory>"
    content_sha256: str = ""

    def aliases(self) -> list[str]:
        """The model names clients may ask for: every literal alias routes match."""
        from gateway.routing.matcher import is_glob       # late: the matcher imports this module

        seen: dict[str, None] = {}
        for route in self.routes:
            for alias in route.match.models:
                if not is_glob(alias):
                    seen.setdefault(alias, None)
        return list(seen)
