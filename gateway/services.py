"""Shared clients and state, created once in `cleanup_ctx` and reached through a typed app key.

Everything a stage needs beyond its request lives here: the upstream session,
the fleet's measurements, the cache and limit stores (Redis or in-memory),
telemetry, the ledger and outcomes, and the background task set.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import web

from gateway.background import Settlements
from gateway.context import RequestContext
from gateway.cost import plain_usd
from gateway.energy import EnergyMonitor
from gateway.energy.sharing import EnergySharing, FolderSharing
from gateway.fleet import Fleet
from gateway.outcomes import ANONYMOUS, Book
from gateway.policy.advice import advice
from gateway.recorder import Recorder
from gateway.runtime import PolicyHolder
from gateway.routing.sharing import EstimateSharing
from gateway.stores import Stores, redis_url_problem
from gateway.tasks import BackgroundTasks
from gateway.telemetry import Telemetry
from gateway.telemetry.peers import PEERS, Peers
from gateway.tokens import DEFAULT_ENCODING, get_encoding
from gateway.upstream import HttpTransport, PoolConnector

log = logging.getLogger("gateway")


@dataclass
class Services:
    """Everything shared by all requests of one gateway process."""

    holder: PolicyHolder
    environ: Mapping[str, str]
    session: aiohttp.ClientSession
    transport: Any                      # HttpTransport, or any object with complete() and stream()
    fleet: Fleet
    stores: Stores
    telemetry: Telemetry
    recorder: Recorder
    energy: EnergyMonitor | None = None     # the GPU sampler (with no `gpus:` in the policy it samples nothing)
    background: BackgroundTasks = field(default_factory=BackgroundTasks)
    pipeline: Any = None
    draining: bool = False
    drain_ends_s: float | None = None   # on the loop's clock: when a stopping server's grace period runs out
    # the requests being served, (context, the task serving it) by id(context): a drain that runs out ends them
    in_flight: dict = field(default_factory=dict)
    # by tenant name: the recordings of answered requests still waiting for their measured joules (their ledger
    # line, their cost with its energy price, their booking to their task); an outcome report waits for them
    pricing: dict = field(default_factory=dict)
    settlements: Settlements = None     # type: ignore[assignment]  # background responses still generated

    def __post_init__(self) -> None:
        if self.settlements is None:
            self.settlements = Settlements(self)

    @property
    def pricing_s(self) -> float:
        """The longest an outcome report waits for a call of its task whose joules are still being priced: the
        sampler's settle time and a second; 0 without a sampler."""
        return self.energy.settle_timeout_s + 1.0 if self.energy is not None else 0.0

    def record_request(self, ctx: RequestContext) -> None:
        """Hand a finished request to the ledger and the outcome book."""
        self.recorder.record(ctx)

    @property
    def outcomes(self) -> Book:
        return self.recorder.outcomes

    async def tenant_usage(self) -> list[dict]:
        """Each tenant's usage against its limits and budget."""
        policy = self.holder.current.policy
        return [{"tenant": name, "limits": _plain(tenant.limits), "budget": _plain(tenant.budget),
                 "spend": (await self.stores.budgets.usage(tenant)).to_dict()}
                for name, tenant in sorted(policy.tenants.items())]


def _plain(obj) -> dict:
    """A settings object as JSON values: amounts of money in plain decimal notation (0.0000001, not 1E-7)."""
    return {k: (plain_usd(v) if isinstance(v, Decimal) else
                str(v) if v is not None and not isinstance(v, (int, float, str, bool)) else v)
            for k, v in vars(obj).items()}


SERVICES = web.AppKey("services", Services)


def budgeted_tenants(policy) -> list[str]:
    """The tenants with a budget, whose spend dashboards show against it under their own name."""
    return [name for name, tenant in policy.tenants.items() if tenant.budget.limited]


def keep_tenant_labels(telemetry: Telemetry, runtime) -> None:
    """After a reload, the tenants it removed give up their places among the named metric labels (an open gateway's
    callers are all anonymous: nothing to give up)."""
    if runtime.policy.tenants:
        telemetry.keep_tenant_labels([*runtime.policy.tenants, ANONYMOUS])    # unauthenticated callers' label


