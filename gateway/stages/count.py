"""count: prompt tokens with tiktoken, offline, before routing needs them."""

from __future__ import annotations

import asyncio

from gateway.context import RequestContext
from gateway.tokens import DEFAULT_ENCODING, count_prompts

#: bodies larger than this (as read, chunked ones too) are counted in a thread, off the event loop
LARGE_BODY_BYTES = 64 * 1024


class Count:
    """Counts the prompt with the default encoding; routing, limits and estimates use it."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        if ctx.body_bytes > LARGE_BODY_BYTES:
            counted = await asyncio.to_thread(count_prompts, ctx.endpoint, ctx.body, DEFAULT_ENCODING)
        else:
            counted = count_prompts(ctx.endpoint, ctx.body, DEFAULT_ENCODING)
        ctx.prompt_tokens, ctx.longest_prompt_tokens = counted
        return None

    async def finish(self, ctx: RequestContext) -> None:
        return None
