"""An OpenAI-compatible chat backend whose every output token is real GPU work, for the GPU energy check.

`python -m bench.gpu_backend --port P [--size N]` serves `POST /v1/chat/completions`
(streamed or not, with `usage`) and `GET /health`. Each output token is one
N x N bf16 matrix product on the GPU through PyTorch, run in a worker thread
so the event loop keeps relaying; concurrent requests interleave on the GPU,
so energy really follows the tokens each request produces. Where PyTorch
or CUDA is missing (a dry run of the check on a machine without a GPU), each
token sleeps `--cpu-token-ms` instead, and `/health` says so. With
`GPU_BACKEND_BUSY_FILE` set, the number of requests in flight is written to
that file as it changes, so a stand-in GPU (the tests' fake NVML) can draw
power while the backend works.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import orjson
from aiohttp import web

DEFAULT_SIZE = 8192
DEFAULT_MAX_TOKENS = 64
WORKER_THREADS = 64


def gpu_step(size: int) -> tuple[Callable[[], None] | None, str]:
    """One token's work (a matrix product on the GPU, on the calling thread's own CUDA stream) and the
    device's name; None and the reason when there is no GPU to run it on."""
    try:
        import torch
    except ImportError:
        return None, "no PyTorch"
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    stream_of_thread: dict[int, object] = {}

    def step() -> None:
        stream = stream_of_thread.get(threading.get_ident())
        if stream is None:
            stream = stream_of_thread[threading.get_ident()] = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.matmul(a, b)
        stream.synchronize()

    step()                      # warm-up: cuBLAS picks its kernel before the first request
    torch.cuda.synchronize()
    return step, torch.cuda.get_device_name(0)


class Backend:
    """Answers chat completions, one unit of work per output token."""

    def __init__(self, step: Callable[[], None] | None, device: str, cpu_token_s: float) -> None:
        self.step = step
        self.device = device
        self.cpu_token_s = cpu_token_s
        self.executor = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="token")
        self.tokens = 0
        self.in_flight = 0
        self.busy_file = os.environ.get("GPU_BACKEND_BUSY_FILE")

    def _busy(self, change: int) -> None:
        self.in_flight += change
        if self.busy_file:
            with open(self.busy_file, "w") as file:
                file.write(str(self.in_flight))

    async def token(self) -> None:
        if self.step is None:
            await asyncio.sleep(self.cpu_token_s)
        else:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.step)
        self.tokens += 1

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"device": self.device, "gpu": self.step is not None, "tokens": self.tokens})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self._busy(+1)
        try:
            return await self._chat(request)
        finally:
            self._busy(-1)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json(loads=orjson.loads)
        max_tokens = int(body.get("max_tokens") or DEFAULT_MAX_TOKENS)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                 "total_tokens": prompt_tokens + max_tokens}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "created": int(time.time()), "model": body.get("model")}
        if not body.get("stream"):
            for _ in range(max_tokens):
                await self.token()
            message = {"role": "assistant", "content": " tok" * max_tokens}
            return web.json_response({**head, "object": "chat.completion", "usage": usage,
                                      "choices": [{"index": 0, "message": message, "finish_reason": "length"}]},
                                     dumps=lambda v: orjson.dumps(v).decode())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(max_tokens):
            await self.token()
            delta = {"role": "assistant", "content": " tok"} if i == 0 else {"content": " tok"}
            await response.write(_event({**head, "object": "chat.completion.chunk",
                                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        await response.write(_event({**head, "object": "chat.completion.chunk",
                                     "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(_event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        return response


def _event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_backend", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="matrix side of one token's product")
    parser.add_argument("--cpu-token-ms", type=float, default=2.0, help="time per token without a GPU")
    args = parser.parse_args(argv)
    step, device = gpu_step(args.size)
    backend = Backend(step, device, args.cpu_token_ms / 1000)
    app = web.Application()
    app.router.add_get("/health", backend.health)
    app.router.add_post("/v1/chat/completions", backend.chat)
    print(f"gpu backend on port {args.port}: {device}", flush=True)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
