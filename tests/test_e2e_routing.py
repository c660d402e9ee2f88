"""End to end: SLA routing, fallback and circuit breaking on the running gateway, through the openai SDK."""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.support import policies
from tests.support.harness import Harness

#: the route SLA of `auto`, and what the slowed small model takes per answer
SLA_MS = 500
SLOW_TTFT_MS = 700
WINDOW_S = 1.5
PRIOR_WEIGHT = 5


def model(name: str, sim: str, size_b: float = 1, tier: int = 1, ctx: int = 8192, price: float = 0.1,
          first_byte_s: float = 2, total_s: float = 10) -> str:
    """One model entry of the policy template, with latency prior 5 ms TTFT and 1 ms per token."""
    return policies.model(name, sim, size_b=size_b, tier=tier, context_window=ctx, price=policies.price(price, price),
                          latency_prior=policies.latency(5, 1), timeouts=policies.short_timeouts(first_byte_s, total_s))


def policy_template(dead_url: str, ledger_path: Path) -> str:
    """The test policy: SLA routes over small/medium/large, and one route per failure scenario."""
    models = "".join([
        model("small", "small"), model("medium", "medium", size_b=8, tier=2, ctx=32768, price=1),
        model("large", "large", size_b=70, tier=3, ctx=131072, price=5),
        model("flaky", "flaky"), model("limited", "limited"), model("hanging", "hanging", first_byte_s=0.3, total_s=1),
        model("broken", "broken"), model("liar", "liar", ctx=131072), model("dropper", "dropper"), model("slowpoke", "slowpoke"),
    ])
    dead = "".join(model(name, "dead") for name in ("dead", "dead2")).replace("{dead}", dead_url)
    return f"""
version: 1
routing:
  latency_window_s: {WINDOW_S}
  prior_weight: {PRIOR_WEIGHT}
  explore_share: 0
  breaker: {{{{failure_threshold: 3, open_s: 1}}}}
ledger: {{{{path: {ledger_path}}}}}
models:
{models}{dead}
routes:
  - name: sla
    match: {{{{models: [auto]}}}}
    candidates: [small, medium, large]
    sla: {{{{p95_latency_ms: {SLA_MS}}}}}
  - name: smart
    match: {{{{models: [smart]}}}}
    candidates: [small, medium, large]
    sla: {{{{min_tier: 2}}}}
  - name: strict
    match: {{{{models: [strict]}}}}
    candidates: [small, medium]
    sla: {{{{p95_latency_ms: 20, on_violation: reject}}}}
  - name: flaky
    match: {{{{models: [flaky]}}}}
    candidates: [flaky]
    fallback: [medium]
  - name: limited
    match: {{{{models: [limited]}}}}
    candidates: [limited]
    fallback: [medium]
  - name: hanging
    match: {{{{models: [hanging]}}}}
    candidates: [hanging]
    fallback: [medium]
  - name: dead
    match: {{{{models: [dead]}}}}
    candidates: [dead]
    fallback: [medium]
  - name: limited-only
    match: {{{{models: [limited-only]}}}}
    candidates: [limited]
  - name: liar
    match: {{{{models: [liar]}}}}
    candidates: [liar]
    fallback: [large]
  - name: doomed
    match: {{{{models: [doomed]}}}}
    candidates: [broken]
    fallback: [dead2]
  - name: dropper
    match: {{{{models: [dropper]}}}}
    candidates: [dropper]
    fallback: [medium]
  - name: slowpoke
    match: {{{{models: [slowpoke]}}}}
    candidates: [slowpoke]
  - name: thrice
    match: {{{{models: [thrice]}}}}
    candidates: [broken]
    fallback: [dead2, medium]
  - name: batch
    match: {{{{models: [batch]}}}}
    candidates: [small, medium]
"""


SIMS = {
    "small": dict(ttft_ms=5, tpot_ms=1), "medium": dict(ttft_ms=10, tpot_ms=2, context_window=32768),
    "large": dict(ttft_ms=20, tpot_ms=3, context_window=131072), "flaky": dict(ttft_ms=5, tpot_ms=1),
    "limited": dict(ttft_ms=5, tpot_ms=1, rate_limit_rate=1.0, retry_after_s=1.0),
    "hanging": dict(ttft_ms=5, tpot_ms=1, hang_rate=1.0), "broken": dict(ttft_ms=5, tpot_ms=1, error_rate=1.0),
    "dropper": dict(ttft_ms=5, tpot_ms=5, drop_rate=1.0), "slowpoke": dict(ttft_ms=5, tpot_ms=100),
    "liar": dict(ttft_ms=5, tpot_ms=1, context_window=4096),
}


