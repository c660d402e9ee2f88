"""The boundary to the shared store: bounded waits, a back-off after a failure, failures counted,
one warning per outage.

Every Redis call of the cache, the rate limiter and the budgets goes through
a `StoreGuard`, the one place where store errors are caught. A call is bounded
by `timeout_s`; an error or a timeout becomes the caller's default answer (a
miss, a degraded admission, "budget unknown"). The first failure of an outage
logs one warning. When the store could not be reached (refused, reset, timed
out) a back-off starts: for `backoff_s` the calls on the response path do not
touch the store at all, so a dead or frozen Redis costs one request per
back-off the timeout, not every request; then one call probes it while the
others keep the default, and a success ends the outage with a second warning.
An error reply (out of memory, read-only replica) is an answer: it is counted
and answered with the default, but starts no back-off and is no outage, so
the calls Redis still serves go on; it is warned of at most once a minute. So is
a call the Redis Cluster client refuses before sending it, its keys mapping to
several slots: the call is wrong, not the store. Writes made after the response (releases, settles,
charges) are always tried: they hold up no response, and skipping them would
lose what they record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import CrossSlotTransactionError, MaxConnectionsError, RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: what `StoreGuard.run` returns, unless told otherwise, when the store did not answer in time or at all
STORE_DOWN: Any = object()

#: the foreign errors that mean "the store is unavailable"; anything else is a bug
#: (a Redis Cluster with no node reachable raises RedisClusterException, which is not a RedisError)
STORE_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)
#: those of them that mean the store could not be reached, which start a back-off
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError, TimeoutError)

#: how redis-py's Cluster client words its refusal of a command whose keys map to several slots (a plain
#: RedisClusterException, raised before anything is sent)
CROSS_SLOT_REFUSAL = "all keys must map to the same key slot"

#: how often a call that found every pooled connection busy looks for a free one again
POOL_WAIT_S = 0.001
#: error replies (out of memory, read-only) are warned of at most this often
REFUSED_WARNING_S = 60.0
#: after Redis could not be reached, how long calls on the response path leave it alone: the cache's
BACKOFF_S = 1.0
#: the same for admissions and budget checks, shorter: with on_store_failure=deny every request is refused
#: meanwhile, with allow none is limited, so Redis is probed again sooner (each probe may wait the timeout)
ADMISSION_BACKOFF_S = 0.25

#: an outage that begins this soon after the last one ended is taken for the same one (a Redis working through its
#: backlog as it resumes; one Redis Cluster node down while the others answer): not warned of again, its calls
#: counted into the next "reachable again"; one that lasts longer than this is said after all
FLAP_QUIET_S = 10.0

OnStoreFailure = Literal["allow", "deny"]


class StoreGuard:
    """Runs one component's store calls under a time limit, answering for the store while it is down."""

    def __init__(self, name: str, timeout_s: float, *, backoff_s: float = BACKOFF_S, meanwhile: str = "",
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        self.name = name                # "redis cache", "rate limit store": the warning's subject
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._meanwhile = f"; {meanwhile}" if meanwhile else ""    # what the component does meanwhile
        self.failures = 0               # calls answered without the store: failed, timed out, or backed off
        self._clock = clock
        self._log = logger
        self._retry_at_s = 0.0          # while Redis is unreachable: when the next call may probe it; else 0
        self._outage_failures = 0
        self._refused_warning_at_s = 0.0
        self._refused_since_warning = 0
        self._recovered_at_s = -FLAP_QUIET_S   # when the last outage ended
        self._quiet_outage = False              # the outage under way began within FLAP_QUIET_S of the last one
        self._outage_started_s = 0.0

    @property
    def healthy(self) -> bool:
        """Whether Redis answered the last call that reached it (an error reply is an answer)."""
        return not self._retry_at_s

    @property
    def backing_off(self) -> bool:
        """Whether a call on the response path made now would be answered without the store."""
        return bool(self._retry_at_s) and self._clock() < self._retry_at_s

    async def run(self, command: Callable[[], Awaitable[T]], default: Any = STORE_DOWN, *,
                  after_response: bool = False, timeout_s: float | None = None) -> T | Any:
        """The command's result, or `default` when the store failed, took longer than `timeout_s` (the guard's
        unless given: a write after the response may wait longer), or is being left alone after it could not be
        reached (`after_response` calls are tried even then)."""
        if self._retry_at_s and not after_response:
            now_s = self._clock()
            if now_s < self._retry_at_s:
                self._count_failure()
                return default
            self._retry_at_s = now_s + self.backoff_s       # this call probes; the ones meanwhile keep waiting
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):    # no extra task, unlike wait_for on 3.11
                while True:
                    try:
                        result = await command()
                        break
                    except MaxConnectionsError:     # every pooled connection busy (a burst): wait for one
                        await asyncio.sleep(POOL_WAIT_S)
        except STORE_ERRORS as exc:
            self._failed(exc)
            return default
        except Exception as exc:
            if not raised_in_redis_client(exc):
                raise                       # a bug of the caller's: the caller's to handle
            # redis-py failing inside itself as a connection drops (its Cluster client raises AttributeError on a
            # node's closed transport): the store's outage, never the request's; said with its traceback
            self._failed(exc, unexpected=True)
            return default
        if self._retry_at_s:
            self._recovered()
        return result

    def _count_failure(self) -> None:
        self.failures += 1
        self._outage_failures += 1
        if self._quiet_outage and self._clock() - self._outage_started_s > FLAP_QUIET_S:
            self._quiet_outage = False      # no flap: an outage of its own, said (and its end will be)
            self._log.warning("%s unavailable for %.0f s%s", self.name, self._clock() - self._outage_started_s,
                              self._meanwhile)

    def _failed(self, exc: BaseException, *, unexpected: bool = False) -> None:
        if not unexpected and (not isinstance(exc, UNREACHABLE) or refused_by_client(exc)):
            self._refused(exc)              # Redis answered, or was not asked
            return
        outage_starts = self.healthy
        now_s = self._clock()
        if outage_starts:
            self._outage_started_s = now_s
        self._count_failure()
        self._retry_at_s = now_s + self.backoff_s
        if not outage_starts:
            return
        # an outage starting soon after the last one ended is the same one flapping (a Redis working through its
        # backlog as it resumes, one Cluster node down among healthy ones): counted, not said again
        self._quiet_outage = now_s - self._recovered_at_s < FLAP_QUIET_S
        if unexpected:
            self._log.error("%s failed inside the Redis client (%s: %s)%s", self.name, type(exc).__name__, exc,
                            self._meanwhile, exc_info=exc)
        elif not self._quiet_outage:
            self._log.warning("%s unavailable (%s: %s)%s", self.name, type(exc).__name__, str(exc) or "timed out",
                              self._meanwhile)

    def _refused(self, exc: BaseException) -> None:
        """Count an error reply; warn at most once per REFUSED_WARNING_S, however many come (a full Redis
        refuses every write)."""
        self.failures += 1
        self._refused_since_warning += 1
        now_s = self._clock()
        if now_s >= self._refused_warning_at_s:
            self._refused_warning_at_s = now_s + REFUSED_WARNING_S
            self._log.warning("%s refused %d call(s) since the last such warning (%s: %s)%s", self.name,
                              self._refused_since_warning, type(exc).__name__, exc, self._meanwhile)
            self._refused_since_warning = 0

    def _recovered(self) -> None:
        self._retry_at_s = 0.0
        self._recovered_at_s = self._clock()
        if not self._quiet_outage:
            self._log.warning("%s reachable again after %d calls answered without it", self.name,
                              self._outage_failures)
            self._outage_failures = 0


