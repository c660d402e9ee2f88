"""`gateway simulate-backend`: serve simulated OpenAI-compatible models until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from gateway.simulator.config import SimConfig
from gateway.simulator.runner import start_simulators


def on_off(text: str) -> bool:
    """`on` / `off` (also true/false, yes/no, 1/0) as a bool, for argparse."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


#: (option, SimConfig field, type, help) for every per-model setting
SETTINGS = (
    ("--ttft-ms", "ttft_ms", float, "time to first token, ms (default 100)"),
    ("--tpot-ms", "tpot_ms", float, "time per output token after the first, ms (default 10)"),
    ("--jitter", "jitter", float, "each delay is scaled by uniform(1-J, 1+J) (default 0)"),
    ("--mean-output-tokens", "mean_output_tokens", int, "output length when max_tokens is absent (default 64)"),
    ("--error-rate", "error_rate", float, "share of requests answered 500 (default 0)"),
    ("--rate-limit-rate", "rate_limit_rate", float, "share of requests answered 429 (default 0)"),
    ("--retry-after-s", "retry_after_s", float, "Retry-After of a 429, seconds (default 1)"),
    ("--hang-rate", "hang_rate", float, "share of requests never answered (default 0)"),
    ("--drop-rate", "drop_rate", float, "share of answers cut off mid-body or mid-stream (default 0)"),
    ("--context-window", "context_window", int,
     "a prompt (each of a batch) + max_tokens above this is a 400 (default 8192)"),
    ("--embedding-dims", "embedding_dims", int, "embedding size when the request sets none (default 1536)"),
    ("--seed", "seed", int, "seed of latency jitter, output lengths and failures (default 0)"),
    ("--usage", "usage", on_off, "report token usage, on or off (default on; off tests estimated counts)"),
)

EPILOG = """\
Several models in one process: repeat --port and --model; the i-th --port serves
the i-th --model, so both must be given the same number of times. Every other
setting is given either once (it applies to every model) or once per --model
(the i-th value applies to the i-th model). Port 0 picks a free port. One line
"simulating MODEL at URL" is printed per model once it serves. Example:

  gateway simulate-backend --port 9101 --model sim-small-1b --ttft-ms 40 \\
      --port 9102 --model sim-medium-8b --ttft-ms 80 --error-rate 0.01
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `gateway simulate-backend`."""
    parser = argparse.ArgumentParser(
        prog="gateway simulate-backend", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve simulated OpenAI-compatible models (chat, completions, responses, embeddings)\n"
                    "with configurable latency and failures, plus /sim/* control endpoints.")
    parser.add_argument("--port", type=int, action="append", required=True, help="port of the next model")
    parser.add_argument("--model", action="append", required=True, help="name of the next model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    for option, _field, kind, text in SETTINGS:
        parser.add_argument(option, type=kind, action="append", help=text)
    return parser


def configs_from_args(args: argparse.Namespace) -> list[SimConfig]:
    """One SimConfig per --port/--model pair; raises ValueError when the counts do not line up."""
    count = len(args.model)
    if len(args.port) != count:
        raise ValueError(f"--port given {len(args.port)} times but --model {count} times; pair them")
    per_model: list[dict[str, Any]] = [{} for _ in range(count)]
    for option, field, _kind, _text in SETTINGS:
        values = getattr(args, field)
        if values is None:
            continue
        if len(values) not in (1, count):
            raise ValueError(f"{option} given {len(values)} times: give it once, or once per --model ({count})")
        for index, settings in enumerate(per_model):
            settings[field] = values[index] if len(values) == count else values[0]
    return [SimConfig(name=name, port=port, **settings)
            for name, port, settings in zip(args.model, args.port, per_model, strict=True)]


def main(argv: list[str] | None = None) -> int:
    """Run the simulators until SIGINT or SIGTERM; the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configs = configs_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return run_loop(serve(configs, args.host))


async def serve(configs: list[SimConfig], host: str) -> int:
    """Start the simulators, print where they serve, and stop them on SIGINT or SIGTERM."""
    try:
        sims = await start_simulators(configs, host)
    except OSError as exc:
        print(f"gateway simulate-backend: cannot listen: {exc}", file=sys.stderr)
        return 1
    for sim in sims:
        print(f"simulating {sim.config.name} at {sim.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for sim in sims:
            await sim.stop()
    return 0


def run_loop(main_coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main_coro)