def dead_port_url() -> str:
    """The URL of a port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    ledger_path = tmp_path_factory.mktemp("ledger") / "ledger.jsonl"
    harness = Harness(policy_template(dead_port_url(), ledger_path), SIMS).start()
    harness.ledger_path = ledger_path
    yield harness
    harness.stop()


@functools.cache
def client(gw):
    """One SDK client per harness (creating one costs tens of milliseconds)."""
    return gw.openai()


def chat(gw, alias: str, *, max_tokens: int = 10, content: str = "Hello", headers: dict | None = None):
    """One non-streamed chat call; returns the raw response (headers and parsed body)."""
    return client(gw).chat.completions.with_raw_response.create(
        model=alias, messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        extra_headers=headers or {})


def ledger_entry(gw, request_id: str) -> dict:
    """The ledger line of one request (the ledger is written by a background thread)."""
    found: list[dict] = []

    def written() -> bool:
        lines = gw.ledger_path.read_text().splitlines() if gw.ledger_path.exists() else []
        found[:] = [entry for line in lines if (entry := json.loads(line))["request_id"] == request_id]
        return bool(found)

    assert wait_for(written), f"no ledger line for request {request_id}"
    return found[0]


def served_by(gw, alias: str, **kwargs) -> str:
    """The model the gateway says answered one request."""
    return chat(gw, alias, **kwargs).headers["x-gateway-model"]


def total(gw, sim: str) -> int:
    """Requests a simulator has finished."""
    return gw.sim_stats(sim)["total"]


def wait_for(predicate, timeout_s: float = 5.0, interval_s: float = 0.02) -> bool:
    """Poll until `predicate()` holds or the time is up; returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not (ok := predicate()) and time.monotonic() < deadline:
        time.sleep(interval_s)
    return ok


