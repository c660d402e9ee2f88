"""GPU power and energy: NVML and DCGM sampling, and attribution of joules to requests.

    readings     GpuReading, EnergyUnavailable: what a GPU said, and "nothing to measure here"
    nvml         NvmlSource: GPUs on this host through `pynvml` (blocking; run in a thread)
    dcgm         DcgmSource: GPUs on model-server hosts through the DCGM exporter's /metrics
    attribution  EnergyLedger: per interval, energy above idle split among requests by tokens
    monitor      EnergyMonitor: the sampling loop feeding the ledger; health per model
    command      `gateway gpu`: a live table of GPUs
"""

from gateway.energy.attribution import EnergyLedger, IntervalSplit, ModelEnergy
from gateway.energy.dcgm import DcgmSource
from gateway.energy.monitor import EnergyMonitor
from gateway.energy.nvml import NvmlSource
from gateway.energy.readings import EnergyUnavailable, GpuReading

__all__ = ["DcgmSource", "EnergyLedger", "EnergyMonitor", "EnergyUnavailable", "GpuReading",
           "IntervalSplit", "ModelEnergy", "NvmlSource"]
