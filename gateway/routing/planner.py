"""The SLA planner: the smallest model that meets the route's SLA, then the fallback chain.

`Router.decide` predicts every candidate (see `predict`), keeps those that fit
the context window, take what the request uses beyond text (images, audio,
files, tools: a model's `supports`, see `needs`), meet the tier, latency, TTFT (streams only), cost and
energy limits and whose circuit is not open, and plans: the smallest kept (by
size_b, then the request's predicted cost: tokens at both prices and any GPU
share), or with probability `explore_share` another kept one or one dropped
only for its predicted latency, TTFT or energy (so a model that was slow is
tried again and can win its traffic back before its slow samples leave the
window; such a request is marked as not meeting the SLA); then the other kept
ones, in the same order; then the route's fallbacks that fit the context, take
what the request uses, meet the tier and whose circuit is not open; at most
`max_attempts` models.

When nothing is kept the route's `on_violation` decides: `best_effort` plans
the candidates that fit context, uses and tier by predicted latency, then the
fallbacks (when every circuit is open, they are planned anyway so a request
is attempted); `reject` raises NoModelMeetsSla naming the unmet terms.
A request that fits no model's context window, or uses what no model of the
route takes, is a ClientError (400).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal

from gateway.context import Candidate, Decision
from gateway.errors import ClientError, NoModelMeetsSla, PolicyError, PolicyProblem, UnsupportedInput
from gateway.policy.model import Model, Policy, Route
from gateway.routing.breaker import Breakers
from gateway.routing.estimates import LatencyEstimates
from gateway.routing.matcher import RouteIndex
from gateway.routing.needs import FEATURES, NO_NEEDS, lacking
from gateway.routing.predict import Limits, PricedModel, fits, judge, meets_hard_terms, reason_kind
from gateway.routing.tighten import Tighten


class _RoutePlan:
    """A route's candidates (smallest first), fallbacks and limits, resolved once."""

    __slots__ = ("candidates", "fallbacks", "limits")

    def __init__(self, candidates: list[PricedModel], fallbacks: list[PricedModel], limits: Limits) -> None:
        self.candidates = tuple(sorted(candidates, key=lambda p: p.choice_key))
        self.fallbacks = tuple(fallbacks)
        self.limits = limits


