"""The GPU sampler: reads each model's GPUs every interval and feeds the energy ledger.

One monitor per gateway process. For every pool of GPUs (the GPUs of one
model, or of several models that share them: `gateway.energy.pools`) it builds
an NVML or DCGM source; `start()` runs one sampling task, and `adopt()`
follows a reloaded policy. NVML calls block, so they run in a single worker
thread, never on the event loop, each awaited at most `nvml_timeout_s` (a hung
call fails its pool; the other pools are sampled on). A model whose GPUs cannot
be measured (no NVML library, no GPU) is `unavailable`, logged once when its
source opens; one whose GPUs fail while sampling, or whose energy counters
stand still at full power for STALE_LIMIT_S, is `failing`, logged on each
change of health.
Requests are served either way: their energy is simply None.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.energy.attribution import EnergyLedger, ModelEnergy
from gateway.energy.dcgm import DcgmSource
from gateway.energy.nvml import NvmlSource
from gateway.energy.pools import pools
from gateway.energy.readings import EnergyUnavailable, GpuReading

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

    name: str                       # the pool's label: its models' names joined by "+"
    models: tuple[str, ...]
    config: GpuSource
    source: NvmlSource | DcgmSource | None = None
    health: str = UNAVAILABLE
    reason: str | None = None
    readings: list[GpuReading] = field(default_factory=list)
    baseline: dict[str, GpuReading] = field(default_factory=dict)    # per GPU: the last booked reading
    booked_until_s: float = float("-inf")     # the time of the last reading whose energy was booked
    stale: dict[str, float] = field(default_factory=dict)   # per GPU: since when its counter stands still
    opened_at_s: float = float("-inf")        # the last attempt to open the source
    nvml_read: asyncio.Future | None = None   # the NVML read running in the worker thread, maybe past its time
    ticked: asyncio.Event = field(default_factory=asyncio.Event)


def interval_energy_j(before: GpuReading, after: GpuReading) -> float | None:
    """Joules one GPU used between two readings: counter delta, else mean power x dt."""
    dt_s = after.timestamp_s - before.timestamp_s
    if dt_s <= 0:
        return None
    if before.energy_mj is not None and after.energy_mj is not None and after.energy_mj >= before.energy_mj:
        return (after.energy_mj - before.energy_mj) / 1000.0
    if after.power_w is None:
        return None
    before_w = after.power_w if before.power_w is None else before.power_w
    return (before_w + after.power_w) / 2 * dt_s


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
        self._sampled = {name: _Sampled(name, models, gpus) for name, (models, gpus) in pools(sources).items()}
        self._pool_of = _pool_index(self._sampled)
        self.ledger = EnergyLedger({name: s.config.idle_w for name, s in self._sampled.items()}, clock=clock)
        self._ids = itertools.count(1)
        self._session = session
        self._own_session = False
        self._nvml_module = nvml_module
        self._clock = clock
        self._executor: ThreadPoolExecutor | None = None
        self.nvml_timeout_s = NVML_TIMEOUT_S
        self._task: asyncio.Task | None = None
        self._opened = False
        self._started = False
        self._adopting = asyncio.Lock()

    @property
    def settle_timeout_s(self) -> float:
        """How long a request's joules are awaited: two sampling intervals and 2 s."""
        return 2 * self.interval_s + 2.0

    # -- life cycle ------------------------------------------------------------------

    async def open(self) -> None:
        """Open every source; log once which models cannot be measured."""
        if self._opened:
            return
        self._opened = True
        await self._open_sources(list(self._sampled.values()))

    async def _open_sources(self, pending: list[_Sampled]) -> None:
        for sampled in pending:
            await self._open_source(sampled)
        unavailable = [s for s in pending if s.health == UNAVAILABLE]
        if unavailable:
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
        self._sampled = {name: old[name] if name in old and old[name].config == gpus else _Sampled(name, models, gpus)
                         for name, (models, gpus) in wanted.items()}
        self._pool_of = _pool_index(self._sampled)
        self.ledger.set_idle_w({name: s.config.idle_w for name, s in self._sampled.items()})
        gone = [s for name, s in old.items() if self._sampled.get(name) is not s]
        await self._close_sources(gone)
        for sampled in gone:
            sampled.ticked.set()            # nobody waits for a pool that is no longer sampled
        if self._opened:
            await self._open_sources([s for name, s in self._sampled.items() if old.get(name) is not s])
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
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None
        self._opened = False    # a later start() opens the sources afresh

    async def _close_sources(self, closing: list[_Sampled]) -> None:
        """Release NVML (in its thread, after any read in flight); DCGM sources hold nothing."""
        nvml_sources = [s.source for s in closing if isinstance(s.source, NvmlSource)]
        if nvml_sources and self._executor is not None:
            try:
                await self._in_nvml_thread(lambda: [source.close() for source in nvml_sources])
            except TimeoutError:    # it runs once the hung call returns
                logger.warning("energy: NVML did not release the GPUs within %g s", self.nvml_timeout_s)
        for sampled in closing:
            sampled.source, sampled.baseline, sampled.stale = None, {}, {}

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
            await self._in_nvml_thread(source.open, undo=source.close)
        except TimeoutError:
            raise EnergyUnavailable(f"NVML did not answer within {self.nvml_timeout_s:g} s") from None
        if self._sampled.get(sampled.name) is not sampled:
            with contextlib.suppress(TimeoutError):     # else it runs once the hung call returns
                await self._in_nvml_thread(source.close)
            return None
        return source

    async def _in_nvml_thread(self, call: Callable[[], Any], *, undo: Callable[[], Any] | None = None) -> Any:
        """`call()` in the NVML thread; TimeoutError after `nvml_timeout_s` (the call finishes there later, and
        then `undo` runs after it, when it succeeded)."""
        future = asyncio.get_running_loop().run_in_executor(self._nvml_executor(), call)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.nvml_timeout_s)
        except TimeoutError:
            future.add_done_callback(lambda done: self._after_late_call(done, undo))
            raise

    def _after_late_call(self, done: asyncio.Future, undo: Callable[[], Any] | None) -> None:
        if done.cancelled() or done.exception() is not None or undo is None or self._executor is None:
            return
        self._executor.submit(undo)

    def _nvml_executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        return self._executor

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session, self._own_session = aiohttp.ClientSession(), True
        return self._session

    # -- sampling --------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began_s = loop.time()
            await self.sample_once()
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - began_s)))

    async def sample_once(self) -> None:
        """Read every measurable model's GPUs once and book the energy since the last read; every REOPEN_S,
        open afresh the GPUs that could not be opened (not there at start) or whose NVML handles keep
        failing (a GPU lost, then back after a reset)."""
        await self._reopen_due()
        live = [s for s in self._sampled.values() if s.source is not None]
        await asyncio.gather(*(self._sample(s) for s in live))

    async def _reopen_due(self) -> None:
        now_s = self._clock()
        for sampled in list(self._sampled.values()):
            if now_s - sampled.opened_at_s < REOPEN_S:
                continue
            was = sampled.health
            if sampled.source is None:
                await self._open_source(sampled)
            elif sampled.health == FAILING and isinstance(sampled.source, NvmlSource) \
                    and (sampled.nvml_read is None or sampled.nvml_read.done()):    # fresh handles cannot help a hang
                await self._renew_source(sampled)
            else:
                continue
            if sampled.health == OK:
                logger.info("energy: GPUs of %s measured now (were %s)", sampled.name, was)

    async def _sample(self, sampled: _Sampled) -> None:
        try:
            readings = await self._read(sampled)
        except Exception as exc:    # boundary: a bug in one source must not stop the sampler
            logger.exception("energy: sampling models %s failed", sampled.name)
            readings = [GpuReading(gpu_id="*", timestamp_s=self._clock(), error=repr(exc))]
        if sampled.source is None:          # closed while reading (a reload took the pool away)
            return
        readings = [replace(r, model=sampled.name) for r in readings]
        self._book(sampled, readings)
        self._update_health(sampled, readings)
        sampled.readings = readings
        sampled.ticked.set()
        sampled.ticked = asyncio.Event()

    async def _read(self, sampled: _Sampled) -> list[GpuReading]:
        source = sampled.source
        if not isinstance(source, NvmlSource):
            return await source.read()
        if sampled.nvml_read is None or sampled.nvml_read.done():    # never a second read behind a hung one
            sampled.nvml_read = asyncio.get_running_loop().run_in_executor(self._nvml_executor(), source.read)
            sampled.nvml_read.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(sampled.nvml_read), self.nvml_timeout_s)
        except TimeoutError:
            error = f"NVML did not answer within {self.nvml_timeout_s:g} s"
            return [GpuReading(gpu_id=gpu_id, timestamp_s=self._clock(), error=error) for gpu_id in source.device_ids]

    def _update_health(self, sampled: _Sampled, readings: list[GpuReading]) -> None:
        problems = [f"GPU {r.gpu_id}: {r.error}" if r.failed else f"GPU {r.gpu_id}: reports neither energy nor power"
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

    def _book(self, sampled: _Sampled, readings: list[GpuReading]) -> None:
        """Sum the energy of every GPU read twice in a row; a failed GPU, or another GPU behind the same id,
        starts afresh. While any GPU's counter was not refreshed yet, nothing is booked: the pool's GPUs
        are booked over one common interval, so no time is counted twice."""
        for reading in readings:
            if reading.failed or _replaced(sampled.baseline.get(reading.gpu_id), reading):
                sampled.baseline.pop(reading.gpu_id, None)
        fresh = [r for r in readings if not r.failed]
        stale = [r for r in fresh if r.gpu_id in sampled.baseline and _is_stale(sampled.baseline[r.gpu_id], r)]
        sampled.stale = {r.gpu_id: sampled.baseline[r.gpu_id].timestamp_s for r in stale}
        if stale:
            return
        measured_j, dt_s, n_gpus = 0.0, 0.0, 0
        for reading in fresh:
            before = sampled.baseline.get(reading.gpu_id)
            sampled.baseline[reading.gpu_id] = reading
            joules = None if before is None else interval_energy_j(before, reading)
            if joules is not None:
                measured_j += joules
                dt_s = max(dt_s, reading.timestamp_s - before.timestamp_s)
                n_gpus += 1
                sampled.booked_until_s = max(sampled.booked_until_s, reading.timestamp_s)
        if n_gpus:
            self.ledger.on_interval(sampled.name, measured_j, dt_s, n_gpus=n_gpus)

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
        """The labels energy totals are kept under: a model's name, or a pool's ("small+small-lora")."""
        return list(self._sampled)

    def totals(self, model: str) -> ModelEnergy:
        """Measured, attributed and idle joules so far of a model's GPUs (its pool's, when shared)."""
        sampled = self._pool_of.get(model)
        return self.ledger.totals(sampled.name if sampled is not None else model)

    def request_started(self, model: str, *, tracks_tokens: bool = True) -> str | None:
        """A request began on `model` (`tracks_tokens`: its progress will be reported, as a stream's is).
        Returns its id in the energy books, unique in this process; None when the model is not measured."""
        sampled = self._pool_of.get(model)
        if sampled is None or sampled.source is None:
            return None
        request_id = str(next(self._ids))
        self.ledger.request_started(request_id, sampled.name, tracks_tokens=tracks_tokens)
        return request_id

    def progress(self, request_id: str, tokens: int) -> None:
        """Cumulative tokens processed by the request so far (prompt once prefilled, plus output)."""
        self.ledger.progress(request_id, tokens)

    def request_ended(self, request_id: str) -> None:
        """The request stopped using the GPU now; its joules are read later with `request_finished`."""
        self.ledger.mark_ended(request_id)

    async def request_finished(self, request_id: str) -> float | None:
        """The request's joules, once the energy up to its end is booked (or after `settle_timeout_s`, or when
        its GPUs fail); None when not measured."""
        measured = await self.request_measured(request_id)
        return None if measured is None else measured[0]

    async def request_measured(self, request_id: str) -> tuple[float, bool] | None:
        """`request_finished`'s joules, and whether they are whole: its GPUs healthy and the energy up to its end
        booked (not cut short by a failure or by `settle_timeout_s`). Only whole ones teach the router."""
        pool = self.ledger.model_of(request_id)
        if pool is None:
            return None
        ended_s = self.ledger.mark_ended(request_id)
        whole = False
        if self._task is not None:
            try:
                async with asyncio.timeout(self.settle_timeout_s):
                    while (sampled := self._sampled.get(pool)) is not None and sampled.health == OK \
                            and sampled.booked_until_s < ended_s:
                        await sampled.ticked.wait()
            except TimeoutError:
                pass
            except asyncio.CancelledError:
                self.ledger.request_finished(request_id)
                raise
            sampled = self._sampled.get(pool)
            whole = sampled is not None and sampled.health == OK and sampled.booked_until_s >= ended_s
        return self.ledger.request_finished(request_id), whole


def _gpu_sources(policy: Policy) -> dict[str, GpuSource]:
    return {name: model.gpus for name, model in policy.models.items() if model.gpus is not None}


def _pool_index(sampled: Mapping[str, _Sampled]) -> dict[str, _Sampled]:
    """Model name -> the pool that samples its GPUs."""
    return {model: pool for pool in sampled.values() for model in pool.models}


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
