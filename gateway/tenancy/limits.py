"""Tenant rate limits: the `Limiter` interface and the `Admission` it answers with.

Algorithm (both implementations): a sliding log over the last `window_s`
(60 s). Every admitted request is logged with its time; its token
reservation is logged with the same time. A request is admitted at time t
when the entries in (t - 60 s, t], plus this request, stay within
`requests_per_minute` and `tokens_per_minute`, and the in-flight count
stays below `concurrent`. Tolerance: 0 (no 60 s span ever holds more than
the limit), however many replicas share the store, because the check and
the write are one atomic step. In-flight entries carry a safety deadline
(`inflight_ttl_s`) so a replica that dies never leaks a slot for ever.
A reservation larger than `tokens_per_minute` would never fit: it is
refused at once (`too_large`), without asking the store and without Retry-After.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Protocol

from gateway.errors import GatewayError, RateLimited, StoreUnavailable
from gateway.policy.model import Limits, Tenant

WINDOW_S = 60.0
INFLIGHT_TTL_S = 900.0
#: how long a client refused for concurrency, or for a store outage, is told to wait
CONCURRENT_RETRY_S = 1.0
STORE_RETRY_S = 1.0
#: a refusal's reason; the first three are the admission script's codes 1 to 3
REASONS = ("requests", "tokens", "concurrent", "store_unavailable", "too_large")


def new_ticket() -> str:
    """A random id for one admission: names its log entries so settle and release find them.

    It only has to be unique among a tenant's entries in the window, so `random` (no syscall) will do.
    """
    return f"{random.getrandbits(64):016x}"


def format_reset(seconds: float) -> str:
    """A duration in OpenAI's x-ratelimit-reset-* format: `12ms`, `1s`, `6m0s`, `1h0m0s`."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest_ms = divmod(ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(frozen=True)
class Admission:
    """The answer of one admission step, with what the rate-limit headers report."""

    allowed: bool
    limits: Limits = field(default_factory=Limits)
    tenant: str = ""
    reason: str | None = None           # one of REASONS
    retry_after_s: float = 0.0
    ticket: str = ""                    # pass to settle() and release()
    reserved_tokens: int = 0
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float = 0.0
    reset_tokens_s: float = 0.0
    degraded: bool = False              # the store failed and on_store_failure let it through
    unsettled: bool = False             # the store was asked and did not answer: it may still apply it later

    @property
    def held(self) -> bool:
        """Whether the store holds this admission, or may still apply it: not when the store answered a refusal,
        nor when the admission was answered without asking the store (a back-off), so there is nothing to end."""
        return self.unsettled or (self.allowed and not self.degraded)

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the limits this tenant has."""
        headers: dict[str, str] = {}
        if self.limits.requests_per_minute is not None and self.remaining_requests is not None:
            headers["x-ratelimit-limit-requests"] = str(self.limits.requests_per_minute)
            headers["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            headers["x-ratelimit-reset-requests"] = format_reset(self.reset_requests_s)
        if self.limits.tokens_per_minute is not None and self.remaining_tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(self.limits.tokens_per_minute)
            headers["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            headers["x-ratelimit-reset-tokens"] = format_reset(self.reset_tokens_s)
        return headers

    def error(self) -> GatewayError:
        """The error to answer a refused admission with, Retry-After included unless no wait would help."""
        if self.reason == "too_large":
            return RateLimited(
                f"Request too large for tenant {self.tenant!r} on tokens per minute: limit "
                f"{self.limits.tokens_per_minute}, requested {self.reserved_tokens} (prompt + max_tokens x n). "
                "Reduce the prompt, max_tokens or n: waiting will not help.",
                code="request_too_large", headers=self.headers())
        retry_s = max(1, math.ceil(self.retry_after_s))
        headers = {**self.headers(), "Retry-After": str(retry_s),
                   "retry-after-ms": str(max(0, math.ceil(self.retry_after_s * 1000)))}
        if self.reason == "store_unavailable":
            return store_unavailable_error(headers)
        return RateLimited(self._message(retry_s), headers=headers)

    def _message(self, retry_s: int) -> str:
        limit = {"requests": f"requests per minute (limit {self.limits.requests_per_minute})",
                 "tokens": f"tokens per minute (limit {self.limits.tokens_per_minute}, "
                           f"requested {self.reserved_tokens})",
                 "concurrent": f"concurrent requests (limit {self.limits.concurrent})"}
        return (f"Rate limit reached for tenant {self.tenant!r} on "
                f"{limit.get(self.reason or '', self.reason)}. Retry after {retry_s}s.")


@dataclass(frozen=True)
class LimitUsage:
    """A tenant's use of its limits right now: what GET /admin/tenants shows."""

    requests: int = 0               # admitted in the last window
    tokens: int = 0                 # reserved or used in the last window
    concurrent: int = 0             # in flight
    available: bool = True          # False: the store did not answer

    def to_dict(self, limits: Limits | None = None) -> dict[str, object]:
        """The use as JSON-ready data; a count null when the store did not answer, or when it is not kept because
        the tenant has no such limit (`limits`): unknown, not 0."""
        known = self.available
        kept = (True, True, True) if limits is None else (limits.requests_per_minute is not None,
                                                          limits.tokens_per_minute is not None,
                                                          limits.concurrent is not None)
        return {"requests": self.requests if known and kept[0] else None,
                "tokens": self.tokens if known and kept[1] else None,
                "concurrent": self.concurrent if known and kept[2] else None, "available": self.available}


