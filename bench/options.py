"""The bench's settings, parsed once from the command line into one frozen dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

#: every section, in the order they run (memory first: it wants a gateway that has served little)
SECTIONS = ("memory", "latency", "throughput", "streaming", "cache", "scaling", "features", "replay")
RESULTS_DIR = Path(__file__).parent / "results"
#: the Azure LLM inference trace (conversation), next to the repository in ../shared/traces
DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure-llm-2023-conv.csv"


@dataclass(frozen=True)
class Options:
    """How long and how often to measure, and which sections."""

    duration_s: int = 5                 # each wrk run
    runs: int = 3                       # interleaved A B A B rounds; medians reported
    sections: tuple[str, ...] = SECTIONS
    streams: int = 1000                 # concurrent open streams in the memory section
    stream_requests: int = 200          # sequential streams per contender in the streaming section
    replay_s: float = 30.0              # wall seconds of trace replayed per contender
    replay_speed: float = 4.0           # trace seconds per wall second
    trace: Path = DEFAULT_TRACE
    out_dir: Path = RESULTS_DIR
    dated_copy: bool = True

    def shortened(self) -> Options:
        """A short run: enough to see the shape of the results, not to quote them."""
        return replace(self, duration_s=2, runs=1, streams=200, stream_requests=40, replay_s=8.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Gateway performance: added latency, throughput, streaming, cache hits, memory, "
                    "scaling, per-stage cost and a trace replay, against a bare aiohttp proxy baseline.")
    parser.add_argument("--quick", action="store_true", help="short runs (2 s, 1 round, 200 streams)")
    parser.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 5)")
    parser.add_argument("--runs", type=int, default=None, help="interleaved rounds; medians reported (default 3)")
    parser.add_argument("--only", action="append", choices=SECTIONS, default=None, metavar="SECTION",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--streams", type=int, default=None, help="open streams in the memory section (1000)")
    parser.add_argument("--stream-requests", type=int, default=None, help="streams per contender (200)")
    parser.add_argument("--replay-seconds", type=float, default=None, help="wall seconds replayed per contender (30)")
    parser.add_argument("--speed", type=float, default=None, help="trace seconds per wall second in the replay (4)")
    parser.add_argument("--trace", type=Path, default=None, help=f"arrivals CSV to replay (default {DEFAULT_TRACE})")
    parser.add_argument("--out", type=Path, default=None, help=f"results directory (default {RESULTS_DIR})")
    parser.add_argument("--no-dated-copy", action="store_true", help="write latest.md only")
    return parser


def parse_options(argv: list[str] | None = None) -> Options:
    """Options from the command line: --quick first, then every explicit flag over it."""
    args = build_parser().parse_args(argv)
    options = Options().shortened() if args.quick else Options()
    overrides = {"duration_s": args.duration, "runs": args.runs, "streams": args.streams,
                 "stream_requests": args.stream_requests, "replay_s": args.replay_seconds,
                 "replay_speed": args.speed, "trace": args.trace, "out_dir": args.out}
    options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
    if args.only:
        options = replace(options, sections=tuple(s for s in SECTIONS if s in args.only))
    if args.no_dated_copy:
        options = replace(options, dated_copy=False)
    return options
