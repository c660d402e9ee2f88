"""What a policy reload keeps and drops of a model's live state: its circuit, energy estimate and call slots
describe the server it called, so a reload that points the model at another server (or at other GPUs) must not
hand them to the new one, nor let calls still under way to the old server speak for the new one."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from gateway.energy import EnergyMonitor
from gateway.errors import ModelBusy, UpstreamStatus
from gateway.fleet import Fleet
from gateway.policy.model import GpuSource, Policy, Routing
from tests.support.fake_pynvml import ManualClock, two_gpus
from tests.support.harness import Harness
from tests.support.policies import latency, model, models, short_timeouts
from tests.test_energy_sources import policy_with
from tests.test_routing_planner import chat_route
from tests.test_routing_planner import models as planner_models

# -- unit: the fleet across reloads -------------------------------------------------------------------------------


def _version(sha: str, **small_changes) -> Policy:
    fleet_models = planner_models()
    fleet_models["small"] = replace(fleet_models["small"], **small_changes)
    return Policy(version=1, models=fleet_models, routes=(chat_route(),), routing=Routing(), content_sha256=sha)


def _without_small(sha: str) -> Policy:
    fleet_models = planner_models()
    del fleet_models["small"]
    return Policy(version=1, models=fleet_models, routes=(chat_route(candidates=("medium", "large")),),
                  routing=Routing(), content_sha256=sha)


def test_a_model_removed_then_put_back_on_another_server_starts_with_a_closed_circuit():
    """`small` was rate limited for an hour by its old provider (Retry-After 3600 opened its circuit); an SRE
    removes it, then puts it back pointed at another server: the new server gets its traffic at once, as it does
    when the endpoint is changed in one edit (the circuit was kept because the reload in between forgot it)."""
    fleet = Fleet(_version("a"))
    fleet.record_failure("small", UpstreamStatus("rate limited", upstream_status=429, retry_after_s=3600.0))
    assert fleet.breakers.state("small") == "open"
    fleet.adopt(_without_small("b"))
    fleet.adopt(_version("c", endpoint="http://10.0.0.9:8000/v1"))
    assert fleet.breakers.state("small") == "closed"


@pytest.mark.parametrize("change", [
    dict(gpus=GpuSource(source="nvml", ids=("2", "3"))),
    dict(endpoint="http://10.0.0.9:8000/v1"),
    dict(upstream_model="sim-small-awq"),
], ids=["gpus", "endpoint", "upstream_model"])
def test_a_reload_that_moves_a_model_forgets_the_energy_it_measured_before(change):
    """Joules per token measured of `small` on GPUs 0 and 1 say nothing of it on GPUs 2 and 3, on another server
    or as another upstream model: after such a reload it has no energy estimate (as a model never measured), so
    a route's max_energy_j does not keep dropping it for what the old hardware drew."""
    fleet = Fleet(_version("a", gpus=GpuSource(source="nvml", ids=("0", "1"))))
    fleet.record_energy("small", 500.0, 10)
    assert fleet.estimates.joules_per_output_token("small") == pytest.approx(50.0)
    fleet.adopt(_version("b", **{"gpus": GpuSource(source="nvml", ids=("0", "1")), **change}))
    assert fleet.estimates.joules_per_output_token("small") is None


def test_a_reload_that_leaves_a_models_server_and_gpus_alone_keeps_its_energy_estimate():
    """A price edit is no reason to forget what `small` was measured to draw."""
    fleet = Fleet(_version("a", gpus=GpuSource(source="nvml", ids=("0", "1"))))
    fleet.record_energy("small", 500.0, 10)
    fleet.adopt(_version("b", gpus=GpuSource(source="nvml", ids=("0", "1")), max_concurrency=7))
    assert fleet.estimates.joules_per_output_token("small") == pytest.approx(50.0)


