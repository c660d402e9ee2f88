"""The in-process limiter: the Redis limiter's semantics for one gateway process (no Redis)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from gateway.policy.model import Limits, Tenant
from gateway.tenancy.limits import (CONCURRENT_RETRY_S, INFLIGHT_TTL_S, WINDOW_S, Admission,
                                    LimitUsage, Verdict, new_ticket, to_ms, too_large, unlimited)


@dataclass
class TenantLog:
    """One tenant's sliding log; times in ms, entries in time order (the clock never goes back)."""

    requests: dict[str, int] = field(default_factory=dict)                  # ticket -> time_ms
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)   # ticket -> (time_ms, tokens)
    tokens_sum: int = 0
    inflight: dict[str, int] = field(default_factory=dict)             # ticket -> deadline_ms

    def expire(self, now_ms: int, window_ms: int) -> None:
        """Drop the entries that left the window and the in-flight slots past their deadline."""
        cutoff = now_ms - window_ms
        while self.requests:
            oldest = next(iter(self.requests))
            if self.requests[oldest] > cutoff:
                break
            del self.requests[oldest]
        while self.tokens:
            oldest = next(iter(self.tokens))
            time_ms, tokens = self.tokens[oldest]
            if time_ms > cutoff:
                break
            del self.tokens[oldest]
            self.tokens_sum -= tokens
        while self.inflight:        # deadlines are in insertion order: the TTL is one constant
            ticket, deadline_ms = next(iter(self.inflight.items()))
            if deadline_ms > now_ms:
                break
            del self.inflight[ticket]

    def requests_wait_ms(self, rpm: int, now_ms: int, window_ms: int) -> int:
        """How long until one more request fits under `rpm`."""
        index = len(self.requests) - rpm
        if rpm <= 0 or index >= len(self.requests):
            return window_ms
        return next(islice(self.requests.values(), index, None)) + window_ms - now_ms

    def tokens_wait_ms(self, tpm: int, cost: int, now_ms: int, window_ms: int) -> int:
        """How long until `cost` more tokens fit under `tpm`."""
        if cost > tpm:
            return window_ms
        need, freed = self.tokens_sum + cost - tpm, 0
        for time_ms, tokens in self.tokens.values():
            freed += tokens
            if freed >= need:
                return time_ms + window_ms - now_ms
        return window_ms

    def reset_ms(self, now_ms: int, window_ms: int) -> tuple[int, int]:
        """Time until the request log and the token log are empty."""
        newest_req = next(reversed(self.requests.values()), None)
        reset_req = newest_req + window_ms - now_ms if newest_req is not None else 0
        newest_tok = next(reversed(self.tokens.values()), None)
        reset_tok = newest_tok[0] + window_ms - now_ms if newest_tok is not None else 0
        return reset_req, reset_tok


