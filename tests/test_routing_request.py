"""One request's routing decision (`decide_request`): the route its tenant, headers and endpoint reach, the
tenant's allow list, the tightening headers, and what the planner is told of the request."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from gateway.errors import ClientError, NoModelMeetsSla, NotFound, PermissionDenied
from gateway.policy.model import Match, Policy, Route, Sla, Tenant
from gateway.routing.breaker import Breakers
from gateway.routing.estimates import LatencyEstimates
from gateway.routing.planner import Router
from gateway.routing.request import decide_request
from gateway.runtime import Runtime
from tests.test_routing_planner import models, plan_names

ROUTES = (
    Route(name="vip", match=Match(tenants=("vip",)), candidates=("large",)),
    Route(name="chat", match=Match(models=("auto",), endpoints=("chat", "completions")),
          candidates=("small", "medium", "large"), sla=Sla(p95_latency_ms=6000, p95_ttft_ms=100)),
    Route(name="capped", match=Match(models=("capped",)), candidates=("small",),
          sla=Sla(max_cost_usd=Decimal("0.0002"), on_violation="reject")),
    Route(name="embed", match=Match(models=("emb",), endpoints=("embeddings",)), candidates=("small",),
          sla=Sla(p95_latency_ms=50)),
    Route(name="chat-lite", match=Match(models=("auto",), endpoints=("chat",)), candidates=("small",)),
)
TENANTS = {"vip": Tenant(name="vip"), "team": Tenant(name="team"),
           "embedder": Tenant(name="embedder", routes=("embed",)),
           "lite": Tenant(name="lite", routes=("chat-lite", "embed"))}


@pytest.fixture()
def routing() -> tuple[Runtime, Router]:
    """The runtime and router of a policy with a tenant's own route, a chat route, a capped one and embeddings."""
    policy = Policy(version=1, models=models(), routes=ROUTES, tenants=TENANTS)
    estimates = LatencyEstimates.from_policy(policy)
    return Runtime.build(policy, {}), Router(policy, estimates, Breakers(policy.routing.breaker), random.Random(1))


def decide(routing, *, endpoint: str = "chat", alias: str = "auto", tenant: str | None = "team",
           headers: dict[str, str] | None = None, prompt_tokens: int = 100, max_tokens: int | None = 10,
           stream: bool = False, choices: int = 1):
    """(decision, tighten) for one request, as the route stage and `policy explain` make it."""
    runtime, router = routing
    return decide_request(runtime, router, endpoint=endpoint, alias=alias,
                          tenant=runtime.policy.tenants[tenant] if tenant else None, headers=headers or {},
                          prompt_tokens=prompt_tokens, max_tokens=max_tokens, stream=stream, choices=choices)


def test_the_tenant_reaches_its_own_route(routing):
    """The `vip` tenant's request takes the route that names it; another tenant's the alias's route."""
    assert decide(routing, tenant="vip")[0].route.name == "vip"
    assert decide(routing, tenant="team")[0].route.name == "chat"


def test_a_tenant_outside_the_routes_allow_list_is_refused(routing):
    """A tenant allowed only the embeddings route gets a 403 for a chat request, though a route takes it."""
    with pytest.raises(PermissionDenied) as caught:
        decide(routing, tenant="embedder")
    assert caught.value.status == 403


def test_a_tenant_is_matched_to_the_first_route_its_allow_list_holds(routing):
    """Routes are matched among those the tenant may use: `lite`, allowed `chat-lite` and not `chat` (which comes
    first and takes `auto` too), is served by `chat-lite`, as GET /v1/models, which lists `auto` to it, promises;
    a tenant without an allow list still gets the first route that takes the request."""
    assert decide(routing, tenant="lite")[0].route.name == "chat-lite"
    assert decide(routing, tenant="team")[0].route.name == "chat"
    runtime, _ = routing
    runtime.identity.check_allowed(runtime.policy.tenants["lite"], alias="auto")    # listed to it: no refusal


def test_a_refusal_for_the_allow_list_names_the_first_route_that_takes_the_request(routing):
    """No route the tenant may use takes the request, but one it may not does: 403 naming that route (not 404:
    the model exists)."""
    with pytest.raises(PermissionDenied) as caught:
        decide(routing, tenant="lite", alias="capped")
    assert caught.value.message == "Tenant 'lite' may not use route 'capped'."


def test_an_alias_no_route_serves_is_a_404_naming_the_model(routing):
    """A request for an alias no route takes on its endpoint is a 404 blaming `model`."""
    with pytest.raises(NotFound) as caught:
        decide(routing, endpoint="embeddings", alias="auto")
    assert caught.value.param == "model"
    assert caught.value.message == "the model 'auto' does not exist or no route serves it on embeddings"


def test_an_embeddings_request_is_planned_for_no_output(routing):
    """An embeddings request writes nothing: it is predicted at `small`'s 40 ms wait and meets a 50 ms SLA."""
    decision, _ = decide(routing, endpoint="embeddings", alias="emb", max_tokens=None)
    assert decision.output_tokens == 0 and decision.sla_met
    assert decision.candidates[0].predicted_latency_ms == pytest.approx(40)


@pytest.mark.parametrize("endpoint, alias, field", [("chat", "auto", "messages"), ("completions", "auto", "prompt"),
                                                    ("embeddings", "emb", "input")])
def test_a_prompt_too_long_for_every_model_blames_the_endpoints_input_field(routing, endpoint, alias, field):
    """The 400 for a prompt no window holds names the field the request's endpoint keeps its prompt in."""
    with pytest.raises(ClientError) as caught:
        decide(routing, endpoint=endpoint, alias=alias, prompt_tokens=200_000)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", field)


def test_the_requests_choices_are_priced(routing):
    """n 5 prices five answers: one 500-token answer fits the $0.0002 ceiling, five do not."""
    assert plan_names(decide(routing, alias="capped", max_tokens=500)[0]) == ["small"]
    with pytest.raises(NoModelMeetsSla, match="max_cost_usd 0.0002: small: cost"):
        decide(routing, alias="capped", max_tokens=500, choices=5)


def test_a_stream_is_held_to_the_ttft_limit(routing):
    """The request's `stream` reaches the planner: a stream drops `large` for its 200 ms first token."""
    assert plan_names(decide(routing, stream=False)[0]) == ["small", "medium", "large"]
    assert plan_names(decide(routing, stream=True)[0]) == ["small", "medium"]


def test_tightening_headers_are_applied_and_returned(routing):
    """x-gateway-min-tier 3 plans only `large`, and the ask is handed back for the request's record."""
    decision, tighten = decide(routing, headers={"x-gateway-min-tier": "3"})
    assert plan_names(decision) == ["large"]
    assert tighten.as_dict() == {"min_tier": 3.0}
