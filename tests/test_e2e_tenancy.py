"""End to end: tenants, rate limits, budgets and the admin surface on the running gateway, with real Redis."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request

import openai
import pytest
import redis

from gateway.tenancy.keys import new_key
from tests.support.harness import DEFAULT_SIMS, Harness
from tests.support.policies import (QUICK_STOP, SMART_AND_EMBEDDINGS_ROUTES, latency, model, models, price,
                                    standard_model)
from tests.support.redis_server import RedisServer

TENANTS = ("full", "narrow", "routed", "rpm", "conc", "tpm", "budget", "thrifty", "capped", "astray")
#: tenant -> (raw key, its sha256 hex), fresh for every run
KEYS = {name: new_key() for name in TENANTS}
ADMIN_TOKEN = "admin-" + new_key()[0]
SIMS = {**DEFAULT_SIMS, "slow": dict(ttft_ms=700, tpot_ms=1)}

MODELS = models(
    standard_model("small"),
    standard_model("medium"),
    standard_model("large"),
    model("slow", size_b=0.5, tier=2, price=price(0.01, 0.01), latency_prior=latency(700, 1)),
) + """
routes:
  - name: chat-default
    match: {{models: ["auto", "gpt-4o-mini"], endpoints: [chat, completions]}}
    candidates: [small, medium, large]
""" + SMART_AND_EMBEDDINGS_ROUTES + """
  - name: slow
    match: {{models: ["slow"], endpoints: [chat]}}
    candidates: [slow]
  - name: premium
    match: {{models: ["premium"], endpoints: [chat]}}
    candidates: [slow, medium]
    sla: {{p95_latency_ms: 300, min_tier: 2}}
"""

TENANTS_YAML = """
tenants:
  full: {{keys_sha256: ["@full@"]}}
  narrow: {{keys_sha256: ["@narrow@"], routes: [chat-default], models: ["auto"]}}
  routed: {{keys_sha256: ["@routed@"], routes: [chat-default, embeddings]}}
  rpm:
    keys_sha256: ["@rpm@"]
    limits: {{requests_per_minute: 3, tokens_per_minute: 100000}}
  conc: {{keys_sha256: ["@conc@"], limits: {{concurrent: 2}}}}
  tpm: {{keys_sha256: ["@tpm@"], limits: {{tokens_per_minute: 2000}}}}
  budget: {{keys_sha256: ["@budget@"], budget: {{usd_per_day: 0.000003}}}}
  thrifty:
    keys_sha256: ["@thrifty@"]
    budget: {{usd_per_day: 0.00003, on_exhausted: downgrade}}
  capped:
    keys_sha256: ["@capped@"]
    limits: {{requests_per_minute: 50, tokens_per_minute: 100000, concurrent: 4}}
    budget: {{usd_per_day: 0.000003}}
  astray:
    keys_sha256: ["@astray@"]
    routes: [chat-default]
    limits: {{requests_per_minute: 2}}
"""


def with_keys(template: str) -> str:
    """The template with each `@tenant@` replaced by that tenant's key hash."""
    for name, (_, key_sha256) in KEYS.items():
        template = template.replace(f"@{name}@", key_sha256)
    return template


POLICY = with_keys(MODELS + TENANTS_YAML)
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def gw(module_redis_server, receiver):
    environ = {"GATEWAY_REDIS_URL": module_redis_server.url, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
               "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint,
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "100",
               "OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_SERVICE_NAME": "gw-tenancy-test"}
    harness = Harness(POLICY, sims=SIMS, environ=environ).start()
    yield harness
    harness.stop()


def client(gw: Harness, tenant: str, **kwargs) -> openai.OpenAI:
    return gw.openai(api_key=KEYS[tenant][0], **kwargs)


