"""A serving gateway process keeps its start-up objects out of full garbage collections."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from gateway.server import GC_YOUNG_THRESHOLD

DEMO_POLICY = Path(__file__).resolve().parents[1] / "gateway" / "data" / "demo.yaml"

SCRIPT = textwrap.dedent("""
    import asyncio, gc, os, sys
    from pathlib import Path
    from gateway.app import build_app
    from gateway.runtime import PolicyHolder
    from gateway.server import run_server

    async def main(freeze):
        ready, stop = asyncio.Event(), asyncio.Event()
        app = build_app(PolicyHolder.from_file(Path(sys.argv[1]), {"OTEL_SDK_DISABLED": "true"}))
        server = asyncio.create_task(run_server(app, "127.0.0.1", 0, ready=ready, stop=stop, freeze_gc=freeze))
        await ready.wait()
        print(gc.get_threshold()[0], gc.get_freeze_count())
        stop.set()
        await server

    asyncio.run(main(sys.argv[2] == "freeze"))
""")


def after_start(mode: str) -> tuple[int, int]:
    """(the young generation's threshold, the objects frozen) once the gateway serves."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(DEMO_POLICY), mode], capture_output=True,
                          text=True, timeout=60, check=True)
    threshold, frozen = done.stdout.split()[-2:]
    return int(threshold), int(frozen)


def test_freeze_gc_moves_start_up_objects_out_of_collections():
    """With freeze_gc (as `gateway run` workers use it) tens of thousands of start-up objects are frozen."""
    assert after_start("freeze")[1] > 10_000
    assert after_start("no")[1] == 0


def test_a_serving_gateway_collects_its_young_generation_less_often():
    """With freeze_gc the young generation is collected every GC_YOUNG_THRESHOLD allocations, CPython's 700
    otherwise (tests that start many gateways keep the default)."""
    assert after_start("freeze")[0] == GC_YOUNG_THRESHOLD
    assert after_start("no")[0] == 700
