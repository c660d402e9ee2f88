"""The official openai SDK's features, used as applications use them, through the gateway: structured outputs,
the stream helper and its events, raw and streaming responses, the request fields a model must receive as sent,
embeddings in the SDK's default base64, every SDK exception class with OpenAI's `code`/`param`/`type`, and the
SDK's retries.

Two gateways: one in front of the simulated backends with a tenant (`acme-key`, small tokens-per-minute
limit), and one in front of `raw`, a scripted model server whose exact answers each test sets.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct

import openai
import pytest
import requests
from pydantic import BaseModel

from gateway.tenancy.identity import sha256_hex
from tests.support.harness import DEFAULT_POLICY, Harness, raw_model_gateway, reset_raw_model
from tests.support.raw_upstream import COMPLETION, SSE_HEAD, TEXT_EVENTS, json_answer, sse

MESSAGES = [{"role": "user", "content": "hi"}]
#: a strict function tool, as structured-output applications declare them
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
#: acme may reserve 5000 tokens a minute; busy may send one request a minute
TENANT_POLICY = DEFAULT_POLICY + f"""tenants:
  acme: {{{{keys_sha256: ["{sha256_hex('acme-key')}"], limits: {{{{tokens_per_minute: 5000}}}}}}}}
  busy: {{{{keys_sha256: ["{sha256_hex('busy-key')}"], limits: {{{{requests_per_minute: 1}}}}}}}}