def raw_http(method: str, url: str, headers: dict[str, str] | None = None,
             body: object = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a plain HTTP call; error statuses are returned, not raised."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


def chat(gw: Harness, tenant: str, model: str = "auto", **kwargs):
    """A raw-response chat completion for a tenant (headers and parsed body)."""
    return client(gw, tenant).chat.completions.with_raw_response.create(
        model=model, messages=kwargs.pop("messages", HELLO), **{"max_tokens": 5, **kwargs})


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05):
    """Poll until predicate() is truthy and return its value; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval_s)
    return result


# identity -----------------------------------------------------------------------------------------
def test_missing_and_unknown_keys_are_401(gw):
    """A request without a key, or with a key no tenant owns, is refused with 401 in OpenAI's shape."""
    status, _, body = raw_http("POST", f"{gw.base_url}/v1/chat/completions",
                               body={"model": "auto", "messages": HELLO})
    assert status == 401
    assert body["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError) as caught:
        gw.openai(api_key=new_key()[0]).chat.completions.create(model="auto", messages=HELLO)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        gw.openai(api_key=KEYS["full"][1]).chat.completions.create(model="auto", messages=HELLO)


def test_azure_style_api_key_header_identifies_the_tenant(gw):
    """An `api-key:` header with no Authorization header identifies the tenant, as Azure clients send it."""
    sdk = gw.openai(api_key="unused", default_headers={"api-key": KEYS["narrow"][0]})
    azure_style = {"Authorization": openai.Omit()}
    assert sdk.chat.completions.create(model="auto", messages=HELLO, max_tokens=2,
                                       extra_headers=azure_style).choices
    with pytest.raises(openai.PermissionDeniedError):       # identified as `narrow`, not refused as unknown
        sdk.chat.completions.create(model="smart", messages=HELLO, max_tokens=2, extra_headers=azure_style)


def test_tenant_outside_its_allow_list_is_403(gw):
    """A tenant limited to one route and one alias gets 403 for any other, and is served on its own."""
    narrow = client(gw, "narrow")
    with pytest.raises(openai.PermissionDeniedError) as on_route:
        narrow.chat.completions.create(model="smart", messages=HELLO, max_tokens=2)
    assert (on_route.value.status_code, on_route.value.type, on_route.value.code) == (403, "permission_error",
                                                                                  "permission_denied")
    with pytest.raises(openai.PermissionDeniedError):
        narrow.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        narrow.embeddings.create(model="text-embedding-3-small", input="x")
    assert narrow.chat.completions.create(model="auto", messages=HELLO, max_tokens=2).choices


def test_models_list_is_filtered_by_the_tenant_allow_list(gw):
    """GET /v1/models shows a tenant only the aliases it may use, and needs a key."""
    assert [m.id for m in client(gw, "narrow").models.list()] == ["auto"]
    assert {m.id for m in client(gw, "routed").models.list()} == {"auto", "gpt-4o-mini", "text-embedding-3-small"}
    everything = {m.id for m in client(gw, "full").models.list()}
    assert everything == {"auto", "gpt-4o-mini", "smart", "text-embedding-3-small", "slow", "premium"}
    with pytest.raises(openai.AuthenticationError):
        gw.openai(api_key=new_key()[0]).models.list()


def test_models_retrieve_of_an_alias_the_tenant_may_not_use_is_not_found(gw):
    """`client.models.retrieve` answers a tenant only for an alias its list shows: another route's alias is the
    SDK's NotFoundError naming `model`, as a name no route serves."""
    narrow = client(gw, "narrow")
    assert narrow.models.retrieve("auto").id == "auto"
    for alias in ("gpt-4o-mini", "smart"):
        with pytest.raises(openai.NotFoundError) as caught:
            narrow.models.retrieve(alias)
        assert caught.value.body["param"] == "model"
    assert client(gw, "full").models.retrieve("smart").id == "smart"


# limits -------------------------------------------------------------------------------------------
def test_requests_per_minute_limit_answers_429_with_openai_headers(gw):
    """Over requests_per_minute the tenant gets 429 rate_limit_exceeded with Retry-After and x-ratelimit-* headers."""
    remaining = [chat(gw, "rpm").headers["x-ratelimit-remaining-requests"] for _ in range(2)]
    streamed = chat(gw, "rpm", stream=True)
    remaining.append(streamed.headers["x-ratelimit-remaining-requests"])
    assert [chunk for chunk in streamed.parse()]
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as caught:
        chat(gw, "rpm")
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.body["type"] == "rate_limit_error"
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert int(headers["retry-after-ms"]) <= 60_000
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert 0 < int(headers["x-ratelimit-remaining-tokens"]) < 100000
    assert headers["x-ratelimit-reset-tokens"].endswith("s")


def test_requests_no_route_serves_or_the_tenant_may_not_use_take_nothing_from_its_limits(gw):
    """A 404 (no route serves the model) or a 403 (a route outside the tenant's allow list) is answered before
    admission: a tenant allowed 2 requests a minute still has both after three of each."""
    astray = client(gw, "astray")
    for _ in range(3):
        with pytest.raises(openai.NotFoundError):
            astray.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=2)
        with pytest.raises(openai.PermissionDeniedError):
            astray.chat.completions.create(model="smart", messages=HELLO, max_tokens=2)
    assert [chat(gw, "astray").headers["x-ratelimit-remaining-requests"] for _ in range(2)] == ["1", "0"]


