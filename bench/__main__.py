"""`python -m bench`: start nginx, the sink, simulators, the baseline and gateways; measure; write results."""

from __future__ import annotations

import os
import shlex
import sys

from bench.machine import Cores, Machine
from bench.nginx import nginx_available
from bench.options import Options, parse_options
from bench.procs import BenchSetupError, raise_fd_limit
from bench.report import SectionResult, document, utc_now, write_results
from bench.sections import SECTION_MODULES
from bench.stack import Stack
from bench.wrk import wrk_available


def run_bench(options: Options, command: str = "python -m bench") -> str:
    """Run the chosen sections and write the results; returns the Markdown written."""
    missing = [tool for tool, ok in (("wrk", wrk_available()), ("nginx", nginx_available())) if not ok]
    if missing:
        raise SystemExit(f"needs {' and '.join(missing)}: apt-get install -y nginx wrk")
    raise_fd_limit()
    machine, cores, started = Machine.describe(), Cores.plan(), utc_now()
    if cores.load:
        os.sched_setaffinity(0, cores.load)       # the bench's own clients run on the load core
    results: list[SectionResult] = []
    with Stack(cores) as stack:
        needed = [proc for name in options.sections for proc in SECTION_MODULES[name].NEEDS]
        _say(f"starting {', '.join(dict.fromkeys(needed))} ({cores.describe()})")
        stack.ensure(*needed)
        for name in options.sections:
            _say(f"section {name} ...")
            results.append(SECTION_MODULES[name].run(stack, options))
            for row in results[-1].rows:
                _say(f"  {row.key}: {row.value:.4g} {row.unit} {row.verdict}")
    text = document(results, machine, cores, command, started)
    for path in write_results(text, options.out_dir, started, options.dated_copy):
        _say(f"wrote {path}")
    return text


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_options(argv)
    try:
        run_bench(options, shlex.join(["python", "-m", "bench", *argv]))
    except BenchSetupError as exc:
        _say(f"bench failed: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