def moves_after_at_most(samples_in_window: int) -> int:
    """Slow answers after which the p95 (nearest rank over prior + samples) must be a slow one.

    With W samples in the window (prior pseudo-samples included) and k slow ones on top,
    nearest-rank p95 is slow once k >= floor(0.05 (W + k)) + 1, which holds for every
    k >= (W + 20) / 19.
    """
    return -(-(samples_in_window + 20) // 19)


# --- SLA routing ------------------------------------------------------------------------------

def test_slow_small_model_loses_traffic_then_wins_it_back(gw):
    """A fast small model is chosen; slowed past the SLA, traffic moves to medium within the bound, and back once it recovers."""
    assert [served_by(gw, "auto") for _ in range(3)] == ["small"] * 3
    bound = moves_after_at_most(PRIOR_WEIGHT + gw.services.fleet.estimates.sample_count("small"))
    gw.sim_config("small", ttft_ms=SLOW_TTFT_MS)
    try:
        before = total(gw, "small")
        served = [served_by(gw, "auto") for _ in range(bound + 3)]
        slow_answers = total(gw, "small") - before
        assert 1 <= slow_answers <= bound
        assert served[slow_answers:] == ["medium"] * (len(served) - slow_answers)
    finally:
        gw.sim_config("small", ttft_ms=5)
    # no request reaches small now: its slow samples leave the window and the prior is what remains
    assert served_by(gw, "auto") == "medium"
    time.sleep(WINDOW_S + 0.2)
    assert [served_by(gw, "auto") for _ in range(3)] == ["small"] * 3


def test_slow_one_token_answers_are_learned(gw):
    """Slow one-token answers raise small's predicted latency past the SLA like longer ones do."""
    gw.sim_config("small", ttft_ms=SLOW_TTFT_MS)
    try:
        served = [served_by(gw, "auto", max_tokens=1) for _ in range(3)]
    finally:
        gw.sim_config("small", ttft_ms=5)
        time.sleep(WINDOW_S)                        # slow samples leave the window before the next test
    assert served[-1] == "medium"


def test_long_prompt_goes_to_a_model_whose_context_fits(gw):
    """A prompt longer than small's 8k context window is served by medium, without trying small."""
    before = total(gw, "small")
    raw = chat(gw, "auto", content="word " * 9000, max_tokens=5)
    assert raw.headers["x-gateway-model"] == "medium"
    assert raw.headers["x-gateway-fallback"] == "none"
    assert total(gw, "small") == before


def test_a_batch_longer_than_the_window_only_in_all_is_served_by_the_small_model(gw):
    """Four prompts (inputs) of about 3,000 tokens each, 12,000 in all, are each read on their own: small's 8k
    window holds every one, so small serves the completions batch and the embeddings list, and usage counts them
    all."""
    text = "word " * 3000
    completions = client(gw).completions.with_raw_response.create(model="batch", prompt=[text] * 4, max_tokens=5)
    embeddings = client(gw).embeddings.with_raw_response.create(model="batch", input=[text] * 4)
    for raw in (completions, embeddings):
        assert (raw.headers["x-gateway-model"], raw.headers["x-gateway-fallback"]) == ("small", "none")
        assert raw.parse().usage.prompt_tokens >= 12_000
    assert len(completions.parse().choices) == 4 and len(embeddings.parse().data) == 4


def test_route_min_tier_is_honoured(gw):
    """A route with min_tier 2 skips the tier-1 small model and serves from medium."""
    assert served_by(gw, "smart") == "medium"


def test_min_tier_header_tightens_but_never_loosens(gw):
    """x-gateway-min-tier raises the tier a request needs; asking for less than the route's own is ignored."""
    assert served_by(gw, "auto", headers={"x-gateway-min-tier": "3"}) == "large"
    assert served_by(gw, "smart", headers={"x-gateway-min-tier": "0"}) == "medium"


def test_max_latency_header_only_tightens(gw):
    """x-gateway-max-latency-ms can make a reject route refuse; a looser value cannot rescue it."""
    with pytest.raises(openai.APIStatusError) as loose:
        chat(gw, "strict", max_tokens=100, headers={"x-gateway-max-latency-ms": "100000"})
    assert loose.value.status_code == 503
    tight = chat(gw, "strict", max_tokens=5)
    assert tight.headers["x-gateway-model"] == "small"
    with pytest.raises(openai.APIStatusError) as tightened:
        chat(gw, "strict", max_tokens=5, headers={"x-gateway-max-latency-ms": "1"})
    assert tightened.value.status_code == 503
    assert "p95_latency_ms 1" in tightened.value.message


def test_bad_sla_header_is_a_clear_400(gw):
    """A malformed SLA header is refused with 400 naming the header."""
    with pytest.raises(openai.BadRequestError) as caught:
        chat(gw, "auto", headers={"x-gateway-max-latency-ms": "soon"})
    assert "x-gateway-max-latency-ms" in caught.value.message


def test_reject_route_answers_503_naming_the_constraint(gw):
    """When no candidate meets a reject route's SLA the gateway answers 503 saying which term failed."""
    before = total(gw, "small") + total(gw, "medium")
    with pytest.raises(openai.APIStatusError) as caught:
        chat(gw, "strict", max_tokens=100)     # 100 tokens cannot finish within 20 ms on either model
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "sla_unmet"
    assert "p95_latency_ms 20" in caught.value.message
    assert "small" in caught.value.message and "medium" in caught.value.message
    assert total(gw, "small") + total(gw, "medium") == before


# --- fallback and circuit breaking ------------------------------------------------------------

@pytest.mark.parametrize("alias, reason", [
    ("limited", "rate_limited"),
    ("hanging", "timeout"),
    ("dead", "connect_error"),
])
def test_failing_model_falls_back(gw, alias, reason):
    """A 429, a hang past first_byte_s, or a refused connection moves the request to the fallback model."""
    raw = chat(gw, alias)
    assert raw.headers["x-gateway-model"] == "medium"
    assert raw.headers["x-gateway-fallback"] == "fallback"
    assert raw.parse().choices[0].message.content
    entry = ledger_entry(gw, raw.headers["x-request-id"])
    assert (entry["models_tried"], entry["fallback"], entry["fallback_reason"]) == \
        ([alias, "medium"], "fallback", reason)


def test_hung_upstream_is_abandoned(gw):
    """After its timeout (total_s: a non-streamed answer comes whole) the gateway closes the hung upstream
    request."""
    chat(gw, "hanging")
    assert wait_for(lambda: gw.sim_stats("hanging")["in_flight"] == 0)


def test_retry_after_opens_the_circuit_for_that_long(gw):
    """A 429 with Retry-After opens the model's circuit at once, so the next request skips it."""
    assert wait_for(lambda: gw.services.fleet.breakers.state("limited") != "open", timeout_s=3)
    chat(gw, "limited")
    assert gw.services.fleet.breakers.state("limited") == "open"
    before = total(gw, "limited")
    assert served_by(gw, "limited") == "medium"
    assert total(gw, "limited") == before


def test_breaker_opens_after_threshold_and_closes_after_probe(gw):
    """failure_threshold consecutive 500s open the breaker; after open_s one probe succeeds and closes it."""
    breakers = gw.services.fleet.breakers
    gw.sim_config("flaky", error_rate=1.0)
    try:
        for _ in range(3):
            assert breakers.state("flaky") == "closed"
            raw = chat(gw, "flaky")
            assert (raw.headers["x-gateway-model"], raw.headers["x-gateway-fallback"]) == ("medium", "fallback")
        assert breakers.state("flaky") == "open"
        before = total(gw, "flaky")
        assert served_by(gw, "flaky") == "medium"
        assert total(gw, "flaky") == before          # an open circuit is not called
    finally:
        gw.sim_config("flaky", error_rate=0.0)
    assert wait_for(lambda: breakers.state("flaky") == "half_open", timeout_s=3)
    assert served_by(gw, "flaky") == "flaky"
    assert breakers.state("flaky") == "closed"


def test_context_length_error_falls_back_without_tripping_the_breaker(gw):
    """An upstream context-length 400 moves the request on, but is not counted as the model failing."""
    for _ in range(4):                              # more than failure_threshold
        raw = chat(gw, "liar", content="word " * 5000, max_tokens=5)
        assert (raw.headers["x-gateway-model"], raw.headers["x-gateway-fallback"]) == ("large", "fallback")
    assert ledger_entry(gw, raw.headers["x-request-id"])["fallback_reason"] == "context_length"
    assert gw.services.fleet.breakers.state("liar") == "closed"
    assert gw.sim_stats("liar")["by_outcome"] == {"context_length": 4}


def test_every_model_failing_is_exhausted(gw):
    """When the candidate and the fallback both fail the client gets the error and state exhausted."""
    with pytest.raises(openai.APIStatusError) as caught:
        chat(gw, "doomed")
    headers = caught.value.response.headers
    assert caught.value.status_code == 502
    assert headers["x-gateway-fallback"] == "exhausted"
    assert headers["x-gateway-model"] == "dead2"
    assert headers["x-gateway-route"] == "doomed"
    entry = ledger_entry(gw, headers["x-request-id"])
    assert (entry["models_tried"], entry["fallback_reason"]) == (["broken", "dead2"], "connect_error")
    assert [a["error"] for a in entry["attempts"]] == ["http_500", "connect_error"]


def test_rate_limited_with_nowhere_to_go_passes_retry_after_on(gw):
    """A 429 from the only model reaches the client as 429 with the upstream's Retry-After and state exhausted."""
    with pytest.raises(openai.RateLimitError) as caught:
        chat(gw, "limited-only")
    headers = caught.value.response.headers
    assert headers["retry-after"] == "1"
    assert headers["x-gateway-fallback"] == "exhausted"
    assert headers["x-gateway-model"] == "limited"


def test_stream_falls_back_before_its_first_byte(gw):
    """A stream whose first model hangs past first_byte_s is served whole by the fallback model."""
    raw = client(gw).chat.completions.with_raw_response.create(
        model="hanging", stream=True, max_tokens=6, messages=[{"role": "user", "content": "Go"}])
    assert (raw.headers["x-gateway-model"], raw.headers["x-gateway-fallback"]) == ("medium", "fallback")
    pieces = [c.choices[0].delta.content for c in raw.parse() if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 6


def test_models_tried_and_reason_are_in_headers(gw):
    """The models tried and the fallback reason travel in response headers."""
    raw = chat(gw, "dead")
    assert raw.headers["x-gateway-models-tried"] == "dead,medium"
    assert raw.headers["x-gateway-fallback-reason"] == "connect_error"


# --- streams ----------------------------------------------------------------------------------

def test_upstream_drop_mid_stream_ends_client_stream_with_error(gw):
    """An upstream that cuts a stream after the first byte ends the client's stream with an error, not a hang."""
    client = gw.openai(timeout=10)
    stream = client.chat.completions.create(model="dropper", stream=True, max_tokens=20,
                                            messages=[{"role": "user", "content": "Go"}])
    pieces = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    assert pieces                                   # the first bytes had reached the client
    assert "dropper" in caught.value.message
    assert gw.sim_stats("dropper")["by_outcome"].get("drop", 0) >= 1
    assert gw.sim_stats("dropper")["in_flight"] == 0


def test_client_disconnect_cancels_upstream(gw):
    """A client that closes a stream mid-way makes the gateway cancel the upstream generation."""
    client = gw.openai(timeout=10)
    stream = client.chat.completions.create(model="slowpoke", stream=True, max_tokens=100,
                                            messages=[{"role": "user", "content": "Go"}])
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert gw.sim_stats("slowpoke")["in_flight"] == 1
    stream.close()
    assert wait_for(lambda: gw.sim_stats("slowpoke")["in_flight"] == 0, timeout_s=5)
    assert gw.sim_stats("slowpoke")["by_outcome"].get("cancelled") == 1


# --- recovery through exploration, with a window too long to wait out -------------------------

EXPLORING_POLICY = """
version: 1
routing: {{latency_window_s: 600, prior_weight: 1, explore_share: 0.5}}
models:
%s
routes:
  - name: sla
    match: {{models: [auto]}}
    candidates: [small, medium]
    sla: {{p95_latency_ms: %d}}
""" % (model("small", "small") + model("medium", "medium", size_b=8, tier=2, price=1), SLA_MS)


@pytest.fixture(scope="module")
def exploring():
    harness = Harness(EXPLORING_POLICY, {"small": SIMS["small"], "medium": SIMS["medium"]}).start()
    yield harness
    harness.stop()


def small_meets_sla(gw) -> bool:
    """Whether the live router now keeps small for a 10-token answer (the same call live requests make)."""
    policy = gw.holder.current.policy
    decision = gw.services.fleet.router(policy).decide(policy.routes[0], prompt_tokens=10, max_tokens=10,
                                                       stream=False)
    return decision.candidates[0].kept


def test_exploration_wins_traffic_back_before_the_window_expires(exploring):
    """With a 10-minute window, explored requests to the recovered small model bring it back within a few dozen requests."""
    gw = exploring
    gw.sim_config("small", ttft_ms=SLOW_TTFT_MS)
    try:
        for _ in range(20):
            served_by(gw, "auto")
            if not small_meets_sla(gw):
                break
        assert not small_meets_sla(gw)
    finally:
        gw.sim_config("small", ttft_ms=5)
    before = total(gw, "small")
    for sent in range(1, 201):
        served_by(gw, "auto")
        if small_meets_sla(gw):
            break
    assert small_meets_sla(gw), f"small still predicted over the SLA after {sent} requests"
    assert total(gw, "small") > before          # only explored requests can have reached it


def test_a_fallback_whose_circuit_opened_meanwhile_is_not_called(gw):
    """The plan's fallback had its circuit opened while the first model hung: it is not called as a last hope
    (only a plan's first model, alone, is), so the client gets the first model's timeout, not a second failure."""
    breakers = gw.services.fleet.breakers
    before = total(gw, "medium")
    opener = threading.Timer(0.3, breakers.record_failure, args=("medium",), kwargs={"retry_after_s": 30})
    opener.start()
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            gw.openai(max_retries=0).chat.completions.create(
                model="hanging", messages=[{"role": "user", "content": "Hello"}], max_tokens=10)
        assert caught.value.status_code == 504
        assert caught.value.response.headers["x-gateway-models-tried"] == "hanging"
        assert total(gw, "medium") == before
    finally:
        opener.join()
        breakers.forget("medium")
        breakers.forget("hanging")


def test_a_stream_that_failed_mid_way_is_not_sent_on_to_the_fallback(gw):
    """A stream that broke after its first bytes reached the client ends with an in-band error; the fallback is
    not called for an answer nobody would receive (and be billed for)."""
    before = total(gw, "medium")
    stream = gw.openai(timeout=10, max_retries=0).chat.completions.create(
        model="dropper", stream=True, max_tokens=20, messages=[{"role": "user", "content": "Go"}])
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    time.sleep(0.5)
    assert total(gw, "medium") == before
    gw.services.fleet.breakers.forget("dropper")


def test_the_fallback_reason_is_why_the_model_just_before_the_answering_one_failed(gw):
    """Three models tried: x-gateway-fallback-reason names the failure of the one just before the model that
    answered, not the first one's."""
    breakers = gw.services.fleet.breakers
    for name in ("broken", "dead2"):
        breakers.forget(name)
    try:
        raw = chat(gw, "thrice")
        assert raw.headers["x-gateway-models-tried"] == "broken,dead2,medium"
        assert raw.headers["x-gateway-fallback-reason"] == "connect_error"
    finally:
        for name in ("broken", "dead2"):
            breakers.forget(name)
