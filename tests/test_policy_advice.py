"""Valid settings that take no effect as written are said, by `policy check` and at start-up, and fail nothing."""

from __future__ import annotations

import logging

from gateway.cli import main
from gateway.policy.advice import advice
from gateway.policy.load import parse_policy
from tests.support.harness import Harness
from tests.support.policies import model, models

HEAD = """
version: 1
models:
  small: {endpoint: "http://127.0.0.1:1/v1", gpus: {source: nvml, ids: [0]}}
routes:
  - name: chat
    match: {endpoints: [chat, completions]}
    candidates: [small]
  - name: emb
    match: {endpoints: [embeddings]}
    candidates: [small]
"""


def test_priorities_without_call_slots_are_said_to_do_nothing():
    text = HEAD + "tenants:\n  batch: {priority: 0}\n  vip: {priority: 5}\n  plain: {}\n"
    assert advice(parse_policy(text)) == [
        "tenants.{batch, vip}.priority: set, but routing.queue_timeout_ms is 0: priority orders only calls "
        "waiting for a model's call slot, so it has no effect"]
    assert advice(parse_policy(text + "routing: {queue_timeout_ms: 200}\n")) == []
    assert advice(parse_policy(HEAD + "tenants:\n  plain: {priority: 1}\n")) == []     # the default: nothing set


def test_an_energy_limit_on_an_embeddings_route_is_said_not_to_apply():
    text = HEAD.replace("    match: {endpoints: [embeddings]}\n    candidates: [small]\n",
                        "    match: {endpoints: [embeddings]}\n    candidates: [small]\n    sla: {max_energy_j: 5}\n")
    assert advice(parse_policy(text)) == [
        "routes.emb.sla.max_energy_j: embeddings have no output tokens to scale an energy prediction, so it is "
        "not applied"]
    chat = HEAD.replace("  - name: chat\n    candidates: [small]\n",
                        "  - name: chat\n    candidates: [small]\n    sla: {max_energy_j: 5}\n")
    assert advice(parse_policy(chat)) == []



def test_a_gpu_hour_price_on_gpus_named_by_no_id_is_said_to_charge_one():
    """A model priced per GPU hour whose gpus names no ids (sampling reads every GPU) is charged for one GPU:
    said, so an 8-GPU server is not billed as one unnoticed; naming the ids, or no gpus at all, says nothing."""
    priced = HEAD.replace("gpus: {source: nvml, ids: [0]}", "gpu_hour_usd: 3.6, gpus: {source: nvml}")
    assert advice(parse_policy(priced)) == [
        "models.small.gpu_hour_usd: charged for one GPU, as its gpus names no ids (GPU time is priced per GPU "
        "gpus.ids names; sampling reads them all): list its GPUs in gpus.ids to charge each"]
    assert advice(parse_policy(priced.replace("{source: nvml}", "{source: nvml, ids: [0, 1]}"))) == []
    assert advice(parse_policy(HEAD.replace("gpus: {source: nvml, ids: [0]}", "gpu_hour_usd: 3.6"))) == []

