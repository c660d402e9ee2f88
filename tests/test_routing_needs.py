"""Models that take only some of images, audio, files and tools (`supports`): what a request uses, the planner's
verdicts, the 400 for a request no model of its route takes, and the policy key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import openai
import pytest

from gateway.errors import ClientError, NoModelMeetsSla, PolicyError, UnsupportedInput
from gateway.policy.load import load_policy, parse_policy
from gateway.policy.model import Sla
from gateway.replay import read_traffic, replay
from gateway.replay.fields import TrafficError
from gateway.routing.needs import NO_NEEDS, lacking, request_needs
from tests.support import policies
from tests.support.accounting import ledger_record
from tests.support.harness import ledgered_harness
from tests.test_routing_planner import Setup, candidate, chat_route, models, plan_names

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
FILE = {"type": "file", "file": {"file_id": "file-abc"}}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


def chat(*parts, **fields) -> dict:
    """A chat body whose user message holds `parts` (text alone when none)."""
    content = [{"type": "text", "text": "what is this?"}, *parts] if parts else "hello"
    return {"model": "auto", "messages": [{"role": "user", "content": content}], **fields}


# what a request uses -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "expected"), [
    (chat(), {}),
    (chat(IMAGE), {"images": "messages"}),
    (chat(AUDIO, IMAGE), {"audio": "messages", "images": "messages"}),
    (chat(FILE), {"files": "messages"}),
    (chat(tools=[TOOL]), {"tools": "tools"}),
    (chat(functions=[TOOL["function"]]), {"tools": "functions"}),
    (chat(tools=[]), {}),                                             # an empty list asks for no tool
    (chat(tools=[TOOL], tool_choice="none"), {}),                     # nor do tools it is told not to call
    (chat(tools=[TOOL], tool_choice="required"), {"tools": "tools"}),
    (chat(functions=[TOOL["function"]], function_call="none"), {}),
    (chat(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}), {"audio": "modalities"}),
    (chat(modalities=["text"]), {}),
    (chat({"type": "text", "text": "x"}, {"type": "refusal", "refusal": "no"}), {}),
    (chat({"type": "video_url", "video_url": {"url": "x"}}), {}),    # unknown to the gateway: the server judges
    (chat({"type": ["image_url"]}, {"type": None}, "a bare string", 7), {}),     # odd parts never raise
])
def test_what_a_chat_request_uses(body, expected):
    assert dict(request_needs("chat", body)) == expected


def test_text_alone_and_other_endpoints_use_nothing_beyond_text():
    """The common case answers the one shared empty mapping, without building one."""
    assert request_needs("chat", chat()) is NO_NEEDS
    assert request_needs("completions", {"model": "m", "prompt": "hi", "tools": [TOOL]}) is NO_NEEDS
    assert request_needs("embeddings", {"model": "m", "input": ["hi"]}) is NO_NEEDS
    assert request_needs("chat", {"model": "m", "messages": ["not an object", {"content": [IMAGE]}]}) == \
        {"images": "messages"}


def test_what_a_model_lacks():
    needs = request_needs("chat", chat(IMAGE, tools=[TOOL]))
    assert lacking(None, needs) == ()                           # no `supports`: it takes anything
    assert lacking(frozenset(), needs) == ("images", "tools")   # `supports: []`: text alone
    assert lacking(frozenset({"tools"}), needs) == ("images",)
    assert lacking(frozenset(), NO_NEEDS) == ()


# the planner -------------------------------------------------------------------------------------------------------

def restricted(**supports: tuple[str, ...]) -> dict:
    """The planner tests' models with `supports` set on those named."""
    return {name: dataclasses.replace(model, supports=supports[name]) for name, model in models().items()
            if name in supports}


def decide(setup: Setup, body: dict, **kwargs):
    return setup.router.decide(setup.route, prompt_tokens=100, max_tokens=None, stream=False,
                               needs=request_needs("chat", body), **kwargs)


def test_a_model_that_lacks_what_the_request_uses_is_passed_over():
    """small takes text alone: an image goes to medium, the next smallest; text still goes to small."""
    setup = Setup(chat_route(), extra_models=restricted(small=(), medium=("images",)))
    decision = decide(setup, chat(IMAGE))
    assert plan_names(decision) == ["medium", "large"] and decision.sla_met
    assert candidate(decision, "small").reasons == ("unsupported: images",)
    assert plan_names(decide(setup, chat()))[0] == "small"
    # medium takes images but not tools: both together go to large, which states nothing
    decision = decide(setup, chat(IMAGE, tools=[TOOL]))
    assert plan_names(decision) == ["large"]
    assert candidate(decision, "medium").reasons == ("unsupported: tools",)
    assert candidate(decision, "small").reasons == ("unsupported: images, tools",)


