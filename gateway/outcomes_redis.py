"""The shared outcome book: tasks kept in Redis, so a task booked by one replica (or worker) is reported through
any other, and `/admin/stats` shows every process's tasks.

Keys, each tenant's under its own hash tag (one Cluster slot per tenant, as the limiter's keys):

    {prefix}:{tenant}:oc:t:{task id}        hash: the task's route, workflow, cost, requests, outcome, value
    {prefix}:{tenant}:oc:r:{request id}     the same hash, for a request without a task id
    {prefix}:{tenant}:oc:rt:{request id}    string: the task id a request with one was booked to
    {prefix}:{tenant}:oc:stats:{bucket}     hash: the tenant's reported tasks by (route, workflow), per bucket
                                            (ttl_s / 24) of report time
    {prefix}:{tenant}:oc:pt:{task id}       set: the task's answered calls whose cost is still being priced (their
    {prefix}:{tenant}:oc:pr:{request id}    measured joules), by request id; the same for one request
    {prefix}:oc:tenants                     set: the tenants that reported, for /admin/stats

Entries live `ttl_s` after their last booking, stats buckets `ttl_s` after their end: stats cover the
tasks reported in the last `ttl_s`. Money stays exact: a cost or value is kept as whole dollars plus
pico-dollars (1e-12 USD), both Redis integers summed with HINCRBY (a carry moves a dollar out of the pico
part), never as floats; a cost is rounded to 1e-12 USD once, when booked.

Booking runs after the response, in the background, and never raises: a tenant's bookings are gathered for
FLUSH_S and sent in one script call (its keys share the tenant's slot), so a request costs a share of a round
trip, not one. A flush waits for Redis up to the store timeout (at least MIN_TIMEOUT_S); with Redis down its
bookings are lost, each one counted, and warned of once (`StoreGuard`). Each booking of a flush is made on its
own: one that Redis refuses (a key of the wrong type, say) is lost and counted alone.
A report waits for this process's bookings of its tenant still under way, then `OTHERS_S` for those other
replicas and workers gather now (a task's last call served by one, its report sent through another just after),
then while any process is still pricing a call of the task (a call on measured GPUs is booked once its joules
are in: it is marked as being priced as its answer leaves, and unmarked once booked), and looks once more after
`RECHECK_S` for an unknown id; with Redis down it is answered 503 store_unavailable, and can be sent again.
A request that ends after its task was reported adds to the task, not to the stats already counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from gateway.errors import StoreUnavailable
from gateway.outcomes import (ANONYMOUS, TTL_S, GroupStats, Report, Task, already_reported, parse_report, summary,
                              unknown_id)
from gateway.store_guard import STORE_DOWN, StoreGuard
from gateway.tasks import BackgroundTasks

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)

PICO = 10 ** 12
PICO_USD = Decimal(1).scaleb(-12)
#: how long a report of an unknown id waits before looking again, for a booking another process is making
RECHECK_S = 0.1
#: the least time a booking or report waits for Redis in all (for a free pooled connection in a burst, say): none
#: holds up a response, and a booking given up loses its cost; each command is still bounded by the client's
#: socket timeout (store.timeout_ms)
MIN_TIMEOUT_S = 1.0
#: stats buckets per ttl_s
BUCKETS = 24
#: how long a tenant's bookings gather before they are sent together (well under RECHECK_S)
FLUSH_S = 0.02
#: how long a report waits before it reads, for the bookings other processes are gathering now: their FLUSH_S
#: and the round trip that sends them
OTHERS_S = FLUSH_S + 0.03
#: the most bookings one script call carries (a longer batch is sent in several)
MAX_BATCH = 256
#: how often a report looks whether the calls of its task being priced have been booked
PRICING_POLL_S = 0.05

#: add whole + pico dollars (strings) to two integer fields of a hash, carrying a dollar out of the pico part
ADD_USD = """
local function add_usd(key, whole_field, pico_field, whole, pico)
  if redis.call('HINCRBY', key, pico_field, pico) >= 1000000000000 then
    redis.call('HINCRBY', key, pico_field, '-1000000000000')
    redis.call('HINCRBY', key, whole_field, 1)
  end
  if whole ~= '0' then redis.call('HINCRBY', key, whole_field, whole) end
