"""Put this folder on PYTHONPATH and every Python process started sees one fake GPU as `pynvml`.

For tests that run the GPU energy check (`bench.gpu_energy`) in subprocesses on
a machine without a GPU. The GPU is `tests.support.fake_pynvml`'s scripted
H100 (the real NVML function names, units and errors); it draws IDLE_W plus
W_PER_REQUEST for each request in flight on `bench.gpu_backend`, which writes
that number to `GPU_BACKEND_BUSY_FILE`. So every token costs the same energy,
alone or beside others: a 3:1 split of tokens is a 3:1 split of energy. Every
process polls the same file, so their energy counters agree to within a poll.
"""

import os
import sys
import threading
import time
from pathlib import Path

IDLE_W, W_PER_REQUEST, POLL_S = 70.0, 80.0, 0.005

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))     # the repository, for tests.support
from tests.support import fake_pynvml  # noqa: E402

_gpu = fake_pynvml.FakeGpu(power_w=IDLE_W)
_gpu.set_power(IDLE_W)          # the counter integrates from now
_nvml = fake_pynvml.FakeNvml(gpus=[_gpu])


def _follow(path: str) -> None:
    in_flight = 0
    while True:
        try:
            now = int(Path(path).read_text() or 0)
        except (OSError, ValueError):
            now = in_flight
        if now != in_flight:
            _gpu.set_power(IDLE_W + W_PER_REQUEST * now)
            in_flight = now
        time.sleep(POLL_S)


def _start_following() -> None:
    threading.Thread(target=_follow, args=(os.environ["GPU_BACKEND_BUSY_FILE"],), daemon=True).start()


if os.environ.get("GPU_BACKEND_BUSY_FILE"):
    _start_following()
    os.register_at_fork(after_in_child=_start_following)   # a forked process (a gateway worker) has no threads
sys.modules["pynvml"] = _nvml