def test_models_that_state_nothing_take_everything():
    decision = decide(Setup(chat_route()), chat(IMAGE, tools=[TOOL]))
    assert plan_names(decision) == ["small", "medium", "large"] and decision.sla_met


def test_fallbacks_that_lack_it_are_not_planned():
    setup = Setup(chat_route(candidates=("medium",), fallback=("small", "large")),
                  extra_models=restricted(small=()))
    assert plan_names(decide(setup, chat(IMAGE))) == ["medium", "large"]
    assert plan_names(decide(setup, chat())) == ["medium", "small", "large"]


def test_best_effort_keeps_what_the_request_uses():
    """No model meets a 1 ms SLA: best effort plans by latency, but never the model that cannot read the image."""
    setup = Setup(chat_route(sla=Sla(p95_latency_ms=1)), extra_models=restricted(small=()))
    decision = decide(setup, chat(IMAGE))
    assert not decision.sla_met and "small" not in plan_names(decision) and plan_names(decision)
    assert "small" in plan_names(decide(setup, chat()))


def test_a_budget_downgrade_keeps_what_the_request_uses():
    setup = Setup(chat_route(), extra_models=restricted(small=()))
    downgraded = setup.router.cheapest(decide(setup, chat(IMAGE)))
    assert plan_names(downgraded)[0] == "medium"


def test_a_request_no_model_of_the_route_takes_is_a_400_naming_what_each_lacks():
    setup = Setup(chat_route(candidates=("small", "medium")), extra_models=restricted(small=(), medium=("audio",)))
    with pytest.raises(UnsupportedInput) as refused:
        decide(setup, chat(IMAGE))
    assert refused.value.status == 400 and refused.value.param == "messages"
    assert refused.value.code == "unsupported_value"
    assert str(refused.value) == ("the request uses images, which no model of route 'chat' takes (small: no images; "
                                  "medium: no images)")
    with pytest.raises(ClientError) as refused:
        decide(setup, chat(tools=[TOOL]))
    assert refused.value.param == "tools" and refused.value.code == "unsupported_parameter"
    # each takes one of the two, none both: still a 400, said to be about taking them together
    setup = Setup(chat_route(candidates=("small", "medium")),
                  extra_models=restricted(small=("images",), medium=("tools",)))
    with pytest.raises(ClientError, match="uses images, tools, which no model of route 'chat' takes together"):
        decide(setup, chat(IMAGE, tools=[TOOL]))


def test_a_reject_route_names_the_models_that_take_the_request_and_are_too_slow():
    """small would meet the SLA but cannot read the image; the others are too slow: 503 naming them (as for a
    model whose context is too small, the one that cannot take the request is not what keeps it from being
    served)."""
    setup = Setup(chat_route(sla=Sla(p95_latency_ms=1500, on_violation="reject")), extra_models=restricted(small=()))
    with pytest.raises(NoModelMeetsSla) as refused:
        decide(setup, chat(IMAGE))
    assert str(refused.value).startswith("no model of route 'chat' meets p95_latency_ms 1500: medium: latency ")
    assert "small" not in str(refused.value)
    assert plan_names(decide(Setup(chat_route(sla=Sla(p95_latency_ms=1500, on_violation="reject")),
                                   extra_models=restricted(small=())), chat())) == ["small"]


# the policy key ----------------------------------------------------------------------------------------------------

POLICY = """version: 1
models:
  small: {{endpoint: "http://127.0.0.1:1/v1", {supports}}}
routes:
  - {{name: r, candidates: [small]}}
"""


@pytest.mark.parametrize(("written", "read"), [
    ("supports: [images, tools]", ("images", "tools")),
    ("supports: []", ()),
    ("supports: null", None),       # as any nullable key written empty: as if not written
    ("size_b: 1", None),
])
def test_supports_is_read(written, read):
    assert parse_policy(POLICY.format(supports=written)).models["small"].supports == read


