"""The parts of test policies that many tests share: simulated models, tenants and their usual values.

Each function returns text for a Harness policy template, where `{small}` stands for the URL
of the simulator named small and the YAML's own braces are doubled for `str.format`. A test
joins these parts with the routes, limits and sections it is about, written out as YAML.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.tenancy.identity import sha256_hex


def price(input_per_mtok: float, output_per_mtok: float) -> dict[str, float]:
    """A model's `price`, in USD per million tokens."""
    return {"input_per_mtok": input_per_mtok, "output_per_mtok": output_per_mtok}


def latency(ttft_ms: float, tpot_ms: float) -> dict[str, float]:
    """A model's `latency_prior`."""
    return {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms}


def short_timeouts(first_byte_s: float = 2, total_s: float = 10) -> dict[str, float]:
    """Upstream `timeouts` short enough that a failing model costs a test seconds, not minutes."""
    return {"connect_s": 1, "first_byte_s": first_byte_s, "total_s": total_s}


#: the three simulated models of the default policy: name -> their fields, timeouts left to each test
STANDARD_MODELS = {
    "small": dict(size_b=1, tier=1, context_window=8192, price=price(0.10, 0.20), latency_prior=latency(5, 1)),
    "medium": dict(size_b=8, tier=2, context_window=32768, price=price(1.00, 2.00), latency_prior=latency(10, 2)),
    "large": dict(size_b=70, tier=3, context_window=131072, price=price(5.00, 15.00), latency_prior=latency(20, 3)),
}


#: two routes of the default policy: `smart` to medium or large (tier 2 and up), embeddings to small
SMART_AND_EMBEDDINGS_ROUTES = """
  - name: chat-smart
    match: {{models: ["smart"], endpoints: [chat]}}
    candidates: [medium, large]
    sla: {{min_tier: 2}}
  - name: embeddings
    match: {{models: ["text-embedding-3-small"], endpoints: [embeddings]}}
    candidates: [small]
"""


#: a `server:` section for tests that stop Redis: charges the stopped store did not take are retried until the
#: gateway's grace period ends at exit, so such a gateway stops in 1 s rather than the default 15
QUICK_STOP = "server: {{grace_period_s: 1}}\n"


def models(*entries: str) -> str:
    """The head of a policy: `version: 1`, then a `models:` section of `entries`."""
    return "version: 1\nmodels:\n" + "".join(entries)


def model(name: str, sim: str | None = None, **fields: object) -> str:
    """One entry under `models:`, served by simulator `sim` (default: `name`) as upstream model `sim-{name}`.

    Fields are written in the order given; a field given as None is left out.
    """
    fields = {"endpoint": "{%s}" % (sim or name), "upstream_model": f"sim-{name}", **fields}
    lines = [f"    {key}: {flow(value)}\n" for key, value in fields.items() if value is not None]
    return f"  {name}:\n" + "".join(lines)


def standard_model(name: str, **changes: object) -> str:
    """One of STANDARD_MODELS, with `changes` to its fields (None leaves a field out)."""
    return model(name, **{**STANDARD_MODELS[name], **changes})


def standard_models(*names: str) -> str:
    """The head of a policy of the standard models named (all three when none is), with `short_timeouts`."""
    return models(*(standard_model(name, timeouts=short_timeouts()) for name in names or STANDARD_MODELS))


def tenants(keys: Mapping[str, str]) -> str:
    """A `tenants:` section of tenant name -> API key (the policy holds the key's SHA-256), nothing more."""
    entries = (f'  {name}: {{{{keys_sha256: ["{sha256_hex(key)}"]}}}}\n' for name, key in keys.items())
    return "tenants:\n" + "".join(entries)


def flow(value: object) -> str:
    """A value in YAML flow style, braces doubled for the template; a string is written as it is."""
    if isinstance(value, Mapping):
        return "{{" + ", ".join(f"{key}: {flow(item)}" for key, item in value.items()) + "}}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(flow(item) for item in value) + "]"
    return str(value)

