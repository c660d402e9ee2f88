"""Tenancy: who is calling (identity), how fast they may call (limits), how much they may spend (budgets).

`limiter_for` and `budgets_for` pick the Redis implementation when a client
is given and the in-process twin otherwise; both have the same semantics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.tenancy.budgets import Budgets, BudgetState
from gateway.tenancy.budgets_memory import MemoryBudgets
from gateway.tenancy.budgets_redis import RedisBudgets
from gateway.tenancy.identity import AdminAuth, Identity, tenant_keys
from gateway.tenancy.limits import Admission, Limiter, LimitUsage
from gateway.tenancy.limits_memory import MemoryLimiter
from gateway.tenancy.limits_redis import RedisLimiter

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from gateway.policy.model import Store

__all__ = ["AdminAuth", "Admission", "BudgetState", "Budgets", "Identity", "LimitUsage", "Limiter",
           "MemoryBudgets", "MemoryLimiter", "RedisBudgets", "RedisLimiter", "budgets_for",
           "limiter_for", "tenant_keys"]


def limiter_for(store: Store, client: Redis | None) -> Limiter:
    """The limiter for a store config: shared in Redis when a client is given, else in memory."""
    if client is None:
        return MemoryLimiter()
    return RedisLimiter(client, store.key_prefix, store.timeout_ms / 1000, store.on_store_failure)


def budgets_for(store: Store, client: Redis | None) -> Budgets:
    """The budgets for a store config: shared in Redis when a client is given, else in memory."""
    if client is None:
        return MemoryBudgets()
    return RedisBudgets(client, store.key_prefix, store.timeout_ms / 1000, store.on_store_failure)