def test_a_model_removed_then_put_back_on_other_gpus_has_no_energy_estimate():
    """The energy measured before `small` was removed is of GPUs it no longer runs on when it comes back."""
    fleet = Fleet(_version("a", gpus=GpuSource(source="nvml", ids=("0", "1"))))
    fleet.record_energy("small", 500.0, 10)
    fleet.adopt(_without_small("b"))
    fleet.adopt(_version("c", gpus=GpuSource(source="nvml", ids=("4",))))
    assert fleet.estimates.joules_per_output_token("small") is None


# -- end to end: calls to the old server still under way when the reload lands -----------------------------------

SIMS = {"hung": dict(ttft_ms=5, tpot_ms=1, hang_rate=1.0), "small": dict(ttft_ms=5, tpot_ms=1),
        "medium": dict(ttft_ms=5, tpot_ms=1)}


def _policy(small_at: str, *, concurrency: int = 64, queue_timeout_ms: int = 0, sla_ms: int | None = None) -> str:
    """`small` served by simulator `small_at` (`hung` never answers), falling back to `medium`; a breaker that
    opens at 2 failures; call slots when `queue_timeout_ms` is set; with `sla_ms`, `medium` (predicted at 4 ms
    for 3 tokens, `small` at 7 ms) is a candidate too, under a p95 latency of `sla_ms`."""
    head = models(
        model("small", small_at, upstream_model="sim-small", size_b=1, latency_prior=latency(5, 1),
              max_concurrency=concurrency, timeouts=short_timeouts(first_byte_s=0.5, total_s=0.6)),
        model("medium", size_b=8, latency_prior=latency(2, 1), timeouts=short_timeouts()))
    candidates = "[small]" if sla_ms is None else f"[small, medium]\n    sla: {{{{p95_latency_ms: {sla_ms}}}}}"
    return head + f"""routes:
  - name: chat
    match: {{{{models: ["auto"]}}}}
    candidates: {candidates}
    fallback: [medium]
routing: {{{{breaker: {{{{failure_threshold: 2, open_s: 30}}}}, queue_timeout_ms: {queue_timeout_ms}}}}}
"""


def _served_by(gw) -> str:
    raw = gw.openai().chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    return raw.headers["x-gateway-model"]