@pytest.mark.parametrize(("written", "problem"), [
    ("supports: [vision]", "models.small.supports[0]: 'vision' is not one of images, audio, files, tools"),
    ("supports: [image]", "did you mean 'images'"),
    ("supports: [tools, tools]", "names 'tools' more than once"),
    ("supports: images", "models.small.supports: expected a list"),
])
def test_a_wrong_supports_is_refused_with_its_line(written, problem):
    with pytest.raises(PolicyError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        parse_policy(POLICY.format(supports=written))


# end to end, through the openai SDK --------------------------------------------------------------------------------

E2E_POLICY = policies.models(
    policies.standard_model("small", supports=[]), policies.standard_model("medium", supports=["images"]),
    policies.standard_model("large")) + """
routes:
  - name: chat
    match: {{models: ["auto"]}}
    candidates: [small, medium, large]
  - name: text-only
    match: {{models: ["text"]}}
    candidates: [small]
    fallback: [medium]
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    harness = ledgered_harness(E2E_POLICY, tmp_path_factory.mktemp("ledger"))
    yield harness
    harness.stop()


def answered(gw, model: str, content, **fields):
    return gw.openai().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=5, **fields)


def served(gw, model: str, content, **fields) -> str:
    return answered(gw, model, content, **fields).headers["x-gateway-model"]


def test_the_sdk_is_served_by_the_smallest_model_that_takes_what_it_sends(gw):
    parts = [{"type": "text", "text": "what is this?"}, IMAGE]
    assert served(gw, "auto", "hello") == "small"
    assert served(gw, "auto", parts) == "medium"
    assert served(gw, "auto", "hello", tools=[TOOL]) == "large"
    assert served(gw, "auto", parts, tools=[TOOL]) == "large"
    with gw.openai().chat.completions.with_streaming_response.create(
            model="auto", messages=[{"role": "user", "content": parts}], max_tokens=5, stream=True) as stream:
        assert stream.headers["x-gateway-model"] == "medium" and "".join(stream.iter_lines())


def test_the_sdk_gets_a_400_when_no_model_of_the_route_takes_it(gw):
    before = gw.sim_stats("small")["total"] + gw.sim_stats("medium")["total"]
    with pytest.raises(openai.BadRequestError) as refused:
        served(gw, "text", "hello", tools=[TOOL])
    error = refused.value.body
    assert error["param"] == "tools" and error["code"] == "unsupported_parameter"
    assert "no model of route 'text-only' takes (small: no tools; medium: no tools)" in error["message"]
    # the image goes to the fallback that takes it
    assert served(gw, "text", [{"type": "text", "text": "what is this?"}, IMAGE]) == "medium"
    assert gw.sim_stats("small")["total"] + gw.sim_stats("medium")["total"] == before + 1


# the ledger line and the what-if replay ----------------------------------------------------------------------------

def test_the_ledger_line_says_what_the_request_used(gw):
    both = answered(gw, "auto", [{"type": "text", "text": "what is this?"}, IMAGE], tools=[TOOL])
    text = answered(gw, "auto", "hello")
    assert ledger_record(gw.ledger_path, both.headers["x-request-id"])["uses"] == ["images", "tools"]
    assert ledger_record(gw.ledger_path, text.headers["x-request-id"])["uses"] == []


def replayed_models(policy_text: str, tmp_path: Path, lines: list[dict]) -> list[str | None]:
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("".join(json.dumps({"ts": 100.0 + i, "endpoint": "chat", "alias": "auto", "stream": False,
                                          "input_tokens": 50, "output_tokens": 5, **line}) + "\n"
                              for i, line in enumerate(lines)))
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy_text)
    result = replay(load_policy(policy_path), read_traffic(ledger, "ledger"), jitter_sigma=0.0)
    return [outcome.label if outcome.status != "rejected" else f"rejected: {outcome.reason}"
            for outcome in result.outcomes]


REPLAY_POLICY = E2E_POLICY.replace("{small}", "http://127.0.0.1:1/v1").replace("{medium}", "http://127.0.0.1:2/v1") \
    .replace("{large}", "http://127.0.0.1:3/v1").replace("{{", "{").replace("}}", "}")


def test_a_replay_routes_each_line_by_what_it_used(tmp_path):
    """What-if: the same lines under a policy where small takes text alone go to the models that take them; a
    line that used tools on a route of text models is refused as `unsupported`, counted against its route."""
    text_only = {"uses": []}
    assert replayed_models(REPLAY_POLICY, tmp_path, [text_only, {"uses": ["images"]}, {"uses": ["tools"]}, {}]) == \
        ["small", "medium", "large", "small"]
    assert replayed_models(REPLAY_POLICY.replace('models: ["text"]', 'models: ["auto"]').replace(
        "  - name: chat\n    match: {models: [\"auto\"]}", "  - name: chat\n    match: {models: [\"none\"]}"),
        tmp_path, [{"uses": ["tools"]}, {"uses": ["images", "some-later-feature"]}]) == \
        ["rejected: unsupported", "medium"]


@pytest.mark.parametrize("uses", ["images", [1], {"images": True}])
def test_a_ledger_line_whose_uses_is_not_a_list_of_names_is_refused_with_its_line(tmp_path, uses):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(json.dumps({"ts": 1.0, "input_tokens": 5, "output_tokens": 5, "uses": uses}) + "\n")
    with pytest.raises(TrafficError, match=r"ledger.jsonl:1: uses: expected a list of strings"):
        read_traffic(ledger, "ledger")