class Router:
    """Matches requests to routes and decides which models serve them."""

    def __init__(self, policy: Policy, estimates: LatencyEstimates, breakers: Breakers,
                 rng: random.Random) -> None:
        self.policy = policy
        self.estimates = estimates
        self.breakers = breakers
        self._rng = rng
        self._explore_share = policy.routing.explore_share
        self._max_attempts = max(1, policy.routing.max_attempts)
        self.index = RouteIndex(policy.routes, policy.source)
        estimates.include(policy.models)
        priced = {name: PricedModel(model) for name, model in policy.models.items()}
        self._plans = {route.name: self._resolve(i, route, priced) for i, route in enumerate(policy.routes)}

    def _resolve(self, order: int, route: Route, priced: dict[str, PricedModel]) -> _RoutePlan:
        """A route's model names resolved to priced models; unknown names are a PolicyError."""
        problems = [PolicyProblem(self.policy.source, None, f"routes[{order}].{key}", f"unknown model {name!r}")
                    for key in ("candidates", "fallback")
                    for name in getattr(route, key) if name not in priced]
        if problems:
            raise PolicyError(problems)
        return _RoutePlan([priced[n] for n in route.candidates], [priced[n] for n in route.fallback],
                          Limits.of(route.sla))

    def match(self, endpoint: str, alias: str, tenant: str | None, headers: Mapping[str, str],
              prompt_tokens: int) -> Route | None:
        """The first route, in policy order, that takes the request."""
        return self.index.match(endpoint, alias, tenant, headers, prompt_tokens)

    def decide(self, route: Route, *, prompt_tokens: int, max_tokens: int | None, stream: bool,
               tighten: Tighten | None = None, choices: int = 1, input_param: str = "messages",
               longest_prompt_tokens: int | None = None, needs: Mapping[str, str] = NO_NEEDS) -> Decision:
        """Plan the models for one request; pass max_tokens=0 for embeddings (no output); `choices`: its `n`;
        `input_param`: the request field a prompt too long for every model is blamed on; `longest_prompt_tokens`:
        a batch's longest prompt (completions prompts, embeddings inputs), which a model reads on its own, so its
        context must hold that one (and `max_tokens`), not the batch's `prompt_tokens` added together (which
        price it); `needs`: what the request uses beyond text (`needs.request_needs`), which a model must take.

        A model's context must hold the prompt and `max_tokens`, or, when the request sets none, the prompt and one
        token: a model then writes what room is left (OpenAI and vLLM do), so a guess of the answer's length (the
        route's learned one, which moves with traffic) never refuses a prompt that fits; the guess still predicts
        latency, cost and energy."""
        plan = self._plans[route.name]
        limits = plan.limits if tighten is None or tighten.empty else plan.limits.tightened(tighten)
        output_tokens = max_tokens if max_tokens is not None else \
            self.estimates.expected_output_tokens(route.name, route.default_output_tokens)
        longest = prompt_tokens if longest_prompt_tokens is None else longest_prompt_tokens
        need = ContextNeed(longest, max_tokens, input_param, batch=longest != prompt_tokens, uses=needs)
        candidates = tuple(judge(p, self.estimates, self.breakers, limits, prompt_tokens, output_tokens, stream,
                                 choices, need.tokens, needs) for p in plan.candidates)
        kept = sorted((c for c in candidates if c.kept), key=_smallest_then_cheapest)
        if kept:
            return self._decide_met(route, plan, candidates, kept, need, output_tokens, limits.min_tier)
        return self._decide_unmet(route, plan, candidates, limits, need, output_tokens)

    def _circuit_wait_s(self, candidates: tuple[Candidate, ...]) -> float | None:
        """Seconds until the first circuit that alone keeps a candidate out turns half-open; None when no
        candidate is dropped for its circuit alone (the client is then not told to come back soon)."""
        waits = [self.breakers.retry_in_s(c.model.name) for c in candidates
                 if c.reasons and all(reason_kind(r) == "circuit" for r in c.reasons)]
        return min(waits) if waits else None

    def cheapest(self, decision: Decision) -> Decision:
        """The same decision re-planned cheapest first, keeping only the hard constraints (context, tier), the
        route's fallbacks the decision planned still after them.

        Used when a tenant's budget is exhausted and its policy says downgrade.
        """
        hard = [c for c in decision.candidates if meets_hard_terms(c)]
        if not hard or decision.pinned:     # a continuation: only the model that stored it has the response
            return decision
        # a model whose circuit is open would be skipped by the call: it leads only when every circuit is open
        callable_now = [c for c in hard if not any(reason_kind(r) == "circuit" for r in c.reasons)] or hard
        ordered = sorted(callable_now, key=lambda c: (c.predicted_cost_usd, c.model.size_b))
        models = [c.model for c in ordered]
        models.extend(m for m in decision.plan if m not in models)
        # the SLA is met only if the cheapest model meets it; nothing was explored
        return replace(decision, plan=tuple(models[:self._max_attempts]), sla_met=ordered[0].kept, explored=False,
                       note=f"budget exhausted: downgraded to the cheapest model, {ordered[0].model.name}")

    def _decide_met(self, route: Route, plan: _RoutePlan, candidates: tuple[Candidate, ...],
                    kept: list[Candidate], need: ContextNeed, output_tokens: int, min_tier: int) -> Decision:
        """The plan when some candidate meets the SLA: smallest (or explored) first; then the fallbacks that
        keep its hard terms (context, what it uses, tier), as best effort's do."""
        chosen = kept[0]
        if self._explore_share > 0 and self._rng.random() < self._explore_share:
            pool = [*kept[1:], *(c for c in candidates if _only_slow(c))]
            chosen = pool[self._rng.randrange(len(pool))] if pool else chosen
        explored = chosen is not kept[0]
        models = [chosen.model]
        models.extend(c.model for c in kept if c is not chosen)
        self._add_fallbacks(models, plan, need, healthy_only=True, min_tier=min_tier)
        note = ""
        if explored:
            note = f"explored {chosen.model.name} instead of {kept[0].model.name}"
            note += "" if chosen.kept else f" to refresh its estimate ({', '.join(chosen.reasons)})"
        return Decision(route=route, plan=tuple(models[:self._max_attempts]), candidates=candidates,
                        sla_met=chosen.kept, explored=explored, note=note, output_tokens=output_tokens)

    def _decide_unmet(self, route: Route, plan: _RoutePlan, candidates: tuple[Candidate, ...],
                      limits: Limits, need: ContextNeed, output_tokens: int) -> Decision:
        """The plan when no candidate meets the SLA: best effort, or an error."""
        needed_tokens, uses = need.tokens, need.uses
        fitting = [c for p, c in zip(plan.candidates, candidates) if fits(p, needed_tokens, limits, uses)]
        fallback_fits = any(fits(f, needed_tokens, limits, uses) for f in plan.fallbacks)
        if route.sla.on_violation == "reject" or not (fitting or fallback_fits):
            error = _unmet_error(route, plan, candidates, fitting, limits, need)
            if isinstance(error, NoModelMeetsSla) and (wait_s := self._circuit_wait_s(candidates)) is not None:
                error.headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
            elif isinstance(error, NoModelMeetsSla) and not any(meets_hard_terms(c) for c in candidates):
                # every model lacks the tier or the context asked for: only a policy change can cure that, and
                # OpenAI's SDKs would send it twice more after their back-off
                error.headers["x-should-retry"] = "false"
            if isinstance(error, NoModelMeetsSla):     # no model to call; a stored answer may still serve it
                error.decision = Decision(route=route, plan=(), candidates=candidates, sla_met=False,
                                          note=str(error), output_tokens=output_tokens)
            raise error
        fitting.sort(key=lambda c: c.predicted_latency_ms)
        models = [c.model for c in fitting if self.breakers.available(c.model.name)]
        # best effort keeps the hard terms, context, what the request uses and tier, for the fallbacks too
        self._add_fallbacks(models, plan, need, healthy_only=True, min_tier=limits.min_tier)
        if not models:
            models = [c.model for c in fitting]
            self._add_fallbacks(models, plan, need, healthy_only=False, min_tier=limits.min_tier)
        note = f"SLA not met ({_unmet_summary(fitting or candidates, limits)}); best effort by predicted latency"
        return Decision(route=route, plan=tuple(models[:self._max_attempts]), candidates=candidates,
                        sla_met=False, note=note, output_tokens=output_tokens)

    def _add_fallbacks(self, models: list[Model], plan: _RoutePlan, need: ContextNeed,
                       healthy_only: bool, min_tier: int) -> None:
        """Append the route's fallbacks not yet planned that fit the context, take what the request uses and have
        `min_tier` (and are healthy)."""
        planned = {m.name for m in models}
        for fallback in plan.fallbacks:
            if fallback.name in planned or fallback.context_window < need.tokens or fallback.tier < min_tier \
                    or lacking(fallback.supports, need.uses):
                continue
            if healthy_only and not self.breakers.available(fallback.name):
                continue
            models.append(fallback.model)
            planned.add(fallback.name)