"""


class Answer(BaseModel):
    answer: str


@pytest.fixture(scope="module")
def gw():
    harness = Harness(TENANT_POLICY).start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def env():
    with raw_model_gateway(first_byte_s=2) as running:
        yield running


@pytest.fixture
def raw_env(env):
    reset_raw_model(*env)
    return env


def counting_client(harness: Harness, sent: list, **kwargs) -> openai.OpenAI:
    """An SDK client that retries as the SDK does by default and records every HTTP request it sends."""
    http = openai.DefaultHttpxClient(event_hooks={"request": [sent.append]})
    return openai.OpenAI(base_url=f"{harness.base_url}/v1", http_client=http, timeout=20, **kwargs)


def chunk_event(choices: list, **fields) -> bytes:
    """One chat.completion.chunk of the scripted model."""
    return json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                       "choices": choices, **fields}).encode()


def answer_with(message: dict, finish: str = "stop", **choice_fields) -> dict:
    """COMPLETION with one choice carrying `message`."""
    return {**COMPLETION, "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None, **message},
                                       "finish_reason": finish, "logprobs": None, **choice_fields}]}


def upstream_body(raw) -> dict:
    """The JSON body of the last request the scripted model received."""
    return json.loads(raw.requests[-1][1])


# structured outputs and the stream helper ----------------------------------------------------------------

def test_parse_with_a_pydantic_model_sends_a_strict_schema_and_parses_the_answer(raw_env):
    """`chat.completions.parse(response_format=Model)` reaches the model as a strict json_schema and the SDK
    parses the JSON answer back into the model."""
    harness, raw = raw_env
    raw.script = json_answer(answer_with({"content": '{"answer": "42"}'}))
    completion = harness.openai().chat.completions.parse(model="raw-only", messages=MESSAGES, response_format=Answer)
    assert completion.choices[0].message.parsed == Answer(answer="42")
    sent = upstream_body(raw)["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["schema"]["additionalProperties"] is False


def test_stream_helper_assembles_a_strict_tool_call(raw_env):
    """The `chat.completions.stream` helper sees each argument fragment as
    `tool_calls.function.arguments.delta`, then the parsed arguments of a strict tool."""
    harness, raw = raw_env
    raw.script = [(SSE_HEAD + sse(
        chunk_event([{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]),
        chunk_event([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
                      "finish_reason": None}]),
        chunk_event([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
                      "finish_reason": None}]),
        chunk_event([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
        chunk_event([], usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}),
        b"[DONE]"), 0.0)]
    with harness.openai().chat.completions.stream(
            model="raw-only", messages=MESSAGES, tools=[WEATHER_TOOL], parallel_tool_calls=False,
            stream_options={"include_usage": True}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert kinds.count("tool_calls.function.arguments.delta") == 3
    assert "tool_calls.function.arguments.done" in kinds
    call = final.choices[0].message.tool_calls[0]
    assert call.function.parsed_arguments == {"city": "Paris"}
    assert final.usage.completion_tokens == 3
    sent = upstream_body(raw)
    assert sent["parallel_tool_calls"] is False and sent["tools"] == [WEATHER_TOOL]


def test_stream_helper_sees_content_and_logprob_events(raw_env):
    """Streamed logprobs reach the stream helper as `logprobs.content.delta` beside `content.delta`."""
    harness, raw = raw_env
    logprob = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    raw.script = [(SSE_HEAD + sse(
        chunk_event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
        chunk_event([{"index": 0, "delta": {"content": "Hi"}, "logprobs": {"content": [logprob]},
                      "finish_reason": None}]),
        chunk_event([{"index": 0, "delta": {}, "finish_reason": "stop"}]), b"[DONE]"), 0.0)]
    with harness.openai().chat.completions.stream(model="raw-only", messages=MESSAGES, logprobs=True,
                                                  top_logprobs=1) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert {"content.delta", "logprobs.content.delta", "content.done"} <= set(kinds)
    assert final.choices[0].message.content == "Hi"
    assert final.choices[0].logprobs.content[0].logprob == -0.1


async def test_async_client_stream_helper(gw):
    """The async client's stream helper assembles a streamed answer of the simulated model: its
    `content.done` event holds every `content.delta` joined."""
    client = gw.async_openai(api_key="acme-key")
    async with client.chat.completions.stream(model="auto", messages=MESSAGES, max_tokens=4) as stream:
        events = [event async for event in stream]
    deltas = "".join(event.delta for event in events if event.type == "content.delta")
    done = [event.content for event in events if event.type == "content.done"]
    assert done == [deltas] and len(deltas.split()) == 4
    await client.close()


# request fields and responses ----------------------------------------------------------------------------

def test_every_request_field_reaches_the_model_as_sent(raw_env):
    """The fields an application sets (and `extra_body`) reach the model unchanged, none dropped or renamed."""
    harness, raw = raw_env
    raw.script = json_answer(answer_with({"content": "{}"}))
    fields = dict(max_completion_tokens=7, seed=3, user="u-1", metadata={"team": "search"}, store=False,
                  service_tier="auto", stop=["\n\n", "END"], logprobs=True, top_logprobs=2,
                  response_format={"type": "json_object"}, temperature=0.5, top_p=0.9, presence_penalty=0.1,
                  frequency_penalty=0.2, logit_bias={"50256": -100}, reasoning_effort="low")
    harness.openai().chat.completions.create(model="raw-only", messages=MESSAGES, extra_body={"top_k": 5},
                                             **fields)
    sent = upstream_body(raw)
    assert {name: sent.get(name) for name in fields} == fields
    assert sent["top_k"] == 5 and "max_tokens" not in sent


def test_raw_and_streaming_responses_carry_the_request_id(gw):
    """`with_raw_response` and `with_streaming_response` see the caller's x-request-id, and the SDK exposes it as
    `_request_id`."""
    client = gw.openai(api_key="acme-key")
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=MESSAGES, max_tokens=2, extra_headers={"x-request-id": "app-req-1"})
    assert raw.headers["x-request-id"] == "app-req-1" and raw.parse()._request_id == "app-req-1"
    with client.chat.completions.with_streaming_response.create(
            model="auto", messages=MESSAGES, max_tokens=2, stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_several_choices_streamed_and_not(gw, stream):
    """`n=3` comes back as three choices, each index once (streamed: in its chunks), each with its text."""
    client = gw.openai(api_key="acme-key")
    reply = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=3, n=3, stream=stream)
    texts: dict[int, str] = {}
    if stream:
        for chunk in reply:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    else:
        texts = {choice.index: choice.message.content for choice in reply.choices}
    assert sorted(texts) == [0, 1, 2] and all(len(text.split()) == 3 for text in texts.values())


def test_embeddings_in_the_sdks_default_base64_and_with_dimensions(gw):
    """The SDK asks for base64 by default and decodes it: the vectors match the float answer's, `dimensions`
    included."""
    client = gw.openai(api_key="acme-key")
    decoded = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=8)
    floats = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=8,
                                      encoding_format="float")
    assert [len(item.embedding) for item in decoded.data] == [8, 8]
    assert decoded.data[1].embedding == pytest.approx(floats.data[1].embedding, rel=1e-6)
    raw = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=["a", "b"],
                                                     dimensions=8, encoding_format="base64")
    packed = base64.b64decode(json.loads(raw.text)["data"][1]["embedding"])
    assert list(struct.unpack("<8f", packed)) == pytest.approx(floats.data[1].embedding, rel=1e-6)


def test_completions_with_echo_suffix_and_best_of(gw):
    """A legacy completion with `echo`, `suffix`, `best_of` and `logprobs` is answered in its shape."""
    completion = gw.openai(api_key="acme-key").completions.create(
        model="auto", prompt="Once", max_tokens=3, echo=True, suffix="end", best_of=2, logprobs=1)
    assert completion.object == "text_completion" and completion.choices[0].text


def test_keep_alive_connection_serves_several_requests(gw):
    """Two requests on one HTTP/1.1 connection are both answered: the connection is kept alive between them."""
    body = json.dumps({"model": "auto", "messages": MESSAGES, "max_tokens": 2}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer acme-key\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):
            sock.sendall(request)
            status = reader.readline()
            headers = {}
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            answer = json.loads(reader.read(int(headers["content-length"])))
            assert status.startswith(b"HTTP/1.1 200") and answer["object"] == "chat.completion"


# errors as the SDK raises them ---------------------------------------------------------------------------

@pytest.mark.parametrize("status, error, exception", [
    (400, {"message": "bad schema", "type": "invalid_request_error", "param": "response_format",
           "code": "invalid_value"}, openai.BadRequestError),
    (409, {"message": "conflict", "type": "invalid_request_error", "param": None, "code": None},
     openai.ConflictError),
    (422, {"message": "unprocessable", "type": "invalid_request_error", "param": "tools[0]", "code": None},
     openai.UnprocessableEntityError),
    (429, {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"},
     openai.RateLimitError),
    (500, {"message": "boom", "type": "server_error", "param": None, "code": None}, openai.InternalServerError),
])
def test_a_models_error_is_the_sdks_exception_with_its_param(raw_env, status, error, exception):
    """A model's error status reaches the client as the SDK exception OpenAI's would be, naming the request
    field the model named (`param`), as OpenAI sends it (a model's 404 is the gateway's set-up: see
    test_e2e_upstream_shapes)."""
    harness, raw = raw_env
    raw.script = json_answer({"error": error}, status=status)
    with pytest.raises(exception) as caught:
        harness.openai().chat.completions.create(model="raw-only", messages=MESSAGES)
    assert caught.value.status_code == status
    assert caught.value.param == error["param"]
    assert error["message"] in caught.value.message
    if status < 500:                        # the model's own code and type, when it sent them
        assert caught.value.code == (error["code"] or "upstream_rejected")
        assert caught.value.type == error["type"]


@pytest.mark.parametrize("status, error, exception", [
    (400, {"message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
                      "policy.", "type": None, "param": "prompt", "code": "content_filter", "status": 400,
           "innererror": {"code": "ResponsibleAIPolicyViolation",
                          "content_filter_result": {"hate": {"filtered": True, "severity": "high"}}}},
     openai.BadRequestError),
    (429, {"message": "You exceeded your current quota.", "type": "insufficient_quota", "param": None,
           "code": "insufficient_quota"}, openai.RateLimitError),
])
def test_a_models_own_error_code_and_fields_reach_the_sdk(raw_env, status, error, exception):
    """Azure's content filter (code `content_filter`, its results under `innererror`) and OpenAI's
    `insufficient_quota` reach the application as the model sent them: code that tests `e.code` works through
    the gateway as it did against the model (it got `upstream_rejected` and `rate_limit_exceeded`)."""
    harness, raw = raw_env
    raw.script = json_answer({"error": error}, status=status)
    with pytest.raises(exception) as caught:
        harness.openai().chat.completions.create(model="raw-only", messages=MESSAGES)
    assert caught.value.code == error["code"]
    assert caught.value.body.get("innererror") == error.get("innererror")
    if error["type"]:
        assert caught.value.type == error["type"]


def test_a_context_length_error_names_the_messages(raw_env):
    """A model's context-length 400 is `context_length_exceeded` with `param: messages`, as OpenAI sends it."""
    harness, raw = raw_env
    raw.script = json_answer({"error": {"message": "This model's maximum context length is 8 tokens",
                                        "type": "invalid_request_error", "param": "messages",
                                        "code": "context_length_exceeded"}}, status=400)
    with pytest.raises(openai.BadRequestError) as caught:
        harness.openai().chat.completions.create(model="raw-only", messages=MESSAGES)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "messages")


