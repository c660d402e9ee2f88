"""A simulated OpenAI-compatible model server: latency, token counts and failures, all configurable.

The gateway's demo, tests and benchmarks run against it instead of GPUs. One aiohttp app
serves one model (`build_sim_app`); `start_simulators` serves several on their own ports;
`main` is the `gateway simulate-backend` command.
"""

from gateway.simulator.cli import main
from gateway.simulator.config import SimConfig
from gateway.simulator.runner import RunningSim, start_simulator, start_simulators
from gateway.simulator.server import STATE, build_sim_app

__all__ = ["STATE", "RunningSim", "SimConfig", "build_sim_app", "main", "start_simulator", "start_simulators"]
