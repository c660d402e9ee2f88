"""Which models share GPUs: models that name the same GPUs are measured once, and booked together.

Several models are often served from one GPU (a base model and its LoRA
adapters, two small models in one vLLM). Each physical GPU must be read and
booked once, or its energy would be counted once per model. So models whose
`gpus:` name the same GPUs form one pool, labelled by their names joined with
"+": the pool is sampled once, and its energy above idle is split among the
requests of all its models. A pool is known by its models' names (a tuple, so
no model's name can stand for another pool); its label in metrics and tables
is a model's name, or its models' names joined by "+", quoted when that joined
name is taken ('"a"+"b"' beside a model named "a+b"). GPUs are the same when the source, the DCGM
exporter's URL and hostname, and the list of ids (in any order) are; models
whose lists only partly overlap (or where one names every GPU of the host and
another some of them), or that give the same GPUs two idle powers, are a
policy error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.policy.model import GpuSource

#: the separator of a pool's label: "small+small-lora"
JOIN = "+"


def _host(gpus: GpuSource) -> tuple[str, str, str]:
    return gpus.source, gpus.url or "", gpus.hostname or ""


def pools(sources: Mapping[str, GpuSource]) -> dict[tuple[str, ...], GpuSource]:
    """Each pool's models, in policy order -> the GPUs they share."""
    grouped: dict[tuple, list[str]] = {}
    for model, gpus in sources.items():
        grouped.setdefault((_host(gpus), frozenset(gpus.ids)), []).append(model)
    return {tuple(models): sources[models[0]] for models in grouped.values()}


def labels(pool_models: Iterable[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """A label per pool, no two alike and none another pool's model: a lone model's name, else the names
    joined by "+", each quoted when that is taken, numbered ("#2") in the unlikely case that is taken too."""
    pool_models = list(pool_models)
    named = {models: models[0] for models in pool_models if len(models) == 1}
    taken = {model for models in pool_models for model in models}
    for models in pool_models:
        if len(models) == 1:
            continue
        label = JOIN.join(models)
        if label in taken:
            label = JOIN.join(json.dumps(model, ensure_ascii=False) for model in models)
        base, n = label, 1
        while label in taken:
            n += 1
            label = f"{base}#{n}"
        named[models] = label
        taken.add(label)
    return named


def sharing_problem(sources: Mapping[str, GpuSource]) -> str | None:
    """Why these models' GPUs cannot be pooled, or None when every two name the same GPUs or none in common."""
    seen: list[tuple[str, GpuSource]] = []
    for model, gpus in sources.items():
        for other, other_gpus in seen:
            if _host(gpus) != _host(other_gpus):
                continue
            ids, other_ids = frozenset(gpus.ids), frozenset(other_gpus.ids)
            if ids == other_ids:
                if gpus.idle_w != other_gpus.idle_w:
                    return (f"models '{other}' and '{model}' name the same GPUs with different idle_w "
                            f"({other_gpus.idle_w} and {gpus.idle_w})")
            elif not ids or not other_ids or ids & other_ids:
                return (f"models '{other}' and '{model}' share some of their GPUs ({_named(other_ids)} and "
                        f"{_named(ids)}): models on shared GPUs must name the same ones, so each GPU is "
                        f"measured once")
        seen.append((model, gpus))
    return None


def _named(ids: frozenset[str]) -> str:
    return "ids " + ", ".join(sorted(ids)) if ids else "every GPU"
