"""Which model stored each Responses API answer, so that a request continuing it goes there, for its tenant alone.

A model server keeps a response (the Responses API's `store`, true unless the request says false) under the
response's id, and only that server can continue it: a request naming it as `previous_response_id` must go
there, whatever the SLA would choose. And the gateway calls each server with its own key, so the server would
continue any tenant's stored response for whoever names its id: a tenant may continue only the responses the
gateway relayed to it. The gateway notes the model and tenant of each stored response it relays, for
`routing.stored_response_ttl_s`, in Redis when there is one (shared by workers and replicas), else in this
process (at most MEMORY_PINS). The same pins send a retrieval or deletion of a stored response to its server, for
its tenant alone (`gateway.stored_responses`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.store_guard import STORE_DOWN, StoreGuard

#: the longest a pin may be kept (`routing.stored_response_ttl_s`): OpenAI keeps a stored response 30 days
MAX_PIN_TTL_S = 30 * 86_400
#: the responses this process remembers without Redis; the oldest are forgotten first
MEMORY_PINS = 100_000
#: a tenant's name when the gateway runs open (no tenants: its callers are one)
OPEN = ""


class MemoryPins:
    """Pins in this process: with several workers or replicas, each knows the responses it relayed."""

    def __init__(self, max_entries: int = MEMORY_PINS, clock: Callable[[], float] = time.monotonic) -> None:
        self._pins: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock

    #: in this process: never backing off
    backing_off = False

    async def remember(self, tenant: str | None, response_id: str, model: str, ttl_s: int) -> None:
        """Note that `model` stored the tenant's response, for `ttl_s`."""
        key = (tenant or OPEN, response_id)
        self._pins[key] = (model, self._clock() + ttl_s)
        self._pins.move_to_end(key)
        while len(self._pins) > self._max_entries:
            self._pins.popitem(last=False)

    async def model_for(self, tenant: str | None, response_id: str) -> str | None:
        """The model that stored the tenant's response, None when it is unknown (or expired)."""
        pinned = self._pins.get((tenant or OPEN, response_id))
        if pinned is None or pinned[1] <= self._clock():
            return None
        return pinned[0]

    async def forget(self, tenant: str | None, response_id: str) -> None:
        """The response was deleted, or its server no longer has it."""
        self._pins.pop((tenant or OPEN, response_id), None)


class RedisPins:
    """Pins in Redis, `{prefix}:{tenant}:rp:{response id}` -> model, each expiring after its `ttl_s`; a lookup while
    Redis cannot answer is STORE_DOWN (the route stage answers it per `store.on_store_failure`)."""

    def __init__(self, client, prefix: str, timeout_s: float) -> None:
        self._client = client
        self._prefix = prefix
        self.guard = StoreGuard("response pin store", timeout_s,
                                meanwhile="requests continuing a stored response follow on_store_failure")

    @property
    def backing_off(self) -> bool:
        """Redis could not be reached a moment ago: a pin noted now is written off the response path."""
        return self.guard.backing_off

    def _key(self, tenant: str | None, response_id: str) -> str:
        return f"{self._prefix}:{{{tenant or OPEN}}}:rp:{response_id}"

    async def remember(self, tenant: str | None, response_id: str, model: str, ttl_s: int) -> None:
        """Note that `model` stored the tenant's response, for `ttl_s`."""
        key = self._key(tenant, response_id)
        await self.guard.run(lambda: self._client.set(key, model, ex=ttl_s), None, after_response=True)

    async def model_for(self, tenant: str | None, response_id: str):
        """The model that stored the tenant's response; None when unknown; STORE_DOWN when Redis did not answer."""
        key = self._key(tenant, response_id)
        found = await self.guard.run(lambda: self._client.get(key))
        if found is None or found is STORE_DOWN:
            return found
        return found.decode() if isinstance(found, bytes) else found

    async def forget(self, tenant: str | None, response_id: str) -> None:
        """The response was deleted, or its server no longer has it (Redis down: it expires in its own time)."""
        key = self._key(tenant, response_id)
        await self.guard.run(lambda: self._client.delete(key), None, after_response=True)
