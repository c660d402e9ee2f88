"""`gateway demo`: three simulated models and the gateway on the demo policy, nothing else needed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import aiohttp
import orjson

from gateway.app import build_app
from gateway.runtime import PolicyHolder
from gateway.server import http_url, install_uvloop, listen_sockets, run_server
from gateway.simulator import SimConfig, start_simulators

#: the simulated models of the demo: name, demo-policy port, ttft_ms, tpot_ms
DEMO_MODELS = (("sim-small-1b", 9101, 40, 4), ("sim-medium-8b", 9102, 80, 8), ("sim-large-70b", 9103, 200, 20))


def demo_policy_text() -> str:
    """The demo policy shipped inside the package."""
    return resources.files("gateway.data").joinpath("demo.yaml").read_text()


def snippet(base_url: str) -> str:
    """What to paste to try the gateway."""
    return f"""
The gateway is ready at {base_url}

  curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "auto", "messages": [{{"role": "user", "content": "Hello!"}}], "temperature": 0}}' -i

  pip install openai    # the official SDK, for the streaming example
  python - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="{base_url}/v1", api_key="unused-in-demo")
  for chunk in client.chat.completions.create(model="auto", stream=True,
          messages=[{{"role": "user", "content": "Tell me a story"}}], max_tokens=40):
      print(chunk.choices[0].delta.content or "" if chunk.choices else "", end="", flush=True)
  PY

Response headers show the routing: x-gateway-model, x-gateway-route, x-gateway-fallback,
x-gateway-cache and x-gateway-cost-usd. Press Ctrl-C to stop.
"""


#: a tiny image (a PNG's signature) sent inline: small reads no images, so the router passes it over
IMAGE_PART = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}


async def tour(base_url: str) -> None:
    """Send a few requests and print what the gateway decided for each."""
    requests = [
        ("small prompt, auto", "chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "Hi"}],
                                                    "temperature": 0, "max_tokens": 16}),
        ("same again (cache)", "chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "Hi"}],
                                                    "temperature": 0, "max_tokens": 16}),
        ("needs tier 2", "chat/completions", {"model": "smart", "max_tokens": 32,
                                              "messages": [{"role": "user", "content": "Plan a trip"}]}),
        ("an image, auto", "chat/completions", {"model": "auto", "max_tokens": 16, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE_PART]}]}),
        ("responses API, auto", "responses", {"model": "auto", "input": "Hi", "max_output_tokens": 16}),
    ]
    print(f"{'request':<22} {'status':<6} {'model':<8} {'route':<13} {'cache':<7} {'cost_usd':>14}")
    async with aiohttp.ClientSession() as session:
        for label, path, body in requests:
            async with session.post(f"{base_url}/v1/{path}", json=body) as resp:
                answer = await resp.read()
                _print_row(label, resp)
        # the stored response, from the model server that stored it (no route, no cost: its row shows none)
        stored_id = orjson.loads(answer).get("id") if resp.status == 200 else None
        async with session.get(f"{base_url}/v1/responses/{stored_id}") as resp:
            await resp.read()
            _print_row("stored response, get", resp)


def _print_row(label: str, resp: aiohttp.ClientResponse) -> None:
    h = resp.headers
    print(f"{label:<22} {resp.status:<6} {h.get('x-gateway-model', '-'):<8} "
          f"{h.get('x-gateway-route', '-'):<13} {h.get('x-gateway-cache', '-'):<7} "
          f"{h.get('x-gateway-cost-usd', '-'):>14}")


async def run_demo(*, host: str = "127.0.0.1", port: int = 8080, duration_s: float | None = None) -> int:
    """Start the simulated models and the gateway; serve until Ctrl-C (or `duration_s`)."""
    install_uvloop()
    sockets = listen_sockets(host, port)        # first: a taken port is said in one line (ListenError)
    port = sockets[0].getsockname()[1]          # --port 0: the free port the system chose
    sims = await start_simulators([SimConfig(name=name, port=0, ttft_ms=ttft, tpot_ms=tpot, seed=index)
                                   for index, (name, _, ttft, tpot) in enumerate(DEMO_MODELS)])
    text = demo_policy_text()
    for (_, demo_port, _, _), sim in zip(DEMO_MODELS, sims):
        text = text.replace(f"127.0.0.1:{demo_port}", f"127.0.0.1:{sim.port}")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    policy_path = workdir / "demo.yaml"
    policy_path.write_text(text)
    holder = PolicyHolder.from_file(policy_path, os.environ)
    ready, stop = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(run_server(build_app(holder), host, port, sockets=sockets, ready=ready, stop=stop))
    try:
        await asyncio.wait({server, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if server.done():
            await server                # raises why it stopped
        base_url = http_url(host, port)
        await tour(base_url)
        print(snippet(base_url), flush=True)
        if duration_s is not None:
            # A Ctrl-C or SIGTERM within the duration stops the server: the demo ends with it, not when time is up.
            await asyncio.wait({server}, timeout=duration_s)
            stop.set()
        await server
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await server
        for sim in sims:
            await sim.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
