"""End to end: `client.responses.input_tokens.count` (POST /v1/responses/input_tokens) through the gateway, with the
official openai SDK: counted by the gateway itself, the model servers never asked."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from gateway.tokens import DEFAULT_ENCODING, count_prompts
from tests.support import policies
from tests.support.harness import Harness
from tests.test_e2e_responses import KEYS, POLICY

#: a tenant allowed one request a minute: at its limit after one
LIMITED_KEY = "sk-limited-count"
LIMITED_POLICY = POLICY + "  limited: {{keys_sha256: [\"%s\"], limits: {{requests_per_minute: 1}}}}\n" % \
    policies.sha256_hex(LIMITED_KEY)

ITEMS = [{"role": "user", "content": [{"type": "input_text", "text": "What is in this list?"}]},
         {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{\"q\": \"x\"}"},
         {"type": "function_call_output", "call_id": "call_1", "output": "a, b and c"}]
TOOLS = [{"type": "function", "name": "lookup", "description": "Look a word up.",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def gw():
    harness = Harness(LIMITED_POLICY).start()
    yield harness
    harness.stop()


def client(gw: Harness, key: str = KEYS["acme"], prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}{prefix}", api_key=key, max_retries=0)


def asked(gw: Harness) -> int:
    return sum(gw.sim_stats(name)["total"] for name in ("small", "medium", "large"))


def test_the_count_is_the_gateways_own_and_no_model_is_asked(gw):
    before = asked(gw)
    counted = client(gw).responses.input_tokens.count(model="auto", instructions="Be brief.", input=ITEMS,
                                                      tools=TOOLS)
    assert counted.object == "response.input_tokens"
    body = {"model": "auto", "instructions": "Be brief.", "input": ITEMS, "tools": TOOLS}
    assert counted.input_tokens == count_prompts("responses", body, DEFAULT_ENCODING)[0] > 30
    assert asked(gw) == before


def test_a_text_input_counts_as_the_model_then_reports_it(gw):
    """The simulated model counts with tiktoken too: the count and the answer's usage agree."""
    fields = {"model": "auto", "input": "Say hello in three languages.", "instructions": "Be brief."}
    counted = client(gw).responses.input_tokens.count(**fields)
    answered = client(gw).responses.create(**fields, max_output_tokens=16)
    assert counted.input_tokens == answered.usage.input_tokens


@pytest.mark.parametrize("field", ["previous_response_id", "conversation"])
def test_a_history_on_a_server_is_refused(gw, field):
    with pytest.raises(openai.BadRequestError) as refused:
        client(gw).responses.input_tokens.count(model="auto", input="More.", **{field: "resp_abc"})
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", field)


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", None),                    # OpenAI's answer to JSON it cannot parse names no code
    (json.dumps({"input": 7}).encode(), "invalid_type"),
    (json.dumps({"input": "x", "instructions": ["a"]}).encode(), "invalid_type"),
])
def test_a_malformed_request_is_an_openai_400(gw, body, code):
    request = urllib.request.Request(f"{gw.base_url}/v1/responses/input_tokens", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {KEYS['acme']}",
                                              "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 400
    assert json.loads(refused.value.read())["error"]["code"] == code


def test_an_unknown_key_is_refused(gw):
    with pytest.raises(openai.AuthenticationError):
        client(gw, key="sk-nobody").responses.input_tokens.count(model="auto", input="x")


def test_azure_paths_count_too(gw):
    for prefix in ("/openai/v1", "/openai"):
        assert client(gw, prefix=prefix).responses.input_tokens.count(model="auto", input="hi").input_tokens > 0


def test_a_large_body_of_a_tenant_at_its_limit_is_refused_before_it_is_counted(gw):
    """Counting a large prompt costs seconds of CPU: a tenant already at its requests per minute is refused (429)
    before it is counted, as a generating request's large prompt is. A small one is counted (it costs nothing)."""
    limited = client(gw, key=LIMITED_KEY)
    limited.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert limited.responses.input_tokens.count(model="auto", input="hi").input_tokens > 0
    with pytest.raises(openai.RateLimitError):
        limited.responses.input_tokens.count(model="auto", input="word " * 40_000)
