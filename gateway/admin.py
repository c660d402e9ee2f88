"""The admin surface: /admin/*, reachable only with the admin token, never a tenant key."""

from __future__ import annotations

import os
from dataclasses import dataclass

from aiohttp import web

from gateway.errors import ClientError
from gateway.fleet import Fleet
from gateway.policy.model import Model
from gateway.responses import json_response
from gateway.services import SERVICES, Services


@dataclass(frozen=True)
class Worker:
    """Which of the workers of `gateway run --workers N` this process is: each answers the admin API with its own
    view (its policy's reload, and without Redis its tenants' counts and its tasks), so each answer names it."""

    slot: int
    workers: int


#: the app's Worker, when it is one of `gateway run --workers N`
WORKER = web.AppKey("worker", Worker)


def _answer(request: web.Request, body: dict, status: int = 200) -> web.Response:
    """An admin answer; from one of several workers, naming which (`worker`: its slot, of how many, its pid)."""
    worker = request.app.get(WORKER)
    if worker is not None:
        body = {**body, "worker": {"slot": worker.slot, "workers": worker.workers, "pid": os.getpid()}}
    return json_response(body, status=status)


def _authorised(request: web.Request) -> Services:
    services: Services = request.app[SERVICES]
    services.holder.current.admin.check(request.headers)
    return services


def policy_status(services: Services) -> dict:
    """The active policy, its hash, and what the last reload did."""
    holder = services.holder
    policy = holder.current.policy
    status = holder.status
    return {"source": policy.source, "sha256": policy.content_sha256,
            "loaded_unix_s": status.loaded_unix_s, "reloads": status.reloads,
            "failed_reloads": status.failures, "last_error": status.last_error,
            "models": sorted(policy.models), "routes": [r.name for r in policy.routes],
            "tenants": sorted(policy.tenants)}


async def get_policy(request: web.Request) -> web.Response:
    """GET /admin/policy: the active policy and its content hash."""
    return _answer(request, policy_status(_authorised(request)))


async def reload_policy(request: web.Request) -> web.Response:
    """POST /admin/policy/reload: validate and swap; an invalid file keeps the old policy: a 422 whose `error`, in
    OpenAI's shape, is every located problem, beside the reload status."""
    services = _authorised(request)
    ok = await services.holder.reload_async()
    status = policy_status(services)
    if ok:
        return _answer(request, {"reloaded": True, **status})
    refused = ClientError(status["last_error"] or "the policy was not reloaded", code="invalid_policy")
    return _answer(request, {"reloaded": False, **status, **refused.body()}, status=422)


async def get_stats(request: web.Request) -> web.Response:
    """GET /admin/stats: cost per successful task, success and escalation rates, by route, tenant, workflow
    (with Redis, of every replica's tasks; while Redis is down, 503 store_unavailable)."""
    services = _authorised(request)
    return _answer(request, await services.outcomes.stats())


async def get_tenants(request: web.Request) -> web.Response:
    """GET /admin/tenants: each tenant's usage against its limits and budgets."""
    services = _authorised(request)
    tenants = services.holder.current.policy.tenants
    report = await services.tenant_usage()
    for entry in report:
        tenant = tenants.get(entry["tenant"])
        if tenant is not None:
            entry["usage"] = (await services.stores.limiter.usage(tenant)).to_dict(tenant.limits)
    return _answer(request, {"tenants": report})


async def get_models(request: web.Request) -> web.Response:
    """GET /admin/models: what the router sees of each model now, in this process (see model_status)."""
    services = _authorised(request)
    fleet = services.fleet
    models = services.holder.current.policy.models
    fleet.estimates.include(models)         # a model a reload has just added, before its router is built
    return _answer(request, {"models": [model_status(fleet, model) for model in models.values()]})


def model_status(fleet: Fleet, model: Model) -> dict:
    """One model's circuit, calls in flight and waiting for a slot, and the latency and energy estimates the
    router predicts it with."""
    name, estimates, breakers = model.name, fleet.estimates, fleet.breakers
    per_token_j = estimates.joules_per_output_token(name)
    return {
        "model": name, "max_concurrency": model.max_concurrency,
        "circuit": breakers.state(name), "circuit_retry_in_s": round(breakers.retry_in_s(name), 3),
        "in_flight": estimates.in_flight(name), "slots_busy": fleet.slots.busy(name),
        "slots_waiting": fleet.slots.waiting(name),
        "latency_samples": estimates.sample_count(name),        # TTFT samples (kept for existing readers)
        "ttft_samples": estimates.sample_count(name), "tpot_samples": estimates.tpot_sample_count(name),
        "ttft_ms": {"p50": _ms(estimates.ttft_p50_s(name)), "p95": _ms(estimates.ttft_p95_s(name))},
        "tpot_ms": {"p50": _ms(estimates.tpot_p50_s(name)), "p95": _ms(estimates.tpot_p95_s(name))},
        "joules_per_output_token": round(per_token_j, 6) if per_token_j is not None else None,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/policy", get_policy)
    app.router.add_post("/admin/policy/reload", reload_policy)
    app.router.add_get("/admin/stats", get_stats)
    app.router.add_get("/admin/tenants", get_tenants)
    app.router.add_get("/admin/models", get_models)
