"""GPU energy shared out between the processes that measure the same GPUs, through Redis.

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
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from typing import Any

from gateway.energy.attribution import Others
from gateway.store_guard import STORE_DOWN, StoreGuard

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
