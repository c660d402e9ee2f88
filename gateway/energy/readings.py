"""What one GPU said at one instant, and the error raised when GPUs cannot be measured at all."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.semconv._incubating.attributes import hw_attributes as hw
from opentelemetry.semconv._incubating.metrics import hw_metrics

from gateway.errors import GatewayError

MIB_BYTES = 1024 * 1024


class EnergyUnavailable(GatewayError):
    """GPUs cannot be measured here: no NVML library, no driver, no GPU, no exporter."""

    code = "energy_unavailable"


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one instant; `error` is set when the GPU could not be read."""

    gpu_id: str
    timestamp_s: float                  # the monitor's clock (monotonic), not wall time
    source: str = "nvml"                # nvml | dcgm
    uuid: str | None = None
    name: str | None = None             # product name, e.g. "NVIDIA H100 80GB HBM3"
    host: str | None = None
    energy_mj: float | None = None      # total energy counter since driver load; None: not supported
    power_w: float | None = None
    utilization: float | None = None    # fraction 0-1 of time a kernel ran
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    error: str | None = None
    model: str | None = None            # the policy model these GPUs serve, set by the monitor

    @property
    def failed(self) -> bool:
        """Whether this GPU could not be read."""
        return self.error is not None

    @property
    def energy_j(self) -> float | None:
        """The energy counter in joules."""
        return None if self.energy_mj is None else self.energy_mj / 1000.0

    @property
    def memory_utilization(self) -> float | None:
        """Used over total memory, a fraction 0-1."""
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return self.memory_used_bytes / self.memory_total_bytes

    @property
    def hw_id(self) -> str:
        """A stable identifier: the GPU UUID, else host and index."""
        return self.uuid or f"{self.host or 'localhost'}:gpu{self.gpu_id}"

    def hw_attributes(self) -> dict[str, str]:
        """OpenTelemetry `hw.*` attributes identifying this GPU."""
        attributes = {hw.HW_ID: self.hw_id, hw.HW_TYPE: hw.HwTypeValues.GPU.value,
                      hw.HW_NAME: f"gpu{self.gpu_id}", hw.HW_VENDOR: "NVIDIA"}
        if self.name:
            attributes[hw.HW_MODEL] = self.name
        return attributes

    def hw_values(self) -> dict[str, float]:
        """The `hw.*` metric values known for this reading: power W, energy J, utilizations 0-1."""
        values = {hw_metrics.HW_POWER: self.power_w, hw_metrics.HW_ENERGY: self.energy_j,
                  hw_metrics.HW_GPU_UTILIZATION: self.utilization,
                  hw_metrics.HW_GPU_MEMORY_UTILIZATION: self.memory_utilization}
        return {name: value for name, value in values.items() if value is not None}
