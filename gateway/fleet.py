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
        #: the last version of every model any policy named, those a reload removed too: what a model put back
        #: is compared with
        self._known = dict(policy.models)
        #: calls in flight to servers a reload has moved a model from, by (name, server)
        self._elsewhere: dict[tuple[str, tuple[str, str]], int] = {}
        self._routers: dict[str, Router] = {}
        #: (endpoint, upstream model) of the model servers that refused a stream's `stream_options`: their streams
        #: are sent without them
        self.refuse_stream_options: set[tuple[str, str]] = set()
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
        model or credential changed, since the policy before or since it was last named, when a reload removed it
        and this one puts it back) starts with a closed circuit, and one now served elsewhere with call slots and
        an in-flight count of its own (the calls to the old server end there): an SRE's fix gets its traffic at
        once; one now run elsewhere (its server, upstream model or GPUs changed) forgets the joules per token
        measured where it ran before."""
        moved = {}
        for name, model in policy.models.items():
            known = self._known.get(name)
            if known is not None and _called_elsewhere(known, model):
                self.breakers.forget(name)
            if known is not None and _served_elsewhere(known, model):
                moved[name] = (known.server, model.server)
                self._move_in_flight(known, model)
            if known is not None and _draws_elsewhere(known, model):
                self.estimates.forget_energy(name)
        self._models = dict(policy.models)
        self._known.update(policy.models)
        routing = policy.routing
        self.estimates.window_s = routing.latency_window_s
        if routing.prior_weight != self.estimates.prior_weight:
            self.estimates.prior_weight = routing.prior_weight
            self.estimates.restart()
        self.estimates.track(policy.models)
        self.slots.configure(policy.models, moved=moved)
        self.breakers.configure(routing.breaker)
        if self.sharing is not None:
            self.sharing.enabled = routing.share_estimates
        self.router(policy)

    def started(self, model: Model | str) -> None:
        """A call to `model` (as the call sees it) began: it loads the model's server now, or, for a call of an
        older policy version to where a reload has moved the model from, that server."""
        key = self._elsewhere_key(model)
        if key is None:
            self.estimates.started(model if isinstance(model, str) else model.name)
        else:
            self._elsewhere[key] = self._elsewhere.get(key, 0) + 1

    def finished(self, model: Model | str) -> None:
        """A call started with `started(model)` ended, on whichever server it loaded."""
        key = self._elsewhere_key(model)
        if key is None or key not in self._elsewhere:
            self.estimates.finished(model if isinstance(model, str) else model.name)
        elif self._elsewhere[key] > 1:
            self._elsewhere[key] -= 1
        else:
            del self._elsewhere[key]

    def _elsewhere_key(self, model: Model | str) -> tuple[str, tuple[str, str]] | None:
        """(name, server) of a call to a server the model of its name is no longer served on;
        None for a call to where it is served now."""
        if isinstance(model, str):
            return None
        known = self._known.get(model.name)
        if known is None or not _served_elsewhere(known, model):
            return None
        return model.name, model.server

    def _move_in_flight(self, known: Model, model: Model) -> None:
        """The calls in flight to `known`'s server no longer load the model's new one (`model`'s), which takes on
        any still in flight to it from before (a reload that moves the model back)."""
        name = model.name
        leaving = self.estimates.in_flight(name)
        self.estimates.set_in_flight(name, self._elsewhere.pop((name, model.server), 0))
        if leaving:
            self._elsewhere[(name, known.server)] = leaving

    def calls_as(self, model: Model) -> bool:
        """Whether `model` (as a call saw it, maybe of an older policy version) is called where the model of its
        name is called now: a verdict on another server says nothing of this one's health."""
        known = self._known.get(model.name)
        return known is None or not _called_elsewhere(known, model)

    def draws_as(self, model: Model) -> bool:
        """Whether `model` (as a call saw it) runs where the model of its name runs now: the joules measured of a
        call to where it ran before say nothing of where it runs now."""
        known = self._known.get(model.name)
        return known is None or not _draws_elsewhere(known, model)

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
    return (known.server, known.api_key_env) != (model.server, model.api_key_env)


def _served_elsewhere(known: Model, model: Model) -> bool:
    """Whether calls to `model` go to another server or model than those to `known` did (whose concurrency is
    not theirs)."""
    return known.server != model.server


def _draws_elsewhere(known: Model, model: Model) -> bool:
    """Whether the energy `model` draws per token is not what `known`'s was: another server, model or GPUs."""
    return (known.server, known.gpus) != (model.server, model.gpus)
