"""Settings a policy may hold that take no effect as written, or one it likely does not mean: said by `policy
check` and at start-up and reload.

They are valid (a policy with them loads), so they are advice, not problems.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from gateway.policy.model import DEFAULT_PRIORITY, ENDPOINTS, Match, Policy, Route, Tenant
from gateway.telemetry.labels import OTHER


def advice(policy: Policy) -> list[str]:
    """One line per setting that does nothing as the rest of the policy stands, or orders routing unlike what it
    likely means (a candidate without size_b tried first)."""
    notes = []
    prioritised = sorted(name for name, tenant in policy.tenants.items() if tenant.priority != DEFAULT_PRIORITY)
    if prioritised and policy.routing.queue_timeout_ms <= 0:
        notes.append(f"tenants.{{{', '.join(prioritised)}}}.priority: set, but routing.queue_timeout_ms is 0: "
                     f"priority orders only calls waiting for a model's call slot, so it has no effect")
    for name, model in policy.models.items():
        if model.gpu_hour_usd is not None and model.gpus is not None and not model.gpus.ids:
            notes.append(f"models.{name}.gpu_hour_usd: charged for one GPU, as its gpus names no ids (GPU time is "
                         f"priced per GPU gpus.ids names; sampling reads them all): list its GPUs in gpus.ids to "
                         f"charge each")
    notes.extend(_shadowed(policy.routes, policy.tenants.values()))
    if OTHER in policy.tenants:
        notes.append(f"tenants.{OTHER}: its metric label is the one the tenants past telemetry.tenant_label_top_n "
                     f"share, so its series mix with theirs: name it otherwise")
    for route in policy.routes:
        if route.cache.enabled and set(route.match.endpoints) == {"responses"}:
            notes.append(f"routes.{route.name}.cache: the Responses API is never cached (a response is stored by "
                         f"its server under its own id), so it has no effect")
        if route.sla.max_energy_j is not None and set(route.match.endpoints) == {"embeddings"}:
            notes.append(f"routes.{route.name}.sla.max_energy_j: embeddings have no output tokens to scale an "
                         f"energy prediction, so it is not applied")
        size_less = [name for name in route.candidates if not policy.models[name].size_b]
        if size_less and len(size_less) < len(route.candidates):
            notes.append(_size_less_first(route.name, size_less,
                                          [name for name in route.candidates if name not in size_less]))
        notes.extend(_unservable(policy, route))
        served = any(policy.models[name].tier >= route.sla.min_tier for name in (*route.candidates, *route.fallback))
        for key in ("candidates", "fallback"):     # (none served: _unservable said every request is refused)
            below = [name for name in getattr(route, key) if policy.models[name].tier < route.sla.min_tier]
            if below and served:
                notes.append(f"routes.{route.name}.{key}: {', '.join(below)} below sla.min_tier "
                             f"{route.sla.min_tier}: never planned (the tier is a hard term, for fallbacks too)")
    return notes


def _size_less_first(route_name: str, size_less: list[str], sized: list[str]) -> str:
    """The note for a route whose candidates mix models with and without a size: those without sort first."""
    has, they_are = ("has", "it is") if len(size_less) == 1 else ("have", "they are")
    return (f"routes.{route_name}.candidates: {', '.join(size_less)} {has} size_b 0 (the default when none is set), "
            f"so {they_are} tried before {', '.join(sized)}: the router picks the smallest candidate that meets the "
            f"SLA; give every candidate its size_b")


def _unservable(policy: Policy, route) -> list[str]:
    """Notes for a route no model of it can serve: its min_tier above every candidate's and fallback's tier, or
    its smallest matched prompt larger than every one's context window (each request matched is refused, but for a
    batch of prompts that each fit)."""
    named = [policy.models[name] for name in (*route.candidates, *route.fallback)]
    notes = []
    top_tier = max(model.tier for model in named)
    if route.sla.min_tier > top_tier:
        notes.append(f"routes.{route.name}.sla.min_tier: {route.sla.min_tier}, but its candidates and fallbacks reach "
                     f"tier {top_tier} at most: every request on it is refused (503 sla_unmet)")
    widest = max(model.context_window for model in named)
    smallest = route.match.prompt_tokens_min
    if smallest is not None and smallest >= widest:      # a request also needs room for one token of answer
        # a completions batch or an embeddings list is priced at all its prompts but read prompt by prompt
        batches = not route.match.endpoints or not set(route.match.endpoints) <= {"chat"}
        fits = "only a batch of prompts (inputs) that each fit is served" if batches else "no request it matches fits"
        notes.append(f"routes.{route.name}.match.prompt_tokens.min: {smallest}, but the largest context window of its "
                     f"candidates and fallbacks is {widest}: {fits}")
    return notes


def _shadowed(routes: tuple[Route, ...], tenants: Iterable[Tenant]) -> list[str]:
    """Notes for routes that never get a request: an earlier route takes every request they match (first wins),
    and every tenant that may use them may use it (a tenant whose allow list holds the later route and not the
    earlier one is matched to the later)."""
    lists = [frozenset(tenant.routes) for tenant in tenants if tenant.routes]
    notes = []
    for index, route in enumerate(routes):
        earlier = next((before for before in routes[:index] if _covers(before.match, route.match)
                        and not any(route.name in allowed and before.name not in allowed for allowed in lists)), None)
        if earlier is not None:
            notes.append(f"routes.{route.name}.match: never matched: route '{earlier.name}' before it takes every "
                         f"request it matches (the first route whose match holds wins)")
    return notes


def _covers(wide: Match, narrow: Match) -> bool:
    """Whether every request `narrow` matches is matched by `wide` (judged on what is written; may miss some)."""
    def alias_covered(alias: str) -> bool:
        return not wide.models or any(pattern == "*" or pattern == alias or (not any(c in alias for c in "*?[")
                                                          and fnmatchcase(alias, pattern)) for pattern in wide.models)
    low, high = narrow.prompt_tokens_min, narrow.prompt_tokens_max
    # an empty tuple matches anything (Match): every alias, every endpoint
    return (all(alias_covered(alias) for alias in narrow.models or ("*",))
            and set(narrow.endpoints or ENDPOINTS) <= set(wide.endpoints or ENDPOINTS)
            and (not wide.tenants or (bool(narrow.tenants) and set(narrow.tenants) <= set(wide.tenants)))
            and set(wide.headers) <= set(narrow.headers)
            and (wide.prompt_tokens_min is None or (low is not None and low >= wide.prompt_tokens_min))
            and (wide.prompt_tokens_max is None or (high is not None and high <= wide.prompt_tokens_max)))
