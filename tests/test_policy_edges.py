"""Policy edges an SRE meets at 3 a.m.: located problems for odd values, and plans that keep the route's hard terms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.policy.load import check_policy
from gateway.policy.model import Policy, Sla
from gateway.stores import redis_url_problem
from gateway.routing import Tighten
from tests.support.harness import Harness
from tests.support.policies import standard_models
from tests.test_routing_planner import Setup, chat_route, plan_names

HEAD = """version: 1
models:
  small: {endpoint: "http://127.0.0.1:9101/v1", size_b: 1}
routes:
  - name: chat
    candidates: [small]
"""


def write(tmp_path: Path, text: str) -> Path:
    """The policy text as a file."""
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("url", ["http://[::1/v1", "http://127.0.0.1:abc/v1", "http://127.0.0.1:99999/v1",
                                 "http://127.0.0.1:0/v1"])
def test_a_model_endpoint_no_client_can_call_is_a_located_problem(tmp_path, url):
    """An endpoint with a broken IPv6 host or a port that is no port is a problem at its line and key path."""
    path = write(tmp_path, HEAD.replace("http://127.0.0.1:9101/v1", url))
    [problem] = check_policy(path)
    assert (problem.line, problem.path) == (3, "models.small.endpoint")
    assert url in problem.message


@pytest.mark.parametrize("tail, key", [
    ("store: {redis_url: 'redis://127.0.0.1:70000/0'}\n", "store.redis_url"),
    ("store: {redis_url: 'redis://[::1/0'}\n", "store.redis_url"),
])
def test_a_store_url_with_a_broken_address_is_a_located_problem(tmp_path, tail, key):
    """A Redis URL whose port or IPv6 host cannot be read is a problem at its line and key path."""
    [problem] = check_policy(write(tmp_path, HEAD + tail))
    assert (problem.line, problem.path) == (7, key)


def test_an_admin_token_that_is_a_tenant_key_is_a_located_problem(tmp_path):
    """`server.admin_token_sha256` equal to a tenant's key hash is found by `policy check`, at its line, as
    start-up refuses it; it used to pass the check and stop `gateway run`."""
    key_hash = "a" * 64
    text = HEAD + f"tenants:\n  acme: {{keys_sha256: ['{key_hash}']}}\nserver:\n  admin_token_sha256: '{key_hash}'\n"
    [problem] = check_policy(write(tmp_path, text))
    assert (problem.line, problem.path) == (10, "server.admin_token_sha256")
    assert "also a tenant API key" in problem.message


def test_policy_check_of_a_broken_ipv6_endpoint_prints_no_traceback(tmp_path):
    """`gateway policy check` names file, line and key of a broken IPv6 endpoint and exits 1, no stack trace."""
    path = write(tmp_path, HEAD.replace("http://127.0.0.1:9101/v1", "http://[::1/v1"))
    done = subprocess.run([sys.executable, "-m", "gateway", "policy", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"{path}:3: models.small.endpoint" in done.stderr


def test_a_fallback_below_the_min_tier_is_not_planned_when_a_candidate_meets_the_sla():
    """A route's min_tier is a hard term: a lower-tier fallback is left out of the plan, as with best effort."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000, min_tier=2), candidates=("medium", "large"),
                             fallback=("small",)))
    assert plan_names(setup.decide()) == ["medium", "large"]


def test_a_fallback_below_the_requested_tier_is_not_planned():
    """A request asking x-gateway-min-tier 3 never gets a tier-1 fallback in its plan."""
    setup = Setup(chat_route(Sla(p95_latency_ms=6000), candidates=("small", "large"), fallback=("small",)))
    assert plan_names(setup.decide(tighten=Tighten(min_tier=3))) == ["large"]


TIERED = standard_models("small", "large") + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [large]
    sla: {{min_tier: 3}}
    fallback: [small]
"""


def test_a_failing_tier_three_model_is_not_answered_by_a_tier_one_fallback():
    """When the only tier-3 model fails, the client gets the error, not a tier-1 model's answer (SDK, real gateway)."""
    import openai

    harness = Harness(TIERED, sims={"small": dict(ttft_ms=1, tpot_ms=0),
                                    "large": dict(ttft_ms=1, tpot_ms=0, error_rate=1.0)}).start()
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            harness.openai().chat.completions.create(
                model="auto", max_tokens=3, messages=[{"role": "user", "content": "tier three only"}])
        assert caught.value.status_code >= 500
        assert harness.sim_stats("small")["total"] == 0
    finally:
        harness.stop()