#: how long after its caller gave up a script that takes something (an admission's slot, a budget hold) may still
#: run: past it, a stalled Redis that resumes runs it taking nothing (the give-backs its request retries for a
#: while cover those that run sooner)
LATE_MARGIN_S = 1.0


class RedisClock:
    """Redis's clock as this host reads it, from the last script reply that carried Redis's time: so a script
    can be given a deadline on Redis's own clock, however far this host's is off."""

    def __init__(self) -> None:
        self.ahead_ms: int | None = None    # Redis's clock less this host's; None until a reply said

    def learn(self, redis_now_ms: int | str | bytes) -> None:
        self.ahead_ms = int(redis_now_ms) - int(time.time() * 1000)

    def deadline_ms(self, wait_s: float) -> int:
        """When, on Redis's clock, a script sent now and waited for `wait_s` is too late to run (LATE_MARGIN_S
        after its caller gave up); 0 (none) until a reply has told Redis's clock."""
        if self.ahead_ms is None:
            return 0
        return int((time.time() + wait_s + LATE_MARGIN_S) * 1000) + self.ahead_ms


def raised_in_redis_client(exc: BaseException) -> bool:
    """Whether `exc` was raised inside the redis-py package (its own failure, not the caller's)."""
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and traceback.tb_frame.f_globals.get("__name__", "").startswith("redis.")


def refused_by_client(exc: BaseException) -> bool:
    """Whether the Redis Cluster client refused a call whose keys map to several slots, without sending it."""
    return isinstance(exc, CrossSlotTransactionError) or (
        type(exc) is RedisClusterException and CROSS_SLOT_REFUSAL in str(exc))
