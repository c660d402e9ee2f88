"""`gateway` under cProfile, switched on and off by signals so start-up and warm-up stay out.

    python -m bench.profiled_gateway --out FILE -- run --policy P --port N

SIGUSR1 starts profiling the event loop thread's CPU time (`time.thread_time`,
so preemption on a busy machine is not counted); SIGUSR2 stops it and writes
the pstats file to FILE (then FILE.done, so a reader knows it is complete).
Use one worker: the profile covers this process only.
"""

from __future__ import annotations

import argparse
import cProfile
import signal
import time
from pathlib import Path

from gateway.cli import main as gateway_main


class SignalProfiler:
    """A cProfile.Profile driven by SIGUSR1 (start) and SIGUSR2 (stop and dump)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.profile = cProfile.Profile(time.thread_time)
        self.running = False

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self._start)
        signal.signal(signal.SIGUSR2, self._stop)

    def _start(self, _signum, _frame) -> None:
        if not self.running:
            self.profile = cProfile.Profile(time.thread_time)
            self.profile.enable()
            self.running = True

    def _stop(self, _signum, _frame) -> None:
        if self.running:
            self.profile.disable()
            self.running = False
            self.profile.dump_stats(self.out)
            Path(f"{self.out}.done").touch()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profiled_gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where SIGUSR2 writes the pstats file")
    parser.add_argument("gateway_args", nargs=argparse.REMAINDER, help="-- then the gateway's arguments")
    args = parser.parse_args(argv)
    gateway_args = args.gateway_args[1:] if args.gateway_args[:1] == ["--"] else args.gateway_args
    SignalProfiler(args.out).install()
    return gateway_main(gateway_args)


if __name__ == "__main__":
    raise SystemExit(main())
