"""`gateway gpu [--policy FILE] [--interval S] [--once]`: a live table of the measured GPUs."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from typing import Any, TextIO

from gateway.energy.monitor import EnergyMonitor
from gateway.errors import PolicyError
from gateway.energy.readings import GpuReading
from gateway.policy.model import GpuSource

GIB_BYTES = 1024 ** 3
_HEADER = ("MODEL", "GPU", "NAME", "POWER_W", "ENERGY_J", "UTIL", "MEM_GiB", "STATUS")


def build_parser() -> argparse.ArgumentParser:
    """The `gateway gpu` argument parser."""
    parser = argparse.ArgumentParser(prog="gateway gpu", description="Show the GPUs the gateway measures.")
    parser.add_argument("--policy", metavar="FILE",
                        help="the GPUs of this policy's models (default: NVML on this host)")
    parser.add_argument("--interval", type=_seconds, metavar="S",
                        help="seconds between refreshes (default: the policy's energy.sample_interval_s, else 1)")
    parser.add_argument("--once", action="store_true", help="print one table and exit")
    return parser


def _seconds(text: str) -> float:
    """An `--interval`: a finite number of seconds above 0 (else argparse's usage error, exit 2)."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0, not {text!r}")
    return seconds


def main(argv: list[str] | None = None, *, nvml_module: Any = None, out: TextIO | None = None) -> int:
    """Run `gateway gpu`; 1 when no GPU can be measured (with `--once`: none was), 2 for a usage error."""
    args = build_parser().parse_args(argv)
    try:
        monitor = _monitor(args, nvml_module)
    except PolicyError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return asyncio.run(_show(monitor, args.once, out or sys.stdout, args.policy))
    except KeyboardInterrupt:
        return 0


def _monitor(args: argparse.Namespace, nvml_module: Any) -> EnergyMonitor:
    if args.policy:
        from gateway.policy.load import load_policy     # only `--policy` needs the YAML loader

        policy = load_policy(args.policy)
        sources = {name: model.gpus for name, model in policy.models.items() if model.gpus is not None}
        interval_s = policy.energy.sample_interval_s if args.interval is None else args.interval
    else:
        sources, interval_s = {"this-host": GpuSource(source="nvml")}, 1.0 if args.interval is None else args.interval
    return EnergyMonitor.for_sources(sources, interval_s, nvml_module=nvml_module)


async def _show(monitor: EnergyMonitor, once: bool, out: TextIO, policy: str | None) -> int:
    await monitor.open(say_unavailable=False)      # said here, once: in the table, or why nothing can be shown
    try:
        if (problem := _nothing_to_measure(monitor, policy)) is not None:
            print(f"gateway gpu: {problem}", file=sys.stderr)
            return 1
        while True:
            await monitor.sample_once()
            readings = monitor.snapshot()
            out.write(format_table(readings, monitor.reasons))
            out.flush()
            if once:
                return 0 if any(_measured(reading) for reading in readings) else 1
            await asyncio.sleep(monitor.interval_s)
    finally:
        await monitor.stop()


def _nothing_to_measure(monitor: EnergyMonitor, policy: str | None) -> str | None:
    """Why `gateway gpu` has nothing to show, or None when some GPU can be measured: a policy none of whose models
    has `gpus:` is the policy's matter, not NVML's."""
    if not monitor.health:
        return f"no model of {policy} has gpus: (nothing to measure)"
    if any(monitor.measures(model) for model in monitor.health):
        return None
    reasons = "; ".join(dict.fromkeys(monitor.reasons.values())) or "unknown"
    return f"no GPU of {policy} can be measured: {reasons}" if policy else f"no GPU can be measured: {reasons}"


def _measured(reading: GpuReading) -> bool:
    """Whether the reading measures its GPU: read, with its energy or its power."""
    return not reading.failed and (reading.energy_mj is not None or reading.power_w is not None)


def format_table(readings: list[GpuReading], reasons: dict[str, str]) -> str:
    """The GPUs as an aligned text table, then one line per model that cannot be measured."""
    rows = [_HEADER] + [_row(reading) for reading in readings]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    measured = {reading.model for reading in readings if not reading.failed}
    lines += [f"{model}: {reason}" for model, reason in reasons.items() if model not in measured]
    return "\n".join(lines) + "\n\n"


def _row(reading: GpuReading) -> tuple[str, ...]:
    memory = "-"
    if reading.memory_used_bytes is not None and reading.memory_total_bytes:
        memory = f"{reading.memory_used_bytes / GIB_BYTES:.1f}/{reading.memory_total_bytes / GIB_BYTES:.1f}"
    return (reading.model or "-", reading.gpu_id, reading.name or "-", _number(reading.power_w, ".1f"),
            _number(reading.energy_j, ".1f"), _number(reading.utilization, ".0%"), memory,
            reading.error or "ok")


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
