"""A fake `pynvml` module: the real function names, signatures, units, structs and errors, scripted GPUs.

Errors are the installed nvidia-ml-py's own `NVMLError` (so `NVMLError(code)`
is the real `NVMLError_GpuIsLost`, ...), and utilization and memory come back
as its ctypes structs. Units as in NVML: energy counter in mJ, power in mW,
utilization in percent, memory in bytes. A GPU's energy counter integrates its
power over `clock`, so a test moves energy by setting power and advancing time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pynvml as _real
from pynvml import NVMLError

GIB_BYTES = 1024 ** 3


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, dt_s: float) -> None:
        self.now_s += dt_s


@dataclass
class FakeGpu:
    """One scripted GPU."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    power_w: float = 70.0
    utilization_pct: int = 0
    memory_utilization_pct: int = 0
    memory_total_bytes: int = 80 * GIB_BYTES
    memory_used_bytes: int = 512 * 1024 * 1024
    energy_supported: bool = True
    lost: bool = False              # every call on this GPU raises NVML_ERROR_GPU_IS_LOST
    hang: threading.Event | None = None     # set: every call on this GPU blocks until the event is set
    clock: Callable[[], float] = time.monotonic
    _counter_mj: float = 123_456_789.0
    _since_s: float | None = None

    def energy_mj(self) -> int:
        """The total energy counter now (NVML returns whole mJ)."""
        now_s = self.clock()
        since_s = now_s if self._since_s is None else self._since_s
        return int(self._counter_mj + self.power_w * (now_s - since_s) * 1000)

    def set_power(self, power_w: float) -> None:
        """Draw `power_w` from now on."""
        self._counter_mj = float(self.energy_mj())
        self._since_s = self.clock()
        self.power_w = power_w


@dataclass(frozen=True)
class _Handle:
    index: int


@dataclass
class FakeNvml:
    """Stands in for the `pynvml` module; pass it wherever `nvml_module` is accepted."""

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: int | None = None   # e.g. NVML_ERROR_LIBRARY_NOT_FOUND: nvmlInit raises it
    driver_version: str = "580.159.04"
    init_count: int = 0
    calls: list[str] = field(default_factory=list)
    call_threads: set[int] = field(default_factory=set)

    NVMLError = NVMLError
    c_nvmlUtilization_t = _real.c_nvmlUtilization_t
    c_nvmlMemory_t = _real.c_nvmlMemory_t

    def _enter(self, call: str, handle: _Handle | None = None) -> FakeGpu | None:
        self.calls.append(call)
        self.call_threads.add(threading.get_ident())
        if self.init_count == 0:
            raise NVMLError(_real.NVML_ERROR_UNINITIALIZED)
        if handle is None:
            return None
        gpu = self.gpus[handle.index]
        if gpu.hang is not None:
            gpu.hang.wait()
        if gpu.lost:
            raise NVMLError(_real.NVML_ERROR_GPU_IS_LOST)
        return gpu

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.init_count -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
        return self._handle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> _Handle:
        self._enter("nvmlDeviceGetHandleByUUID")
        for index, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                return self._handle(index)
        raise NVMLError(_real.NVML_ERROR_NOT_FOUND)

    def _handle(self, index: int) -> _Handle:
        """A handle, or GPU_IS_LOST as NVML answers for a GPU that fell off the bus."""
        if self.gpus[index].lost:
            raise NVMLError(_real.NVML_ERROR_GPU_IS_LOST)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._enter("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return self._enter("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        gpu = self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        if not gpu.energy_supported:
            raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
        return gpu.energy_mj()

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return int(self._enter("nvmlDeviceGetPowerUsage", handle).power_w * 1000)

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> _real.c_nvmlUtilization_t:
        gpu = self._enter("nvmlDeviceGetUtilizationRates", handle)
        return _real.c_nvmlUtilization_t(gpu=gpu.utilization_pct, memory=gpu.memory_utilization_pct)

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> _real.c_nvmlMemory_t:
        gpu = self._enter("nvmlDeviceGetMemoryInfo", handle)
        free = gpu.memory_total_bytes - gpu.memory_used_bytes
        return _real.c_nvmlMemory_t(total=gpu.memory_total_bytes, free=free, used=gpu.memory_used_bytes)


for _name in dir(_real):
    if _name.startswith("NVML_ERROR_"):
        setattr(FakeNvml, _name, getattr(_real, _name))


def two_gpus(clock: Callable[[], float], power_w: float = 70.0) -> FakeNvml:
    """A fake host with two H100s drawing `power_w` each."""
    gpus = [FakeGpu(uuid=f"GPU-1111111{i}-2222-3333-4444-555555555555", power_w=power_w, clock=clock)
            for i in range(2)]
    for gpu in gpus:
        gpu.set_power(power_w)
    return FakeNvml(gpus=gpus)


def real_nvml_works() -> bool:
    """Whether this machine has a working NVML and a GPU (tests of the no-GPU path skip there)."""
    from gateway.energy.nvml import NvmlSource
    from gateway.energy.readings import EnergyUnavailable

    source = NvmlSource(["0"])
    try:
        source.open()
    except EnergyUnavailable:
        return False
    source.close()
    return True
