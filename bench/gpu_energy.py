"""The GPU energy check: the gateway sampling a real GPU through NVML while real GPU work serves its requests.

`python -m bench.gpu_energy [--out DIR] [--workers N [--no-redis]]` on a machine with an NVIDIA GPU:

1. starts `bench.gpu_backend` (each output token is a matrix product on GPU 0)
   and a gateway whose two models (a model and an adapter of it, served by the
   same backend) have `gpus: {source: nvml, ids: [0]}`, with a ledger and
   `/metrics`;
2. runs `gateway gpu --once`, then phases, each measured independently through
   NVML's total energy counter: idle; two concurrent streams with a 3:1 ratio
   of output tokens; idle; a mixed load (streamed and not) while
   `gateway gpu` prints its live table; idle;
3. compares what the gateway booked (the ledger's per-request joules, its
   measured and idle totals) with what NVML measured, and writes
   `gpu-energy-<time>.md` to `--out`.

With `--workers N` (above 1) the gateway runs N worker processes sharing a
redis-server the check starts, each request on a connection of its own (so the
kernel spreads them over the workers): every worker samples the GPU, and the
books hold only if the workers share its energy out rather than each booking
all of it (`gateway.energy.sharing`); `/metrics` gathers every worker's series.
With `--no-redis` the workers share it without Redis, through their private folder.

Exit status 0 when the books balance (attributed + idle = measured within
1 %, and the gateway's measured energy within 5 % of NVML's over the same
window), 1 when they do not, 2 when there is no GPU to measure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from bench.machine import free_port
from bench.procs import BenchSetupError, Proc, http_ok, port_open, python_module, spawn, wait_until

MODEL = "gpu-model"
PAIR_TOKENS = (1200, 400)
LOAD_TOKENS = (50, 150, 300, 600)
LOAD_REQUESTS = 24
LOAD_CONCURRENCY = 8
SAMPLE_INTERVAL_S = 0.25
SETTLE_S = 2.0              # idle after work: the last requests' energy is booked on the next samples
BALANCE_TOLERANCE = 0.01
NVML_TOLERANCE = 0.05
#: with several workers each books its share by the others' word of their last interval (`gateway.energy.sharing`):
#: where requests start or end in another worker, up to one interval is booked on a word a sample old
WORKERS_NVML_TOLERANCE = 0.10
#: gateway metric families the report quotes (summed over their label sets)
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")

#: a second model served from the same GPU (an adapter of the first): the two form one pool, measured once
ADAPTER = "gpu-model-lora"
POLICY = """\
version: 1
models:
  {model}: &served                # the adapter is served by the same backend, on the same GPU
    endpoint: http://127.0.0.1:{backend_port}/v1
    energy_usd_per_kwh: 0.12
    latency_prior: {{ttft_ms: 5, tpot_ms: 3}}
    timeouts: {{connect_s: 5, first_byte_s: 60, total_s: 600}}
    gpus: {{source: nvml, ids: [0]}}
  {adapter}: *served
routes:
  - name: adapter
    match: {{models: [lora]}}
    candidates: [{adapter}]
  - name: gpu
    candidates: [{model}]