end
"""

#: ARGV[1]: ttl ms; then five per booking: route, workflow, cost whole USD, cost pico-USD, task id ('' for
#: none). KEYS, booking after booking: the task's hash, and for a booking with a task id the request id's
#: pointer to its task. Each booking is made on its own (Redis rolls nothing back, so one refused must not stop
#: the rest); returns {bookings refused, the first refusal's error ('' for none)}.
BOOK = ADD_USD + """
local function book(key, pointer, i)
  redis.call('HSETNX', key, 'route', ARGV[i])
  redis.call('HSETNX', key, 'workflow', ARGV[i + 1])
  add_usd(key, 'cost_usd', 'cost_pusd', ARGV[i + 2], ARGV[i + 3])
  redis.call('HINCRBY', key, 'requests', 1)
  redis.call('PEXPIRE', key, ARGV[1])
  if pointer then redis.call('SET', pointer, ARGV[i + 4], 'PX', ARGV[1]) end
end
local k, refused, first_error = 1, 0, ''
for i = 2, #ARGV, 5 do
  local pointer = ARGV[i + 4] ~= '' and KEYS[k + 1] or nil
  local ok, err = pcall(book, KEYS[k], pointer, i)
  if not ok then
    refused = refused + 1
    if refused == 1 then first_error = type(err) == 'table' and err.err or tostring(err) end
  end
  k = k + (pointer and 2 or 1)
end
return {refused, first_error}
"""

#: KEYS: the task's hash, the stats bucket of now; ARGV: outcome, value whole USD, value pico-USD ('' for
#: none), the bucket's ttl ms. Returns nil for an unknown task, {'reported', outcome} for one reported
#: before, else {'ok', route, workflow, cost whole USD, cost pico-USD, requests}.
REPORT = ADD_USD + """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
if redis.call('HSETNX', KEYS[1], 'outcome', ARGV[1]) == 0 then
  return {'reported', redis.call('HGET', KEYS[1], 'outcome')}
end
local task = redis.call('HMGET', KEYS[1], 'route', 'workflow', 'cost_usd', 'cost_pusd', 'requests')
task[3], task[4] = task[3] or '0', task[4] or '0'   -- a field is made by its first HINCRBY
local group = cjson.encode({task[1], task[2]})
redis.call('HINCRBY', KEYS[2], 'tasks:' .. group, 1)
redis.call('HINCRBY', KEYS[2], ARGV[1] .. ':' .. group, 1)
add_usd(KEYS[2], 'cost_usd:' .. group, 'cost_pusd:' .. group, task[3], task[4])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'value_usd', ARGV[2], 'value_pusd', ARGV[3])
  add_usd(KEYS[2], 'value_usd:' .. group, 'value_pusd:' .. group, ARGV[2], ARGV[3])
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {'ok', task[1], task[2], task[3], task[4], task[5]}
"""


def raw(value: str) -> bytes:
    """A key or value as Redis keeps it: ids and workflow names come from headers, where aiohttp keeps a byte
    that is not UTF-8 as a lone surrogate, which redis-py's strict encoding would refuse."""
    return value.encode("utf-8", "surrogateescape")


def text(value: bytes) -> str:
    """What `raw` wrote, as the str it was."""
    return value.decode("utf-8", "surrogateescape")


def split_usd(amount_usd: Decimal) -> tuple[str, str]:
    """A non-negative amount as (whole dollars, pico-dollars below a dollar), rounded to 1e-12 USD."""
    whole, pico = divmod(int(amount_usd.quantize(PICO_USD, rounding=ROUND_HALF_EVEN).scaleb(12)), PICO)
    return str(whole), str(pico)


def joined_usd(whole: bytes | str | int, pico: bytes | str | int) -> Decimal:
    """The amount split_usd split (Redis answers bytes)."""
    return Decimal(int(whole)) + Decimal(int(pico)).scaleb(-12)


