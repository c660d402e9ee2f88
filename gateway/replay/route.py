"""The identify and route stages for a replayed request: the live `decide_request`, refusals as reasons.

The traffic names its tenant rather than presenting a key: on a gateway with
tenants an unnamed or unknown tenant is refused (401 live), and one whose
allow lists exclude the route or alias is refused (403); on an open gateway
every caller is anonymous, so routes limited to tenants never match.

The traffic carries no request headers. A request that a route matching on
headers could take (one that holds on everything but its headers and comes
before the first route that needs none) is given the route its recorded line
names, when that route is one of those it could take in the replayed policy:
the live gateway matched it with the headers it really had. Otherwise it is
matched without headers, and counted, as header-matched routes are then not
simulated for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.context import Decision
from gateway.errors import (
    AuthenticationFailed, ClientError, NoModelMeetsSla, NotFound, PermissionDenied, UnsupportedInput,
)
from gateway.policy.model import Policy, Route, Tenant
from gateway.replay.traffic import ReplayRequest
from gateway.routing.matcher import RouteIndex
from gateway.routing.needs import recorded_needs
from gateway.routing.planner import Router
from gateway.routing.predict import meets_hard_terms
from gateway.routing.request import continued_on, decide_request
from gateway.runtime import Runtime

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
#: the live refusal -> the replay's rejection reason; first match wins (all are ClientErrors but the SLA's)
REASONS: tuple[tuple[type[Exception], str], ...] = (
    (AuthenticationFailed, "unknown_tenant"), (PermissionDenied, "forbidden"), (NotFound, "no_route"),
    (NoModelMeetsSla, "sla"), (UnsupportedInput, "unsupported"), (ClientError, "context"))
#: a continuation of a response stored by a model the replayed policy lacks (live: 400 previous_response_not_found)
CONTINUATION = "continuation"
#: reasons given after a route matched: the request counts against that route's SLA
ROUTED_REASONS = frozenset({"sla", "unsupported", "context", CONTINUATION})


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the gateway would refuse before calling any model."""

    reason: str         # unknown_tenant | forbidden | no_route | sla | unsupported | context | continuation
    route: str | None = None            # the route it matched, for sla and context


