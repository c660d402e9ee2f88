"""Helpers every section uses: interleaved rounds, a sanity request, CPU per request."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Sequence
from typing import TypeVar

from bench.procs import BenchSetupError, cpu_s
from bench.stack import API_KEYS, Stack
from bench.wrk import Load, WrkResult, run_wrk

T = TypeVar("T")

#: what wrk sends in the non-streaming sections: unique bodies over the three tenants' keys
UNIQUE_CHAT = Load(model="gpt-4o-mini", keys=API_KEYS, mode="unique")


def interleaved(contenders: Sequence[str], runs: int, measure: Callable[[str], T]) -> dict[str, list[T]]:
    """Measure each contender once per round, A B A B ..., so slow drifts hit all of them alike."""
    results: dict[str, list[T]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name in contenders:
            results[name].append(measure(name))
    return results


def check_answers(url: str, model: str = "gpt-4o-mini", key: str = API_KEYS[0],
                  stream: bool = False) -> dict[str, str]:
    """Send one request; raise unless it is a 200 (so a misconfigured run never measures errors)."""
    body = {"model": model, "temperature": 0, "max_tokens": 4, "stream": stream,
            "messages": [{"role": "user", "content": "bench sanity check"}]}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return dict(response.headers)
    except OSError as exc:
        raise BenchSetupError(f"sanity request to {url} failed: {exc}") from exc


def wrk_on(stack: Stack, name: str, load: Load, connections: int, duration_s: int) -> WrkResult:
    """wrk from the load core against a contender ('direct' is nginx itself)."""
    url = stack.stream_url(name) if load.stream else stack.url(name)
    return run_wrk(url, load, connections=connections, duration_s=duration_s, cpus=stack.cores.load)


def wrk_with_cpu(stack: Stack, name: str, load: Load, connections: int,
                 duration_s: int) -> tuple[WrkResult, float, float]:
    """A wrk run plus the contender's CPU µs per request: whole process, and its event loop thread."""
    pid = stack.pid(name)
    # read so that the loop thread's span lies within the process's: its CPU can never come out above the whole's
    # (a busy process gains a clock tick between two reads of /proc)
    total_before = cpu_s(pid)
    loop_before = cpu_s(pid, pid)
    result = wrk_on(stack, name, load, connections, duration_s)
    loop = cpu_s(pid, pid) - loop_before
    total = cpu_s(pid) - total_before
    requests = max(result.requests, 1)
    return result, total * 1e6 / requests, loop * 1e6 / requests


def errors_note(results: Sequence[WrkResult]) -> str:
    """A note naming failed requests, if any: a figure measured on errors is not a figure."""
    errors = sum(r.errors for r in results)
    return f"{errors} failed requests!" if errors else ""
