"""GPUs on model-server hosts, read from the DCGM exporter's Prometheus endpoint.

The exporter (NVIDIA/dcgm-exporter) serves one series per GPU and field,
labelled `gpu`, `UUID`, `device`, `modelName`, `Hostname`, ... . Its values
are refreshed every collect interval (`-c`, 30 s by default): set it near the
gateway's `energy.sample_interval_s` so energy deltas land in the right
interval. A GPU in MIG mode has no whole-GPU series: each device field comes
once per GPU instance (`GPU_I_ID` label), so its energy, power and
utilization are read from one instance's series (they are the physical GPU's)
and its memory is summed over the instances; a GPU with whole-GPU series uses
only those. Lines of fields not used here are not parsed (an exporter prints
`ERROR - FAILED TO CONVERT TO STRING` for some), and DCGM's blank values
(no value: 2**47 and above for a gauge, int64 blank for the counter) are read
as absent, like NaN and negative values. A failed scrape, or one that finds no GPU, gives failed
readings; nothing raises out of `read`.
"""

from __future__ import annotations

import asyncio
import math
import re
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
#: per GPU instance in MIG mode: summed over the instances for the whole GPU
MEMORY_FIELDS = frozenset({FB_USED, FB_FREE, FB_RESERVED})
#: DCGM's "no value" markers (dcgm_structs.h): DCGM_FP64_BLANK, and DCGM_INT64_BLANK for the int64 counter
FP64_BLANK = 140737488355328.0
INT64_BLANK = 0x7FFFFFFFFFFFFFF0
#: the metric name a line is about: a sample's, or the one a `# HELP` / `# TYPE` comment describes
_LINE_METRIC = re.compile(r"^(?:#\s*(?:HELP|TYPE)\s+)?([a-zA-Z_:][a-zA-Z0-9_:]*)(?=[\s{]|$)")


def parse_exporter_text(text: str, hostname: str | None) -> dict[str, dict[str, object]]:
    """Per `gpu` label: the fields we use and the GPU's labels; ValueError on malformed text. Text of several
    hosts with no `hostname` to pick one: a label that more than one host lists has no fields, only `hosts` and
    `each` (its GPUs, one per host, still found by UUID), so no GPU is read as another host's."""
    gpus: dict[tuple[str | None, str], dict[str, object]] = {}          # per (Hostname, gpu)
    instances: dict[tuple[str | None, str], dict[str, object]] = {}     # GPUs in MIG mode: their instances' series
    # match on the family name: the parser renames a counter's sample to `<name>_total`
    for family in text_string_to_metric_families(_used_lines(text)):
        if family.name not in FIELDS:
            continue
        for sample in family.samples:
            labels = sample.labels
            if "gpu" not in labels or (hostname is not None and labels.get("Hostname") != hostname):
                continue
            mig = "GPU_I_ID" in labels
            gpu = (instances if mig else gpus).setdefault((labels.get("Hostname"), labels["gpu"]), {"labels": labels})
            value = _value(family.name, sample.value)
            if value is None:
                continue
            if mig and family.name in MEMORY_FIELDS:
                gpu[family.name] = gpu.get(family.name, 0.0) + value
            else:
                gpu.setdefault(family.name, value)
    for key, gpu in instances.items():
        gpus.setdefault(key, gpu)
    by_label: dict[str, list[dict[str, object]]] = {}
    for (_host, gpu_id), gpu in gpus.items():
        by_label.setdefault(gpu_id, []).append(gpu)
    return {gpu_id: each[0] if len(each) == 1 else
            {"labels": {"gpu": gpu_id}, "hosts": [g["labels"].get("Hostname") for g in each], "each": each}
            for gpu_id, each in by_label.items()}


def _used_lines(text: str) -> str:
    """The text without the lines of fields not used here; lines that name no metric stay (and fail to parse)."""
    kept = []
    for line in text.splitlines():
        metric = _LINE_METRIC.match(line)
        if metric is None or metric[1] in FIELDS:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _value(field: str, value: float) -> float | None:
    """A sample's value, or None for NaN, Inf, DCGM's blank markers (a field the GPU cannot read) and a negative
    value (no field used here can be below 0: a broken exporter's, read as absent rather than booked)."""
    if not math.isfinite(value) or value < 0 or value >= (INT64_BLANK if field == ENERGY else FP64_BLANK):
        return None
    return value


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
        # every GPU (no ids named): those listed now and those listed before, so that one gone from the text (off
        # the bus, or the exporter lost it) is a failed reading, not a pool that quietly shrank
        ids = self.gpu_ids or tuple(sorted(set(gpus) | set(self._seen_ids), key=lambda gpu: (len(gpu), gpu)))
        if not gpus and not self.gpu_ids:
            return self._failed(f"no GPU in the DCGM exporter output at {self.url}{self._where()}")
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
            return self._failed_one(gpu_id, now_s, f"GPU {gpu_id} not in the DCGM exporter output{self._where()}")
        if "hosts" in gpu:
            hosts = ", ".join(sorted(str(host) for host in gpu["hosts"]))
            return self._failed_one(gpu_id, now_s, f"GPU {gpu_id} is listed by several hosts ({hosts}) at {self.url}: "
                                                   f"set gpus.hostname to the one to measure, or name GPUs by UUID")
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

    def _where(self) -> str:
        return f" for Hostname {self.hostname!r}" if self.hostname else ""

    def _failed(self, error: str) -> list[GpuReading]:
        now_s = self._clock()
        return [self._failed_one(gpu_id, now_s, error) for gpu_id in self.gpu_ids or self._seen_ids or ("*",)]

    def _failed_one(self, gpu_id: str, now_s: float, error: str) -> GpuReading:
        return GpuReading(gpu_id=gpu_id, timestamp_s=now_s, source=self.source,
                          host=self.hostname, error=error)


def _by_uuid(gpus: dict[str, dict[str, object]], uuid: str) -> dict[str, object] | None:
    """The GPU whose `UUID` label is `uuid`, when the policy names GPUs by UUID."""
    for listed in gpus.values():
        for gpu in listed.get("each", (listed,)):     # type: ignore[union-attr]
            if gpu["labels"].get("UUID") == uuid:  # type: ignore[index]
                return gpu                          # type: ignore[return-value]
    return None