def test_policy_check_notes_a_fallback_below_the_route_min_tier(tmp_path):
    """`policy check` says a fallback below the route's min_tier is never planned (valid, so a note, exit 0)."""
    text = HEAD.replace("routes:", '  big: {endpoint: "http://127.0.0.1:9102/v1", size_b: 70, tier: 3}\nroutes:')
    path = write(tmp_path, text.replace("candidates: [small]", "candidates: [big]\n    sla: {min_tier: 3}\n"
                                                               "    fallback: [small]"))
    done = subprocess.run([sys.executable, "-m", "gateway", "policy", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "routes.chat.fallback: small below sla.min_tier 3: never planned" in done.stderr


def test_policy_check_of_a_bad_file_then_a_good_one_exits_1(tmp_path, capsys):
    """`gateway policy check BAD GOOD` fails as a whole: a valid file after an invalid one does not clear the exit
    status a deploy script tests."""
    bad, good = tmp_path / "bad.yaml", tmp_path / "good.yaml"
    bad.write_text(HEAD.replace("[small]", "[smal]"))
    good.write_text(HEAD)
    assert main(["policy", "check", str(bad), str(good)]) == 1
    said = capsys.readouterr()
    assert f"{bad}:6: routes[0].candidates[0]: unknown model 'smal'" in said.err and f"{good}: ok" in said.out


@pytest.mark.parametrize("edit, line, key", [
    (lambda text: text.replace("candidates: [small]", "candidates: [small]\n    match: {tenants: [acme]}"),
     7, "routes[0].match.tenants[0]"),
    (lambda text: text + "telemetry: {tenant_labels: [acme]}\n", 7, "telemetry.tenant_labels[0]"),
])
def test_naming_a_tenant_in_a_policy_without_tenants_is_a_located_problem(tmp_path, edit, line, key):
    """With no tenants section the gateway runs open and no tenant ever matches, so naming one is a broken reference."""
    [problem] = check_policy(write(tmp_path, edit(HEAD)))
    assert (problem.line, problem.path) == (line, key)
    assert problem.message == "unknown tenant 'acme' (the policy defines no tenant)"


@pytest.mark.parametrize("text, line, key, says", [
    # a folded scalar keeps its line break: the name would make every response header invalid
    (HEAD.replace("  - name: chat\n", "  - name: >\n      chat\n"), 5, "routes[0].name", "control characters"),
    (HEAD.replace("  small: {", '  "small\\r\\nSet-Cookie: x=1": {').replace("[small]", '["small\\r\\nSet-Cookie: x=1"]'),
     3, "models.small\r\nSet-Cookie: x=1", "control characters"),
    (HEAD + "tenants:\n  \"acme\\n\": {keys_sha256: ['" + "a" * 64 + "']}\n", 8, "tenants.acme\n", "control characters"),
    (HEAD.replace("size_b: 1}", "size_b: 1, gpus: {source: nvml, ids: [0, '0', 1]}}"), 3, "models.small.gpus.ids",
     "names GPU 0 more than once"),
    (HEAD.replace("size_b: 1}", "size_b: 1, latency_prior: {tpot_ms: 1e306}}"), 3,
     "models.small.latency_prior.tpot_ms", "at most"),
    (HEAD.replace("size_b: 1}", "size_b: 1, context_window: 010}"), 3, "models.small.context_window", "in decimal"),
    (HEAD.replace("size_b: 1}", "size_b: 1, max_concurrency: 0x10}"), 3, "models.small.max_concurrency", "in decimal"),
    (HEAD.replace("size_b: 1}", "size_b: 1, timeouts: {total_s: 1:30}}"), 3, "models.small.timeouts.total_s",
     "in decimal"),
])
def test_values_the_gateway_would_misread_or_could_not_send_are_located_problems(tmp_path, text, line, key, says):
    """A name with a line break or other control character (it goes out in response headers: every request on it
    would get no answer at all), a GPU named twice (its time priced twice), a latency prior past an hour (it
    overflows a prediction's GPU price), and a number YAML 1.1 reads in another base (010 is 8) are problems at
    their line and key, not a policy that loads and misbehaves."""
    problems = check_policy(write(tmp_path, text))
    assert [(p.line, p.path) for p in problems] == [(line, key)], problems
    assert says in problems[0].message


@pytest.mark.parametrize("route_tail, says", [
    ("    sla: {min_tier: 3}\n",
     "routes.chat.sla.min_tier: 3, but its candidates and fallbacks reach tier 1 at most: every request on it is "
     "refused (503 sla_unmet)"),
    ("    match: {prompt_tokens: {min: 8192}, endpoints: [chat]}\n",   # a full window leaves no room to answer
     "routes.chat.match.prompt_tokens.min: 8192, but the largest context window of its candidates and fallbacks "
     "is 8192: no request it matches fits"),
    ("    match: {prompt_tokens: {min: 8192}}\n",      # completions and embeddings batches are read prompt by prompt
     "routes.chat.match.prompt_tokens.min: 8192, but the largest context window of its candidates and fallbacks "
     "is 8192: only a batch of prompts (inputs) that each fit is served"),
])
def test_policy_check_notes_a_route_no_model_of_it_can_serve(tmp_path, route_tail, says):
    """A route whose min_tier is above every model it names, or whose smallest matched prompt fits no model's
    context window, loads (it is valid) but refuses every request: `policy check` says so."""
    path = write(tmp_path, HEAD.replace("    candidates: [small]\n", "    candidates: [small]\n" + route_tail))
    done = subprocess.run([sys.executable, "-m", "gateway", "policy", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert says in done.stderr


def test_a_refused_url_is_quoted_without_its_credentials(tmp_path):
    """A Redis URL (or an endpoint) that is refused is quoted in the problem, which reaches the log, `policy
    check` and the admin API's reload answer: never with its password."""
    [problem] = check_policy(write(tmp_path, HEAD + "store: {redis_url: 'redis://:REDISPASS@127.0.0.1:70000/0'}\n"))
    assert "REDISPASS" not in problem.message and "redis://***@127.0.0.1:70000/0" in problem.message
    [problem] = check_policy(write(tmp_path, HEAD + "store: {redis_url: 'reddis://user:REDISPASS@h/0'}\n"))
    assert "REDISPASS" not in problem.message


@pytest.mark.parametrize("url", ["reddis://:s3cr'et@host:6379/0", "redis://:ab/cd'ef@host/0",
                                 'redis://u:pa"ss/w@host/0', "redis://:sec ret/x@host/0",
                                 "htp://:tok'en@host:9400/metrics"])
def test_a_password_holding_a_quote_or_a_space_is_masked_whole(tmp_path, url):
    """The URL is quoted in the problem between single quotes; a quote or space in its password does not end the
    mask there."""
    if url.startswith("red"):
        text = HEAD + f"store: {{redis_url: {json.dumps(url)}}}\n"
    else:                               # a DCGM exporter's URL
        text = HEAD.replace("size_b: 1}", f"size_b: 1, gpus: {{source: dcgm, url: {json.dumps(url)}, ids: [0]}}}}")
    problems = check_policy(write(tmp_path, text))
    assert problems, text
    secret = url.split("//", 1)[1].rpartition("@")[0]
    for problem in problems:
        assert secret not in problem.message and secret.split(":")[-1] not in problem.message, problem.message
    assert any("***@host" in problem.message for problem in problems)


@pytest.mark.parametrize("url, secret", [("redis:/:hunter2@127.0.0.1:6379/0", "hunter2"),
                                         ("redis:hunter2@host:6379", "hunter2")])
def test_a_url_missing_a_slash_is_masked_too(tmp_path, url, secret):
    """A typo that leaves one slash or none after the scheme still hides the password in the refusal."""
    [problem] = check_policy(write(tmp_path, HEAD + f"store: {{redis_url: '{url}'}}\n"))
    assert secret not in problem.message and "***@" in problem.message, problem.message


@pytest.mark.parametrize("url", ["redis://:Zx9/Kq+Pw3S3cr3t@redis.internal:6379/0",
                                 "redis://user:Zx9/Kq+Pw3S3cr3t@redis.internal/0"])
def test_a_password_holding_a_slash_is_not_quoted_in_part(tmp_path, url):
    """A password with a '/' its writer did not percent-encode (base64 ones have them) is masked whole, and the
    URL parser's reason, which quotes the password's start as a port, is not passed on: the problem says what
    to do instead."""
    [problem] = check_policy(write(tmp_path, HEAD + f"store: {{redis_url: '{url}'}}\n"))
    assert "Zx9" not in problem.message and "S3cr3t" not in problem.message
    assert "***@redis.internal" in problem.message and "percent-encoded" in problem.message
    said = redis_url_problem(Policy(version=1, models={}, routes=()), {"GATEWAY_REDIS_URL": url})
    assert "Zx9" not in said and "S3cr3t" not in said and "percent-encoded" in said
