"""The GPU sampler: reads each model's GPUs every interval and feeds the energy ledger.

One monitor per gateway process. For every pool of GPUs (the GPUs of one
model, or of several models that share them: `gateway.energy.pools`) it builds
an NVML or DCGM source; `start()` runs the sampling loop, which samples each
pool in a task of its own (a slow scrape or a hung NVML call holds back only
its pool), and `adopt()` follows a reloaded policy. NVML calls block, so each
NVML pool's run in a worker thread of its own, never on the event loop, each
awaited at most `nvml_timeout_s`: a hung call fails its pool, and while it is
still outstanding the pool's next reads fail at once, without waiting again.
A model whose GPUs cannot be measured (no NVML library, no GPU) is
`unavailable`, logged once when its source opens; one whose GPUs fail while
sampling, whose energy counters stand still at full power for STALE_LIMIT_S,
or one of whose GPUs is also another pool's (named by index in one and by UUID
in the other), is `failing`, logged on each change of health.
Requests are served either way: their energy is simply None, as it is for a
request whose books were not whole (see `request_finished`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.energy.attribution import EnergyLedger, ModelEnergy, Others
from gateway.energy.dcgm import DcgmSource
from gateway.energy.nvml import NvmlSource
from gateway.energy.pools import labels, pools
from gateway.energy.readings import EnergyUnavailable, GpuReading
from gateway.energy.sharing import FRESH_S, EnergySharing, FolderSharing

if TYPE_CHECKING:
    from gateway.policy.model import GpuSource, Policy

logger = logging.getLogger("gateway.energy")

OK, UNAVAILABLE, FAILING = "ok", "unavailable", "failing"
#: how often GPUs that could not be opened, or NVML GPUs that keep failing, are opened afresh
REOPEN_S = 30.0
#: how long a GPU's energy counter may stand still while it draws power before its pool is failing
#: (longer than the DCGM exporter's default 30 s collect interval)
STALE_LIMIT_S = 60.0
#: how long an NVML call may take before its pool is failing (a GPU in trouble can hang NVML for long)
NVML_TIMEOUT_S = 5.0


@dataclass
class _Sampled:
    """One pool of GPUs (one model's, or several models' that share them): source, health, latest readings."""

    name: str                       # the pool's label: its model's name, or its models' names joined by "+"
    models: tuple[str, ...]         # the pool's key (in the ledger too): a model may be named "a+b"
    config: GpuSource
    source: NvmlSource | DcgmSource | None = None
    health: str = UNAVAILABLE
    reason: str | None = None
    readings: list[GpuReading] = field(default_factory=list)
    baseline: dict[str, GpuReading] = field(default_factory=dict)    # per GPU: the last booked reading
    booked_until_s: float = float("-inf")     # the time of the last reading whose energy was booked
    unbooked_until_s: float = float("-inf")   # the last reading from which booking had to start afresh (a GPU
    #                                           failed or is new): what a request used before it is not all booked
    stale: dict[str, float] = field(default_factory=dict)   # per GPU: since when its counter stands still
    opened_at_s: float = float("-inf")        # the last attempt to open the source
    nvml_read: asyncio.Future | None = None   # the NVML read running in the worker thread, maybe past its time
    executor: ThreadPoolExecutor | None = None  # NVML pools: their own worker thread, so a hang stalls no other
    cycle: asyncio.Task | None = None         # the sampling loop's read of this pool, maybe past its interval
    uuids: set[str] = field(default_factory=set)    # the UUIDs of the GPUs read, to find a GPU in two pools
    conflict: str | None = None               # why not booked: one of its GPUs is another pool's too
    crashed: bool = False                     # sampling raised (logged once, until it works again)
    others: Others | None = None              # the other processes measuring its GPUs (`sharing`), last heard
    others_at_s: float = float("-inf")        # when
    said_at_s: float = float("-inf")          # when this process last told them its own
    unshared_said: bool = False               # its GPUs report no UUID, so cannot be shared: said once
    ticked: asyncio.Event = field(default_factory=asyncio.Event)


def interval_energy_j(before: GpuReading, after: GpuReading) -> float | None:
    """Joules one GPU used between two readings: counter delta, else mean power x dt; None when neither is
    known, or the figure is not a finite number of joules >= 0."""
    dt_s = after.timestamp_s - before.timestamp_s
    if dt_s <= 0:
        return None
    if before.energy_mj is not None and after.energy_mj is not None and after.energy_mj >= before.energy_mj:
        joules = (after.energy_mj - before.energy_mj) / 1000.0
    elif after.power_w is None:
        return None
    else:
        before_w = after.power_w if before.power_w is None else before.power_w
        joules = (before_w + after.power_w) / 2 * dt_s
    return joules if math.isfinite(joules) and joules >= 0 else None


def _is_stale(before: GpuReading, after: GpuReading) -> bool:
    """A counter that has not moved while the GPU draws power was not refreshed (DCGM `-c`)."""
    return (after.energy_mj is not None and after.energy_mj == before.energy_mj
            and bool(after.power_w))


class EnergyMonitor:
    """Samples every model's GPUs and attributes their energy to the requests in flight."""

    def __init__(self, policy: Policy, session: aiohttp.ClientSession | None = None,
                 nvml_module: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._setup(_gpu_sources(policy), policy.energy.sample_interval_s, session, nvml_module, clock)

    @classmethod
    def for_sources(cls, sources: Mapping[str, GpuSource], interval_s: float,
                    session: aiohttp.ClientSession | None = None, nvml_module: Any = None,
                    clock: Callable[[], float] = time.monotonic) -> EnergyMonitor:
        """A monitor for named GPU sources without a policy (the `gateway gpu` command)."""
        monitor = cls.__new__(cls)
        monitor._setup(dict(sources), interval_s, session, nvml_module, clock)
        return monitor

    def _setup(self, sources: dict[str, GpuSource], interval_s: float, session: aiohttp.ClientSession | None,
               nvml_module: Any, clock: Callable[[], float]) -> None:
        self.interval_s = interval_s
        wanted = pools(sources)
        named = labels(wanted)
        self._sampled = {models: _Sampled(named[models], models, gpus) for models, gpus in wanted.items()}
        self._index()
        self.ledger = EnergyLedger({models: s.config.idle_w for models, s in self._sampled.items()}, clock=clock)
        self._ids = itertools.count(1)
        self._session = session
        self._own_session = False
        self._nvml_module = nvml_module
        self._clock = clock
        self.nvml_timeout_s = NVML_TIMEOUT_S
        self.sharing: EnergySharing | FolderSharing | None = None     # set by `share_through`
        self._task: asyncio.Task | None = None
        self._opened = False
        self._started = False
        self._adopting = asyncio.Lock()

    @property
    def settle_timeout_s(self) -> float:
        """How long a request's joules are awaited: two sampling intervals and 2 s."""
        return 2 * self.interval_s + 2.0

    # -- life cycle ------------------------------------------------------------------

    async def open(self, *, say_unavailable: bool = True) -> None:
        """Open every source; log once which models cannot be measured (`say_unavailable`: unless the caller says
        why itself, as `gateway gpu` does)."""
        if self._opened:
            return
        self._opened = True
        await self._open_sources(list(self._sampled.values()), say_unavailable=say_unavailable)

    async def _open_sources(self, pending: list[_Sampled], *, say_unavailable: bool = True) -> None:
        for sampled in pending:
            await self._open_source(sampled)
        unavailable = [s for s in pending if s.health == UNAVAILABLE]
        if unavailable and say_unavailable:
            reasons = "; ".join(dict.fromkeys(s.reason or "unknown" for s in unavailable))
            logger.warning("no GPU: energy not measured for models %s (%s)",
                           ", ".join(m for s in unavailable for m in s.models), reasons)

    async def start(self) -> None:
        """Open the sources and run the sampling loop every `interval_s`."""
        self._started = True
        await self.open()
        if self._task is None and self._sampled:
            self._task = asyncio.create_task(self._run(), name="energy-sampler")

    async def adopt(self, policy: Policy) -> None:
        """Follow a reloaded policy: pools whose GPUs are unchanged keep sampling (and their books); new
        ones are opened, gone ones closed. Requests in flight on a gone pool keep what was booked."""
        async with self._adopting:          # reloads in quick succession are applied in order
            await self._adopt(policy)

    async def _adopt(self, policy: Policy) -> None:
        self.interval_s = policy.energy.sample_interval_s
        old = self._sampled
        wanted = pools(_gpu_sources(policy))
        named = labels(wanted)
        self._sampled = {models: old[models] if models in old and old[models].config == gpus
                         else _Sampled(named[models], models, gpus) for models, gpus in wanted.items()}
        for models, sampled in self._sampled.items():
            sampled.name = named[models]
        self._index()
        self.ledger.set_idle_w({models: s.config.idle_w for models, s in self._sampled.items()})
        for models, sampled in self._sampled.items():
            if old.get(models) is not sampled:  # GPUs read afresh (new, or other than before): their idle power too
                self.ledger.forget_idle(models)
        gone = [s for models, s in old.items() if self._sampled.get(models) is not s]
        await self._stop_cycles(gone)
        await self._close_sources(gone)
        self._release_threads(gone)
        for sampled in gone:
            sampled.ticked.set()            # nobody waits for a pool that is no longer sampled
            self.ledger.forget_abandoned(sampled.models)
        if self._opened:
            await self._open_sources([s for models, s in self._sampled.items() if old.get(models) is not s])
        if self._started and self._task is None and self._sampled:
            self._task = asyncio.create_task(self._run(), name="energy-sampler")

    async def stop(self) -> None:
        """Stop sampling and release NVML and the HTTP session; `start()` may be called again."""
        self._started = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._close_sources(list(self._sampled.values()))
        self._release_threads(list(self._sampled.values()))
        if self.sharing is not None:
            await self.sharing.close()      # this process's words taken back
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
        self._opened = False    # a later start() opens the sources afresh

    async def _close_sources(self, closing: list[_Sampled]) -> None:
        """Release NVML (in each pool's thread, after any read in flight); DCGM sources hold nothing."""
        await asyncio.gather(*(self._close_nvml(s) for s in closing if isinstance(s.source, NvmlSource)))
        for sampled in closing:
            sampled.source, sampled.baseline, sampled.stale, sampled.uuids = None, {}, {}, set()

    async def _close_nvml(self, sampled: _Sampled) -> None:
        try:
            await self._in_nvml_thread(sampled, sampled.source.close)
        except TimeoutError:    # it runs once the hung call returns
            logger.warning("energy: NVML did not release the GPUs of %s within %g s", sampled.name, self.nvml_timeout_s)

    @staticmethod
    def _release_threads(releasing: list[_Sampled]) -> None:
        """Let the pools' NVML threads end once their last call returns."""
        for sampled in releasing:
            if sampled.executor is not None:
                sampled.executor.shutdown(wait=False)
                sampled.executor = None

    @staticmethod
    async def _stop_cycles(stopping: list[_Sampled]) -> None:
        """Cancel the pools' reads in progress (an NVML call itself finishes in its thread)."""
        cycles = [s.cycle for s in stopping if s.cycle is not None]
        for cycle in cycles:
            cycle.cancel()
        await asyncio.gather(*cycles, return_exceptions=True)
        for sampled in stopping:
            sampled.cycle = None

    async def _open_source(self, sampled: _Sampled) -> None:
        sampled.opened_at_s = self._clock()
        try:
            source = await self._new_source(sampled)
        except EnergyUnavailable as exc:
            sampled.health, sampled.reason = UNAVAILABLE, exc.message
            return
        if source is not None:
            sampled.source, sampled.health, sampled.reason = source, OK, None

    async def _renew_source(self, sampled: _Sampled) -> None:
        """Open a failing pool's GPUs afresh and swap the new handles in once all open; until then the old
        handles keep reading the GPUs that still answer. The counters carry on: the baselines are kept."""
        sampled.opened_at_s = self._clock()
        try:
            source = await self._new_source(sampled)
        except EnergyUnavailable:
            return
        if source is None:
            return
        baseline = sampled.baseline
        await self._close_sources([sampled])
        sampled.source, sampled.baseline, sampled.health, sampled.reason = source, baseline, OK, None

    async def _new_source(self, sampled: _Sampled) -> NvmlSource | DcgmSource | None:
        """An opened source for the pool's GPUs; None when a reload took the pool away meanwhile."""
        config = sampled.config
        if config.source == "dcgm":
            if not config.url:
                raise EnergyUnavailable("no DCGM exporter url (gpus.url)")
            return DcgmSource(config.url, config.ids, config.hostname, self._http(), clock=self._clock)
        source = NvmlSource(config.ids, self._nvml_module, clock=self._clock)
        try:
            await self._in_nvml_thread(sampled, source.open, undo=source.close)
        except TimeoutError:
            raise EnergyUnavailable(f"NVML did not answer within {self.nvml_timeout_s:g} s") from None
        if self._sampled.get(sampled.models) is not sampled:
            with contextlib.suppress(TimeoutError):     # else it runs once the hung call returns
                await self._in_nvml_thread(sampled, source.close)
            return None
        return source

    async def _in_nvml_thread(self, sampled: _Sampled, call: Callable[[], Any], *,
                              undo: Callable[[], Any] | None = None) -> Any:
        """`call()` in the pool's NVML thread; TimeoutError after `nvml_timeout_s` (the call finishes there later,
        and then `undo` runs after it, when it succeeded; so too when the wait is cancelled)."""
        future = asyncio.get_running_loop().run_in_executor(self._nvml_executor(sampled), call)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.nvml_timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            future.add_done_callback(lambda done: _after_late_call(sampled, done, undo))
            raise

    @staticmethod
    def _nvml_executor(sampled: _Sampled) -> ThreadPoolExecutor:
        if sampled.executor is None:
            sampled.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nvml {sampled.name}")
        return sampled.executor

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session, self._own_session = aiohttp.ClientSession(), True
        return self._session

    # -- sampling --------------------------------------------------------------------

    async def _run(self) -> None:
        """Every `interval_s`, a cycle for each pool whose last one has ended: a pool whose scrape is slow or
        whose NVML call hangs holds back only itself."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                began_s = loop.time()
                for sampled in list(self._sampled.values()):
                    if sampled.cycle is None or sampled.cycle.done():
                        sampled.cycle = asyncio.create_task(self._cycle(sampled), name=f"energy-sampler {sampled.name}")
                await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - began_s)))
        finally:
            await self._stop_cycles(list(self._sampled.values()))

    async def sample_once(self) -> None:
        """Read every measurable model's GPUs once and book the energy since the last read (see `_cycle`)."""
        await asyncio.gather(*(self._cycle(s) for s in list(self._sampled.values())))

    async def _cycle(self, sampled: _Sampled) -> None:
        """One pool's turn: every REOPEN_S, open afresh GPUs that could not be opened (not there at start) or
        whose NVML handles keep failing (a GPU lost, then back after a reset); then read and book them."""
        try:
            await self._reopen_if_due(sampled)
        except Exception:           # boundary: a bug in one source must not stop its sampling
            logger.exception("energy: opening the GPUs of %s failed", sampled.name)
        if sampled.source is not None:
            await self._sample(sampled)

    async def _reopen_if_due(self, sampled: _Sampled) -> None:
        if self._clock() - sampled.opened_at_s < REOPEN_S:
            return
        was = sampled.health
        if sampled.source is None:
            await self._open_source(sampled)
        elif sampled.health == FAILING and isinstance(sampled.source, NvmlSource) \
                and (sampled.nvml_read is None or sampled.nvml_read.done()):    # fresh handles cannot help a hang
            await self._renew_source(sampled)
        else:
            return
        if sampled.health == OK:
            logger.info("energy: GPUs of %s measured now (were %s)", sampled.name, was)

    def share_through(self, sharing: EnergySharing | FolderSharing) -> None:
        """Share each pool's energy with the other processes measuring the same GPUs (`gateway.energy.sharing`)."""
        self.sharing = sharing

    async def _sample(self, sampled: _Sampled) -> None:
        try:
            readings = await self._read(sampled)
            if sampled.source is None:          # closed while reading (a reload took the pool away)
                return
            readings = [replace(r, model=sampled.name) for r in readings]
            self._find_conflict(sampled, readings)
            interval = self._measure(sampled, readings)
            self._update_health(sampled, readings)
            if self.sharing is not None:        # every sample, booked or not (a DCGM counter refreshed or not)
                await self._hear_others(sampled)
            if interval is not None:
                measured_j, dt_s, n_gpus = interval
                self.ledger.on_interval(sampled.models, measured_j, dt_s, n_gpus=n_gpus, others=sampled.others)
        except Exception as exc:    # boundary: a bug or a bad value in one pool must not stop its sampling
            readings = self._crashed(sampled, exc)
        else:
            sampled.crashed = False
        sampled.readings = readings
        sampled.ticked.set()
        sampled.ticked = asyncio.Event()

    async def _hear_others(self, sampled: _Sampled) -> None:
        """Tell the other processes measuring the pool's GPUs how many of this one's requests were in flight on
        them since its last word, and hear theirs; when Redis does not answer, what was last heard is kept while
        it is fresh. A pool whose GPUs report no UUID cannot be known by the others: said once."""
        if not sampled.uuids:
            if not sampled.unshared_said and any(not r.failed for r in sampled.readings):
                sampled.unshared_said = True
                logger.warning("energy: the GPUs of %s report no UUID, so other processes measuring them cannot "
                               "be told apart: this process books their whole energy among its own requests",
                               sampled.name)
            return
        now_s = self._clock()
        since_s = min(now_s - sampled.said_at_s, STALE_LIMIT_S)
        in_flight = self.ledger.in_flight(sampled.models, since_s) if since_s > 0 else 0.0
        fresh_s = max(FRESH_S, 4 * self.interval_s)
        others = await self.sharing.exchange(sampled.uuids, in_flight, fresh_s=fresh_s)
        sampled.said_at_s = now_s
        if others is not None:
            sampled.others, sampled.others_at_s = others, now_s
        elif now_s - sampled.others_at_s > fresh_s:
            sampled.others = None

    def _crashed(self, sampled: _Sampled, exc: Exception) -> list[GpuReading]:
        """The pool is failing; logged with the traceback once, until a sample works again."""
        if not sampled.crashed:
            logger.exception("energy: sampling the GPUs of %s failed", sampled.name)
        sampled.crashed = True
        sampled.health, sampled.reason = FAILING, f"sampling failed: {exc!r}"
        return [GpuReading(gpu_id="*", timestamp_s=self._clock(), error=repr(exc), model=sampled.name)]

    async def _read(self, sampled: _Sampled) -> list[GpuReading]:
        source = sampled.source
        if not isinstance(source, NvmlSource):
            return await source.read()
        error = f"NVML did not answer within {self.nvml_timeout_s:g} s"
        if sampled.nvml_read is not None and not sampled.nvml_read.done():    # a read past its time: fail at once
            return _failed(source, self._clock(), error)                      # (never a second read behind it)
        sampled.nvml_read = asyncio.get_running_loop().run_in_executor(self._nvml_executor(sampled), source.read)
        sampled.nvml_read.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(sampled.nvml_read), self.nvml_timeout_s)
        except TimeoutError:
            return _failed(source, self._clock(), error)

    def _find_conflict(self, sampled: _Sampled, readings: list[GpuReading]) -> None:
        """A GPU read by this pool and by another (one names it by index, the other by UUID), or twice by this
        one, would be booked twice: neither pool books until the policy names it the same way in both."""
        ids_of: dict[str, list[str]] = {}
        for reading in readings:
            if reading.uuid is not None:
                ids_of.setdefault(reading.uuid, []).append(reading.gpu_id)
        sampled.uuids.update(ids_of)
        twice = [f"GPU {uuid} is named twice by {sampled.name} ({', '.join(ids)})"
                 for uuid, ids in ids_of.items() if len(ids) > 1]
        twice += [f"GPU {uuid} is also measured for {other.name}" for other in self._sampled.values()
                  if other is not sampled and other.source is not None for uuid in sorted(other.uuids & sampled.uuids)]
        conflict = "; ".join(twice) or None
        if conflict and conflict != sampled.conflict:
            logger.error("energy: %s: the energy of %s is not measured, so that no GPU is counted twice; name each "
                         "GPU the same way (index or UUID) in every model that runs on it", conflict, sampled.name)
        sampled.conflict = conflict
        if conflict:
            sampled.baseline = {}

    def _update_health(self, sampled: _Sampled, readings: list[GpuReading]) -> None:
        problems = [sampled.conflict] if sampled.conflict else []
        problems += [f"GPU {r.gpu_id}: {r.error}" if r.failed else f"GPU {r.gpu_id}: reports neither energy nor power"
                    for r in readings if r.failed or (r.energy_mj is None and r.power_w is None)]
        now_s = max((r.timestamp_s for r in readings), default=self._clock())
        problems += [f"GPU {gpu_id}: energy counter not refreshed for {now_s - since_s:.0f} s"
                     for gpu_id, since_s in sampled.stale.items() if now_s - since_s >= STALE_LIMIT_S]
        health = FAILING if problems else OK
        reason = "; ".join(problems) or None
        if health != sampled.health:
            if problems:
                logger.warning("energy: GPUs of %s failing: %s", sampled.name, reason)
            else:
                logger.info("energy: GPUs of %s measured again", sampled.name)
        sampled.health, sampled.reason = health, reason

    def _measure(self, sampled: _Sampled, readings: list[GpuReading]) -> tuple[float, float, int] | None:
        """The interval to book (joules, seconds, GPUs) from these readings, or None. Sums the energy of every GPU
        read twice in a row; a failed GPU, or another GPU behind the same id,
        starts afresh: what a GPU used while it could not be read is not booked (booked whole on its return it
        would be split among the requests in flight then, not those that ran meanwhile, and over an interval the
        pool's other GPUs did not share). While any GPU's counter was not refreshed yet, nothing is booked: the
        pool's GPUs are booked over one common interval, so no time is counted twice. Nothing is booked for a
        pool in conflict over a GPU."""
        if sampled.conflict:
            return None
        for reading in readings:
            if reading.failed or _replaced(sampled.baseline.get(reading.gpu_id), reading):
                sampled.baseline.pop(reading.gpu_id, None)
        fresh = [r for r in readings if not r.failed]
        if len(fresh) < len(readings) or any(r.gpu_id not in sampled.baseline for r in fresh):
            sampled.unbooked_until_s = max(r.timestamp_s for r in readings)
        stale = [r for r in fresh if r.gpu_id in sampled.baseline and _is_stale(sampled.baseline[r.gpu_id], r)]
        sampled.stale = {r.gpu_id: sampled.baseline[r.gpu_id].timestamp_s for r in stale}
        if stale:
            return None
        measured_j, dt_s, n_gpus = 0.0, 0.0, 0
        for reading in fresh:
            before = sampled.baseline.get(reading.gpu_id)
            sampled.baseline[reading.gpu_id] = reading
            joules = None if before is None else interval_energy_j(before, reading)
            if before is not None and joules is None:   # read, but its interval has no figure (its counter went
                sampled.unbooked_until_s = max(sampled.unbooked_until_s, reading.timestamp_s)   # back, no power)
            if joules is not None:
                measured_j += joules
                dt_s = max(dt_s, reading.timestamp_s - before.timestamp_s)
                n_gpus += 1
                sampled.booked_until_s = max(sampled.booked_until_s, reading.timestamp_s)
        return (measured_j, dt_s, n_gpus) if n_gpus else None

    # -- what the rest of the gateway reads ------------------------------------------

    @property
    def health(self) -> dict[str, str]:
        """Per model with `gpus:`: ok, unavailable or failing."""
        return {model: s.health for model, s in self._pool_of.items()}

    @property
    def reasons(self) -> dict[str, str]:
        """Why a model's GPUs are unavailable or failing."""
        return {model: s.reason for model, s in self._pool_of.items() if s.reason}

    def measures(self, model: str) -> bool:
        """Whether `model`'s energy is being measured."""
        sampled = self._pool_of.get(model)
        return sampled is not None and sampled.source is not None

    def snapshot(self) -> list[GpuReading]:
        """The latest reading of every GPU, failed ones included, for `gateway gpu` and metrics; each GPU once,
        labelled with its pool (a model's name, or the names of the models sharing it joined by "+")."""
        readings: dict[str, GpuReading] = {}
        for sampled in self._sampled.values():
            for reading in sampled.readings:    # a GPU named twice (by index and by UUID) is shown once
                readings.setdefault(reading.hw_id, reading)
        return list(readings.values())

    def models(self) -> list[str]:
        """The labels energy totals are shown under: a model's name, or a pool's ("small+small-lora")."""
        return [sampled.name for sampled in self._sampled.values()]

    def totals(self, model: str) -> ModelEnergy:
        """Measured, attributed and idle joules so far of a pool (by its label) or of a model's GPUs (its pool's,
        when shared)."""
        sampled = self._labelled.get(model) or self._pool_of.get(model)
        return self.ledger.totals(sampled.models) if sampled is not None else ModelEnergy()

    def request_started(self, model: str, *, tracks_tokens: bool = True) -> str | None:
        """A request began on `model` (`tracks_tokens`: its progress will be reported, as a stream's is).
        Returns its id in the energy books, unique in this process; None when the model is not measured."""
        sampled = self._pool_of.get(model)
        if sampled is None or sampled.source is None:
            return None
        request_id = str(next(self._ids))
        self.ledger.request_started(request_id, sampled.models, tracks_tokens=tracks_tokens)
        return request_id

    def progress(self, request_id: str, tokens: int) -> None:
        """Cumulative tokens processed by the request so far (prompt once prefilled, plus output)."""
        self.ledger.progress(request_id, tokens)

    def request_ended(self, request_id: str) -> None:
        """The request stopped using the GPU now; its joules are read later with `request_finished`."""
        self.ledger.mark_ended(request_id)

    async def request_finished(self, request_id: str) -> float | None:
        """The request's joules once the energy up to its end is booked; None when they are not whole (its GPUs
        failed, or its books did not settle within `settle_timeout_s`): a part is not reported as the whole.
        None too when the request was not measured."""
        measured = await self.request_measured(request_id)
        return measured[0] if measured is not None and measured[1] else None

    async def request_measured(self, request_id: str) -> tuple[float, bool] | None:
        """The joules booked to the request, and whether they are whole: its GPUs healthy, the energy from its
        start (no GPU failed or started afresh while it ran) to its end booked (not cut short by a failure or by
        `settle_timeout_s`). Waits for its books while sampling."""
        pool = self.ledger.model_of(request_id)
        if pool is None:
            return None
        ended_s = self.ledger.mark_ended(request_id)
        timed_out = False
        if self._task is not None:
            try:
                async with asyncio.timeout(self.settle_timeout_s):
                    while (sampled := self._sampled.get(pool)) is not None and sampled.health == OK \
                            and sampled.booked_until_s < ended_s:
                        await sampled.ticked.wait()
            except TimeoutError:
                timed_out = True
            except asyncio.CancelledError:
                self.ledger.request_finished(request_id)
                raise
        sampled = self._sampled.get(pool)
        started_s = self.ledger.started_s(request_id)
        whole = sampled is not None and sampled.health == OK and sampled.booked_until_s >= ended_s \
            and started_s is not None and started_s >= sampled.unbooked_until_s \
            and not self.ledger.idle_guessed(request_id)    # booked all idle, before its GPUs' idle power was known
        if timed_out and sampled is not None and sampled.health == OK and sampled.booked_until_s < ended_s:
            # its books are still open (a counter not refreshed yet): it keeps its share of the interval to come,
            # so that share is not handed to the requests booked with it, and is forgotten once booked
            return self.ledger.abandon(request_id), False
        return self.ledger.request_finished(request_id), whole

    def _index(self) -> None:
        """Model name -> its pool, and label -> pool, after the pools changed."""
        self._pool_of = {model: pool for pool in self._sampled.values() for model in pool.models}
        self._labelled = {pool.name: pool for pool in self._sampled.values()}


