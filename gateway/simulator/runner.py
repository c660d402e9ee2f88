"""Starting and stopping simulated models, each on its own port."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.simulator.config import SimConfig
from gateway.simulator.server import build_sim_app

#: how long stopping waits for answers still being sent before cancelling them
SHUTDOWN_TIMEOUT_S = 1.0


@dataclass
class RunningSim:
    """One simulated model serving on `host:port`."""

    config: SimConfig
    host: str
    port: int
    runner: web.AppRunner

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. `http://127.0.0.1:PORT/v1`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def control_url(self) -> str:
        """The root of the `/sim/*` control endpoints."""
        return self.url.removesuffix("/v1") + "/sim"

    async def stop(self) -> None:
        """Stop serving; hanging requests are released and in-flight answers get SHUTDOWN_TIMEOUT_S."""
        await self.runner.cleanup()


async def start_simulator(config: SimConfig, host: str = "127.0.0.1") -> RunningSim:
    """Serve one simulated model; port 0 picks a free port."""
    runner = web.AppRunner(build_sim_app(config), access_log=None, handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, config.port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = runner.addresses[0][1]
    return RunningSim(config=config, host=host, port=port, runner=runner)


async def start_simulators(configs: list[SimConfig], host: str = "127.0.0.1") -> list[RunningSim]:
    """Serve several simulated models; if one cannot start, those already started are stopped."""
    started: list[RunningSim] = []
    try:
        for config in configs:
            started.append(await start_simulator(config, host))
    except BaseException:
        for sim in started:
            await sim.stop()
        raise
    return started
