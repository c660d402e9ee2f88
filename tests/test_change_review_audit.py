"""Review of the day's merged changes (a442c1c..): edges they left. A `store: true` request whose reject route has
no model meeting its SLA (its refusal deferred to a cache lookup that never comes), a prompt a model server read on a
reused keep-alive connection sent to it again, and a ledger's audio tokens and its cache hits on such a route replayed
unlike live."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import openai
import pytest

from gateway.context import Usage
from gateway.cost import token_cost_usd
from gateway.policy.model import CacheRule, Match, Policy, Price, Route, Sla
from gateway.replay import read_traffic, replay
from tests.support.harness import Harness, raw_model_gateway
from tests.support.raw_calls import post
from tests.test_cache_audit import STRICT_POLICY, ask, chat, metrics_environ
from tests.test_e2e_upstream_audit import KeepAliveRaw
from tests.test_replay_audit import _ledger_line, _model


@pytest.fixture(scope="module")
def strict_gw():
    harness = Harness(STRICT_POLICY, {"small": dict(ttft_ms=1, tpot_ms=0)}, metrics_environ()).start()
    yield harness
    harness.stop()


def test_a_store_true_request_no_model_meets_the_sla_for_is_refused_503_sla_unmet(strict_gw):
    """`store: true` skips the cache lookup, so a stored answer cannot serve it: a request whose headers tighten a
    reject route past every model is refused with the route's 503 sla_unmet, not sent on with an empty plan."""
    strict_gw.services.fleet.breakers._circuits.clear()
    with pytest.raises(openai.APIStatusError) as refused:
        chat(strict_gw, headers={"x-gateway-max-latency-ms": "1"}, **ask("kept by the provider", store=True))
    assert refused.value.status_code == 503
    assert refused.value.response.json()["error"]["code"] == "sla_unmet"


# the upstream: a prompt the model server read on a reused connection ---------------------------------------------


class CrashingRaw(KeepAliveRaw):
    """A keep-alive model server that, on a connection's second request, reads it whole, works on it for 0.3 s and
    then goes down with the connection (a prompt that crashes the worker); every request it read is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.crash_reused = False

    async def _drops_reused(self, writer: asyncio.StreamWriter) -> bool:
        if not self.crash_reused:
            return False
        await asyncio.sleep(0.3)        # the model saw the prompt and worked on it
        return True


@pytest.fixture(scope="module")
def crashing():
    with raw_model_gateway(first_byte_s=2, raw=CrashingRaw()) as (harness, raw):
        yield harness, raw


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_prompt_the_model_server_read_and_went_down_on_over_a_reused_connection_is_not_sent_again(crashing, stream):
    """A model server that read the prompt on a kept-alive connection and went down working on it (0.3 s later)
    saw it: the gateway does not send that prompt a second time (as it does not on a new connection), so a prompt
    that brings a server down is not sent twice because the pool happened to be warm."""
    harness, raw = crashing
    raw.crash_reused, raw.stream = False, stream
    harness.services.fleet.breakers._circuits.clear()
    assert post(harness, model="raw-only", stream=stream).status_code == 200     # a connection now in the pool
    raw.crash_reused, raw.read_requests = True, 0
    post(harness, model="raw-only", stream=stream)
    assert raw.read_requests == 1, "the prompt the model server read was sent to it again"


# the replay: a ledger's audio tokens -------------------------------------------------------------------------------

def test_a_ledger_replayed_against_its_own_policy_prices_audio_tokens_as_the_ledger_did(tmp_path):
    """The ledger now keeps each attempt's audio tokens, which the account stage priced at the model's audio
    prices; `gateway replay` prices every attempt "as the account stage prices it", so replaying the ledger
    against its own policy gives the cost the live gateway booked, not the audio billed as text."""
    price = Price(Decimal(1), Decimal(2), audio_input_per_mtok=Decimal(40), audio_output_per_mtok=Decimal(80))
    small = _model("small", 40, 4, price)
    policy = Policy(version=1, models={"small": small},
                    routes=(Route("r", Match(models=("auto",)), candidates=("small",)),))
    live = token_cost_usd(small, Usage(input_tokens=1000, output_tokens=10, audio_input_tokens=800,
                                       audio_output_tokens=6))
    line = _ledger_line(100.0, cost_usd=str(live))
    line["attempts"][0].update(cached_input_tokens=0, audio_input_tokens=800, audio_output_tokens=6,
                               cost_usd=str(live))
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps(line) + "\n")
    outcome, = replay(policy, read_traffic(path)).outcomes
    assert outcome.cost_usd == live



def test_a_recorded_cache_hit_on_a_reject_route_no_model_meets_is_replayed_as_a_hit_as_live_answers_it(tmp_path):
    """Live, a `reject` route with no model meeting its SLA (too slow for it here) still answers a request its cache
    holds; `gateway replay` routes "as the live gateway would", so a ledger's cache hit on such a route replays as a
    cache hit, not as a 503 `sla` refusal."""
    small = _model("small", 400, 40, Price(Decimal(1), Decimal(1)))
    route = Route("r", Match(models=("auto",)), candidates=("small",),
                  sla=Sla(p95_latency_ms=50, on_violation="reject"), cache=CacheRule(enabled=True))
    policy = Policy(version=1, models={"small": small}, routes=(route,))
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps(_ledger_line(100.0, cache="hit", cost_usd="0", attempts=[])) + "\n")
    outcome, = replay(policy, read_traffic(path)).outcomes
    assert (outcome.status, outcome.reason) == ("cache_hit", None)