def test_the_gateways_own_errors_are_the_sdks_exceptions(gw):
    """A wrong key, a model alias the policy lacks and a bad field raise AuthenticationError, NotFoundError and
    BadRequestError with OpenAI's type, code and param."""
    with pytest.raises(openai.AuthenticationError) as caught:
        gw.openai(api_key="wrong").chat.completions.create(model="auto", messages=MESSAGES)
    assert (caught.value.type, caught.value.code) == ("authentication_error", "invalid_api_key")
    client = gw.openai(api_key="acme-key")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="auto", messages=MESSAGES, temperature=3)
    assert (caught.value.type, caught.value.param) == ("invalid_request_error", "temperature")


def test_an_integer_field_of_another_type_is_asked_for_as_an_integer(gw):
    """`max_tokens` sent as a string is refused with a message asking for an integer, not for any number."""
    with pytest.raises(openai.BadRequestError) as caught:
        gw.openai(api_key="acme-key").chat.completions.create(model="auto", messages=MESSAGES, max_tokens="5")
    assert caught.value.param == "max_tokens" and "an integer" in caught.value.message


def test_a_request_too_large_for_the_tenant_is_not_retried_by_the_sdk(gw):
    """A request past the tenant's tokens per minute (429 `request_too_large`, no wait helps) carries
    `x-should-retry: false`, so the SDK raises at once instead of sending it twice more."""
    sent: list = []
    with pytest.raises(openai.RateLimitError) as caught:
        counting_client(gw, sent, api_key="acme-key", max_retries=2).chat.completions.create(
            model="auto", messages=MESSAGES, max_tokens=9000)
    assert caught.value.code == "request_too_large"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(sent) == 1


