"""GPUs on this host, read through NVML (the `pynvml` module of the `nvidia-ml-py` package).

Every call here blocks: the monitor runs `open`, `read` and `close` in a worker
thread, never on the event loop. NVML errors are translated here: a missing
library or GPU raises `EnergyUnavailable`; a GPU that fails while reading
(e.g. NVML_ERROR_GPU_IS_LOST) comes back as a failed reading, the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from gateway.energy.readings import EnergyUnavailable, GpuReading

#: NVML error names meaning "this GPU or driver cannot give that value": read as None
_UNSUPPORTED = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND")


@dataclass
class _Device:
    gpu_id: str
    handle: Any
    uuid: str | None
    name: str | None
    energy_supported: bool = True


def import_pynvml() -> ModuleType:
    """The real `pynvml` module, or EnergyUnavailable when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError as exc:
        raise EnergyUnavailable("NVML not available: the nvidia-ml-py package is not installed") from exc
    return pynvml


class NvmlSource:
    """Reads energy, power, utilization and memory of some (or all) GPUs of this host."""

    source = "nvml"

    def __init__(self, gpu_ids: Sequence[str] = (), nvml_module: Any = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        #: NVML indexes ("0", which ignore CUDA_VISIBLE_DEVICES) or UUIDs ("GPU-..."); empty: every GPU
        self.gpu_ids = tuple(gpu_ids)
        self._nvml = nvml_module
        self._clock = clock
        self._devices: list[_Device] = []
        self._opened = False

    def open(self) -> None:
        """Initialise NVML and find the GPUs; EnergyUnavailable when there is nothing to measure."""
        nvml = self._nvml = self._nvml or import_pynvml()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise EnergyUnavailable(f"NVML not available: {exc}") from exc
        self._opened = True
        try:
            self._devices = self._find_devices()
        except nvml.NVMLError as exc:
            self.close()
            raise EnergyUnavailable(f"NVML cannot list GPUs: {exc}") from exc
        except EnergyUnavailable:
            self.close()
            raise

    @property
    def device_ids(self) -> tuple[str, ...]:
        """The ids of the GPUs this source reads (every GPU of the host when none were named)."""
        return tuple(device.gpu_id for device in self._devices) or self.gpu_ids or ("*",)

    def read(self) -> list[GpuReading]:
        """One reading per GPU; a GPU that errors is a failed reading, the others are read."""
        return [self._read_device(device) for device in self._devices]

    def close(self) -> None:
        """Release NVML (NVML counts initialisations, so each source shuts down its own)."""
        if not self._opened:
            return
        self._opened = False
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass    # the driver went away; there is nothing left to release

    def _find_devices(self) -> list[_Device]:
        nvml = self._nvml
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            raise EnergyUnavailable("no GPU: NVML sees no device")
        ids = self.gpu_ids or tuple(str(index) for index in range(count))
        return [self._open_device(gpu_id, count) for gpu_id in ids]

    def _open_device(self, gpu_id: str, count: int) -> _Device:
        nvml = self._nvml
        if gpu_id.startswith(("GPU-", "MIG-")):
            handle = nvml.nvmlDeviceGetHandleByUUID(gpu_id)
        elif gpu_id.isdigit() and int(gpu_id) < count:
            handle = nvml.nvmlDeviceGetHandleByIndex(int(gpu_id))
        else:
            raise EnergyUnavailable(f"no GPU {gpu_id!r} on this host (NVML sees {count})")
        uuid = self._optional(nvml.nvmlDeviceGetUUID, handle)
        name = self._optional(nvml.nvmlDeviceGetName, handle)
        return _Device(gpu_id=gpu_id, handle=handle, uuid=uuid, name=name)

    def _read_device(self, device: _Device) -> GpuReading:
        nvml = self._nvml
        base = {"gpu_id": device.gpu_id, "uuid": device.uuid, "name": device.name, "source": self.source}
        try:
            energy_mj = self._energy_mj(device)
            power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, device.handle)
            rates = self._optional(nvml.nvmlDeviceGetUtilizationRates, device.handle)
            memory = self._optional(nvml.nvmlDeviceGetMemoryInfo, device.handle)
        except nvml.NVMLError as exc:
            return GpuReading(**base, timestamp_s=self._clock(), error=f"NVML: {exc}")
        return GpuReading(
            **base, timestamp_s=self._clock(), energy_mj=energy_mj,
            power_w=None if power_mw is None else power_mw / 1000.0,
            utilization=None if rates is None else rates.gpu / 100.0,
            memory_used_bytes=None if memory is None else memory.used,
            memory_total_bytes=None if memory is None else memory.total,
        )

    def _energy_mj(self, device: _Device) -> float | None:
        """The total energy counter (mJ); once NOT_SUPPORTED, power samples are used instead."""
        if not device.energy_supported:
            return None
        energy_mj = self._optional(self._nvml.nvmlDeviceGetTotalEnergyConsumption, device.handle)
        device.energy_supported = energy_mj is not None
        return energy_mj

    def _optional(self, call: Callable[[Any], Any], handle: Any) -> Any:
        """`call(handle)`, or None when this GPU does not support it; other NVML errors propagate."""
        nvml = self._nvml
        try:
            return call(handle)
        except nvml.NVMLError as exc:
            if any(exc.value == getattr(nvml, name, None) for name in _UNSUPPORTED):
                return None
            raise