def store_unavailable() -> StoreUnavailable:
    return StoreUnavailable("the outcome store (Redis) is unavailable; report again shortly",
                            headers={"Retry-After": "1"})


class RedisOutcomeBook:
    """Tasks in Redis, shared by every gateway process; store failures counted and warned of, never raised
    on the response path."""

    def __init__(self, client: Redis, prefix: str = "gw", timeout_s: float = MIN_TIMEOUT_S, *,
                 ttl_s: float = TTL_S, clock: Callable[[], float] = time.time, recheck_s: float = RECHECK_S,
                 others_s: float = OTHERS_S) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.clock = clock
        self.recheck_s = recheck_s
        self.others_s = others_s
        self.guard = StoreGuard("outcome store", max(timeout_s, MIN_TIMEOUT_S), logger=log,
                                meanwhile="requests are served but not booked to their tasks; "
                                          "reports answer 503 store_unavailable")
        self.book_script = client.register_script(BOOK)
        self.report_script = client.register_script(REPORT)
        self._bookings = BackgroundTasks()
        # tenant -> the next flush's keys, args, and pricing marks to clear (key, request id) once it is booked
        self._gathering: dict[str, tuple[list[bytes], list[str | bytes], list[tuple[bytes, bytes]]]] = {}
        self._pending: defaultdict[str, set[asyncio.Task]] = defaultdict(set)     # flushes under way, by tenant
        self._marking: defaultdict[str, set[asyncio.Task]] = defaultdict(set)     # pricing marks being set, by tenant
        self._lost_uncounted = 0        # bookings lost beyond the one call the guard counts per failed flush

    @property
    def store_failures(self) -> int:
        """Reports and stats answered without Redis, and bookings lost: each one a failed flush carried, or
        that Redis refused."""
        return self.guard.failures + self._lost_uncounted

    @property
    def bucket_s(self) -> float:
        return self.ttl_s / BUCKETS

    # keys

    def _key(self, tenant: str, kind: str, name: str | int) -> bytes:
        return raw(f"{self.prefix}:{{{tenant}}}:oc:{kind}:{name}")

    @property
    def tenants_key(self) -> str:
        return f"{self.prefix}:oc:tenants"

    async def warm_up(self) -> None:
        """Load the scripts now, so a first report does not spend a round trip on them."""
        for script in (self.book_script, self.report_script):
            await self.client.script_load(script.script)

    # booking

    def track(self, *, request_id: str, task_id: str | None, route: str, tenant: str,
              workflow: str | None, cost_usd: Decimal, priced_late: bool = False) -> None:
        """Book one finished request's cost to its task, with the tenant's next flush (which clears its pricing
        marks, when `pricing` set them: `priced_late`)."""
        gathering = self._gathering.get(tenant)
        if gathering is None:
            gathering = self._gathering[tenant] = ([], [], [])
            self._spawn(self._pending, tenant, self._flush(tenant), "outcome-booking")
        keys, args, marks = gathering
        args.extend((route, raw(workflow or "-"), *split_usd(cost_usd), raw(task_id) if task_id else ""))
        if task_id:
            keys.extend((self._key(tenant, "t", task_id), self._key(tenant, "rt", request_id)))
        else:
            keys.append(self._key(tenant, "r", request_id))
        if priced_late:
            marks.extend((key, raw(request_id)) for key in self._pricing_keys(tenant, request_id, task_id))

    def pricing(self, *, request_id: str, task_id: str | None, tenant: str, for_s: float) -> None:
        """Mark a finished request whose cost is still being priced, under its task and its request id, for
        `for_s` (and the store timeout): a report naming either, through any process, waits until `track` has
        booked it and cleared the mark."""
        self._spawn(self._marking, tenant, self._mark(self._pricing_keys(tenant, request_id, task_id),
                                                      raw(request_id), _ms(for_s + self.guard.timeout_s)),
                    "outcome-pricing")

    def _pricing_keys(self, tenant: str, request_id: str, task_id: str | None) -> list[bytes]:
        return [self._key(tenant, "pr", request_id), *([self._key(tenant, "pt", task_id)] if task_id else [])]

    def _spawn(self, under_way: defaultdict[str, set[asyncio.Task]], tenant: str, work, name: str) -> None:
        """Start background work for a tenant, kept in `under_way` until it is done."""
        task = self._bookings.spawn(work, name=name)
        under_way[tenant].add(task)
        task.add_done_callback(lambda done: _forget(under_way, tenant, done))

    async def _mark(self, keys: list[bytes], request_id: bytes, ttl_ms: int) -> None:
        async def mark() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.sadd(key, request_id).pexpire(key, ttl_ms)
                await pipe.execute()

        await self.guard.run(mark, after_response=True)

    async def _flush(self, tenant: str) -> None:
        """After FLUSH_S, send what the tenant's requests booked meanwhile: MAX_BATCH bookings per call; then
        clear the pricing marks of those that had them (once their marks are set)."""
        await asyncio.sleep(FLUSH_S)
        keys, args, marks = self._gathering.pop(tenant)
        ttl_ms = _ms(self.ttl_s)
        key_at = 0
        for start in range(0, len(args), 5 * MAX_BATCH):
            batch = args[start:start + 5 * MAX_BATCH]
            used = sum(2 if task_id else 1 for task_id in batch[4::5])
            await self._book(keys[key_at:key_at + used], [ttl_ms, *batch])
            key_at += used
        if marks:
            if marking := self._marking.get(tenant):
                await asyncio.wait(set(marking), timeout=self.guard.timeout_s)
            await self.guard.run(lambda: self._unmark(marks), after_response=True)

    async def _unmark(self, marks: list[tuple[bytes, bytes]]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for key, request_id in marks:
                pipe.srem(key, request_id)
            await pipe.execute()

    async def _book(self, keys: list[bytes], args: list) -> None:
        """One script call of bookings; each booking lost (all of a call that failed, or those Redis refused) is
        counted."""
        bookings = (len(args) - 1) // 5
        refused = 0

        async def book() -> None:
            nonlocal refused
            refused, error = await self.book_script(keys=keys, args=args)
            if refused:     # an error reply for the guard to count and warn of
                raise ResponseError(f"{refused} of {bookings} bookings refused: {text(error)}")

        if await self.guard.run(book, after_response=True) is STORE_DOWN:
            self._lost_uncounted += (refused or bookings) - 1

    async def _landed(self, tenant: str) -> None:
        """Wait (up to the store timeout) for this process's bookings of `tenant` under way: a report sent
        just after a response counts that request's cost."""
        if pending := self._pending.get(tenant):
            await asyncio.wait(set(pending), timeout=self.guard.timeout_s)

    # reporting

    async def report(self, payload: object, *, tenant: str | None = None, pricing_s: float = 0.0) -> Task:
        """Record an outcome from a `POST /v1/outcomes` body for one of the caller's own tasks, atomically
        once. `tenant`: the caller, None for an anonymous one; `pricing_s`: the longest it waits for calls of the
        task that a process is still pricing."""
        report = parse_report(payload)
        tenant = tenant or ANONYMOUS
        await self._landed(tenant)
        await asyncio.sleep(self.others_s)      # another process's booking of the task's last call may be gathering
        await self._priced(report, tenant, pricing_s)
        if await self.guard.run(lambda: self._remember(tenant)) is STORE_DOWN:
            raise store_unavailable()
        task = await self._report(report, tenant)
        if task is None:
            await asyncio.sleep(self.recheck_s)
            task = await self._report(report, tenant)
        if task is None:
            raise unknown_id()
        return task

    async def _remember(self, tenant: str) -> None:
        """Add the tenant to those `stats` reads; the set lives as long as the stats bucket a report writes now
        (ttl_s past its end), so it is not kept for ever once nobody reports."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.sadd(self.tenants_key, tenant).pexpire(self.tenants_key, _ms(self.ttl_s + self.bucket_s))
            await pipe.execute()

    async def _priced(self, report: Report, tenant: str, pricing_s: float) -> None:
        """Wait, at most `pricing_s`, while a call of the reported task (or the reported request) is still being
        priced by any process."""
        key = self._key(tenant, "pt", report.task_id) if report.task_id is not None else \
            self._key(tenant, "pr", report.request_id)
        loop = asyncio.get_running_loop()
        ends_s = loop.time() + pricing_s
        while loop.time() < ends_s and await self.guard.run(lambda: self.client.exists(key)) == 1:
            await asyncio.sleep(PRICING_POLL_S)

    async def _report(self, report: Report, tenant: str) -> Task | None:
        """The task as reported now; None when its id is unknown."""
        task_id = report.task_id
        if task_id is None:
            pointer = await self.guard.run(lambda: self.client.get(self._key(tenant, "rt", report.request_id)))
            if pointer is STORE_DOWN:
                raise store_unavailable()
            task_id = text(pointer) if pointer is not None else None
        key = self._key(tenant, "t", task_id) if task_id is not None else self._key(tenant, "r", report.request_id)
        now_s = self.clock()
        bucket = int(now_s // self.bucket_s)
        value = split_usd(report.value_usd) if report.value_usd is not None else ("0", "")
        reply = await self.guard.run(lambda: self.report_script(
            keys=[key, self._key(tenant, "stats", bucket)],
            args=[report.outcome, *value, _ms((bucket + 1) * self.bucket_s + self.ttl_s - now_s)]))
        if reply is STORE_DOWN:
            raise store_unavailable()
        if reply is None:
            return None
        status, *fields = (text(item) if isinstance(item, bytes) else item for item in reply)
        if status == "reported":
            raise already_reported(fields[0])
        route, workflow, cost_whole, cost_pico, requests = fields
        return Task(route=route, tenant=tenant, workflow=workflow, cost_usd=joined_usd(cost_whole, cost_pico),
                    requests=int(requests), outcome=report.outcome,
                    value_usd=joined_usd(*value) if report.value_usd is not None else None)    # as stored

    # stats

    async def stats(self) -> dict:
        """Tasks reported in the last ttl_s, by any process, grouped by route, tenant and workflow."""
        tenants = await self.guard.run(lambda: self.client.smembers(self.tenants_key))
        if tenants is STORE_DOWN:
            raise store_unavailable()
        now_bucket = int(self.clock() // self.bucket_s)
        keys = [(tenant, self._key(tenant, "stats", bucket))
                for tenant in sorted(map(text, tenants)) for bucket in range(now_bucket - BUCKETS, now_bucket + 1)]
        buckets = await self.guard.run(lambda: self._read_all([key for _, key in keys]))
        if buckets is STORE_DOWN:
            raise store_unavailable()
        counts: defaultdict[tuple[str, str, str], defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        for (tenant, _), bucket in zip(keys, buckets):
            for name, value in bucket.items():
                stat, _, group = text(name).partition(":")
                route, workflow = json.loads(group)
                counts[route, tenant, workflow][stat] += int(value)
        return summary((group, _group_stats(group_counts)) for group, group_counts in counts.items())

    async def _read_all(self, keys: list[bytes]) -> list[dict[bytes, bytes]]:
        """HGETALL of each key, in one pipeline (split by node on a Cluster)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            return await pipe.execute()

    async def close(self) -> None:
        """Finish the bookings under way (each is bounded by the store timeout)."""
        await self._bookings.drain(timeout_s=2 * self.guard.timeout_s + 0.1)


def _forget(under_way: defaultdict[str, set[asyncio.Task]], tenant: str, task: asyncio.Task) -> None:
    tasks = under_way[tenant]
    tasks.discard(task)
    if not tasks:
        del under_way[tenant]


def _group_stats(counts: dict[str, int]) -> GroupStats:
    return GroupStats(tasks=counts["tasks"], success=counts["success"], failure=counts["failure"],
                      escalated=counts["escalated"], cost_usd=joined_usd(counts["cost_usd"], counts["cost_pusd"]),
                      value_usd=joined_usd(counts["value_usd"], counts["value_pusd"]))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
