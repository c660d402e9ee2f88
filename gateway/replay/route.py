"""The identify and route stages for a replayed request: the live `decide_request`, refusals as reasons.

The traffic names its tenant rather than presenting a key: on a gateway with
tenants an unnamed or unknown tenant is refused (401 live), and one whose
allow lists exclude the route or alias is refused (403); on an open gateway
every caller is anonymous, so routes limited to tenants never match.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.context import Decision
from gateway.errors import AuthenticationFailed, ClientError, NoModelMeetsSla, NotFound, PermissionDenied
from gateway.policy.model import Policy, Tenant
from gateway.replay.traffic import ReplayRequest
from gateway.routing.planner import Router
from gateway.routing.request import decide_request
from gateway.runtime import Runtime

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
#: the live refusal -> the replay's rejection reason; first match wins (all are ClientErrors but the SLA's)
REASONS: tuple[tuple[type[Exception], str], ...] = (
    (AuthenticationFailed, "unknown_tenant"), (PermissionDenied, "forbidden"), (NotFound, "no_route"),
    (NoModelMeetsSla, "sla"), (ClientError, "context"))
#: reasons given after a route matched: the request counts against that route's SLA
ROUTED_REASONS = frozenset({"sla", "context"})


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the gateway would refuse before calling any model."""

    reason: str                         # unknown_tenant | forbidden | no_route | sla | context
    route: str | None = None            # the route it matched, for sla and context


class Routing:
    """Identifies the traffic's tenant and decides its route and plan with the live code path."""

    def __init__(self, policy: Policy, router: Router) -> None:
        self.policy = policy
        self.router = router
        self.runtime = Runtime.build(policy, environ={})

    def decide(self, request: ReplayRequest) -> Decision | Refusal:
        """The decision the route stage would make, or why the request would be refused."""
        tenant = None
        try:
            tenant = self._tenant(request.tenant)
            decision, _ = decide_request(
                self.runtime, self.router, endpoint=request.endpoint, alias=request.alias, tenant=tenant,
                headers=_NO_HEADERS, prompt_tokens=request.input_tokens, max_tokens=request.output_tokens,
                stream=request.streamed)
        except (ClientError, NoModelMeetsSla) as exc:
            reason = next(name for kind, name in REASONS if isinstance(exc, kind))
            return Refusal(reason, self._route_name(request, tenant) if reason in ROUTED_REASONS else None)
        return decision

    def _tenant(self, name: str | None) -> Tenant | None:
        """The identify stage: None on an open gateway; AuthenticationFailed for an unknown tenant."""
        if not self.policy.tenants:
            return None
        tenant = self.policy.tenants.get(name) if name else None
        if tenant is None:
            raise AuthenticationFailed(f"no tenant named {name!r} in the policy")
        return tenant

    def _route_name(self, request: ReplayRequest, tenant: Tenant | None) -> str | None:
        """The route a refused request matched."""
        route = self.runtime.routes.match(request.endpoint, request.alias, tenant.name if tenant else None,
                                          _NO_HEADERS, request.input_tokens)
        return route.name if route else None
