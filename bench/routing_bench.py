"""Time route matching plus the SLA decision for a large synthetic policy.

A policy of 100 models and 1,000 routes (exact aliases, some header- and
tenant-specific, a few globs and a catch-all), estimates warmed with real-looking
samples, and many requests: prints the median and p99 µs per decision and
appends a Markdown row to bench/results/routing.md.

    python -m bench.routing_bench [--requests 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from decimal import Decimal
from pathlib import Path

from gateway.errors import GatewayError
from gateway.policy.model import (HeaderMatch, LatencyPrior, Match, Model, Policy, Price, Route, Routing,
                                  Sla)
from gateway.routing import Breakers, LatencyEstimates, Router

RESULTS = Path(__file__).parent / "results" / "routing.md"
MODELS = 100
ROUTES = 1000
ALIASES = 400


def synthetic_models(rng: random.Random) -> dict[str, Model]:
    """100 models from 0.5B to 400B parameters, priced and latency-primed by size."""
    models = {}
    for i in range(MODELS):
        size_b = round(0.5 * 1.07 ** i, 1)
        models[f"m{i}"] = Model(
            name=f"m{i}", endpoint=f"http://10.0.{i // 250}.{i % 250}:8000/v1", upstream_model=f"model-{i}",
            size_b=size_b, tier=1 + i // 25, context_window=rng.choice((8192, 32768, 131072)),
            max_concurrency=rng.choice((16, 32, 64)),
            price=Price(Decimal(str(round(0.02 * size_b, 4))), Decimal(str(round(0.06 * size_b, 4)))),
            latency_prior=LatencyPrior(ttft_ms=30 + 2 * size_b, tpot_ms=3 + 0.2 * size_b))
    return models


def synthetic_route(i: int, rng: random.Random) -> Route:
    """Route i: an exact alias shared by a few routes, narrowed by tenant, header or prompt size."""
    narrow: dict = {}
    kind = i % 4
    if kind == 1:
        narrow["tenants"] = (f"tenant-{rng.randrange(50)}",)
    elif kind == 2:
        narrow["headers"] = (HeaderMatch("x-team", r"team-\d+", regex=True),)
    elif kind == 3:
        narrow["prompt_tokens_min"] = 2000
    candidates = tuple(f"m{j}" for j in sorted(rng.sample(range(MODELS), rng.randint(3, 6))))
    sla = Sla(p95_latency_ms=rng.choice((1000.0, 3000.0, 8000.0)), p95_ttft_ms=rng.choice((None, 300.0)),
              min_tier=rng.choice((0, 1, 2)), max_cost_usd=rng.choice((None, Decimal("0.05"))))
    return Route(name=f"route-{i}", match=Match(models=(f"alias-{i % ALIASES}",), **narrow),
                 candidates=candidates, sla=sla, fallback=(f"m{rng.randrange(60, MODELS)}",))


def synthetic_policy(seed: int) -> Policy:
    """100 models, 1,000 routes: exact aliases, 10 glob routes and a catch-all."""
    rng = random.Random(seed)
    models = synthetic_models(rng)
    routes = [synthetic_route(i, rng) for i in range(ROUTES - 11)]
    routes += [Route(name=f"glob-{k}", match=Match(models=(f"team{k}-*",)), candidates=("m0", "m10", "m40"))
               for k in range(10)]
    routes.append(Route(name="catch-all", match=Match(), candidates=("m5", "m20", "m50")))
    return Policy(version=1, models=models, routes=tuple(routes), routing=Routing(explore_share=0.05))


def requests(count: int, rng: random.Random) -> list[tuple]:
    """(endpoint, alias, tenant, headers, prompt_tokens, max_tokens, stream) per request."""
    out = []
    for _ in range(count):
        roll = rng.random()
        alias = (f"alias-{rng.randrange(ALIASES)}" if roll < 0.9
                 else f"team{rng.randrange(10)}-x" if roll < 0.97 else "unknown-model")
        headers = {"x-team": f"team-{rng.randrange(9)}"} if rng.random() < 0.5 else {}
        out.append(("chat", alias, f"tenant-{rng.randrange(60)}", headers, int(rng.lognormvariate(6.5, 1.0)),
                    rng.choice((None, 128, 512)), rng.random() < 0.5))
    return out


def run(count: int, seed: int) -> tuple[float, float, int]:
    """Median and p99 µs per match+decide, and how many decisions were timed."""
    rng = random.Random(seed)
    policy = synthetic_policy(seed)
    estimates = LatencyEstimates.from_policy(policy)
    for name, model in policy.models.items():
        for _ in range(200):
            estimates.record(name, model.latency_prior.ttft_ms / 1000 * rng.uniform(0.5, 2.0),
                             model.latency_prior.tpot_ms / 1000 * rng.uniform(0.5, 2.0))
    router = Router(policy, estimates, Breakers(policy.routing.breaker), random.Random(seed))
    timings_ns = []
    for i, (endpoint, alias, tenant, headers, prompt, max_tokens, stream) in enumerate(requests(count, rng)):
        start_ns = time.perf_counter_ns()
        route = router.match(endpoint, alias, tenant, headers, prompt)
        try:
            router.decide(route, prompt_tokens=prompt, max_tokens=max_tokens, stream=stream)
        except GatewayError:    # a rejection is a decision too
            pass
        timings_ns.append(time.perf_counter_ns() - start_ns)
        if i % 4 == 0:  # live traffic keeps feeding the estimates, outside the timed part
            estimates.record(f"m{rng.randrange(MODELS)}", rng.uniform(0.05, 0.5), rng.uniform(0.003, 0.05))
    timings_us = sorted(t / 1000 for t in timings_ns[count // 10:])     # first 10% is warm-up
    return statistics.median(timings_us), timings_us[int(len(timings_us) * 0.99)], len(timings_us)


def write_result(median_us: float, p99_us: float, timed: int) -> None:
    """Append one Markdown table row to bench/results/routing.md."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text("| date | python | cpu | models | routes | decisions | median µs | p99 µs |\n"
                           "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    row = (f"| {time.strftime('%Y-%m-%d %H:%M')} | {platform.python_version()} | {platform.machine()} "
           f"| {MODELS} | {ROUTES} | {timed} | {median_us:.1f} | {p99_us:.1f} |\n")
    with RESULTS.open("a") as results:
        results.write(row)


def main() -> None:
    """Run the benchmark and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    median_us, p99_us, timed = run(args.requests, args.seed)
    print(f"match+decide: median {median_us:.1f} µs, p99 {p99_us:.1f} µs "
          f"({timed} decisions, {MODELS} models, {ROUTES} routes)")
    write_result(median_us, p99_us, timed)


if __name__ == "__main__":
    main()