async def test_concurrency_limit_refuses_the_excess_and_frees_slots(gw):
    """With `concurrent: 2`, a burst of 4 slow requests admits exactly 2; once they end, the next is admitted."""
    sdk = gw.async_openai(api_key=KEYS["conc"][0])

    async def one():
        try:
            await sdk.chat.completions.create(model="slow", messages=HELLO, max_tokens=2)
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.response.headers["retry-after"] == "1"
            return exc.code

    outcomes = await asyncio.gather(*(one() for _ in range(4)))
    assert sorted(outcomes) == ["ok", "ok", "rate_limit_exceeded", "rate_limit_exceeded"]
    assert await one() == "ok"      # the finished requests gave their slots back before answering
    await sdk.close()


def test_token_reservation_is_corrected_with_real_usage(gw):
    """The prompt estimate plus the output reserve is held at admission and replaced by the real usage after."""
    store = redis.Redis.from_url(gw.environ["GATEWAY_REDIS_URL"])
    first = client(gw, "tpm").chat.completions.with_raw_response.create(model="auto", messages=HELLO)
    used = first.parse().usage.total_tokens
    assert first.headers["x-ratelimit-limit-tokens"] == "2000"
    reserved = 2000 - int(first.headers["x-ratelimit-remaining-tokens"])
    assert reserved > used      # no max_tokens: the gateway reserved more than the answer used
    wait_until(lambda: int(store.get("gw:{tpm}:rl:tok_sum") or 0) == used)
    second = client(gw, "tpm").chat.completions.with_raw_response.create(model="auto", messages=HELLO)
    # the second reserves as much as the first did; the first now counts only what it used
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 2000 - used - reserved
    with pytest.raises(openai.RateLimitError) as caught:
        chat(gw, "tpm", max_tokens=1900)
    assert "tokens per minute" in caught.value.message


def test_a_request_larger_than_tokens_per_minute_is_request_too_large(gw):
    """max_tokens x n above tokens_per_minute can never be admitted: 429 request_too_large naming the limit and
    the tokens requested, without a Retry-After that would send the client back to be refused again."""
    with pytest.raises(openai.RateLimitError) as caught:
        chat(gw, "tpm", max_tokens=1200, n=2)
    error = caught.value
    assert (error.status_code, error.code) == (429, "request_too_large")
    assert "limit 2000" in error.message and "requested 24" in error.message      # 2 x 1200 + the prompt
    assert "retry-after" not in error.response.headers and "retry-after-ms" not in error.response.headers


# budgets ------------------------------------------------------------------------------------------
def test_exhausted_budget_answers_429_budget_exceeded(gw):
    """Once a tenant's spend reaches usd_per_day, its requests get 429 budget_exceeded with Retry-After."""
    assert chat(gw, "budget").parse().choices       # nothing spent yet: admitted, and charged

    def refused():
        try:
            chat(gw, "budget")
        except openai.RateLimitError as exc:
            return exc
        return None

    error = wait_until(refused)
    assert error.code == "budget_exceeded"
    assert 1 <= int(error.response.headers["retry-after"]) <= 86400


def test_budget_refusals_take_no_rate_limit_capacity(gw):
    """A tenant with limits and an exhausted budget is refused for the budget, and its refusals hold no slots."""
    assert chat(gw, "capped").parse().choices       # admitted and charged past its tiny budget

    def refused():
        try:
            chat(gw, "capped")
        except openai.RateLimitError as exc:
            return exc
        return None

    assert wait_until(refused).code == "budget_exceeded"
    tenant = gw.holder.current.policy.tenants["capped"]

    def settled():
        usage = gw.call(gw.services.stores.limiter.usage(tenant))
        return usage if usage.concurrent == 0 else None

    before = wait_until(settled)            # a refusal that raced its own admission has given it back
    for _ in range(5):
        with pytest.raises(openai.RateLimitError) as caught:
            chat(gw, "capped")
        assert caught.value.code == "budget_exceeded"
    after = wait_until(settled)
    assert after.requests == before.requests     # refusals for the budget took no request slot
    assert after.tokens <= before.tokens         # nor any tokens (an earlier settle may still land)


