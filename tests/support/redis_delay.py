"""A TCP proxy in front of a real redis-server: commands pass at once, every reply `delay_s` late.

It notes when each command arrived, so a test can tell whether the gateway
sent a command before the reply to an earlier one could have reached it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Arrival:
    """One command as the proxy saw it: when, its name, its first argument and all its arguments."""

    at_s: float
    name: str
    first_arg: str
    args: tuple[str, ...] = ()
    data: bytes = b""                       # everything the read brought: pipelined commands too


def command_of(data: bytes) -> tuple[str, str, tuple[str, ...]]:
    """The name, first argument and arguments of the first RESP command in `data` (`*N $len NAME $len ARG ...`)."""
    parts = data.split(b"\r\n")
    name = parts[2].decode(errors="replace").upper() if len(parts) > 2 else "?"
    words = parts[2:]
    count = int(parts[0][1:]) if parts[0][:1] == b"*" and parts[0][1:].isdigit() else 0
    args = tuple(word.decode(errors="replace") for word in words[2:2 * count:2])
    return name, args[0] if args else "", args


class DelayingRedisProxy:
    """Runs on its own event loop thread; `url` is what the gateway connects to."""

    def __init__(self, redis_port: int, delay_s: float) -> None:
        self.redis_port = redis_port
        self.delay_s = delay_s
        self.arrivals: list[Arrival] = []
        self.holding = threading.Event()    # set: replies are held until it is cleared
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> DelayingRedisProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)

        async def commands() -> None:
            while data := await client_r.read(65536):
                self.arrivals.append(Arrival(time.monotonic(), *command_of(data), data=data))
                redis_w.write(data)
                await redis_w.drain()
            redis_w.close()

        async def replies() -> None:
            while data := await redis_r.read(65536):
                await asyncio.sleep(self.delay_s)
                while self.holding.is_set():    # replies wait while a test holds them
                    await asyncio.sleep(0.01)
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        try:
            await asyncio.gather(commands(), replies())
        except (ConnectionError, asyncio.CancelledError):
            client_w.close()
            redis_w.close()