def test_a_rate_limited_request_may_still_be_retried(gw):
    """A 429 a wait can cure is not marked `x-should-retry: false`: the SDK's own retry rules apply."""
    client = gw.openai(api_key="busy-key")
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(2):          # one request a minute
            client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=2)
    assert caught.value.code == "rate_limit_exceeded"
    assert "x-should-retry" not in caught.value.response.headers
    assert caught.value.response.headers["retry-after-ms"]


def test_a_model_refusing_the_gateways_credential_is_not_retried_by_the_sdk(raw_env):
    """A model server's 401 to the gateway (502 `upstream_auth_failed`) carries `x-should-retry: false`: the SDK
    does not send the request twice more to meet the same misconfiguration."""
    harness, raw = raw_env
    raw.script = json_answer({"error": {"message": "bad key", "type": "invalid_request_error"}}, status=401)
    sent: list = []
    calls_before = len(raw.requests)
    with pytest.raises(openai.APIStatusError) as caught:
        counting_client(harness, sent, api_key="k", max_retries=2).chat.completions.create(
            model="raw-only", messages=MESSAGES)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_auth_failed"
    assert len(sent) == 1 and len(raw.requests) == calls_before + 1


def test_a_slow_gateway_answer_is_the_sdks_timeout(raw_env):
    """A client whose own timeout passes before the model answers raises APITimeoutError."""
    harness, raw = raw_env
    raw.script = json_answer(COMPLETION)
    raw.script[0] = (raw.script[0][0], 1.5)
    with pytest.raises(openai.APITimeoutError):
        harness.openai(timeout=0.3).chat.completions.create(model="raw-only", messages=MESSAGES)