def test_exhausted_budget_with_downgrade_goes_to_the_cheapest_model(gw, receiver):
    """With on_exhausted: downgrade, an exhausted tenant is served by the route's cheapest model instead, and its
    SERVER span says the budget downgraded it (the request before, within budget, says nothing of it)."""
    first = chat(gw, "thrifty", model="premium").headers
    assert first["x-gateway-model"] == "medium"

    def downgraded():
        headers = chat(gw, "thrifty", model="premium").headers
        return headers if headers["x-gateway-model"] != "medium" else None

    later = wait_until(downgraded)
    assert later["x-gateway-model"] == "slow"
    assert gw.flush_telemetry()

    def server_span(request_id: str):
        return next((s for s in receiver.spans if s.kind == "SERVER"
                     and s.attributes.get("gateway.request.id") == request_id), None)

    receiver.wait_for_spans(lambda _: server_span(first["x-request-id"]) and server_span(later["x-request-id"]))
    assert server_span(later["x-request-id"]).attributes.get("gateway.budget.downgraded") is True
    assert "gateway.budget.downgraded" not in server_span(first["x-request-id"]).attributes


# admin surface ------------------------------------------------------------------------------------
ADMIN_CALLS = [("GET", "/admin/policy"), ("POST", "/admin/policy/reload"), ("GET", "/admin/stats"),
               ("GET", "/admin/tenants"), ("GET", "/admin/models")]


@pytest.mark.parametrize("method, path", ADMIN_CALLS)
def test_admin_endpoints_need_the_admin_token(gw, method, path):
    """Every admin endpoint refuses no token, a wrong token and any tenant key, and serves the admin token."""
    url = f"{gw.base_url}{path}"
    tenant_key = KEYS["full"][0]
    refusals = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {tenant_key}"},
                {"x-admin-token": tenant_key}, {"api-key": tenant_key},
                {"Authorization": f"Bearer {KEYS['full'][1]}"}]
    for headers in refusals:
        status, _, body = raw_http(method, url, headers)
        assert status in (401, 403), headers
        assert body["error"]["type"] in ("authentication_error", "permission_error")
    for headers in ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, {"x-admin-token": ADMIN_TOKEN}):
        assert raw_http(method, url, headers)[0] == 200


def test_admin_token_is_not_a_tenant_key(gw):
    """The admin token does not open the OpenAI endpoints."""
    with pytest.raises(openai.AuthenticationError):
        gw.openai(api_key=ADMIN_TOKEN).chat.completions.create(model="auto", messages=HELLO)


def test_admin_tenants_shows_usage_against_limits_and_budgets(gw):
    """GET /admin/tenants lists every tenant with its limits, budget, spend and current rate-limit usage. The usage
    is made here, whether the tests before ran or not: the rate limit and the budget refuse what would pass them,
    so it comes to the same either way."""
    chat(gw, "tpm", max_tokens=3)
    for tenant in ("rpm", "rpm", "rpm", "budget"):
        try:
            chat(gw, tenant)
        except openai.RateLimitError:
            pass                    # already at its limit, or its budget spent, by the tests before
    status, _, body = raw_http("GET", f"{gw.base_url}/admin/tenants", {"x-admin-token": ADMIN_TOKEN})
    assert status == 200
    by_name = {entry["tenant"]: entry for entry in body["tenants"]}
    assert set(by_name) == set(TENANTS)
    assert by_name["tpm"]["limits"]["tokens_per_minute"] == 2000
    assert 0 < by_name["tpm"]["usage"]["tokens"] <= 2000
    assert by_name["rpm"]["usage"]["requests"] >= 3
    assert by_name["conc"]["usage"]["concurrent"] == 0
    spend = by_name["budget"]["spend"]
    assert spend["usd_per_day"] == "0.000003"
    assert 0 < float(spend["spent_day_usd"]) <= 0.000003     # refused before its requests could overspend
    assert by_name["thrifty"]["spend"]["on_exhausted"] == "downgrade"
    # tpm has no budget, and its spend is kept all the same (a budget given it later counts it)
    tpm = by_name["tpm"]["spend"]
    assert float(tpm["spent_day_usd"]) > 0 and tpm["spent_month_usd"] == tpm["spent_day_usd"]