def _smallest_then_cheapest(candidate: Candidate) -> tuple[float, Decimal]:
    """Smaller is preferred: size_b, then this request's predicted cost (output and GPU time included)."""
    return candidate.model.size_b, candidate.predicted_cost_usd


#: the SLA terms predicted from measurements, which change: a model dropped for these alone may be explored
MEASURED_TERMS = frozenset({"latency", "ttft", "energy"})


def _only_slow(candidate: Candidate) -> bool:
    """Dropped for predicted latency, TTFT or energy alone: exploring it is how a recovered model is noticed."""
    return not candidate.kept and all(reason_kind(r) in MEASURED_TERMS for r in candidate.reasons)


def _unmet_summary(candidates: list[Candidate] | tuple[Candidate, ...], limits: Limits) -> str:
    """'p95_latency_ms 200: small: latency 310ms > 200ms; medium: ...'."""
    if not candidates:
        return "its SLA: the route has no candidates"
    kinds = dict.fromkeys(reason_kind(r) for c in candidates for r in c.reasons)
    terms = " and ".join(limits.label(kind) for kind in kinds)
    details = "; ".join(f"{c.model.name}: {', '.join(c.reasons)}" for c in candidates)
    return f"{terms}: {details}"


@dataclass(frozen=True, slots=True)
class ContextNeed:
    """What a request needs of a model: its context window to hold its prompt and `max_tokens` (one token when
    unset), and to take what it uses beyond text."""

    prompt_tokens: int          # the prompt a model reads at once: a batch's longest
    max_tokens: int | None
    input_param: str            # the request field that holds the prompt: messages, prompt, input
    batch: bool = False         # several prompts (completions) or inputs (embeddings), each read on its own
    uses: Mapping[str, str] = field(default_factory=lambda: NO_NEEDS)     # feature -> request field (`needs`)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + (self.max_tokens if self.max_tokens is not None else 1)

    def refusal(self, route: Route, widest: int) -> ClientError:
        """The 400 for a request no model of the route has the context for, blaming the field to shorten."""
        prompt = "longest prompt" if self.batch else "prompt"
        if self.max_tokens:
            needs = f"{self.tokens} tokens ({self.prompt_tokens} {prompt} + {self.max_tokens} max_tokens)"
        elif self.max_tokens is None:
            needs = f"{self.tokens} tokens ({self.prompt_tokens} {prompt} + at least 1 to answer)"
        else:
            needs = f"{self.prompt_tokens} {prompt} tokens"
        return ClientError(f"request needs {needs} but the largest context window of route {route.name!r} is "
                           f"{widest}", param=self.input_param, code="context_length_exceeded")


