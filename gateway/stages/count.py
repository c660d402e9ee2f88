"""count: prompt tokens with tiktoken, offline, before routing needs them."""

from __future__ import annotations

import asyncio

from gateway.context import RequestContext
from gateway.policy.model import Tenant
from gateway.tenancy.limits import new_ticket, unlimited
from gateway.tokens import DEFAULT_ENCODING, count_prompts

#: bodies larger than this (as read, chunked ones too) are counted in a thread, off the event loop
LARGE_BODY_BYTES = 64 * 1024


class Count:
    """Counts the prompt with the default encoding; routing, limits and estimates use it."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        ctx.prompt_tokens, ctx.longest_prompt_tokens = await counted(self.services, ctx.tenant, ctx.endpoint,
                                                                     ctx.body, ctx.body_bytes)
        return None

    async def finish(self, ctx: RequestContext) -> None:
        return None


async def counted(services, tenant: Tenant | None, endpoint: str, body: dict, body_bytes: int) -> tuple[int, int]:
    """`count_prompts` of a request body with the default encoding; a large one in a thread, off the event loop,
    once its tenant has been found under its limits."""
    if body_bytes <= LARGE_BODY_BYTES:
        return count_prompts(endpoint, body, DEFAULT_ENCODING)
    await refuse_a_tenant_at_its_limit(services, tenant)
    return await asyncio.to_thread(count_prompts, endpoint, body, DEFAULT_ENCODING)


async def refuse_a_tenant_at_its_limit(services, tenant: Tenant | None) -> None:
    """A large prompt costs seconds of CPU to count (about 0.5 s a MiB): a tenant already at its requests,
    tokens or concurrency limit is refused (429) before it is counted, so its limits bound what it can spend
    of the gateway's CPU and threads. Read only (`usage`), one store call, for large bodies only; admission
    decides as before for those that pass."""
    if tenant is None or unlimited(tenant.limits):
        return
    usage = await services.stores.limiter.usage(tenant)
    limits = tenant.limits
    if not usage.available or not any(limit is not None and used >= limit for used, limit in (
            (usage.requests, limits.requests_per_minute), (usage.tokens, limits.tokens_per_minute),
            (usage.concurrent, limits.concurrent))):
        return
    # the limiter's own refusal: the wait until the window frees and the x-ratelimit-* headers admission
    # would send (a refusal consumes nothing; one admitted meanwhile is given back, admission decides later)
    limiter, ticket = services.stores.limiter, new_ticket()
    try:
        verdict = await limiter.admit(tenant, route=None, tokens=0, ticket=ticket)
    except BaseException:
        await limiter.withdraw(tenant, ticket=ticket, reserved_tokens=0)
        raise
    if verdict.held:
        await limiter.withdraw(tenant, ticket=ticket, reserved_tokens=0)
    if not verdict.allowed and not verdict.degraded:
        raise verdict.error()
