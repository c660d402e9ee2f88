"""CPU of one upstream call: the bare proxy's aiohttp POST against the gateway's transport, on nginx.

Each contender makes sequential POSTs of a small chat body to nginx's canned
answer, in rounds interleaved A B C D, and the CPU time of this process
(`time.process_time`, event loop included) per call is reported as the
median over rounds. It isolates the part of a request no gateway feature
touches, the HTTP client, so the gateway's own transport can be compared
with the bare proxy's call:

- `bare`: `session.post(str URL)`, as `bench/baseline_proxy.py` calls;
- `bare, URL parsed once`: the same with a `yarl.URL` made once;
- `gateway transport`: `HttpTransport.complete` (URL parsed once per model, timeouts, error translation,
  JSON parse of the answer), with the headers a proxied request carries.

    python -m bench.client_call [--calls 3000] [--rounds 7]

Needs nginx (the OS package); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import uvloop
import yarl

from bench.machine import free_port
from bench.nginx import nginx_command
from gateway.policy.model import Model
from gateway.upstream import HttpTransport, UpstreamCall

BODY = orjson.dumps({"model": "bench-upstream", "max_tokens": 8,
                     "messages": [{"role": "user", "content": "hello " * 20}]})
#: what a proxied request carries upstream: the body's type, a trace context, the client's user agent
PROXIED_HEADERS = {"Content-Type": "application/json", "user-agent": "wrk", "accept": "*/*",
                   "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


async def measure(base_url: str, calls: int, rounds: int) -> dict[str, float]:
    """Median CPU µs per call of each contender, rounds interleaved."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",)) as session:
        url = base_url + "/chat/completions"
        parsed = yarl.URL(url)
        transport = HttpTransport(session)
        call = UpstreamCall(Model("bench", base_url, "bench-upstream"), "chat", BODY, PROXIED_HEADERS)

        async def bare() -> None:
            async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as response:
                await response.read()

        async def bare_parsed() -> None:
            async with session.post(parsed, data=BODY, headers={"Content-Type": "application/json"}) as response:
                await response.read()

        async def gateway() -> None:
            await transport.complete(call)

        contenders: dict[str, Callable[[], Awaitable[None]]] = {
            "bare": bare, "bare, URL parsed once": bare_parsed, "gateway transport": gateway}
        for contender in contenders.values():     # warm: connections open, code paths hot
            for _ in range(200):
                await contender()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, contender in contenders.items():
                started = time.process_time()
                for _ in range(calls):
                    await contender()
                samples[name].append((time.process_time() - started) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client_call", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per contender per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-client-") as workdir:
        nginx = subprocess.Popen(nginx_command(Path(workdir), port), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            uvloop.install()
            medians = asyncio.run(measure(f"http://127.0.0.1:{port}/v1", args.calls, args.rounds))
        finally:
            nginx.terminate()
            nginx.wait(10)
    bare = medians["bare"]
    print(f"CPU per upstream call, median of {args.rounds} interleaved rounds of {args.calls} sequential calls\n")
    print("| contender | µs per call | vs bare |\n| --- | --- | --- |")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value / bare:.2f}× |")


if __name__ == "__main__":
    main()