# what the gateway does not do yet (fixes belong to files outside this test's modules) ------------------

def test_models_retrieve_finds_a_listed_alias(gw):
    """`client.models.retrieve(alias)` answers for an alias `models.list()` lists, and raises the SDK's
    NotFoundError, naming `model`, for a name no route serves."""
    client = gw.openai(api_key="acme-key")
    assert client.models.retrieve("auto").id == "auto"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["param"] == "model"


def test_models_retrieve_on_a_gateway_without_tenants_finds_only_routed_names(raw_env):
    """With no tenants (the gateway runs open), `client.models.retrieve` still answers only for a name a route
    serves: any other is the SDK's NotFoundError naming `model`."""
    harness, _ = raw_env
    client = harness.openai()
    assert client.models.retrieve("raw-only").id == "raw-only"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["param"] == "model"


def test_every_answer_carries_a_request_id_the_sdk_reads(gw):
    """The model list, a model, and the health checks carry x-request-id (the SDK's `_request_id`), the client's own
    when it sent a sane one, as the completions do."""
    client = gw.openai(api_key="acme-key")
    assert client.models.with_raw_response.list().headers["x-request-id"]
    assert client.models.with_raw_response.retrieve("auto").headers["x-request-id"]
    for path in ("/healthz", "/readyz"):
        answer = requests.get(f"{gw.base_url}{path}", headers={"x-request-id": "probe-7"}, timeout=10)
        assert answer.headers["x-request-id"] == "probe-7"


def test_a_refused_model_list_carries_the_callers_request_id(gw):
    """A model list or a model refused for a wrong key (401) carries the caller's x-request-id too, so the SDK's
    AuthenticationError names the request an operator can look up."""
    for path in ("/v1/models", "/v1/models/auto"):
        answer = requests.get(f"{gw.base_url}{path}", timeout=10,
                              headers={"Authorization": "Bearer wrong", "x-request-id": "probe-401"})
        assert (answer.status_code, answer.headers["x-request-id"]) == (401, "probe-401")
        assert answer.json()["error"]["code"] == "invalid_api_key"


def test_a_request_id_is_echoed_only_when_sane(gw):
    """A client's x-request-id of up to 128 letters, digits and `._:-` comes back as sent; a longer one, or one with
    other characters, is replaced by a fresh 32-hex-digit id rather than echoed into the answer and the logs."""
    longest = "a.b_c:d-" * 16
    for path in ("/healthz", "/v1/models"):
        url, auth = f"{gw.base_url}{path}", {"Authorization": "Bearer acme-key"}
        kept = requests.get(url, headers={**auth, "x-request-id": longest}, timeout=10)
        assert kept.headers["x-request-id"] == longest
        for insane in (longest + "a", "two words", "<script>"):
            fresh = requests.get(url, headers={**auth, "x-request-id": insane}, timeout=10).headers["x-request-id"]
            assert len(fresh) == 32 and int(fresh, 16) >= 0, (insane, fresh)


