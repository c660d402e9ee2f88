"""GPUs on model-server hosts, read from the DCGM exporter's Prometheus endpoint.

The exporter (NVIDIA/dcgm-exporter) serves one series per GPU and field,
labelled `gpu`, `UUID`, `device`, `modelName`, `Hostname`, ... . Its values
are refreshed every collect interval (`-c`, 30 s by default): set it near the
gateway's `energy.sample_interval_s` so energy deltas land in the right
interval. Series of MIG instances (`GPU_I_ID` label) are skipped: energy and
power are per physical GPU. A failed scrape gives failed readings; nothing
raises out of `read`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.energy.readings import MIB_BYTES, GpuReading

ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"     # mJ, counter
POWER = "DCGM_FI_DEV_POWER_USAGE"                   # W
GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"                   # %
FB_USED = "DCGM_FI_DEV_FB_USED"                     # MiB
FB_FREE = "DCGM_FI_DEV_FB_FREE"                     # MiB
FB_RESERVED = "DCGM_FI_DEV_FB_RESERVED"             # MiB, newer exporters only
FIELDS = frozenset({ENERGY, POWER, GPU_UTIL, FB_USED, FB_FREE, FB_RESERVED})


def parse_exporter_text(text: str, hostname: str | None) -> dict[str, dict[str, object]]:
    """Per `gpu` label: the fields we use and the GPU's labels; ValueError on malformed text."""
    gpus: dict[str, dict[str, object]] = {}
    # match on the family name: the parser renames a counter's sample to `<name>_total`
    for family in text_string_to_metric_families(text):
        if family.name not in FIELDS:
            continue
        for sample in family.samples:
            labels = sample.labels
            if "GPU_I_ID" in labels or "gpu" not in labels:
                continue
            if hostname is not None and labels.get("Hostname") != hostname:
                continue
            gpu = gpus.setdefault(labels["gpu"], {"labels": labels})
            if math.isfinite(sample.value):     # NaN or Inf (a field the GPU cannot read): as if absent
                gpu.setdefault(family.name, sample.value)
    return gpus


class DcgmSource:
    """Scrapes one DCGM exporter for the GPUs of one model."""

    source = "dcgm"

    def __init__(self, url: str, gpu_ids: Sequence[str], hostname: str | None,
                 session: aiohttp.ClientSession, *, clock: Callable[[], float] = time.monotonic,
                 timeout_s: float = 2.0) -> None:
        self.url = url
        self.gpu_ids = tuple(gpu_ids)   # `gpu` label values ("0") or UUIDs ("GPU-..."); empty: all
        self.hostname = hostname
        self._session = session
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._seen_ids: tuple[str, ...] = ()

    async def read(self) -> list[GpuReading]:
        """One reading per GPU; failed readings when the exporter cannot be scraped."""
        try:
            text = await self._scrape()
        except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError) as exc:
            return self._failed(f"DCGM scrape of {self.url} failed: {exc!r}")
        now_s = self._clock()
        try:
            gpus = parse_exporter_text(text, self.hostname)
        except ValueError as exc:
            return self._failed(f"DCGM exporter at {self.url} sent unparseable metrics: {exc}")
        ids = self.gpu_ids or tuple(sorted(gpus, key=lambda gpu: (len(gpu), gpu)))
        self._seen_ids = ids
        return [self._reading(gpu_id, gpus, now_s) for gpu_id in ids]

    async def _scrape(self) -> str:
        async with self._session.get(self.url, timeout=self._timeout) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, response.history, status=response.status,
                    message=response.reason or "", headers=response.headers)
            return await response.text()

    def _reading(self, gpu_id: str, gpus: dict[str, dict[str, object]], now_s: float) -> GpuReading:
        gpu = gpus.get(gpu_id) or _by_uuid(gpus, gpu_id)
        if gpu is None:
            where = f" for Hostname {self.hostname!r}" if self.hostname else ""
            return self._failed_one(gpu_id, now_s, f"GPU {gpu_id} not in the DCGM exporter output{where}")
        labels: dict[str, str] = gpu["labels"]   # type: ignore[assignment]
        used_mib, free_mib = gpu.get(FB_USED), gpu.get(FB_FREE)
        total_mib = None if used_mib is None or free_mib is None else (
            used_mib + free_mib + gpu.get(FB_RESERVED, 0.0))
        util = gpu.get(GPU_UTIL)
        return GpuReading(
            gpu_id=gpu_id, timestamp_s=now_s, source=self.source, uuid=labels.get("UUID"),
            name=labels.get("modelName"), host=labels.get("Hostname") or self.hostname,
            energy_mj=gpu.get(ENERGY), power_w=gpu.get(POWER),
            utilization=None if util is None else util / 100.0,
            memory_used_bytes=None if used_mib is None else int(used_mib * MIB_BYTES),
            memory_total_bytes=None if total_mib is None else int(total_mib * MIB_BYTES),
        )

    def _failed(self, error: str) -> list[GpuReading]:
        now_s = self._clock()
        return [self._failed_one(gpu_id, now_s, error) for gpu_id in self.gpu_ids or self._seen_ids or ("*",)]

    def _failed_one(self, gpu_id: str, now_s: float, error: str) -> GpuReading:
        return GpuReading(gpu_id=gpu_id, timestamp_s=now_s, source=self.source,
                          host=self.hostname, error=error)


def _by_uuid(gpus: dict[str, dict[str, object]], uuid: str) -> dict[str, object] | None:
    """The GPU whose `UUID` label is `uuid`, when the policy names GPUs by UUID."""
    for gpu in gpus.values():
        if gpu["labels"].get("UUID") == uuid:  # type: ignore[union-attr]
            return gpu
    return None
