"""The live state of every model: latency and energy estimates, in-flight counts, call slots, circuit breakers.

It outlives policy reloads (a model keeps its measurements across a reload)
and hands each policy its router.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from gateway.errors import UpstreamError
from gateway.policy.model import Model, Policy
from gateway.routing.breaker import Breakers
from gateway.routing.estimates import LatencyEstimates
from gateway.routing.planner import Router
from gateway.routing.sharing import EstimateSharing
from gateway.routing.slots import Slots


class Fleet:
    """Measurements and health per model, shared by every request and every policy version."""

    def __init__(self, policy: Policy, *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.clock = clock
        self.rng = rng or random.Random()
        self.estimates = LatencyEstimates.from_policy(policy, clock=clock)
        self.breakers = Breakers(policy.routing.breaker, clock)
        self.slots = Slots()
        self.slots.configure(policy.models)
        self._models = dict(policy.models)
        self._routers: dict[str, Router] = {}
        self.router(policy)
        #: sends this process's latency samples to the other processes and takes theirs (routing.share_estimates)
        self.sharing: EstimateSharing | None = None

    @property
    def models(self) -> dict[str, Model]:
        """The models of the policy now in force."""
        return self._models

    def share(self, sharing: EstimateSharing, policy: Policy) -> None:
        """Share latency samples through `sharing` while the policy says so (a reload turns it on or off)."""
        self.sharing = sharing
        sharing.enabled = policy.routing.share_estimates

    def router(self, policy: Policy) -> Router:
        """The router for one policy version (built once per version; the two newest are kept)."""
        router = self._routers.get(policy.content_sha256)
        if router is None:
            router = Router(policy, self.estimates, self.breakers, self.rng)
            previous = list(self._routers.items())[-1:]     # for requests still in flight on it
            self._routers = {**dict(previous), policy.content_sha256: router}
        return router

    def adopt(self, policy: Policy) -> None:
        """Follow a reloaded policy: its latency window, prior weight (a change restarts every model's
        estimates), breaker settings and latency priors (also when an earlier version comes back, whose
        router is still cached), and its router built now. A model now called elsewhere (its endpoint, upstream
        model or credential changed) starts with a closed circuit: an SRE's fix gets its traffic at once."""
        for name, model in policy.models.items():
            known = self._models.get(name)
            if known is not None and _called_elsewhere(known, model):
                self.breakers.forget(name)
        self._models = dict(policy.models)
        routing = policy.routing
        self.estimates.window_s = routing.latency_window_s
        if routing.prior_weight != self.estimates.prior_weight:
            self.estimates.prior_weight = routing.prior_weight
            self.estimates.restart()
        self.estimates.track(policy.models)
        self.slots.configure(policy.models)
        self.breakers.configure(routing.breaker)
        if self.sharing is not None:
            self.sharing.enabled = routing.share_estimates
        self.router(policy)

    def started(self, model_name: str) -> None:
        self.estimates.started(model_name)

    def finished(self, model_name: str) -> None:
        self.estimates.finished(model_name)

    def record_success(self, model_name: str) -> None:
        self.breakers.record_success(model_name)

    def record_failure(self, model_name: str, exc: UpstreamError) -> None:
        self.breakers.record_failure(model_name, exc.retry_after_s)

    def record_latency(self, model: Model, ttft_s: float | None, tpot_s: float | None) -> None:
        """One call's latency, of `model` as the call saw it: a call on an older policy version, made where a
        reload has since moved the model, teaches this process's estimates nothing (it is shared for that server)."""
        if self.estimates.measures(model):
            self.estimates.record(model.name, ttft_s, tpot_s)
        if self.sharing is not None:
            self.sharing.add(model, ttft_s, tpot_s)

    def record_energy(self, model_name: str, joules: float, output_tokens: int) -> None:
        self.estimates.record_energy(model_name, joules, output_tokens)


def _called_elsewhere(known: Model, model: Model) -> bool:
    """Whether calls to `model` go to another server, model or credential than those to `known` did."""
    return (known.endpoint, known.upstream_model, known.api_key_env) != \
        (model.endpoint, model.upstream_model, model.api_key_env)