# secrets ------------------------------------------------------------------------------------------
def test_no_key_or_key_hash_in_logs_or_telemetry(gw, receiver, caplog):
    """Neither raw keys nor their SHA-256 appear in the log output, the exported spans or the exported metrics."""
    caplog.set_level(logging.DEBUG)
    for tenant in TENANTS:
        try:
            chat(gw, tenant, model="auto", max_tokens=1)
        except openai.APIStatusError:
            pass        # 403, 429: refusals are searched too
    for bad in (new_key()[0], KEYS["full"][1]):
        with pytest.raises(openai.AuthenticationError):
            gw.openai(api_key=bad).chat.completions.create(model="auto", messages=HELLO)
    raw_http("GET", f"{gw.base_url}/admin/tenants", {"Authorization": f"Bearer {KEYS['full'][0]}"})
    assert gw.flush_telemetry()
    spans = receiver.wait_for_spans(lambda spans: {"full", "narrow", "rpm"} <= {
        s.attributes.get("gateway.tenant") for s in spans})
    metrics = [metric for export in receiver.metric_exports for metric in export]
    assert metrics
    secrets_ = [secret for pair in KEYS.values() for secret in pair] + [ADMIN_TOKEN]
    searched = {"logs": caplog.text + "\n".join(str(r.__dict__) for r in caplog.records),
                "spans": repr(spans), "metrics": repr(metrics),
                "upstream": repr([gw.sim_requests(name) for name in SIMS])}
    for where, text in searched.items():
        assert text
        leaked = [secret[:12] for secret in secrets_ if secret in text]
        assert not leaked, f"secrets in {where}: {leaked}"


# open mode and the store failure policy ----------------------------------------------------------
def test_policy_without_tenants_runs_open_and_says_so(caplog):
    """A policy with no tenants serves keyless callers and logs at start-up that it runs open."""
    caplog.set_level(logging.INFO)
    harness = Harness(MODELS, sims=SIMS, environ={"OTEL_SDK_DISABLED": "true"}).start()
    try:
        assert any("runs open" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        status, _, body = raw_http("POST", f"{harness.base_url}/v1/chat/completions",
                                   body={"model": "auto", "messages": HELLO, "max_tokens": 2})
        assert status == 200 and body["choices"]
        status, _, body = raw_http("GET", f"{harness.base_url}/admin/tenants",
                                   {"x-admin-token": ADMIN_TOKEN})
        assert status == 403        # no admin token configured: the admin surface is closed
    finally:
        harness.stop()


def store_policy(on_store_failure: str) -> str:
    """The test policy with a store section and a cached default route."""
    return POLICY.replace("    candidates: [small, medium, large]\n",
                          "    candidates: [small, medium, large]\n    cache: {{enabled: true}}\n", 1) + \
        f"store: {{{{on_store_failure: {on_store_failure}}}}}\n" + QUICK_STOP


def test_redis_down_with_allow_serves_and_warns_once(redis_server, caplog):
    """When Redis dies under on_store_failure: allow, limited and budgeted tenants are still served, warned once."""
    caplog.set_level(logging.WARNING)
    harness = Harness(store_policy("allow"), sims=SIMS, environ={
        "GATEWAY_REDIS_URL": redis_server.url, "OTEL_SDK_DISABLED": "true"}).start()
    try:
        assert chat(harness, "rpm").parse().choices
        redis_server.stop()
        for tenant in ("rpm", "tpm", "budget", "full", "rpm", "tpm"):
            assert chat(harness, tenant, max_tokens=2).parse().choices
        warnings = [r.getMessage() for r in caplog.records if "rate limit store unavailable" in r.getMessage()]
        assert len(warnings) == 1
        assert "on_store_failure=allow" in warnings[0]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        harness.stop()


def test_redis_down_with_deny_answers_503_store_unavailable(caplog):
    """With Redis unreachable under on_store_failure: deny, limited and budgeted tenants get 503 store_unavailable."""
    dead = RedisServer()        # a free port with nothing listening
    harness = Harness(store_policy("deny"), sims=SIMS, environ={
        "GATEWAY_REDIS_URL": dead.url, "OTEL_SDK_DISABLED": "true"}).start()
    try:
        for tenant in ("rpm", "conc", "budget"):
            with pytest.raises(openai.InternalServerError) as caught:
                chat(harness, tenant)
            assert caught.value.status_code == 503
            assert caught.value.code == "store_unavailable"
            assert caught.value.response.headers["retry-after"]
        assert chat(harness, "full").parse().choices      # no limit, no budget: nothing to enforce
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        harness.stop()