class MemoryLimiter:
    """Sliding-log limits held in this process; atomic because admit never awaits mid-step."""

    remote = False

    def __init__(self, clock: Callable[[], float] = time.time, *, window_s: float = WINDOW_S,
                 inflight_ttl_s: float = INFLIGHT_TTL_S) -> None:
        self.clock = clock
        self.window_ms = to_ms(window_s)
        self.inflight_ttl_ms = to_ms(inflight_ttl_s)
        self.store_failures = 0
        self.logs: dict[str, TenantLog] = {}

    async def admit(self, tenant: Tenant, *, route: str | None, tokens: int,
                    now_s: float | None = None, ticket: str | None = None) -> Admission:
        """Check and consume all limits at once, or consume nothing and refuse."""
        if (refusal := too_large(tenant, tokens)) is not None:
            return refusal
        ticket = ticket or new_ticket()
        if unlimited(tenant.limits):
            return Admission(allowed=True, limits=tenant.limits, tenant=tenant.name,
                             ticket=ticket, reserved_tokens=tokens)
        verdict = self.decide(tenant.name, tenant.limits, tokens, ticket, self._now_ms(now_s))
        return verdict.admission(tenant, tokens=tokens, ticket=ticket)

    def decide(self, name: str, limits: Limits, cost: int, ticket: str, now_ms: int) -> Verdict:
        """The admission step itself, mirroring the Redis Lua script."""
        log = self.logs.setdefault(name, TenantLog())
        log.expire(now_ms, self.window_ms)
        refusals = self._refusals(log, limits, cost, now_ms)
        if not refusals:
            self._consume(log, limits, cost, ticket, now_ms)
        reset_req, reset_tok = log.reset_ms(now_ms, self.window_ms)
        return Verdict(not refusals, refusals[0][0] if refusals else 0,
                       max((wait_ms for _, wait_ms in refusals), default=0),
                       len(log.requests), log.tokens_sum, reset_req, reset_tok)

    def _refusals(self, log: TenantLog, limits: Limits, cost: int,
                  now_ms: int) -> list[tuple[int, int]]:
        """(reason code, wait in ms) for each limit that refuses, in order."""
        rpm, tpm, concurrent = limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent
        refusals = []
        if rpm is not None and len(log.requests) + 1 > rpm:
            refusals.append((1, log.requests_wait_ms(rpm, now_ms, self.window_ms)))
        if tpm is not None and log.tokens_sum + cost > tpm:
            refusals.append((2, log.tokens_wait_ms(tpm, cost, now_ms, self.window_ms)))
        if concurrent is not None and len(log.inflight) + 1 > concurrent:
            refusals.append((3, to_ms(CONCURRENT_RETRY_S)))
        return refusals

    def _consume(self, log: TenantLog, limits: Limits, cost: int, ticket: str, now_ms: int) -> None:
        if limits.requests_per_minute is not None:
            log.requests[ticket] = now_ms
        if limits.tokens_per_minute is not None:
            log.tokens[ticket] = (now_ms, cost)
            log.tokens_sum += cost
        if limits.concurrent is not None:
            log.inflight[ticket] = now_ms + self.inflight_ttl_ms

    async def settle(self, tenant: Tenant, *, ticket: str, reserved_tokens: int,
                     actual_tokens: int, now_s: float | None = None) -> None:
        """Rewrite the reservation to the real count, or charge a late excess at `now`."""
        self._settle(tenant, ticket, reserved_tokens, actual_tokens, now_s)

    def _settle(self, tenant: Tenant, ticket: str, reserved_tokens: int, actual_tokens: int,
                now_s: float | None) -> None:
        delta = actual_tokens - reserved_tokens
        log = self.logs.get(tenant.name)
        if tenant.limits.tokens_per_minute is None or delta == 0 or log is None:
            return
        now_ms = self._now_ms(now_s)
        found = log.tokens.get(ticket)
        if found is not None and found[1] == reserved_tokens and found[0] > now_ms - self.window_ms:
            log.tokens[ticket] = (found[0], actual_tokens)      # in place: keeps time order
        elif delta > 0 and (correction := f"{ticket}+{now_ms}:{delta}") not in log.tokens:
            log.tokens[correction] = (now_ms, delta)
        else:
            return
        log.tokens_sum += delta

    async def end(self, tenant: Tenant, *, ticket: str, reserved_tokens: int, actual_tokens: int,
                  now_s: float | None = None) -> bool:
        """release, then settle."""
        return self.end_now(tenant, ticket=ticket, reserved_tokens=reserved_tokens, actual_tokens=actual_tokens,
                            now_s=now_s)

    def end_now(self, tenant: Tenant, *, ticket: str, reserved_tokens: int, actual_tokens: int,
                now_s: float | None = None) -> bool:
        """`end`, done at once: admission ends an in-process admission without a task."""
        self._release(tenant, ticket)
        self._settle(tenant, ticket, reserved_tokens, actual_tokens, now_s)
        return True

    async def withdraw(self, tenant: Tenant, *, ticket: str, reserved_tokens: int,
                       now_s: float | None = None) -> bool:
        """release, settle to no tokens, and drop the request-log entry: the request takes nothing."""
        await self.end(tenant, ticket=ticket, reserved_tokens=reserved_tokens, actual_tokens=0, now_s=now_s)
        log = self.logs.get(tenant.name)
        if log is not None:
            log.requests.pop(ticket, None)
        return True

    async def release(self, tenant: Tenant, *, ticket: str) -> bool:
        """End an admission's in-flight slot; releasing twice is harmless. Always answered: True."""
        return self._release(tenant, ticket)

    def _release(self, tenant: Tenant, ticket: str) -> bool:
        log = self.logs.get(tenant.name)
        if log is not None:
            log.inflight.pop(ticket, None)
        return True

    async def usage(self, tenant: Tenant, now_s: float | None = None) -> LimitUsage:
        """The tenant's requests, tokens and in-flight count in the current window."""
        log = self.logs.get(tenant.name)
        if log is None:
            return LimitUsage()
        log.expire(self._now_ms(now_s), self.window_ms)
        return LimitUsage(len(log.requests), log.tokens_sum, len(log.inflight))

    def _now_ms(self, now_s: float | None) -> int:
        return to_ms(self.clock() if now_s is None else now_s)