def test_policy_check_prints_notes_after_ok_and_still_exits_0(tmp_path, capsys):
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD + "tenants:\n  vip: {priority: 5}\n")
    assert main(["--log-level", "WARNING", "policy", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok\n"
    assert err.startswith(f"{path}: note: tenants.{{vip}}.priority: set, but routing.queue_timeout_ms is 0")


def test_the_gateway_says_the_advice_at_start_up(caplog):
    policy = models(model("small", size_b=1)) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small]
tenants:
  vip: {{priority: 5}}
"""
    with caplog.at_level(logging.WARNING, logger="gateway"):
        harness = Harness(policy, sims={"small": {}}).start()
        harness.stop()
    assert any("tenants.{vip}.priority: set, but routing.queue_timeout_ms is 0" in record.getMessage()
               for record in caplog.records)


def test_policy_check_refuses_a_tenants_section_left_empty_rather_than_run_the_gateway_open(tmp_path, capsys):
    """`tenants:` written with every entry commented out loads as no tenants: the gateway would run open, without
    API keys, and `policy check` says ok. It is a located problem (a reload of it keeps the keyed policy serving);
    `tenants: {}` runs open on purpose."""
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD + "tenants:\n#  team: {keys_sha256: [\"" + "a" * 64 + "\"]}\n")
    assert main(["--log-level", "WARNING", "policy", "check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert f"{path}:12: tenants: written but empty" in err, (out, err)
    path.write_text(HEAD + "tenants: {}\n")
    assert main(["--log-level", "WARNING", "policy", "check", str(path)]) == 0


def test_policy_check_notes_a_route_an_earlier_route_takes_every_request_of():
    """Routes match first-wins: a route after one with no conditions (models "*", every endpoint, any tenant) never
    gets a request, and an SRE who adds one below it sees nothing happen; advice names it and the route taking its
    requests. A route an earlier one only partly covers gets no such note."""
    catch_all = HEAD.replace("    match: {endpoints: [chat, completions]}\n", "")
    shadowed = advice(parse_policy(catch_all))
    assert any(note.startswith("routes.emb.match: never matched") and "'chat'" in note for note in shadowed), shadowed
    assert not any("never matched" in note for note in advice(parse_policy(HEAD)))


def test_a_route_after_a_catch_all_is_not_never_matched_for_a_tenant_allowed_only_it():
    """A tenant whose allow list holds the later route and not the catch-all before it is matched to the later
    one: that route is live, and advice must not tell the SRE to delete it; a tenant allowed both changes
    nothing."""
    catch_all = HEAD.replace("    match: {endpoints: [chat, completions]}\n", "")
    keyed = catch_all + 'tenants:\n  embedder: {keys_sha256: ["' + "a" * 64 + '"], routes: [emb]}\n'
    assert not any("never matched" in note for note in advice(parse_policy(keyed)))
    both = keyed.replace("routes: [emb]", "routes: [emb, chat]")
    assert any(note.startswith("routes.emb.match: never matched") for note in advice(parse_policy(both)))


def test_policy_check_notes_a_candidate_below_the_route_min_tier_as_it_does_a_fallback():
    """A candidate below its route's min_tier is never planned (a request may only raise the tier), just as a
    fallback below it, which advice already notes; the candidate is noted the same way."""
    text = HEAD.replace("routes:", '  big: {endpoint: "http://127.0.0.1:9102/v1", size_b: 70, tier: 3}\nroutes:')
    text = text.replace("    candidates: [small]\n  - name: emb", "    candidates: [small, big]\n"
                        "    sla: {min_tier: 3}\n  - name: emb")
    notes = advice(parse_policy(text))
    assert any(note.startswith("routes.chat.candidates: small below sla.min_tier 3: never planned")
               for note in notes), notes


def test_policy_check_does_not_call_a_route_that_matches_any_endpoint_never_matched():
    """`endpoints: []` (or `models: []`) matches anything, as the policy model says ("Empty tuples match
    anything"): a catch-all route after one for chat still takes every embeddings request, so advice must not tell
    the SRE it is never matched (who may then delete the route serving the embeddings traffic)."""
    text = HEAD.replace("    match: {endpoints: [embeddings]}\n", "    match: {endpoints: []}\n")
    assert not any("never matched" in note for note in advice(parse_policy(text)))
    text = HEAD.replace("    match: {endpoints: [chat, completions]}\n",
                        "    match: {endpoints: [chat, completions], models: [gpt-4o]}\n")
    text = text.replace("    match: {endpoints: [embeddings]}\n", "    match: {endpoints: [chat], models: []}\n")
    assert not any("never matched" in note for note in advice(parse_policy(text)))


def test_a_tenant_named_as_the_shared_metric_label_is_noted():
    assert advice(parse_policy(HEAD + "tenants:\n  other: {}\n  acme: {}\n")) == [
        "tenants.other: its metric label is the one the tenants past telemetry.tenant_label_top_n share, so its "
        "series mix with theirs: name it otherwise"]
    assert advice(parse_policy(HEAD + "tenants:\n  others: {}\n")) == []


def test_a_cache_on_a_route_of_the_responses_api_alone_is_said_to_do_nothing():
    text = HEAD.replace("    match: {endpoints: [embeddings]}\n    candidates: [small]\n",
                        "    match: {endpoints: [responses]}\n    candidates: [small]\n    cache: {enabled: true}\n")
    assert advice(parse_policy(text)) == [
        "routes.emb.cache: the Responses API is never cached (a response is stored by its server under its own id), "
        "so it has no effect"]
    both = text.replace("match: {endpoints: [responses]}", "match: {endpoints: [chat, responses]}")
    assert advice(parse_policy(both)) == []