def _gpu_sources(policy: Policy) -> dict[str, GpuSource]:
    return {name: model.gpus for name, model in policy.models.items() if model.gpus is not None}


def _failed(source: NvmlSource, now_s: float, error: str) -> list[GpuReading]:
    return [GpuReading(gpu_id=gpu_id, timestamp_s=now_s, error=error) for gpu_id in source.device_ids]


def _after_late_call(sampled: _Sampled, done: asyncio.Future, undo: Callable[[], Any] | None) -> None:
    """Undo a call that succeeded after its caller stopped waiting (an NVML open: close it), in its thread."""
    if done.cancelled() or done.exception() is not None or undo is None or sampled.executor is None:
        return
    sampled.executor.submit(undo)


def _retrieve(done: asyncio.Future) -> None:
    """Take a finished NVML read's exception, so a read nobody awaits any more is not reported as unretrieved."""
    if not done.cancelled():
        done.exception()


def _replaced(before: GpuReading | None, after: GpuReading) -> bool:
    """Another GPU answers behind the same id (renumbered after an exporter restart, or another node behind
    one URL): its counter is no continuation of the last one."""
    return (before is not None and before.uuid is not None and after.uuid is not None
            and before.uuid != after.uuid)


def main(argv: list[str] | None = None) -> int:
    """`gateway gpu [--policy FILE] [--interval S] [--once]`: see gateway.energy.command."""
    from gateway.energy.command import main as gpu_main   # late: command imports this module

    return gpu_main(argv)
