"""One request's routing decision: the single code path for live requests and `policy explain`."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.context import Decision
from gateway.errors import NotFound
from gateway.policy.model import Tenant
from gateway.routing.planner import Router
from gateway.routing.tighten import Tighten, tighten_from_headers
from gateway.stages.parse import INPUT_FIELD


def decide_request(runtime, router: Router, *, endpoint: str, alias: str, tenant: Tenant | None,
                   headers: Mapping[str, str], prompt_tokens: int, max_tokens: int | None,
                   stream: bool, choices: int = 1,
                   longest_prompt_tokens: int | None = None) -> tuple[Decision, Tighten]:
    """Match the route, check the tenant may use it, and plan the models that meet its SLA (`longest_prompt_tokens`:
    a batch's longest prompt, which each model's context must hold; `prompt_tokens`, all of them, match routes by
    size and price the request)."""
    route = runtime.routes.match(endpoint, alias, tenant.name if tenant else None, headers, prompt_tokens)
    if route is None:
        raise NotFound(f"the model '{alias}' does not exist or no route serves it on {endpoint}", param="model")
    runtime.identity.check_allowed(tenant, route.name, alias)
    tighten = tighten_from_headers(headers)
    decision = router.decide(route, prompt_tokens=prompt_tokens,
                             max_tokens=0 if endpoint == "embeddings" else max_tokens,
                             stream=stream, tighten=tighten, choices=choices, input_param=INPUT_FIELD[endpoint],
                             longest_prompt_tokens=longest_prompt_tokens)
    return decision, tighten
