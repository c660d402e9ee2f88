"""route: match the policy route, then plan the models that meet its SLA, smallest first.

It runs before admission, so a request for a model no route serves (404) or a route its tenant may not
use (403) takes nothing from the tenant's limits; admission re-plans cheapest first when the budget says
downgrade.
"""

from __future__ import annotations

from gateway.cache.key import cache_use, is_cacheable
from gateway.context import RequestContext
from gateway.errors import ClientError, NoModelMeetsSla, StoreUnavailable
from gateway.routing.predict import meets_hard_terms
from gateway.routing.request import continued_on, decide_request
from gateway.routing.tighten import tighten_from_headers
from gateway.store_guard import STORE_DOWN

#: ctx.extra: the 503 of a request no model of its route may serve, which a stored answer still may: `Cache`
#: raises it on a miss
SLA_REFUSAL = "sla_refusal"


class Route:
    """Chooses the route and the plan of models; answers 404 for an alias no route takes."""

    def __init__(self, services) -> None:
        self.services = services

    async def handle(self, ctx: RequestContext) -> None:
        if ctx.endpoint == "responses" and ctx.policy.tenants and _references_items(ctx.body):
            # the server resolves a stored item's id for whoever names it, as it continues any stored response
            raise ClientError("input items of type item_reference are not served through this gateway: send the "
                              "item itself, or continue the response with previous_response_id",
                              param="input", code="unsupported_value")
        router = self.services.fleet.router(ctx.policy)
        with self.services.telemetry.route_span(ctx):
            try:
                ctx.decision, tighten = decide_request(
                    ctx.runtime, router, endpoint=ctx.endpoint, alias=ctx.requested_model, tenant=ctx.tenant,
                    headers=ctx.http.headers, prompt_tokens=ctx.prompt_tokens, max_tokens=ctx.max_tokens,
                    stream=ctx.stream, choices=ctx.choices, longest_prompt_tokens=ctx.longest_prompt_tokens,
                    needs=ctx.uses)
            except NoModelMeetsSla as refusal:
                continuing = _continuing(ctx) and getattr(refusal, "decision", None) is not None
                if not continuing and not _cache_may_answer(ctx, refusal):
                    raise
                # a stored answer no longer has speed, price or a circuit: the cache is asked first; a
                # continuation goes to the model that stored it, whatever the SLA (unless it is not pinned)
                ctx.decision, tighten = refusal.decision, tighten_from_headers(ctx.http.headers)
                if not continuing:
                    ctx.extra[SLA_REFUSAL] = refusal
                elif not await self._continue(ctx, ctx.body["previous_response_id"]):
                    raise
            else:
                if _continuing(ctx):
                    await self._continue(ctx, ctx.body["previous_response_id"])
            ctx.sla_tightened = tighten.as_dict()     # inside: the span records the limits the request asked for
        return None

    async def _continue(self, ctx: RequestContext, previous: str) -> bool:
        """A request continuing a stored response (`previous_response_id`) goes to the model that stored it,
        whatever the SLA chose: no other server has it (`gateway.routing.pins`). With tenants, a response the
        gateway did not relay to the request's tenant is not found (400, as the provider answers an unknown
        id): every tenant's calls reach the server with the gateway's key, which would continue anyone's. An
        open gateway routes such a request as any other. Its store down, `store.on_store_failure` decides."""
        model_name = await self.services.stores.pins.model_for(ctx.tenant_name, previous)
        if model_name is STORE_DOWN:
            if ctx.policy.store.on_store_failure == "deny":
                raise StoreUnavailable("the store of stored responses cannot be reached, and store.on_store_failure "
                                       "is deny; send the request again shortly")
            return False                    # allow: routed as any other request, its tenant not checked
        if model_name is None:
            if ctx.policy.tenants:
                raise ClientError(f"Previous response with id '{previous}' not found.",
                                  param="previous_response_id", code="previous_response_not_found")
            return False
        model = ctx.policy.models.get(model_name)
        if model is None:
            raise ClientError(f"Previous response with id '{previous}' was stored by model '{model_name}', which "
                              "the gateway's policy no longer has: send the conversation's input again instead",
                              param="previous_response_id", code="previous_response_not_found")
        ctx.decision = continued_on(ctx.decision, model, f"continues response {previous}, stored by model {model_name}")
        return True

    async def finish(self, ctx: RequestContext) -> None:
        return None


def _references_items(body: dict) -> bool:
    """The Responses API request's input names a stored item by its id (`item_reference`)."""
    given = body.get("input")
    return isinstance(given, list) and any(isinstance(item, dict) and item.get("type") == "item_reference"
                                           for item in given)


def _continuing(ctx: RequestContext) -> bool:
    """A Responses API request continuing a stored response (`previous_response_id`)."""
    return ctx.endpoint == "responses" and ctx.body.get("previous_response_id") is not None


def _cache_may_answer(ctx: RequestContext, refusal: NoModelMeetsSla) -> bool:
    """Whether a request refused because no model meets its route's SLA may still be answered from the cache: its
    route caches it, it allows a lookup, and some candidate was dropped only for speed, price, energy or its
    circuit (an answer it stored may serve the request)."""
    decision = getattr(refusal, "decision", None)
    if decision is None or not cache_use(ctx.http.headers, ctx.body)[0]:
        return False            # no lookup will be made (no-cache, or a completion the provider is asked to keep)
    return is_cacheable(ctx.body, decision.route.cache, endpoint=ctx.endpoint) and \
        any(meets_hard_terms(c) for c in decision.candidates)