def test_a_models_retry_after_ms_reaches_the_client(raw_env):
    """A model's 429 with `retry-after-ms` (OpenAI's header, which the SDK reads first) reaches the client, so
    its retry waits as long as the model asked, not the SDK's own backoff."""
    harness, raw = raw_env
    raw.script = json_answer({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}},
                             status=429, headers={"retry-after-ms": "250"})
    with pytest.raises(openai.RateLimitError) as caught:
        harness.openai().chat.completions.create(model="raw-only", messages=MESSAGES)
    assert caught.value.response.headers.get("retry-after-ms") == "250"
    assert caught.value.response.headers.get("retry-after") == "1"       # whole seconds, rounded up


async def test_async_client_raises_the_same_exceptions(gw):
    """The async client raises the same SDK exception classes as the sync one."""
    client = gw.async_openai(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="auto", messages=MESSAGES)
    await client.close()


def test_the_azure_openai_client_works_through_the_gateway(gw):
    """The SDK's AzureOpenAI client (deployment paths, `api-key` header, `api-version` query) gets answers: chat,
    a stream and embeddings, the deployment in the path naming the model (whatever the body's `model` says, as
    Azure reads it)."""
    client = openai.AzureOpenAI(azure_endpoint=gw.base_url, api_key="acme-key", api_version="2024-10-21",
                                max_retries=0, timeout=20)
    answer = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=5)
    assert answer.choices[0].message.content
    chunks = list(client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=5, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    embedding = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(embedding.data[0].embedding) > 0
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-deployment", messages=MESSAGES)
    deployed = openai.AzureOpenAI(azure_endpoint=gw.base_url, azure_deployment="auto", api_key="acme-key",
                                  api_version="2024-10-21", max_retries=0, timeout=20)
    assert deployed.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=5).choices
    # AzureOpenAI's model list asks GET /openai/models; Azure's v1 API lives under /openai/v1/
    assert "auto" in [model.id for model in client.models.list()]
    v1 = openai.OpenAI(base_url=f"{gw.base_url}/openai/v1/", api_key="acme-key", max_retries=0, timeout=20)
    assert v1.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=5).choices
    assert v1.models.retrieve("auto").id == "auto"


# found in review: what the SDK shows of a model's refusal, and when it retries -------------------------

