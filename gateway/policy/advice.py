"""Settings a policy may hold that take no effect as written: said by `policy check` and at start-up and reload.

They are valid (a policy with them loads), so they are advice, not problems.
"""

from __future__ import annotations

from gateway.policy.model import DEFAULT_PRIORITY, Policy


def advice(policy: Policy) -> list[str]:
    """One line per setting that does nothing as the rest of the policy stands."""
    notes = []
    prioritised = sorted(name for name, tenant in policy.tenants.items() if tenant.priority != DEFAULT_PRIORITY)
    if prioritised and policy.routing.queue_timeout_ms <= 0:
        notes.append(f"tenants.{{{', '.join(prioritised)}}}.priority: set, but routing.queue_timeout_ms is 0: "
                     f"priority orders only calls waiting for a model's call slot, so it has no effect")
    for route in policy.routes:
        if route.sla.max_energy_j is not None and set(route.match.endpoints) == {"embeddings"}:
            notes.append(f"routes.{route.name}.sla.max_energy_j: embeddings have no output tokens to scale an "
                         f"energy prediction, so it is not applied")
        below = [name for name in route.fallback if policy.models[name].tier < route.sla.min_tier]
        if below:
            notes.append(f"routes.{route.name}.fallback: {', '.join(below)} below sla.min_tier {route.sla.min_tier}: "
                         f"never planned (the tier is a hard term, for fallbacks too)")
    return notes
