"""The bare pass-through baseline: the smallest aiohttp proxy a gateway can be compared with.

It reads the JSON body with orjson, rewrites `model`, forwards it over one
pooled ClientSession and returns the answer (streams relayed as they come).
No auth, no limits, no routing, no telemetry: what is left is the cost of
being a Python proxy at all.

    python -m bench.baseline_proxy --port 8001 --upstream http://127.0.0.1:8000/v1 \
        [--stream-upstream http://127.0.0.1:8000/stream/v1] [--model bench-upstream]
"""

from __future__ import annotations

import argparse

import aiohttp
import orjson
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str, stream_upstream: str, model: str) -> web.Application:
    """The proxy for one upstream (and one for streams)."""
    async def session_ctx(app: web.Application):
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        body["model"] = model
        stream = bool(body.get("stream"))
        url = (stream_upstream if stream else upstream) + request.path.removeprefix("/v1")
        async with request.app[SESSION].post(url, data=orjson.dumps(body),
                                             headers={"Content-Type": "application/json"}) as upstream_resp:
            if not stream:
                return web.Response(body=await upstream_resp.read(), status=upstream_resp.status,
                                    content_type="application/json")
            response = web.StreamResponse(status=upstream_resp.status,
                                          headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for chunk in upstream_resp.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", proxy)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="OpenAI base URL of the upstream, e.g. http://h:p/v1")
    parser.add_argument("--stream-upstream", default=None, help="base URL for stream=true requests")
    parser.add_argument("--model", default="bench-upstream", help="the upstream model name written into bodies")
    args = parser.parse_args(argv)
    app = build_app(args.upstream.rstrip("/"), (args.stream_upstream or args.upstream).rstrip("/"), args.model)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
