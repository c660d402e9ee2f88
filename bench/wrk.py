"""Running wrk with the chat Lua script and reading the JSON line its `done` hook prints."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.machine import taskset_prefix
from bench.procs import BenchSetupError

LUA_SCRIPT = Path(__file__).parent / "lua" / "chat.lua"
MARKER = "BENCH_JSON "


@dataclass(frozen=True)
class Load:
    """What wrk sends: which model alias, with which keys, unique or identical bodies, streamed or not."""

    model: str = "gpt-4o-mini"
    keys: tuple[str, ...] = ()
    mode: str = "unique"
    stream: bool = False

    def script_args(self) -> list[str]:
        """The Lua script's arguments, with a fresh nonce: no two runs send the same "unique" body."""
        return [self.model, ",".join(self.keys) or "-", self.mode, "true" if self.stream else "false",
                uuid.uuid4().hex[:12]]


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: requests, errors and latency percentiles (µs)."""

    requests: int
    duration_s: float
    errors: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else math.nan

    @classmethod
    def parse(cls, output: str) -> WrkResult:
        """The figures from wrk's output; raises when the `done` hook printed none."""
        for line in output.splitlines():
            if line.startswith(MARKER):
                data = json.loads(line[len(MARKER):])
                latency = data["latency_us"]
                return cls(requests=data["requests"], duration_s=data["duration_us"] / 1e6,
                           errors=sum(data["errors"].values()), p50_us=latency["p50"], p90_us=latency["p90"],
                           p99_us=latency["p99"], mean_us=latency["mean"])
        raise BenchSetupError(f"wrk printed no {MARKER.strip()} line:\n{output[-2000:]}")


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, load: Load, *, connections: int, duration_s: int, cpus: tuple[int, ...] = (),
            threads: int = 1) -> WrkResult:
    """Run wrk against `url` (a full /v1/chat/completions URL) and return its figures."""
    threads = max(1, min(threads, connections))
    argv = [*taskset_prefix(cpus), "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, duration_s)}s",
            "--timeout", "30s", "-s", str(LUA_SCRIPT), url, "--", *load.script_args()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if done.returncode != 0:
        raise BenchSetupError(f"wrk failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return WrkResult.parse(done.stdout)
