"""A tiny OTLP/HTTP sink: accepts POST /v1/traces and /v1/metrics, answers 200, counts what came.

The gateway under test exports to it, so telemetry costs what it costs in
production (encoding, batching, HTTP export) without a collector's CPU.

    python -m bench.otlp_sink --port 4318      # GET /stats -> {"traces": {...}, "metrics": {...}}
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import uvloop
from aiohttp import web


@dataclass
class SignalCount:
    """Export requests and bytes received for one signal."""

    requests: int = 0
    bytes: int = 0


COUNTS = web.AppKey("counts", dict)


async def receive(request: web.Request) -> web.Response:
    """Accept one export; an empty protobuf body is a valid Export*ServiceResponse."""
    count: SignalCount = request.app[COUNTS][request.match_info["signal"]]
    count.requests += 1
    count.bytes += len(await request.read())
    return web.Response(body=b"", content_type="application/x-protobuf")


async def stats(request: web.Request) -> web.Response:
    return web.json_response({name: asdict(count) for name, count in request.app[COUNTS].items()})


def build_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[COUNTS] = {"traces": SignalCount(), "metrics": SignalCount(), "logs": SignalCount()}
    app.router.add_post("/v1/{signal:traces|metrics|logs}", receive)
    app.router.add_get("/stats", stats)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvloop.install()
    web.run_app(build_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