def store_unavailable_error(headers: dict[str, str], what: str = "Rate limit") -> GatewayError:
    """A 503 for a refusal because the limits (or budgets: `what`) store is down and the policy says deny."""
    return StoreUnavailable(f"{what} store unavailable; retry shortly.", headers=headers)


def too_large(tenant: Tenant, tokens: int) -> Admission | None:
    """The refusal of a reservation above the tenant's tokens_per_minute, which no wait would ever admit;
    None when it fits."""
    tpm = tenant.limits.tokens_per_minute
    if tpm is None or tokens <= tpm:
        return None
    return Admission(allowed=False, limits=tenant.limits, tenant=tenant.name, reason="too_large",
                     reserved_tokens=tokens)


def unlimited(limits: Limits) -> bool:
    """Whether a tenant has no rate limit at all, so admission needs no store call."""
    return (limits.requests_per_minute is None and limits.tokens_per_minute is None
            and limits.concurrent is None)


class Limiter(Protocol):
    """Admits, settles and releases requests against a tenant's limits, atomically.

    `route` is accepted for per-route limits and not used yet. `settle` and
    `release` take the `ticket` of the admission they finish.
    """

    #: the limits live in a store across the network; one that is not remote (in this process) also offers
    #: `end_now`, `end` done at once (admission ends a served request's admission without a task)
    remote: bool

    @property
    def store_failures(self) -> int:
        """Store calls that failed or timed out since start."""
        ...

    async def admit(self, tenant: Tenant, *, route: str | None, tokens: int,
                    now_s: float | None = None, ticket: str | None = None) -> Admission:
        """Check and consume all limits at once, or consume nothing and refuse.

        `ticket` names the admission (a fresh one when None): a caller that may be cancelled
        mid-call passes its own, so it can give back what the store may already hold.
        """
        ...

    async def settle(self, tenant: Tenant, *, ticket: str, reserved_tokens: int,
                     actual_tokens: int, now_s: float | None = None) -> None:
        """Replace an admission's token reservation with the tokens really used."""
        ...

    async def release(self, tenant: Tenant, *, ticket: str) -> bool:
        """End an admission's in-flight slot; False when the store did not answer."""
        ...

    async def end(self, tenant: Tenant, *, ticket: str, reserved_tokens: int, actual_tokens: int,
                  now_s: float | None = None) -> bool:
        """release, then settle: everything an answered admission gives back, at once; False when the store
        did not answer."""
        ...

    async def withdraw(self, tenant: Tenant, *, ticket: str, reserved_tokens: int,
                       now_s: float | None = None) -> bool:
        """Undo an admission whose request was refused after all (or abandoned before it was admitted): its
        slot, its tokens and its request-log entry, so it takes nothing; harmless twice. False when the store
        did not answer."""
        ...

    async def usage(self, tenant: Tenant) -> LimitUsage:
        """The tenant's requests, tokens and in-flight count in the current window."""
        ...


@dataclass(frozen=True)
class Verdict:
    """What one atomic admission step decided, in integer milliseconds (as the Lua script returns)."""

    allowed: bool
    reason_code: int            # 0 admitted, then 1 requests, 2 tokens, 3 concurrent
    retry_ms: int
    requests: int               # requests in the window, this one included when admitted
    tokens: int                 # tokens reserved in the window, likewise
    reset_requests_ms: int
    reset_tokens_ms: int

    @classmethod
    def from_reply(cls, reply: list[int]) -> Verdict:
        """Read the Lua script's reply array (its clock reading, last, is the limiter's)."""
        allowed, reason, retry, requests, tokens, reset_req, reset_tok = (int(v) for v in reply[:7])
        return cls(bool(allowed), reason, retry, requests, tokens, reset_req, reset_tok)

    def admission(self, tenant: Tenant, *, tokens: int, ticket: str) -> Admission:
        """The `Admission` this verdict means for a tenant."""
        limits = tenant.limits
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        return Admission(
            allowed=self.allowed, limits=limits, tenant=tenant.name,
            reason=None if self.allowed else REASONS[self.reason_code - 1],
            retry_after_s=self.retry_ms / 1000, ticket=ticket if self.allowed else "",
            reserved_tokens=tokens,
            remaining_requests=None if rpm is None else max(0, rpm - self.requests),
            remaining_tokens=None if tpm is None else max(0, tpm - self.tokens),
            reset_requests_s=self.reset_requests_ms / 1000,
            reset_tokens_s=self.reset_tokens_ms / 1000)


def to_ms(seconds: float) -> int:
    """Seconds as whole milliseconds, the unit both limiters count in."""
    return round(seconds * 1000)
