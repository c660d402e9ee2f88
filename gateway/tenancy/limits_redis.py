"""The shared limiter: one Lua script call per admission, so every replica sees the same counts."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.policy.model import Limits, Tenant
from gateway.store_guard import (ADMISSION_BACKOFF_S, STORE_DOWN, STORE_ERRORS, OnStoreFailure, RedisClock,
                                 StoreGuard)
from gateway.tenancy import limits_lua
from gateway.tenancy.limits import (CONCURRENT_RETRY_S, INFLIGHT_TTL_S, STORE_RETRY_S, WINDOW_S,
                                    Admission, LimitUsage, Verdict, new_ticket, to_ms, too_large, unlimited)

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

#: how long start-up waits for Redis to take the scripts; a request waits only `timeout_s`
WARM_UP_TIMEOUT_S = 2.0


#: ADMIT's reason for a script run past its deadline (`store_guard.RedisClock`)
LATE = 4


def tenant_keys(prefix: str, tenant: str) -> tuple[str, str, str, str]:
    """The limiter's keys for one tenant: requests log, token log, token sum, in-flight set."""
    base = f"{prefix}:{{{tenant}}}:rl"
    return f"{base}:req", f"{base}:tok", f"{base}:tok_sum", f"{base}:inflight"


def limit_arg(value: int | None) -> int:
    """A limit as the script reads it: -1 for none."""
    return -1 if value is None else value


