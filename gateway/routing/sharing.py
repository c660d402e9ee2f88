"""Latency samples shared by every gateway process through Redis (`routing.share_estimates`).

Without sharing, each process (worker or replica) learns a model's TTFT and
TPOT from its own calls only: with ten replicas each sees a tenth of the
evidence, a new replica starts from the priors, and a model one replica has
found slow still gets the others' traffic until each finds out for itself.

With sharing, each process sends the samples it measured to Redis once a
second (`SYNC_INTERVAL_S`) and reads the ones the others sent, in one
pipelined round trip (and a TIME) off the request path: a call only appends its sample to
a list. Each model has one Redis stream per server it is called on (the key
carries a digest of the endpoint and upstream model the sample measured, so
processes on two versions of a policy that moved a model never mix what they
measured); an entry is one process's samples of one model in one sync (a
batch), each sample with its age when sent. A process reads only others'
entries (its own are in its windows already), and at start-up reads the
newest window's worth (up to `MAX_ENTRIES_READ` entries a model), so a new
replica routes by what the fleet measured rather than by the priors. Ages
are counted on Redis's clock (TIME, read in the same round trip): a sample
leaves every process's window when it leaves the one that measured it, and a
replica whose own clock is off changes nothing. Entries are trimmed past the
latency window and a stream expires `EXPIRY_MARGIN_S` after the window once
nobody writes to it.

Redis down: each process routes by its own samples; a batch whose sync went
unanswered is kept (up to `MAX_PENDING` samples, the newest, and only while
they are inside the window) and sent again with the next sync that reaches
Redis. A batch Redis did store while its reply was lost is sent again too:
entries carry the batch's number, a process's batches reach a stream in the
order of their numbers, and readers skip one numbered at or below the last
they read from that process. An entry Redis refuses (another type under the
key) is an answer: its samples are dropped, not sent again. Samples dropped
are counted as `gateway.store.failures` (part `estimates`), with the syncs
that failed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
#: entries read from one stream in one sync (each entry is one process's samples of one sync)
MAX_ENTRIES_READ = 1000
#: how long a stream outlives its latest entry beyond the latency window
EXPIRY_MARGIN_S = 60
#: (stream, process) pairs remembered before those quiet for a latency window are forgotten
SEEN_PAIRS = 1024

Sample = tuple[Model, "float | None", "float | None", float]     # model measured, TTFT, TPOT, when (local s)


@functools.lru_cache(maxsize=1024)
def server_digest(endpoint: str, upstream_model: str) -> str:
    """Which server a model's samples measure: its endpoint and upstream model, digested."""
    return hashlib.sha256(f"{endpoint}\0{upstream_model}".encode()).hexdigest()[:16]


