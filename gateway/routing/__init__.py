"""SLA routing: match a route, predict each candidate, plan the smallest model that meets the SLA."""

from gateway.routing.breaker import Breakers
from gateway.routing.estimates import LatencyEstimates
from gateway.routing.explain import format_decision
from gateway.routing.matcher import RouteIndex
from gateway.routing.planner import Router
from gateway.routing.tighten import NO_TIGHTEN, Tighten, tighten_from_headers

__all__ = ["NO_TIGHTEN", "Breakers", "LatencyEstimates", "RouteIndex", "Router", "Tighten",
           "format_decision", "tighten_from_headers"]