#: Gemini's OpenAI-compatible API wraps its error in a list; FastAPI servers (Xinference, many wrappers) answer
#: `{"detail": ...}`; both carry the reason a client needs to fix its request
WRAPPED_ERRORS = [
    ([{"error": {"code": 400, "status": "INVALID_ARGUMENT",
                 "message": 'Invalid JSON payload received. Unknown name "web_search_options": Cannot find field.'}}],
     'Unknown name "web_search_options"'),
    ({"detail": "max_tokens must be at most 4096"}, "max_tokens must be at most 4096"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("body, reason", WRAPPED_ERRORS, ids=["gemini-list", "fastapi-detail"])
def test_a_models_refusal_reaches_the_sdk_with_its_reason_whatever_shape_wraps_it(raw_env, body, reason, stream):
    """A model's 400 whose error comes in a list (Gemini) or as FastAPI's `detail` reaches the SDK's
    BadRequestError with the model's reason in its message, as the SDK shows it when it talks to that model
    directly, not a bare "answered 400"."""
    harness, raw = raw_env
    raw.script = json_answer(body, status=400)
    with pytest.raises(openai.BadRequestError) as caught:
        harness.openai().chat.completions.create(model="raw-only", messages=MESSAGES, stream=stream)
    assert reason in caught.value.message


def test_a_request_no_model_of_the_route_can_ever_serve_is_not_retried_by_the_sdk(gw):
    """A request whose tier no model of its route has (503 `sla_unmet` that only a policy change can cure)
    carries `x-should-retry: false`: the SDK raises at once instead of sending it twice more after its back-off."""
    sent: list = []
    with pytest.raises(openai.InternalServerError) as caught:
        counting_client(gw, sent, api_key="acme-key", max_retries=2).chat.completions.create(
            model="auto", messages=MESSAGES, max_tokens=2, extra_headers={"x-gateway-min-tier": "9"})
    assert caught.value.code == "sla_unmet"
    assert caught.value.response.headers.get("x-should-retry") == "false"
    assert len(sent) == 1


def test_a_models_own_do_not_retry_reaches_the_sdk(raw_env):
    """A model's error marked `x-should-retry: false` (the header OpenAI's SDKs obey before any status rule) keeps
    that mark through the gateway: the SDK raises at once, as it would talking to the model, instead of sending the
    request twice more."""
    harness, raw = raw_env
    raw.script = json_answer({"error": {"message": "overloaded for this request", "type": "server_error"}},
                             status=503, headers={"x-should-retry": "false"})
    sent: list = []
    calls_before = len(raw.requests)
    with pytest.raises(openai.InternalServerError) as caught:
        counting_client(harness, sent, api_key="k", max_retries=2).chat.completions.create(
            model="raw-only", messages=MESSAGES)
    assert caught.value.response.headers.get("x-should-retry") == "false"
    assert len(sent) == 1 and len(raw.requests) == calls_before + 1


def test_a_model_that_refuses_stream_options_still_streams_to_the_sdk(raw_env):
    """A model that refuses `stream_options` (Azure OpenAI before api-version 2024-09-01-preview answers 400
    "Unrecognized request argument supplied: stream_options") still streams to an application that worked against
    it directly: the usage the gateway asks for on its own account does not break the stream, and a client that
    asked for usage gets the gateway's count."""
    harness, raw = raw_env
    refusal = json_answer({"error": {"message": "Unrecognized request argument supplied: stream_options",
                                     "type": "invalid_request_error", "param": None, "code": None}}, status=400)
    answer = [(SSE_HEAD + sse(*TEXT_EVENTS), 0.0)]
    raw.script_for = lambda body: refusal if b"stream_options" in body else answer
    client = harness.openai()
    calls_before = len(raw.requests)
    chunks = list(client.chat.completions.create(model="raw-only", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello world"
    assert len(raw.requests) == calls_before + 2            # refused, then sent without the field
    chunks = list(client.chat.completions.create(model="raw-only", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len(raw.requests) == calls_before + 3            # the refusal remembered: one call, without the field


def test_a_clients_own_bad_stream_options_do_not_turn_off_usage_for_every_later_stream(raw_env):
    """A client sends a `stream_options` field the model does not know (a newer SDK's option): the model refuses
    the request naming stream_options, as it would refuse it sent directly. That says nothing of whether the model
    takes `stream_options: {include_usage: true}`, which it does: the next client's stream still asks the model
    for its usage (rather than every stream from then on being billed on the gateway's own estimate)."""
    harness, raw = raw_env
    refusal = json_answer({"error": {"message": "stream_options.include_obfuscation: Extra inputs are not permitted",
                                     "type": "BadRequestError", "param": None, "code": 400}}, status=400)
    answer = [(SSE_HEAD + sse(*TEXT_EVENTS), 0.0)]
    raw.script_for = lambda body: refusal if b"include_obfuscation" in body else answer
    client = harness.openai()
    with contextlib.suppress(openai.BadRequestError):
        list(client.chat.completions.create(model="raw-only", messages=MESSAGES, stream=True,
                                            extra_body={"stream_options": {"include_obfuscation": False}}))
    list(client.chat.completions.create(model="raw-only", messages=MESSAGES, stream=True))
    assert b'"include_usage":true' in raw.requests[-1][1]
