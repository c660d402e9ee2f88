"""Small stand-ins for what a unit test must control: the clock, and a model with a given latency prior."""

from __future__ import annotations

from gateway.policy.model import LatencyPrior, Model


class FakeClock:
    """A clock the test moves by hand (`now_s += 5`)."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def prior_model(name: str = "small", ttft_ms: float = 40, tpot_ms: float = 4) -> Model:
    """A model with the given latency prior, on an endpoint nothing listens on."""
    return Model(name=name, endpoint="http://127.0.0.1:1/v1", upstream_model=name,
                 latency_prior=LatencyPrior(ttft_ms=ttft_ms, tpot_ms=tpot_ms))
