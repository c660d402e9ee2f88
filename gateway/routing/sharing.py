"""Latency samples shared by every gateway process through Redis (`routing.share_estimates`).

Without sharing, each process (worker or replica) learns a model's TTFT and
TPOT from its own calls only: with ten replicas each sees a tenth of the
evidence, a new replica starts from the priors, and a model one replica has
found slow still gets the others' traffic until each finds out for itself.

With sharing, each process sends the samples it measured to Redis once a
second (`SYNC_INTERVAL_S`) and reads the ones the others sent, in one
pipelined round trip off the request path: a call only appends its sample to
a list. Each model has one Redis stream per server it is called on (the
key carries a digest of its endpoint and upstream model, so processes on two
versions of a policy that moved a model never mix what they measured); an
entry is one process's samples of one interval. Entries are trimmed past the
latency window and the key expires when nobody writes to it. A process
reads only others' entries (its own are in its windows already), and at
start-up reads the newest window's worth, so a new replica routes by what the
fleet measured rather than by the priors. A sample read from another process
counts from when it was sent, so it leaves the window when it would have there.

Redis down: each process routes by its own samples; the ones it could not
send are kept (up to `MAX_PENDING`, the newest) and sent with the next sync
that reaches Redis; the lost ones are counted as `gateway.store.failures`
(part `estimates`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from gateway.policy.model import Model
from gateway.routing.estimates import MAX_SAMPLES, LatencyEstimates
from gateway.store_guard import STORE_DOWN, StoreGuard

log = logging.getLogger(__name__)

#: how often a process sends its samples and reads the others'
SYNC_INTERVAL_S = 1.0
#: samples kept for sending while Redis cannot be reached (the oldest are dropped first)
MAX_PENDING = 4096
#: entries read from one stream in one sync (each entry is one process's samples of one interval)
MAX_ENTRIES_READ = 1000
#: how long a stream outlives its latest entry beyond the latency window
EXPIRY_MARGIN_S = 60


def server_digest(model: Model) -> str:
    """Which server a model's samples measure: its endpoint and upstream model, digested."""
    return hashlib.sha256(f"{model.endpoint}\0{model.upstream_model}".encode()).hexdigest()[:16]