@dataclass
class _Batch:
    """The samples of one sync, under the number readers know them by."""

    number: int
    samples: list[Sample]


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
        self._process = self.process_id.encode()
        self.enabled = False
        self.guard = StoreGuard("shared latency estimates", timeout_s,
                                meanwhile="each process routes by its own samples until it is back")
        self.lost = 0                       # samples dropped unsent (Redis unreachable for long)
        self._pending: list[Sample] = []
        self._unsent: list[_Batch] = []     # batches a failed sync may not have stored: sent again, same number
        self._batches = 0
        # stream key -> the last entry id read (kept for models a reload removed: one put back reads on from there)
        self._cursors: dict[str, bytes] = {}
        # (key, process) -> (the highest batch number read, when last read): a process's batches reach a stream in
        # the order of their numbers, so one at or below it is a batch sent again
        self._seen: dict[tuple[str, bytes], tuple[int, float]] = {}
        self._redis_offset_s: float | None = None   # Redis's clock minus this process's, at the last sync
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def unsent(self) -> int:
        """Samples waiting for a sync that reaches Redis."""
        return len(self._pending) + sum(len(batch.samples) for batch in self._unsent)

    @property
    def store_failures(self) -> int:
        """Syncs that did not reach Redis, and samples lost unsent."""
        return self.guard.failures + self.lost

    def add(self, model: Model, ttft_s: float | None, tpot_s: float | None) -> None:
        """Keep one sample this process measured of `model` (as the call saw it), for the next sync: the request
        path's only cost."""
        if self.enabled:
            self._pending.append((model, ttft_s, tpot_s, self._wall_clock()))

    def key(self, model: Model) -> str:
        """The stream of one model on one server."""
        return f"{self.prefix}:estimates:{model.name}:{server_digest(model.endpoint, model.upstream_model)}"

    def start(self) -> None:
        """Sync every `SYNC_INTERVAL_S` until `stop`."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="estimate-sharing")

    async def stop(self) -> None:
        """Stop syncing, once the sync under way is done, after sending what is pending (each bounded by the
        store timeout)."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.enabled and (self._pending or self._unsent):
            try:
                await self.sync()
            except Exception:               # shutdown goes on whatever sharing does
                log.exception("sending the last latency samples failed")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), SYNC_INTERVAL_S)
                return
            except TimeoutError:
                pass
            if self.enabled:
                try:
                    await self.sync()
                except Exception:       # a bug here must not end sharing for good, nor go unseen
                    log.exception("sharing latency estimates failed")

    async def sync(self) -> None:
        """Send the pending samples (and the batches earlier syncs could not) and record the ones other
        processes sent since the last sync."""
        now_s = self._wall_clock()
        window_s = self.estimates.window_s
        if self._pending:
            self._batches += 1
            self._unsent.append(_Batch(self._batches, self._pending))
            self._pending = []
        batches = [batch for batch in self._unsent if _keep_fresh(batch, now_s, window_s)]
        self._unsent = []
        outgoing = [(batch, *entry) for batch in batches for entry in self._payloads(batch, now_s)]
        reads = {model.name: self.key(model) for model in self._models().values()}
        trim = {} if self._redis_offset_s is None else \
            {"minid": f"{max(0, int((now_s + self._redis_offset_s - window_s) * 1000))}-0", "approximate": True}

        async def commands():
            pipe = self.client.pipeline(transaction=False)
            for batch, key, payload, _ in outgoing:
                pipe.xadd(key, {"p": self.process_id, "b": batch.number, "s": payload}, **trim)
                pipe.expire(key, math.ceil(window_s) + EXPIRY_MARGIN_S)
            for key in reads.values():
                cursor = self._cursors.get(key)
                if cursor is None:              # first read: the newest entries, back to the window
                    pipe.xrevrange(key, "+", trim.get("minid", "-"), count=MAX_ENTRIES_READ)
                else:
                    pipe.xrange(key, b"(" + cursor, "+", count=MAX_ENTRIES_READ)
            replies = await pipe.execute(raise_on_error=False)    # one error fails neither the rest nor the reads
            return [await self.client.time(), *replies]      # its own call: a Cluster pipeline refuses TIME

        replies = await self.guard.run(commands)
        if replies is STORE_DOWN:
            self._keep_unsent(batches)
            return
        clock, sends, read_replies = replies[0], replies[1:1 + 2 * len(outgoing)], replies[1 + 2 * len(outgoing):]
        for (_, key, _, count), sent in zip(outgoing, sends[::2]):
            if isinstance(sent, Exception):     # an answer (another type under the key, say): sending again won't do
                self.lost += count
                log.warning("%d shared latency samples not stored in %s: %s", count, key, sent)
        redis_now_s = int(clock[0]) + int(clock[1]) / 1e6
        self._redis_offset_s = redis_now_s - now_s
        for (name, key), entries in zip(reads.items(), read_replies):
            if isinstance(entries, Exception):
                continue
            if self._cursors.get(key) is None:
                entries = entries[::-1]         # read newest first, recorded oldest first
            self._record(name, key, entries, redis_now_s, window_s)
        if len(self._seen) > SEEN_PAIRS:            # replicas come and go: forget those quiet for a window
            self._seen = {pair: seen for pair, seen in self._seen.items() if redis_now_s - seen[1] < window_s}

    def _payloads(self, batch: _Batch, now_s: float) -> list[tuple[str, bytes, int]]:
        """A batch's entries: per stream, its samples with their age when sent, in ms, and how many."""
        by_key: dict[str, list[list]] = {}
        for model, ttft_s, tpot_s, measured_s in batch.samples:
            by_key.setdefault(self.key(model), []).append([ttft_s, tpot_s, round((now_s - measured_s) * 1000)])
        return [(key, orjson.dumps(samples), len(samples)) for key, samples in by_key.items()]

    def _record(self, model_name: str, key: str, entries: list, redis_now_s: float, window_s: float) -> None:
        """Record the samples of other processes' entries, each as old as it is on Redis's clock."""
        if not entries:
            self._cursors.setdefault(key, b"0-0")
            return
        self._cursors[key] = _as_bytes(entries[-1][0])
        kept: list[tuple[float, float | None, float | None]] = []
        for entry_id, fields in entries:
            process = _as_bytes(fields.get(b"p", b""))
            if process == self._process or not self._first_time(key, process, fields.get(b"b"), redis_now_s):
                continue
            sent_s = int(_as_bytes(entry_id).split(b"-", 1)[0]) / 1000
            for ttft_s, tpot_s, age_ms in _samples(fields.get(b"s")):
                age_s = max(0.0, redis_now_s - sent_s + age_ms / 1000)
                if age_s < window_s:
                    kept.append((age_s, ttft_s, tpot_s))
        self.estimates.record_shared(model_name, kept[-MAX_SAMPLES:])

    def _first_time(self, key: str, process: bytes, raw_number: object, now_s: float) -> bool:
        """Whether this batch of `process` has not been read from `key` yet (a batch is sent again when its sync
        went unanswered, even if Redis had stored it)."""
        try:
            number = int(_as_bytes(raw_number))
        except ValueError:
            return False
        highest, _ = self._seen.get((key, process), (0, now_s))
        if number <= highest:
            return False
        self._seen[(key, process)] = (number, now_s)
        return True

    def _keep_unsent(self, batches: list[_Batch]) -> None:
        """Batches to send again with the next sync; past `MAX_PENDING` samples the oldest are dropped."""
        kept = batches + self._unsent
        over = sum(len(batch.samples) for batch in kept) + len(self._pending) - MAX_PENDING
        while kept and over > 0:
            oldest = kept[0]
            dropped = min(over, len(oldest.samples))
            del oldest.samples[:dropped]
            self.lost += dropped
            over -= dropped
            if not oldest.samples:
                kept.pop(0)
        self._unsent = kept


def _keep_fresh(batch: _Batch, now_s: float, window_s: float) -> bool:
    """Whether a batch still holds a sample inside the window (its stale ones are dropped: no one would use them)."""
    batch.samples = [sample for sample in batch.samples if now_s - sample[3] < window_s]
    return bool(batch.samples)


def _samples(raw: object) -> list[tuple[float | None, float | None, float]]:
    """An entry's samples (TTFT, TPOT, age when sent in ms); an entry written by anything else is skipped, not
    believed."""
    try:
        samples = orjson.loads(raw) if isinstance(raw, (bytes, str)) else None
    except orjson.JSONDecodeError:
        return []
    if not isinstance(samples, list):
        return []
    return [(ttft, tpot, age) for ttft, tpot, age in (s for s in samples if isinstance(s, list) and len(s) == 3)
            if _seconds(ttft) and _seconds(tpot) and (ttft is not None or tpot is not None)
            and type(age) is int and age >= 0]


def _seconds(value: object) -> bool:
    """Whether a sample value is a duration a router can use (or absent)."""
    return value is None or (type(value) in (int, float) and math.isfinite(value) and 0 <= value < 3600)


def _as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