def _unmet_error(route: Route, plan: _RoutePlan, candidates: tuple[Candidate, ...],
                 fitting: list[Candidate], limits: Limits, need: ContextNeed) -> ClientError | NoModelMeetsSla:
    """The error for a request no model of the route may serve."""
    models = (*plan.candidates, *plan.fallbacks)
    windows = [p.context_window for p in models]
    if windows and max(windows) < need.tokens:
        return need.refusal(route, max(windows))
    if need.uses and models and all(lacking(p.supports, need.uses) for p in models):
        return _unsupported_refusal(route, models, need.uses)
    return NoModelMeetsSla(f"no model of route {route.name!r} meets {_unmet_summary(fitting or candidates, limits)}")


def _unsupported_refusal(route: Route, models: tuple[PricedModel, ...], uses: Mapping[str, str]) -> UnsupportedInput:
    """The 400 for a request using what no model of the route takes (an image sent to a route of text models),
    naming what each model lacks; its `param` is the field that uses the first feature lacked."""
    lacked = {feature for p in models for feature in lacking(p.supports, uses)}
    first = next(feature for feature in FEATURES if feature in lacked)
    used = ", ".join(feature for feature in FEATURES if feature in uses)
    details = "; ".join(f"{p.name}: no {', '.join(lacking(p.supports, uses))}" for p in models)
    param = uses[first]
    together = " together" if len(uses) > 1 else ""
    message = f"the request uses {used}, which no model of route {route.name!r} takes{together} ({details})"
    if param in ("tools", "functions"):
        return UnsupportedInput(message, param=param, code="unsupported_parameter")
    return UnsupportedInput(message, param=param)