telemetry: {{prometheus: true}}
ledger: {{path: {ledger}}}
energy: {{sample_interval_s: {interval}}}
"""


class NvmlCounter:
    """GPU 0's total energy counter, read by this process directly (not through the gateway)."""

    def __init__(self) -> None:
        import pynvml
        pynvml.nvmlInit()
        self._nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else name
        self.driver = pynvml.nvmlSystemGetDriverVersion()

    def joules(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0

    def power_w(self) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0


@dataclass
class Phase:
    name: str
    seconds: float
    nvml_j: float

    @property
    def mean_w(self) -> float:
        return self.nvml_j / self.seconds if self.seconds else 0.0


@dataclass
class Run:
    device: str
    workers: int = 1
    redis: bool = True          # with several workers: they share through Redis (else through their folder)
    phases: list[Phase] = field(default_factory=list)
    pair_ids: tuple[str, str] = ("", "")
    records: dict[str, dict] = field(default_factory=dict)     # request id -> ledger record
    metrics: dict[str, float] = field(default_factory=dict)    # family -> sum over label sets, at the end
    metrics_start: dict[str, float] = field(default_factory=dict)   # the same when the window opened
    metric_lines: list[str] = field(default_factory=list)
    gpu_once: str = ""
    gpu_live: str = ""
    window_nvml_j: float = 0.0
    window_s: float = 0.0
    errors: list[str] = field(default_factory=list)


async def _ask(session: aiohttp.ClientSession, url: str, request_id: str, tokens: int, stream: bool,
               alias: str = "auto") -> None:
    body = {"model": alias, "max_tokens": tokens, "stream": stream, "temperature": 0.7,
            "messages": [{"role": "user", "content": f"energy check {request_id}"}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with session.post(url, json=body, headers={"x-request-id": request_id}) as response:
        payload = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{request_id}: HTTP {response.status}: {payload[:200]!r}")
        if stream and not payload.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"{request_id}: stream did not end with [DONE]")


def _session(workers: int) -> aiohttp.ClientSession:
    """With several workers, a connection per request: the kernel spreads connections over the workers."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=workers > 1))


async def _pair(url: str, workers: int) -> tuple[str, str]:
    ids = ("pair-long", "pair-short")
    async with _session(workers) as session:
        await asyncio.gather(*(_ask(session, url, rid, n, True) for rid, n in zip(ids, PAIR_TOKENS)))
    return ids


async def _load(url: str, workers: int) -> None:
    # streamed and not, on the model and on its adapter (which shares its GPU), in turn
    plan = [(f"load-{i:02d}", tokens, i % 2 == 0, "lora" if (i // 4) % 2 else "auto")
            for i, tokens in zip(range(LOAD_REQUESTS), itertools.cycle(LOAD_TOKENS))]
    gate = asyncio.Semaphore(LOAD_CONCURRENCY)

    async def one(rid: str, tokens: int, stream: bool, alias: str) -> None:
        async with gate:
            await _ask(session, url, rid, tokens, stream, alias)

    async with _session(workers) as session:
        await asyncio.gather(*(one(*item) for item in plan))


def _measure(run: Run, counter: NvmlCounter, name: str, work: Callable[[], object]) -> object:
    start_j, start_s = counter.joules(), time.monotonic()
    result = work()
    run.phases.append(Phase(name, time.monotonic() - start_s, counter.joules() - start_j))
    return result


def _scrape(url: str) -> tuple[dict[str, float], list[str]]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, float] = {}
    quoted = []
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if not match or not (match[1].startswith("hw_") or "energy" in match[1]):
            continue
        quoted.append(line)
        sums[match[1]] = sums.get(match[1], 0.0) + float(match[3])
    return sums, quoted


def _read_ledger(path: Path) -> dict[str, dict]:
    records = {}
    for line in path.read_text().splitlines():
        record = orjson.loads(line)
        if record.get("request_id"):
            records[record["request_id"]] = record
    return records


def _run(counter: NvmlCounter, size: int, idle_s: float, workers: int = 1, redis: bool = True) -> Run:
    run = Run(device=f"{counter.name}, driver {counter.driver}", workers=workers, redis=redis)
    with tempfile.TemporaryDirectory(prefix="gpu-energy-") as tmp:
        workdir = Path(tmp)
        backend_port, gateway_port = free_port(), free_port()
        policy = workdir / "policy.yaml"
        ledger = workdir / "ledger.jsonl"
        text = POLICY.format(model=MODEL, adapter=ADAPTER, backend_port=backend_port, ledger=ledger,
                             interval=SAMPLE_INTERVAL_S)
        procs: list[Proc] = []
        try:
            if workers > 1 and redis:
                redis_port = free_port()
                procs.append(_redis(redis_port, workdir))
                text += f"store: {{redis_url: 'redis://127.0.0.1:{redis_port}/0'}}\n"
            policy.write_text(text)
            backend = spawn("gpu-backend", python_module("bench.gpu_backend", "--port", str(backend_port),
                                                         "--size", str(size)), cpus=(), logdir=workdir)
            procs.append(backend)
            wait_until(backend, http_ok(f"http://127.0.0.1:{backend_port}/health"), 300)
            gateway = spawn("gateway", python_module("gateway", "run", "--policy", str(policy), "--host",
                                                     "127.0.0.1", "--port", str(gateway_port),
                                                     "--workers", str(workers)),
                            cpus=(), logdir=workdir)
            procs.append(gateway)
            base = f"http://127.0.0.1:{gateway_port}"
            wait_until(gateway, http_ok(f"{base}/healthz"), 60)
            run.gpu_once = _gateway_gpu(policy, ["--once"], 30)
            url = f"{base}/v1/chat/completions"
            run.metrics_start = _scrape(f"{base}/metrics")[0]
            window_start_j, window_start_s = counter.joules(), time.monotonic()
            _measure(run, counter, "idle", lambda: time.sleep(idle_s))
            run.pair_ids = _measure(run, counter, "pair 3:1 (streamed)", lambda: asyncio.run(_pair(url, workers)))
            _measure(run, counter, "idle", lambda: time.sleep(SETTLE_S))
            live = subprocess.Popen(python_module("gateway", "gpu", "--policy", str(policy), "--interval", "1"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            _measure(run, counter, f"load: {LOAD_REQUESTS} requests, {LOAD_CONCURRENCY} at a time",
                     lambda: asyncio.run(_load(url, workers)))
            live.terminate()
            run.gpu_live = live.communicate(timeout=10)[0]
            _measure(run, counter, "idle", lambda: time.sleep(SETTLE_S))
            run.window_nvml_j = counter.joules() - window_start_j
            run.metrics, run.metric_lines = _scrape(f"{base}/metrics")
            run.window_s = time.monotonic() - window_start_s
            gateway.stop(30)
            run.records = _read_ledger(ledger)
        except (BenchSetupError, RuntimeError, OSError) as exc:
            run.errors.append(f"{type(exc).__name__}: {exc}")
            for proc in procs:
                run.errors.append(f"--- {proc.name} log ---\n{proc.tail(40)}")
        finally:
            for proc in procs:
                proc.stop()
    return run


def _redis(port: int, workdir: Path) -> Proc:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchSetupError("redis-server is not installed (apt-get install redis-server)")
    proc = spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                           "--dir", str(workdir)], cpus=(), logdir=workdir)
    wait_until(proc, port_open(port), 30)
    return proc


def _gateway_gpu(policy: Path, args: list[str], timeout_s: float) -> str:
    done = subprocess.run(python_module("gateway", "gpu", "--policy", str(policy), *args),
                          capture_output=True, text=True, timeout=timeout_s)
    return done.stdout + done.stderr


@dataclass(frozen=True)
class Books:
    """What the gateway booked against what it and NVML measured."""

    measured_j: float           # growth of the gateway's gateway_energy_measured over the window
    idle_j: float               # growth of its gateway_energy_idle
    attributed_j: float         # sum of the ledger's per-request joules (every request ran in the window)
    nvml_window_j: float        # NVML's counter over the same window, read by the check
    nvml_tolerance: float = NVML_TOLERANCE

    @property
    def balance_error(self) -> float:
        """(attributed + idle - measured) / measured."""
        return (self.attributed_j + self.idle_j - self.measured_j) / self.measured_j if self.measured_j else 1.0

    @property
    def nvml_error(self) -> float:
        """(gateway measured - NVML over the window) / NVML over the window."""
        return (self.measured_j - self.nvml_window_j) / self.nvml_window_j if self.nvml_window_j else 1.0

    @property
    def holds(self) -> bool:
        return abs(self.balance_error) <= BALANCE_TOLERANCE and abs(self.nvml_error) <= self.nvml_tolerance


def books(run: Run) -> Books:
    """The energy booked over the window: the scraped metrics' growth and the ledger."""
    def growth(prefix: str, exclude: str | None = None) -> float:
        return _family(run.metrics, prefix, exclude) - _family(run.metrics_start, prefix, exclude)

    return Books(measured_j=growth("gateway_energy_measured"),
                 idle_j=growth("gateway_energy_idle", exclude="to_active"),
                 attributed_j=sum(r.get("energy_j") or 0.0 for r in run.records.values()),
                 nvml_window_j=run.window_nvml_j,
                 nvml_tolerance=NVML_TOLERANCE if run.workers == 1 else WORKERS_NVML_TOLERANCE)


def _family(metrics: dict[str, float], prefix: str, exclude: str | None = None) -> float:
    return sum(value for name, value in metrics.items()
               if name.startswith(prefix) and (exclude is None or exclude not in name)
               and not name.endswith(("_created", "_count", "_bucket")))


def report(run: Run) -> str:
    """The check's Markdown report."""
    lines = [f"# GPU energy check: {run.device}", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `python -m bench.gpu_energy"
             f"{_workers_said(run)}. "
             "Each output token is one bf16 matrix product on the GPU (`bench/gpu_backend.py`); the gateway "
             f"samples NVML every {SAMPLE_INTERVAL_S} s; the phases are measured independently through "
             "NVML's total energy counter.", ""]
    if run.errors:
        return "\n".join(lines + ["## The check did not complete", "", "```", *run.errors, "```", ""])
    lines += ["## Phases (NVML counter, read by the check itself)", "", "| phase | s | J | mean W |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {p.name} | {p.seconds:.2f} | {p.nvml_j:.1f} | {p.mean_w:.1f} |" for p in run.phases]
    b = books(run)
    lag = ("; with several workers, where requests start or end in another worker, an interval is booked on its "
           "word of its last interval") if run.workers > 1 else ""
    lines += ["", "## The gateway's books", "", "| | J |", "| --- | --- |",
              f"| NVML counter over the window ({run.window_s:.1f} s) | {b.nvml_window_j:.1f} |",
              f"| gateway: measured (growth of `gateway_energy_measured` over the window) | {b.measured_j:.1f} |",
              f"| gateway: idle (growth of `gateway_energy_idle`) | {b.idle_j:.1f} |",
              f"| gateway: attributed to requests (ledger sum, {len(run.records)} requests) | {b.attributed_j:.1f} |",
              "", f"- attributed + idle − measured: {b.balance_error:+.3%} of measured "
              f"(tolerance ±{BALANCE_TOLERANCE:.0%})",
              f"- gateway measured − NVML over the window: {b.nvml_error:+.3%} (tolerance ±{b.nvml_tolerance:.0%}; "
              f"the gateway books at its samples, so each end of the window may differ by up to "
              f"{SAMPLE_INTERVAL_S} s of power{lag})",
              f"- verdict: **{'books balance' if b.holds else 'books do NOT balance'}**", ""]
    lines += _pair_section(run)
    lines += _per_request_section(run)
    lines += ["## `gateway gpu --once`", "", "```", run.gpu_once.rstrip(), "```", "",
              "## `gateway gpu --interval 1` during the load", "", "```", run.gpu_live.rstrip(), "```", "",
              "## Energy and GPU metrics scraped from `/metrics`", "", "```", *run.metric_lines, "```", ""]
    return "\n".join(lines)


def _workers_said(run: Run) -> str:
    if run.workers == 1:
        return "`"
    if not run.redis:
        return (f" --workers {run.workers} --no-redis` ({run.workers} gateway workers sharing through their folder, "
                "a connection per request)")
    return f" --workers {run.workers}` ({run.workers} gateway workers sharing a redis-server, a connection per request)"


def _pair_section(run: Run) -> list[str]:
    pair = [run.records.get(rid) for rid in run.pair_ids]
    if not all(pair) or not all(r.get("energy_j") for r in pair):
        return ["## Pair 3:1", "", f"ledger records missing or without energy: {pair}", ""]
    long_, short = pair
    ratio = long_["energy_j"] / short["energy_j"]
    return ["## Pair: two concurrent streams, 3:1 output tokens", "",
            "| request | output tokens | J | J per output token | latency s |", "| --- | --- | --- | --- | --- |",
            *(f"| {r['request_id']} | {r['output_tokens']} | {r['energy_j']:.1f} | "
              f"{r['energy_j'] / r['output_tokens']:.3f} | {r['latency_s']:.2f} |" for r in pair),
            "", f"Energy ratio long : short = {ratio:.2f} : 1 (tokens {PAIR_TOKENS[0] / PAIR_TOKENS[1]:.0f} : 1).", ""]


def _per_request_section(run: Run) -> list[str]:
    load = [r for rid, r in sorted(run.records.items()) if rid.startswith("load-")]
    lines = ["## Load: joules per output token", "", "| answers | requests | with energy | J per output token: "
             "min | median | max |", "| --- | --- | --- | --- | --- | --- |"]
    for label, streamed in (("streamed", True), ("not streamed", False)):
        group = [r for r in load if r.get("stream") is streamed]
        per_token = sorted(r["energy_j"] / r["output_tokens"] for r in group
                           if r.get("energy_j") and r.get("output_tokens"))
        figures = (f"{per_token[0]:.3f} | {per_token[len(per_token) // 2]:.3f} | {per_token[-1]:.3f}"
                   if per_token else "- | - | -")
        lines.append(f"| {label} | {len(group)} | {len(per_token)} | {figures} |")
    for model in (MODEL, ADAPTER):
        joules = [r["energy_j"] for r in load if r.get("model") == model and r.get("energy_j")]
        lines.append(f"| on `{model}` | {len([r for r in load if r.get('model') == model])} | {len(joules)} | "
                     f"{sum(joules):.1f} J in all | | |")
    costs = [float(r["cost_usd"]) for r in load if r.get("cost_usd") is not None]
    series = len({re.search(r'hw_id="([^"]*)"', line)[1] for line in run.metric_lines
                  if line.startswith("hw_energy_joules_total{") and 'hw_id="' in line})
    lines += ["", f"`{MODEL}` and `{ADAPTER}` share GPU 0: `hw_energy_joules_total` has {series} series for it "
                  "(one GPU id), and the energy totals are kept once, for the pool."]
    return lines + ["", f"Their cost (energy at 0.12 USD/kWh; the model has no token price) sums to "
                        f"{sum(costs):.8f} USD.", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_energy", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the report")
    parser.add_argument("--size", type=int, default=8192, help="matrix side of one token's product")
    parser.add_argument("--idle-s", type=float, default=4.0, help="first idle phase, seconds")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes (above 1: with Redis)")
    parser.add_argument("--no-redis", action="store_true",
                        help="several workers share the GPU's energy through their folder, without Redis")
    args = parser.parse_args(argv)
    try:
        counter = NvmlCounter()
    except Exception as exc:        # ImportError or pynvml.NVMLError alike: nothing to measure
        print(f"no GPU to measure: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    run = _run(counter, args.size, args.idle_s, max(1, args.workers), redis=not args.no_redis)
    text = report(run)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-energy-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.md"
    path.write_text(text)
    print(text)
    print(f"written to {path}")
    return 0 if not run.errors and books(run).holds else 1


if __name__ == "__main__":
    raise SystemExit(main())