class Routing:
    """Identifies the traffic's tenant and decides its route and plan with the live code path."""

    def __init__(self, policy: Policy, router: Router) -> None:
        self.policy = policy
        self.router = router
        self.runtime = Runtime.build(policy, environ={})
        self.header_routes = frozenset(r.name for r in policy.routes if r.match.headers)
        #: the policy's routes with their header conditions dropped: which routes a request could match
        self._headerless = RouteIndex(tuple(_without_headers(r) for r in policy.routes)) \
            if self.header_routes else None
        self._pinned: dict[str, Runtime] = {}
        self.by_recorded_route = 0      # header-dependent requests given the route their line recorded
        self.without_headers = 0        # header-dependent requests with no usable recorded route

    def decide(self, request: ReplayRequest) -> Decision | Refusal:
        """The decision the route stage would make, or why the request would be refused."""
        tenant, runtime = None, self.runtime
        try:
            tenant = self._tenant(request.tenant)
            runtime = self._runtime_for(request, tenant)
            decision, _ = decide_request(
                runtime, self.router, endpoint=request.endpoint, alias=request.alias, tenant=tenant,
                headers=_NO_HEADERS, prompt_tokens=request.input_tokens, max_tokens=request.output_tokens,
                stream=request.streamed, longest_prompt_tokens=request.context_tokens,
                needs=recorded_needs(request.uses))
        except (ClientError, NoModelMeetsSla) as exc:
            refused = getattr(exc, "decision", None)
            if request.recorded_answer == "cache_hit" and _cache_may_answer(refused):
                return exc.decision     # live asks the cache first: a stored answer has no speed, price or circuit
            if request.continues_on is not None and refused is not None:
                return self._continued(runtime, request, refused)   # live pins it whatever the SLA, as here
            reason = next(name for kind, name in REASONS if isinstance(exc, kind))
            return Refusal(reason, self._route_name(runtime, request, tenant) if reason in ROUTED_REASONS else None)
        if request.continues_on is not None:
            return self._continued(runtime, request, decision)
        return decision

    @staticmethod
    def _continued(runtime: Runtime, request: ReplayRequest, decision: Decision) -> Decision | Refusal:
        """A continuation of a stored response, planned as live plans it: on the model that stored it alone,
        whatever the SLA; refused when the replayed policy lacks that model (live: 400, the response not
        found)."""
        model = runtime.policy.models.get(request.continues_on)
        if model is None:
            return Refusal(CONTINUATION, decision.route.name)
        return continued_on(decision, model, f"continues a response stored by model {model.name}")

    def _runtime_for(self, request: ReplayRequest, tenant: Tenant | None) -> Runtime:
        """The runtime to match the request with: the policy's, or, for a request a header-matched route could
        take, one whose matching gives the route its line recorded (when the request could take that route)."""
        possible = self._possible_routes(request, tenant)
        if not possible or possible[0] not in self.header_routes:
            return self.runtime         # no header-matched route could take it: headers change nothing
        recorded = request.recorded_route
        if recorded not in possible:
            self.without_headers += 1
            return self.runtime
        self.by_recorded_route += 1
        if recorded not in self.header_routes:
            return self.runtime         # it matched no header route live: matching without headers agrees
        pinned = self._pinned.get(recorded)
        if pinned is None:
            route = next(r for r in self.policy.routes if r.name == recorded)
            pinned = self._pinned[recorded] = dataclasses.replace(self.runtime, routes=_RecordedRoute(route))
        return pinned

    def _possible_routes(self, request: ReplayRequest, tenant: Tenant | None) -> list[str]:
        """The routes that hold for the request but for their headers, in policy order, up to the first that
        needs no header (the one it matches without headers); empty without header-matched routes."""
        if self._headerless is None:
            return []
        possible = []
        allowed = tenant.routes if tenant is not None else ()
        for compiled in self._headerless.routes_for(request.alias):
            if allowed and compiled.route.name not in allowed:
                continue                # the live gateway matches among the routes the tenant may use
            if compiled.holds(request.endpoint, tenant.name if tenant else None, _NO_HEADERS, request.input_tokens):
                possible.append(compiled.route.name)
                if compiled.route.name not in self.header_routes:
                    break
        return possible

    def _tenant(self, name: str | None) -> Tenant | None:
        """The identify stage: None on an open gateway; AuthenticationFailed for an unknown tenant."""
        if not self.policy.tenants:
            return None
        tenant = self.policy.tenants.get(name) if name else None
        if tenant is None:
            raise AuthenticationFailed(f"no tenant named {name!r} in the policy")
        return tenant

    @staticmethod
    def _route_name(runtime: Runtime, request: ReplayRequest, tenant: Tenant | None) -> str | None:
        """The route a refused request matched."""
        route = runtime.routes.match(request.endpoint, request.alias, tenant.name if tenant else None,
                                     _NO_HEADERS, request.input_tokens, tenant.routes if tenant is not None else ())
        return route.name if route else None


def _cache_may_answer(decision: Decision | None) -> bool:
    """Whether a request no model of its route may serve (the SLA's refusal's decision) is answered from the cache
    live (`stages.route`): its route caches, and some candidate was dropped only for speed, price, energy or its
    circuit (a recorded hit was cacheable and allowed a lookup)."""
    return decision is not None and decision.route.cache.enabled and \
        any(meets_hard_terms(c) for c in decision.candidates)


class _RecordedRoute:
    """A route index that matches every request to one route: the one the traffic's gateway matched live."""

    __slots__ = ("route",)

    def __init__(self, route: Route) -> None:
        self.route = route

    def match(self, endpoint: str, alias: str, tenant: str | None, headers: Mapping[str, str],
              prompt_tokens: int, allowed: Collection[str] = ()) -> Route:
        return self.route


def _without_headers(route: Route) -> Route:
    """The route with its header conditions dropped."""
    return dataclasses.replace(route, match=dataclasses.replace(route.match, headers=()))
