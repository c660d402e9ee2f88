"""GPU energy shared out between the processes that measure the same GPUs, through Redis or the workers' folder.

The workers of `gateway run --workers N` on a GPU host each sample its GPUs, and replicas reading one DCGM
exporter each scrape the model server's: every one of them sees the GPUs' whole energy, but only the requests it
serves itself. Booked alone, each would split the whole energy among its own requests, and the books of N
processes would add up to N times what the GPUs used. So after each sample a process tells Redis how many of its
requests were in flight on those GPUs (on average over the interval it booked) and reads what the others last
said; it books its share of the next interval by that (`attribution.Others`).

The GPUs are known by their UUIDs, which NVML and the DCGM exporter both report, so processes share a pool's
energy exactly when they measure the same GPUs, whatever the policy calls the pool (replicas on different hosts,
each measuring its own GPUs through NVML, never do). One Redis hash per pool (`{prefix}:energy:{digest of the
UUIDs}`) holds one field per process: its number in flight and when it said so, on Redis's clock. A process that
has not said anything for FRESH_S, or four sampling intervals when that is longer (stopped, frozen, cut off
from Redis), is left out and its field removed; the hash expires when no process writes to it. A process says
its word at every sample (a DCGM counter that has not refreshed books nothing, but the word is said): what it
had in flight since its last word.

Redis down: the last answer is used while it is fresh, then each process books alone (as without Redis) until
Redis answers again; the exchanges that failed are counted as `gateway.store.failures` (part `energy`).

Without Redis, the workers of one `gateway run --workers N` say the same words through files in their private
folder (`FolderSharing`, mode 0700, made by the supervisor): one file per pool and worker slot, its number in flight
and when it said so on the host's monotonic clock, which every process of the host shares. A file a worker cannot
write or read counts as a failed exchange, like Redis not answering. Replicas on several hosts need Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gateway.energy.attribution import Others
from gateway.store_guard import STORE_DOWN, StoreGuard
from gateway.telemetry.peers import own_folder

log = logging.getLogger(__name__)

#: how long a process's word counts: past it, the process is left out of the others
FRESH_S = 3.0

#: KEYS[1] the pool's hash; ARGV: this process's id, its number in flight, FRESH_S and the hash's expiry (ms).
#: Stores this process's word and returns the others' fresh ones (their numbers in flight), removing stale ones.
EXCHANGE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
local fields = redis.call('HGETALL', KEYS[1])
local others = {}
for i = 1, #fields, 2 do
  if fields[i] ~= ARGV[1] then
    local in_flight, said = string.match(fields[i + 1], '^(%S+) (%d+)$')
    if said ~= nil and now - tonumber(said) <= tonumber(ARGV[3]) then
      others[#others + 1] = in_flight
    else
      redis.call('HDEL', KEYS[1], fields[i])
    end
  end
end
return others
"""


def gpus_key(uuids: Iterable[str]) -> str:
    """The name a pool's GPUs go by in Redis: a digest of their UUIDs, the same in every process."""
    return hashlib.sha256(",".join(sorted(uuids)).encode()).hexdigest()[:20]


class EnergySharing:
    """Tells Redis this process's requests in flight on a pool's GPUs, and hears the other processes'."""

    def __init__(self, client: Any, prefix: str, timeout_s: float) -> None:
        self.prefix = prefix
        self.process_id = secrets.token_hex(8)
        self._exchange = client.register_script(EXCHANGE)
        self.guard = StoreGuard("shared GPU energy", timeout_s,
                                meanwhile="each process books the energy of the GPUs it measures among its own "
                                          "requests alone")

    @property
    def store_failures(self) -> int:
        return self.guard.failures

    async def exchange(self, uuids: Iterable[str], in_flight: float, fresh_s: float | None = None) -> Others | None:
        """Say that `in_flight` of this process's requests ran on these GPUs; the other processes measuring them
        that spoke within `fresh_s` (FRESH_S unless given; none: Others(0, 0.0)), or None when Redis did not
        answer."""
        fresh_s = FRESH_S if fresh_s is None else fresh_s
        key = f"{self.prefix}:energy:{gpus_key(uuids)}"
        args = [self.process_id, repr(float(in_flight)), int(fresh_s * 1000), int(2 * fresh_s * 1000)]
        reply = await self.guard.run(lambda: self._exchange(keys=[key], args=args))
        if reply is STORE_DOWN:
            return None
        said = [float(value) for value in reply]
        return Others(processes=len(said), in_flight=sum(said))

    async def close(self) -> None:
        """Nothing to take back: the pool's hash forgets a silent process by itself."""


class FolderSharing:
    """The same words through files in the folder of one gateway's workers (`gateway.telemetry.peers`), for
    workers without Redis: `{digest of the GPUs' UUIDs}.{slot}.energy`, written whole (renamed into place)."""

    def __init__(self, folder: Path, slot: int) -> None:
        self.folder = folder
        self.slot = slot
        self.store_failures = 0
        self._failing = False
        self._pending: set[asyncio.Future] = set()    # exchanges in their threads: `close` waits for them

    async def exchange(self, uuids: Iterable[str], in_flight: float, fresh_s: float | None = None) -> Others | None:
        """As `EnergySharing.exchange`: None when the folder could not be written or read (said once, until an
        exchange works again)."""
        fresh_s = FRESH_S if fresh_s is None else fresh_s
        exchanging = asyncio.ensure_future(asyncio.to_thread(self._exchange, gpus_key(uuids), float(in_flight),
                                                             fresh_s))
        self._pending.add(exchanging)
        exchanging.add_done_callback(self._pending.discard)
        try:
            others = await asyncio.shield(exchanging)   # cancelled (the monitor stopping): the thread runs on
        except OSError as exc:
            self.store_failures += 1
            if not self._failing:
                self._failing = True
                log.warning("energy: worker %d cannot share GPU energy with the other workers through %s (%s): "
                            "it books the energy of the GPUs it measures among its own requests alone meanwhile",
                            self.slot, self.folder, exc.strerror or exc)
            return None
        if self._failing:
            self._failing = False
            log.warning("energy: worker %d shares GPU energy with the other workers again", self.slot)
        return others

    def _exchange(self, digest: str, in_flight: float, fresh_s: float) -> Others:
        own = self.folder / f"{digest}.{self.slot}.energy"
        now_s = time.monotonic()
        own_folder(self.folder)         # made again when the last worker out took it
        partial = own.with_name(own.name + ".partial")
        partial.write_text(f"{in_flight!r} {now_s!r}")
        os.replace(partial, own)
        said = []
        for path in self.folder.glob(f"{digest}.*.energy"):
            if path == own:
                continue
            try:
                value, said_at_s = (float(part) for part in path.read_text().split())
            except (FileNotFoundError, ValueError):     # gone meanwhile (a worker stopping); not a word
                continue
            if now_s - said_at_s <= fresh_s:
                said.append(value)
        return Others(processes=len(said), in_flight=sum(said))

    async def close(self) -> None:
        """Take back this slot's words on every pool (also those of a worker in this slot killed before it could),
        once any exchange still in its thread has written its own, then remove the folder if this worker is the
        last one out."""
        await asyncio.gather(*self._pending, return_exceptions=True)
        with contextlib.suppress(OSError):
            for path in self.folder.glob(f"*.{self.slot}.energy*"):     # a .partial a failed write left too
                with contextlib.suppress(OSError):
                    path.unlink()
        with contextlib.suppress(OSError):
            self.folder.rmdir()
