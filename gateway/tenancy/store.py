"""The boundary to the shared store: bounded waits, failures counted, one warning per outage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Literal

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

#: what `StoreGuard.run` returns when the store did not answer in time or at all
STORE_DOWN: Any = object()

#: the foreign errors that mean "the store is unavailable"; anything else is a bug
STORE_ERRORS = (RedisError, OSError, TimeoutError)

OnStoreFailure = Literal["allow", "deny"]


class StoreGuard:
    """Runs store calls under a time limit and turns store failures into `STORE_DOWN`."""

    def __init__(self, name: str, timeout_s: float, on_store_failure: OnStoreFailure) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.on_store_failure = on_store_failure
        self.store_failures = 0
        self.in_outage = False

    @property
    def allow_on_failure(self) -> bool:
        return self.on_store_failure == "allow"

    async def run(self, call: Awaitable[Any]) -> Any:
        """The call's result, or `STORE_DOWN` when it failed or took longer than `timeout_s`."""
        try:
            async with asyncio.timeout(self.timeout_s):     # no extra task, unlike wait_for on 3.11
                result = await call
        except STORE_ERRORS as exc:
            self._failed(exc)
            return STORE_DOWN
        self._succeeded()
        return result

    def _failed(self, exc: BaseException) -> None:
        self.store_failures += 1
        if not self.in_outage:
            self.in_outage = True
            log.warning("%s store unavailable (%s: %s); on_store_failure=%s",
                        self.name, type(exc).__name__, str(exc) or "timed out", self.on_store_failure)

    def _succeeded(self) -> None:
        if self.in_outage:
            self.in_outage = False
            log.warning("%s store reachable again after %d failed calls",
                        self.name, self.store_failures)