class EstimateSharing:
    """Sends this process's latency samples to Redis and records the other processes' in its estimates."""

    def __init__(self, client: Any, prefix: str, timeout_s: float, estimates: LatencyEstimates,
                 models: Callable[[], Mapping[str, Model]], *, wall_clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.estimates = estimates
        self._models = models
        self._wall_clock = wall_clock
        self.process_id = secrets.token_hex(8)
        self.enabled = False
        self.guard = StoreGuard("shared latency estimates", timeout_s,
                                meanwhile="each process routes by its own samples until it is back")
        self.lost = 0                       # samples dropped unsent (Redis unreachable for long)
        self._pending: list[tuple[str, float | None, float | None]] = []
        # stream key -> the last entry id read (kept for models a reload removed: one put back reads on from there)
        self._cursors: dict[str, bytes] = {}
        self._task: asyncio.Task | None = None

    @property
    def store_failures(self) -> int:
        """Syncs that did not reach Redis, and samples lost unsent."""
        return self.guard.failures + self.lost

    def add(self, model_name: str, ttft_s: float | None, tpot_s: float | None) -> None:
        """Keep one sample this process measured, for the next sync (the request path's only cost)."""
        if self.enabled:
            self._pending.append((model_name, ttft_s, tpot_s))

    def key(self, model_name: str, model: Model) -> str:
        """The stream of one model on one server."""
        return f"{self.prefix}:estimates:{model_name}:{server_digest(model)}"

    def start(self) -> None:
        """Sync every `SYNC_INTERVAL_S` until `stop`."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="estimate-sharing")

    async def stop(self) -> None:
        """Stop syncing, after sending what is pending (bounded by the store timeout)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.enabled and self._pending:
            await self.sync()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            if self.enabled:
                try:
                    await self.sync()
                except Exception:       # a bug here must not end sharing for good, nor go unseen
                    log.exception("sharing latency estimates failed")

    async def sync(self) -> None:
        """Send the pending samples and record the ones other processes sent since the last sync."""
        models = dict(self._models())
        sent, self._pending = self._pending, []
        outgoing = _by_model(sent, models)
        window_s = self.estimates.window_s
        now_s = self._wall_clock()
        min_id = f"{max(0, int((now_s - window_s) * 1000))}-0"
        keys = {name: self.key(name, model) for name, model in models.items()}

        def commands():
            pipe = self.client.pipeline(transaction=False)
            for name, samples in outgoing.items():
                key = keys[name]
                pipe.xadd(key, {"p": self.process_id, "s": orjson.dumps(samples)}, minid=min_id, approximate=True)
                pipe.expire(key, math.ceil(window_s) + EXPIRY_MARGIN_S)
            for key in keys.values():
                cursor = self._cursors.get(key)
                if cursor is None:              # first read: the newest window's worth
                    pipe.xrevrange(key, "+", min_id, count=MAX_ENTRIES_READ)
                else:
                    pipe.xrange(key, b"(" + cursor, "+", count=MAX_ENTRIES_READ)
            return pipe.execute()

        replies = await self.guard.run(commands)
        if replies is STORE_DOWN:
            self._keep_unsent(sent)
            return
        reads = replies[2 * len(outgoing):]
        for (name, key), entries in zip(keys.items(), reads):
            if entries and self._cursors.get(key) is None:
                entries = entries[::-1]         # read newest first, recorded oldest first
            self._record(name, key, entries, now_s)

    def _record(self, model_name: str, key: str, entries: list, now_s: float) -> None:
        """Record the samples of other processes' entries, each as old as its entry."""
        if not entries:
            self._cursors.setdefault(key, b"0-0")
            return
        self._cursors[key] = _as_bytes(entries[-1][0])
        kept: list[tuple[float, float | None, float | None]] = []
        for entry_id, fields in entries:
            if _as_bytes(fields.get(b"p", b"")) == self.process_id.encode():
                continue
            age_s = max(0.0, now_s - int(_as_bytes(entry_id).split(b"-", 1)[0]) / 1000)
            kept.extend((age_s, *sample) for sample in _samples(fields.get(b"s")))
        for age_s, ttft_s, tpot_s in kept[-MAX_SAMPLES:]:
            if age_s < self.estimates.window_s:
                self.estimates.record(model_name, ttft_s, tpot_s, age_s=age_s)

    def _keep_unsent(self, sent: list[tuple[str, float | None, float | None]]) -> None:
        pending = sent + self._pending
        if len(pending) > MAX_PENDING:
            self.lost += len(pending) - MAX_PENDING
            pending = pending[-MAX_PENDING:]
        self._pending = pending


def _by_model(samples: list[tuple[str, float | None, float | None]],
              models: Mapping[str, Model]) -> dict[str, list[tuple[float | None, float | None]]]:
    grouped: dict[str, list[tuple[float | None, float | None]]] = {}
    for name, ttft_s, tpot_s in samples:
        if name in models:              # a model a reload removed: its samples measure nothing routable
            grouped.setdefault(name, []).append((ttft_s, tpot_s))
    return grouped


def _samples(raw: object) -> list[tuple[float | None, float | None]]:
    """An entry's samples; an entry written by anything else is skipped, not believed."""
    try:
        samples = orjson.loads(raw) if isinstance(raw, (bytes, str)) else None
    except orjson.JSONDecodeError:
        return []
    if not isinstance(samples, list):
        return []
    return [(ttft, tpot) for ttft, tpot in (s for s in samples if isinstance(s, list) and len(s) == 2)
            if _seconds(ttft) and _seconds(tpot) and (ttft is not None or tpot is not None)]


def _seconds(value: object) -> bool:
    """Whether a sample value is a duration a router can use (or absent)."""
    return value is None or (type(value) in (int, float) and math.isfinite(value) and 0 <= value < 3600)


def _as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