def policy_encodings(policy) -> set[str]:
    """The tiktoken encodings a policy uses: the default (prompt counting) and its models' own."""
    return {DEFAULT_ENCODING, *(model.encoding for model in policy.models.values())}


def services_ctx(holder: PolicyHolder, environ: Mapping[str, str] | None):
    """The cleanup context that opens the shared clients at start-up and closes them at exit."""
    environ = os.environ if environ is None else environ

    async def lifecycle(app: web.Application):
        from gateway.pipeline import STAGES, Pipeline

        policy = holder.current.policy
        started = holder.started        # what RESTART_ONLY settings run with: a replacement worker's is the gateway's
        for name in policy_encodings(policy):
            get_encoding(name)          # loaded now, not on the first request
        recorder = open_recorder(started)
        stores = await open_stores(started, environ, recorder)   # before the session: a refusal leaves none open
        connector = PoolConnector(limit=0, limit_per_host=0, keepalive_timeout=60, enable_cleanup_closed=True)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                        skip_auto_headers=("User-Agent",))
        services = Services(holder=holder, environ=environ, session=session,
                            transport=HttpTransport(session), fleet=Fleet(policy), stores=stores,
                            telemetry=Telemetry.from_env(started.telemetry, environ=environ),
                            recorder=recorder)
        recorder.outcomes = services.stores.outcomes       # in Redis when there is one: shared by every process
        sharing = share_estimates(services, started)
        energy_sharing = energy_sharing_for(stores, app.get(PEERS), started.store.timeout_ms / 1000)
        services.telemetry.observe_cache_errors(lambda: getattr(services.stores.cache, "errors", 0))
        services.telemetry.observe_store_failures(lambda: {"limits": services.stores.limiter.store_failures,
                                                           "budgets": services.stores.budgets.store_failures,
                                                           "outcomes": services.stores.outcomes.store_failures,
                                                           **({"estimates": sharing.store_failures}
                                                              if sharing is not None else {}),
                                                           **({"energy": energy_sharing.store_failures}
                                                              if energy_sharing is not None else {})})
        if recorder.ledger is not None:
            services.telemetry.observe_ledger_errors(lambda: recorder.ledger.write_errors)
        services.telemetry.observe_policy(lambda: holder.current.policy)
        services.telemetry.label_tenants(budgeted_tenants(policy))
        holder.listeners.append(lambda runtime: services.telemetry.label_tenants(budgeted_tenants(runtime.policy)))
        holder.listeners.append(functools.partial(keep_tenant_labels, services.telemetry))
        services.telemetry.observe_reloads(lambda: holder.status)
        services.telemetry.observe_slots(lambda: waiting_in_policy(services))
        services.telemetry.observe_background(services.settlements.by_model)
        # always there, so a reload can add GPUs; with none in the policy it samples nothing
        services.energy = energy = EnergyMonitor(policy, session)
        if energy_sharing is not None:
            energy.share_through(energy_sharing)
        await energy.start()
        services.telemetry.observe_gpus(energy)
        services.pipeline = Pipeline(tuple(stage(services) for stage in STAGES))
        # the fleet follows reloads: new routing settings, and the new router built before its first request
        holder.listeners.append(lambda runtime: services.fleet.adopt(runtime.policy))
        # the GPU sampler too, on the event loop (a reload may be applied from another thread: tests, tools)
        loop = asyncio.get_running_loop()
        holder.listeners.append(lambda runtime: loop.call_soon_threadsafe(
            lambda: services.background.spawn(energy.adopt(runtime.policy), name="energy-adopt")))
        app[SERVICES] = services
        if not policy.tenants:
            log.warning("the policy has no tenants: the gateway runs open, without API keys")
        say_advice(policy)
        holder.listeners.append(lambda runtime: say_advice(runtime.policy))
        yield
        services.draining = True
        await close_each((
            ("background responses", services.settlements.close),     # settled with what is known, first
            ("background tasks", lambda: services.background.drain(
                timeout_s=background_drain_s(services, started.server.grace_period_s))),
            ("the GPU sampler", energy.stop),
            ("estimate sharing", sharing.stop if sharing is not None else lambda: None),
            ("the ledger", lambda: asyncio.to_thread(services.recorder.close)),     # waits up to 3 s on a slow disk
            ("the stores", services.stores.close),
            ("the upstream session", session.close),
            ("telemetry", lambda: asyncio.to_thread(services.telemetry.shutdown)),
        ))

    return lifecycle