def _wait_until(condition, what: str, timeout_s: float = 5.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline_s, what
        time.sleep(0.005)


def test_calls_to_a_models_old_server_that_fail_after_a_reload_do_not_open_its_new_servers_circuit():
    """Two calls hang on `small`'s old server; the SRE points `small` at a healthy one. When the two old calls
    time out (and fall back to `medium`), their failures are of the server `small` no longer calls: its new
    server's circuit stays closed and the next request is served by `small`, not sent to the fallback for
    the breaker's 30 s."""
    gw = Harness(_policy("hung"), SIMS).start()
    try:
        with ThreadPoolExecutor(2) as pool:
            hung = [pool.submit(_served_by, gw) for _ in range(2)]
            _wait_until(lambda: gw.services.fleet.estimates.in_flight("small") == 2, "the calls never hung")
            gw.write_policy(_policy("small"))
            assert gw.reload_policy()
            assert [call.result(10) for call in hung] == ["medium", "medium"]     # the old server timed out
        assert gw.services.fleet.breakers.state("small") == "closed"
        assert _served_by(gw) == "small"
    finally:
        gw.stop()


def test_a_call_hung_on_a_models_old_server_does_not_hold_the_new_servers_call_slot():
    """`small` takes one call at a time (max_concurrency 1, call slots on); its only call hangs on the old
    server when a reload points it at a healthy one: the next request gets the new server's slot at once and is
    served by `small`, rather than waiting out queue_timeout_ms behind a call to a server it no longer calls
    and going to the fallback."""
    gw = Harness(_policy("hung", concurrency=1, queue_timeout_ms=300), SIMS).start()
    try:
        assert _served_after_a_move(gw, _policy("small", concurrency=1, queue_timeout_ms=300),
                                    lambda: gw.services.fleet.slots.busy("small") == 1) == ("small", "medium")
    finally:
        gw.stop()


def _served_after_a_move(gw, moved: str, hanging: Callable[[], bool]) -> tuple[str, str]:
    """One call hangs on `small`'s old server (until `hanging()`), then the policy `moved` is loaded: (the model
    that serves the next request, the one that served the hung call once its server timed out)."""
    with ThreadPoolExecutor(1) as pool:
        hung = pool.submit(_served_by, gw)
        _wait_until(hanging, "the call never hung")
        gw.write_policy(moved)
        assert gw.reload_policy()
        served = _served_by(gw)
        return served, hung.result(10)


# -- the GPU sampler: what it learned of a model's GPUs -----------------------------------------------------------


async def test_a_model_moved_to_other_gpus_learns_their_idle_power_afresh():
    """`big` idled at 50 W on GPU 0 (no idle_w configured: the sampler learns it); a reload moves it to GPU 1,
    which idles at 100 W. A request there that keeps GPU 1 at its idle power is booked no joules above idle, and
    GPU 1's idle power is 100 W: not 50 W learned of GPU 0, which booked the request 50 W of GPU 1's idle power
    (and taught the router, and priced, energy it never drew) for up to the learner's 10-minute window."""
    clock = ManualClock()
    nvml = two_gpus(clock, power_w=50.0)
    nvml.gpus[1].set_power(100.0)
    monitor = EnergyMonitor(policy_with({"big": GpuSource(source="nvml", ids=("0",))}, interval_s=60.0),
                            nvml_module=nvml, clock=clock)
    await monitor.open()
    try:
        for _ in range(3):
            await monitor.sample_once()
            clock.advance(1.0)
        assert monitor.totals("big").idle_w_per_gpu == pytest.approx(50.0)
        await monitor.adopt(policy_with({"big": GpuSource(source="nvml", ids=("1",))}, interval_s=60.0))
        await monitor.sample_once()
        request = monitor.request_started("big")
        for _ in range(2):
            clock.advance(1.0)
            await monitor.sample_once()
        monitor.request_ended(request)
        assert monitor.ledger.request_finished(request) == pytest.approx(0.0, abs=1.0)
        assert monitor.totals("big").idle_w_per_gpu == pytest.approx(100.0)
    finally:
        await monitor.stop()


def test_a_call_hung_on_a_models_old_server_does_not_count_as_load_on_its_new_one():
    """`small` (max_concurrency 1) is predicted at 7 ms for 3 tokens, within the route's 10 ms; its one call hangs
    on the old server when a reload points it at a healthy one. The next request is predicted at 7 ms on the new
    server, which has nothing in flight, and served by `small`: not at twice that for the load of a call to a
    server it no longer calls, which dropped it for `medium`."""
    gw = Harness(_policy("hung", concurrency=1, sla_ms=10), SIMS).start()
    try:
        assert _served_after_a_move(gw, _policy("small", concurrency=1, sla_ms=10),
                                    lambda: gw.services.fleet.estimates.in_flight("small") == 1) == ("small", "medium")
        assert gw.services.fleet.estimates.in_flight("small") == 0
    finally:
        gw.stop()


# -- a model moved away and back while calls hang -------------------------------------------------------------------


async def test_a_model_moved_away_and_back_counts_the_calls_still_hung_on_its_first_server_against_its_slots():
    """`small` takes one call at a time; its call hangs on server A when a reload points it at B, and another
    points it back at A before the call ends: A still has that call in flight (the in-flight count says so, as
    `_move_in_flight` hands it back), so the next call waits for A's one slot instead of being let in beside it."""
    old = "http://10.0.0.9:8000/v1"
    fleet = Fleet(_version("a", max_concurrency=1))
    small_a = fleet._models["small"]
    pool = fleet.slots.pool("small", 1)
    fleet.started(small_a)
    assert await fleet.slots.take("small", 1, 0, 0.05, pool=pool) == 0.0        # the call that hangs on A
    fleet.adopt(_version("b", max_concurrency=1, endpoint=old))
    fleet.adopt(_version("c", max_concurrency=1))                                 # back on A
    assert fleet.estimates.in_flight("small") == 1                               # A's call counts again
    with pytest.raises(ModelBusy):                                                # A's one slot is taken
        await fleet.slots.take("small", 1, 0, 0.05, pool=fleet.slots.pool("small", 1))
