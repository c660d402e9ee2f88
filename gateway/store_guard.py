"""The boundary to the shared store: bounded waits, a back-off after a failure, failures counted,
one warning per outage.

Every Redis call of the cache, the rate limiter and the budgets goes through
a `StoreGuard`, the one place where store errors are caught. A call is bounded
by `timeout_s`; an error or a timeout becomes the caller's default answer (a
miss, a degraded admission, "budget unknown"). The first failure of an outage
logs one warning and starts a back-off: for `backoff_s` the calls on the
response path do not touch the store at all, so a dead or frozen Redis costs
one request the timeout, not every request; then the next call tries again.
Writes made after the response (releases, settles, charges) are always tried:
they cost no request any time, and skipping them would lose what they record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from redis.exceptions import RedisError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: what `StoreGuard.run` returns, unless told otherwise, when the store did not answer in time or at all
STORE_DOWN: Any = object()

#: the foreign errors that mean "the store is unavailable"; anything else is a bug
STORE_ERRORS = (RedisError, OSError, TimeoutError)

#: after a failure, how long calls on the response path leave the store alone
BACKOFF_S = 1.0

OnStoreFailure = Literal["allow", "deny"]


class StoreGuard:
    """Runs one component's store calls under a time limit, answering for the store while it is down."""

    def __init__(self, name: str, timeout_s: float, *, backoff_s: float = BACKOFF_S, meanwhile: str = "",
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        self.name = name                # "redis cache", "rate limit store": the warning's subject
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.meanwhile = meanwhile      # what the component does while the store is down, for the warning
        self.failures = 0               # calls answered without the store: failed, timed out, or backed off
        self.healthy = True
        self._clock = clock
        self._log = logger
        self._retry_at_s = 0.0

    async def run(self, command: Callable[[], Awaitable[T]], default: Any = STORE_DOWN, *,
                  after_response: bool = False) -> T | Any:
        """The command's result, or `default` when the store failed, took longer than `timeout_s`, or is
        being left alone after a failure (`after_response` calls are tried even then)."""
        if not self.healthy and not after_response and self._clock() < self._retry_at_s:
            self.failures += 1
            return default
        try:
            async with asyncio.timeout(self.timeout_s):     # no extra task, unlike wait_for on 3.11
                result = await command()
        except STORE_ERRORS as exc:
            self._failed(exc)
            return default
        if not self.healthy:
            self.healthy = True
            self._log.warning("%s reachable again after %d calls answered without it", self.name, self.failures)
        return result

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self._retry_at_s = self._clock() + self.backoff_s
        if self.healthy:
            self.healthy = False
            self._log.warning("%s unavailable (%s: %s)%s", self.name, type(exc).__name__, str(exc) or "timed out",
                              f"; {self.meanwhile}" if self.meanwhile else "")