class RedisLimiter:
    """Sliding-log limits in Redis; store failures answered per `on_store_failure`, never raised."""

    remote = True

    def __init__(self, client: Redis, prefix: str = "gw", timeout_s: float = 0.05,
                 on_store_failure: OnStoreFailure = "allow", *, window_s: float = WINDOW_S,
                 inflight_ttl_s: float = INFLIGHT_TTL_S, backoff_s: float = ADMISSION_BACKOFF_S) -> None:
        self.client = client
        self.prefix = prefix
        self.on_store_failure = on_store_failure
        self.guard = StoreGuard("rate limit store", timeout_s, backoff_s=backoff_s, logger=log,
                                meanwhile=f"on_store_failure={on_store_failure}")
        self.window_ms = to_ms(window_s)
        self.inflight_ttl_ms = to_ms(inflight_ttl_s)
        self.redis_clock = RedisClock()             # read from each admission's reply
        self.admit_script = client.register_script(limits_lua.ADMIT)
        self.settle_script = client.register_script(limits_lua.SETTLE)
        self.usage_script = client.register_script(limits_lua.USAGE)

    @property
    def store_failures(self) -> int:
        return self.guard.failures

    async def warm_up(self, timeout_s: float = WARM_UP_TIMEOUT_S) -> bool:
        """Connect and load the scripts now, so a cold burst does not spend its time budget on them."""
        try:
            await asyncio.wait_for(self._load_scripts(), timeout_s)
        except STORE_ERRORS as exc:
            log.warning("Redis not reachable at start-up (%s: %s); limits follow on_store_failure=%s",
                        type(exc).__name__, str(exc) or "timed out", self.on_store_failure)
            return False
        return True

    async def _load_scripts(self) -> None:
        for script in (self.admit_script, self.settle_script, self.usage_script):
            await self.client.script_load(script.script)

    async def admit(self, tenant: Tenant, *, route: str | None, tokens: int,
                    now_s: float | None = None, ticket: str | None = None) -> Admission:
        """Check and consume all limits in one atomic script call, or consume nothing."""
        if (refusal := too_large(tenant, tokens)) is not None:      # never admittable: no need to ask Redis
            return refusal
        ticket = ticket or new_ticket()
        if unlimited(tenant.limits):
            return Admission(allowed=True, limits=tenant.limits, tenant=tenant.name,
                             ticket=ticket, reserved_tokens=tokens)
        asked = not self.guard.backing_off          # else the guard answers without sending anything
        reply = await self.guard.run(lambda: self.admit_script(
            keys=tenant_keys(self.prefix, tenant.name), args=self._admit_args(tenant.limits, tokens, ticket, now_s)))
        if reply is STORE_DOWN:
            return self._store_down(tenant, tokens, ticket, unsettled=asked)
        if now_s is None and len(reply) > 7:        # Redis's clock: where the next admission's deadline lies
            self.redis_clock.learn(reply[7])
        if int(reply[1]) == LATE:   # answered in time yet late: a clock stepped since the last reply (now read)
            return self._store_down(tenant, tokens, ticket, unsettled=False)
        return Verdict.from_reply(reply).admission(tenant, tokens=tokens, ticket=ticket)

    def _admit_args(self, limits: Limits, tokens: int, ticket: str,
                    now_s: float | None) -> list[int | str]:
        return [self._now_arg(now_s), self.window_ms, limit_arg(limits.requests_per_minute),
                limit_arg(limits.tokens_per_minute), limit_arg(limits.concurrent), tokens,
                ticket, self.inflight_ttl_ms, to_ms(CONCURRENT_RETRY_S), self._deadline_ms(now_s)]

    def _deadline_ms(self, now_s: float | None) -> int:
        """When, on Redis's clock, an admission sent now is too late to run (a stalled Redis that runs it on
        resuming takes no slot nobody will end); none for a caller's own clock (`now_s`)."""
        return 0 if now_s is not None else self.redis_clock.deadline_ms(self.guard.timeout_s)

    def _store_down(self, tenant: Tenant, tokens: int, ticket: str, *, unsettled: bool) -> Admission:
        """Admit degraded, or refuse with `store_unavailable`, as the policy says. `unsettled`: the script
        was sent, and a stalled Redis may still run it when it resumes."""
        if self.on_store_failure == "allow":
            return Admission(allowed=True, limits=tenant.limits, tenant=tenant.name,
                             ticket=ticket, reserved_tokens=tokens, degraded=True, unsettled=unsettled)
        return Admission(allowed=False, limits=tenant.limits, tenant=tenant.name,
                         reason="store_unavailable", retry_after_s=STORE_RETRY_S, ticket=ticket,
                         reserved_tokens=tokens, unsettled=unsettled)

    async def settle(self, tenant: Tenant, *, ticket: str, reserved_tokens: int,
                     actual_tokens: int, now_s: float | None = None) -> None:
        """Rewrite the reservation to the real count, or charge a late excess at `now`."""
        if tenant.limits.tokens_per_minute is None or actual_tokens == reserved_tokens:
            return
        await self._settle(tenant, ticket, reserved_tokens, actual_tokens, now_s, leaves=[])

    async def end(self, tenant: Tenant, *, ticket: str, reserved_tokens: int, actual_tokens: int,
                  now_s: float | None = None) -> bool:
        """Release the slot and settle the tokens in one script call: one round trip, not two.
        False when Redis did not answer."""
        if tenant.limits.tokens_per_minute is None or actual_tokens == reserved_tokens:
            return await self.release(tenant, ticket=ticket)
        flight_key = tenant_keys(self.prefix, tenant.name)[3]
        return await self._settle(tenant, ticket, reserved_tokens, actual_tokens, now_s,
                                  leaves=[flight_key] if tenant.limits.concurrent is not None else [])

    async def withdraw(self, tenant: Tenant, *, ticket: str, reserved_tokens: int,
                       now_s: float | None = None) -> bool:
        """Free the slot, give back the tokens and drop the request-log entry in one script call: the request
        takes nothing. False when Redis did not answer."""
        limits = tenant.limits
        if unlimited(limits):
            return True
        req_key, _, _, flight_key = tenant_keys(self.prefix, tenant.name)
        leaves = [key for key, limit in ((flight_key, limits.concurrent), (req_key, limits.requests_per_minute))
                  if limit is not None]
        reserved_tokens = reserved_tokens if limits.tokens_per_minute is not None else 0
        return await self._settle(tenant, ticket, reserved_tokens, 0, now_s, leaves=leaves)

    async def _settle(self, tenant: Tenant, ticket: str, reserved_tokens: int, actual_tokens: int,
                      now_s: float | None, *, leaves: list[str]) -> bool:
        """One SETTLE script call; the ticket also leaves the `leaves` sets (in-flight set, requests log)."""
        _, tok_key, sum_key, _ = tenant_keys(self.prefix, tenant.name)
        return await self.guard.run(lambda: self.settle_script(
            keys=[tok_key, sum_key, *leaves],
            args=[self._now_arg(now_s), self.window_ms, ticket, reserved_tokens, actual_tokens]),
            after_response=True) is not STORE_DOWN

    async def release(self, tenant: Tenant, *, ticket: str) -> bool:
        """End an admission's in-flight slot; releasing twice is harmless. False when Redis did not answer."""
        if tenant.limits.concurrent is None:
            return True
        flight_key = tenant_keys(self.prefix, tenant.name)[3]
        return await self.guard.run(lambda: self.client.zrem(flight_key, ticket), after_response=True) \
            is not STORE_DOWN

    async def usage(self, tenant: Tenant, now_s: float | None = None) -> LimitUsage:
        """The tenant's requests, tokens and in-flight count in the current window, read only."""
        req_key, tok_key, _, flight_key = tenant_keys(self.prefix, tenant.name)
        reply = await self.guard.run(lambda: self.usage_script(
            keys=[req_key, tok_key, flight_key], args=[self._now_arg(now_s), self.window_ms]))
        if reply is STORE_DOWN:
            return LimitUsage(available=False)
        requests, tokens, concurrent = (int(v) for v in reply)
        return LimitUsage(requests, tokens, concurrent)

    @staticmethod
    def _now_arg(now_s: float | None) -> int | str:
        """The time the script uses: the caller's, or "" for the Redis server's clock."""
        return "" if now_s is None else to_ms(now_s)