def energy_sharing_for(stores: Stores, peers: Peers | None, timeout_s: float) -> EnergySharing | FolderSharing | None:
    """How this process shares the energy of GPUs that other processes measure too (workers, replicas), so each
    books its share: through Redis when there is one; without, through the workers' folder when it is one of
    `gateway run --workers N` (the workers of this gateway only); else it is alone, or cannot know."""
    if stores.redis is not None:
        return EnergySharing(stores.redis, stores.key_prefix, timeout_s)
    if peers is not None:
        return FolderSharing(peers.folder, peers.slot)
    return None


def waiting_in_policy(services: Services) -> dict[str, int]:
    """Calls waiting for a slot, per model of the current policy (a model a reload removed is no series)."""
    models = services.holder.current.policy.models
    return {name: count for name, count in services.fleet.slots.waiting_by_model().items() if name in models}


#: what background work (budget settles, limit releases, cache writes) gets at least once requests have drained
MIN_BACKGROUND_DRAIN_S = 1.0


def background_drain_s(services: Services, grace_s: float) -> float:
    """How long the background work may take at exit: what is left of the grace period a stopping server
    counts from SIGTERM (at least MIN_BACKGROUND_DRAIN_S), not another whole one, so a Redis that does not
    answer cannot stretch the stop to twice the grace period, past the platform's kill; the whole grace period
    when no server counted one."""
    if services.drain_ends_s is None:
        return grace_s
    return max(MIN_BACKGROUND_DRAIN_S, services.drain_ends_s - asyncio.get_running_loop().time())


def share_estimates(services: Services, policy) -> EstimateSharing | None:
    """Latency samples shared with the other processes through Redis, following `routing.share_estimates`
    (a reload turns it on or off); None without a Redis, when the policy asking for it is told so."""
    stores = services.stores
    if stores.redis is None:
        say_unshared(policy)
        services.holder.listeners.append(lambda runtime: say_unshared(runtime.policy))     # and on each reload
        return None
    sharing = EstimateSharing(stores.redis, policy.store.key_prefix, policy.store.timeout_ms / 1000,
                              services.fleet.estimates, lambda: services.fleet.models)
    services.fleet.share(sharing, services.holder.current.policy)
    sharing.start()
    return sharing


def say_unshared(policy) -> None:
    """Warn that a policy asking to share latency estimates cannot: there is no Redis."""
    if policy.routing.share_estimates:
        log.warning("routing.share_estimates: no Redis is configured, so each process routes by its own latency "
                    "samples")


def say_advice(policy) -> None:
    """Log each setting of the policy that takes no effect as written (see gateway.policy.advice)."""
    for note in advice(policy):
        log.warning("policy %s: %s", policy.source, note)


def open_recorder(policy) -> Recorder:
    """The recorder and its ledger; a ledger that cannot be opened stops the start-up, said in one line."""
    try:
        return Recorder(policy)
    except OSError as exc:
        log.error("%s", _unopened_ledger(policy, exc))
        raise SystemExit(1) from None


def ledger_problem(policy) -> str | None:
    """Why the policy's ledger cannot be opened, in one line (it is opened and closed again); None when it can."""
    try:
        Recorder(policy).close()
    except OSError as exc:
        return _unopened_ledger(policy, exc)
    return None


def _unopened_ledger(policy, exc: OSError) -> str:
    return f"cannot open the ledger {policy.ledger.path} ({exc}), not starting"


async def open_stores(policy, environ: Mapping[str, str], recorder: Recorder) -> Stores:
    """The stores; a Redis URL the client cannot use stops the start-up, said in one line without the URL (it may
    carry a password), the ledger closed first."""
    if (problem := redis_url_problem(policy, environ)) is None:
        return await Stores.open(policy, environ)
    log.error("%s", problem)
    await asyncio.to_thread(recorder.close)
    raise SystemExit(1) from None


async def close_each(steps: tuple[tuple[str, Callable[[], Any]], ...]) -> None:
    """Run every shutdown step, awaiting those that return an awaitable; one failing skips none of the rest."""
    for name, step in steps:
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except Exception:               # a shutdown step's own failure must not leave the later ones undone
            log.exception("shutdown: closing %s failed", name)
