"""One request's routing decision: the single code path for live requests and `policy explain`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from gateway.context import Decision
from gateway.errors import NotFound
from gateway.policy.model import Model, Route, Tenant
from gateway.routing.needs import NO_NEEDS
from gateway.routing.planner import Router
from gateway.routing.tighten import Tighten, tighten_from_headers
from gateway.tenancy.identity import route_denied
from gateway.stages.parse import INPUT_FIELD


def decide_request(runtime, router: Router, *, endpoint: str, alias: str, tenant: Tenant | None,
                   headers: Mapping[str, str], prompt_tokens: int, max_tokens: int | None,
                   stream: bool, choices: int = 1, longest_prompt_tokens: int | None = None,
                   needs: Mapping[str, str] = NO_NEEDS) -> tuple[Decision, Tighten]:
    """Match the route among those the tenant may use, check it may use the alias, and plan the models that meet
    the route's SLA (`longest_prompt_tokens`: a batch's longest prompt, which each model's context must hold;
    `prompt_tokens`, all of them, match routes by size and price the request; `needs`: what it uses beyond text,
    `Router.needs_of`)."""
    route = match_route(runtime, endpoint=endpoint, alias=alias, tenant=tenant, headers=headers,
                        prompt_tokens=prompt_tokens)
    runtime.identity.check_allowed(tenant, route.name, alias)
    tighten = tighten_from_headers(headers)
    decision = router.decide(route, prompt_tokens=prompt_tokens,
                             max_tokens=0 if endpoint == "embeddings" else max_tokens,
                             stream=stream, tighten=tighten, choices=choices, input_param=INPUT_FIELD[endpoint],
                             longest_prompt_tokens=longest_prompt_tokens, needs=needs)
    return decision, tighten


def continued_on(decision: Decision, model: Model, note: str) -> Decision:
    """The plan of a request continuing a stored response: the model that stored it alone, whatever the SLA chose
    (no other has it), the SLA met when that model was a kept candidate; never re-planned (`pinned`). The route
    stage's and `gateway replay`'s."""
    kept = any(c.kept for c in decision.candidates if c.model.name == model.name)
    return replace(decision, plan=(model,), sla_met=kept, explored=False, pinned=True, note=note)


def match_route(runtime, *, endpoint: str, alias: str, tenant: Tenant | None, headers: Mapping[str, str],
                prompt_tokens: int) -> Route:
    """The first route, in policy order, that takes the request among those the tenant's allow list holds (a
    tenant allowed only a later route that also takes the alias is served by it, as GET /v1/models tells it).
    PermissionDenied (403) naming the first route that takes it when the tenant may use none that does; NotFound
    (404) when no route takes it."""
    name = tenant.name if tenant else None
    allowed = tenant.routes if tenant is not None else ()
    route = runtime.routes.match(endpoint, alias, name, headers, prompt_tokens, allowed)
    if route is not None:
        return route
    barred = runtime.routes.match(endpoint, alias, name, headers, prompt_tokens) if allowed else None
    if barred is None:
        raise NotFound(f"the model '{alias}' does not exist or no route serves it on {endpoint}", param="model")
    raise route_denied(tenant, barred.name)
