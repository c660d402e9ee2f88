"""The policy loader: YAML in, frozen dataclasses out, every problem located by file, line and key path."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.errors import PolicyError, PolicyProblem
from gateway.policy import load, model
from gateway.policy.load import check_policy, load_policy, parse_policy

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "policies"
HASH_A = "a" * 64
HASH_B = "b" * 64

#: a valid policy to which tests append one broken section (lines 1-7)
BASE = """\
version: 1
models:
  small: {endpoint: "http://127.0.0.1:9101/v1"}
  medium: {endpoint: "http://127.0.0.1:9102/v1"}
routes:
  - name: chat
    candidates: [small, medium]
"""


def problems_of(text: str) -> list[PolicyProblem]:
    """The problems parse_policy reports for a text (none when it loads)."""
    try:
        parse_policy(textwrap.dedent(text), source="p.yaml")
    except PolicyError as exc:
        return exc.problems
    return []


def where(problems: list[PolicyProblem]) -> list[tuple[int | None, str]]:
    """The (line, key path) of each problem, in report order."""
    return [(problem.line, problem.path) for problem in problems]


def only(text: str) -> PolicyProblem:
    """The single problem a text has; fails when it has none or several."""
    problems = problems_of(text)
    assert len(problems) == 1, [str(problem) for problem in problems]
    return problems[0]


def test_demo_policy_loads_with_decimal_prices():
    """The shipped demo policy loads: three models, three routes, prices as exact Decimals."""
    policy = load_policy(ROOT / "policies" / "demo.yaml")
    assert list(policy.models) == ["small", "medium", "large"]
    assert [route.name for route in policy.routes] == ["chat-default", "chat-smart", "embeddings"]
    assert policy.models["small"].price.input_per_mtok == Decimal("0.05")
    assert isinstance(policy.models["large"].price.output_per_mtok, Decimal)
    assert policy.models["large"].price.cached_input_per_mtok == Decimal("1.25")
    assert policy.routes[0].candidates == ("small", "medium", "large")
    assert policy.source == str(ROOT / "policies" / "demo.yaml")


def test_content_sha256_is_the_hash_of_the_file_bytes():
    """content_sha256 equals hashlib's SHA-256 of the file's bytes, so reloads can detect change."""
    path = FIXTURES / "full.yaml"
    assert load_policy(path).content_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_fixture_fills_every_section():
    """Every section converts: merge keys, GPU ids as strings, lower-cased headers, regexes, money, nulls."""
    policy = load_policy(FIXTURES / "full.yaml")
    small, medium = policy.models["small"], policy.models["medium"]
    assert (small.name, small.upstream_model, small.gpus.ids) == ("small", "small", ("0", "1"))
    assert (medium.upstream_model, medium.tier, medium.size_b, medium.gpus.source) == ("llama-8b", 2, 1.0, "dcgm")
    assert medium.gpu_hour_usd == Decimal("2.49") and medium.timeouts.first_byte_s == 10.5
    match = policy.routes[0].match
    assert match.headers == (model.HeaderMatch("x-tier", "gold"), model.HeaderMatch("x-team", "^ml-.*$", regex=True))
    assert (match.prompt_tokens_min, match.prompt_tokens_max, match.tenants) == (0, 4000, ("acme",))
    assert policy.routes[0].sla.max_cost_usd == Decimal("0.01")
    assert policy.routes[1].match == model.Match()
    assert policy.tenants["acme"].budget.usd_per_day == Decimal("25.5")
    assert policy.tenants["beta"] == model.Tenant(name="beta")
    assert policy.server.admin_token_env is None
    assert (policy.routing.breaker.open_s, policy.store.on_store_failure) == (10.0, "deny")
    assert (policy.routing.queue_timeout_ms, policy.tenants["acme"].priority) == (250.0, 2)
    assert policy.tenants["beta"].priority == model.DEFAULT_PRIORITY == 1


def test_check_policy_is_empty_for_a_valid_file():
    """check_policy returns no problems for a valid file."""
    assert check_policy(FIXTURES / "full.yaml") == []


def test_all_problems_are_reported_with_file_line_and_path():
    """A file with six mistakes reports all six, in line order, formatted file:line: path: message."""
    path = FIXTURES / "many_errors.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert where(caught.value.problems) == [
        (5, "models.small.tierr"),
        (8, "models.medium.context_window"),
        (9, "models.medium.price.input_per_mtok"),
        (12, "routes[0].candidates[1]"),
        (13, "routes[1].name"),
        (15, "routes[1].sla.on_violation"),
    ]
    assert str(caught.value.problems[3]) == (
        f"{path}:12: routes[0].candidates[1]: unknown model 'mediun' (did you mean 'medium'?)")
    assert check_policy(path) == caught.value.problems


def test_yaml_syntax_error_has_its_line():
    """A YAML indentation mistake is reported at the line where it is."""
    problems = check_policy(FIXTURES / "syntax_error.yaml")
    assert where(problems) == [(5, "")]
    assert "invalid YAML" in problems[0].message


def test_unreadable_file_is_a_problem_not_a_crash():
    """A missing file raises PolicyError naming the file."""
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(FIXTURES / "no-such-file.yaml")


def test_empty_or_non_mapping_document_is_rejected():
    """An empty document and a top-level list are each one clear problem."""
    assert only("").message == "the policy file is empty"
    assert only("- 1\n").message == "expected a mapping, got a list"


def test_unknown_key_suggests_the_close_one():
    """A typo'd key is reported at its line with the key path and a did-you-mean."""
    problem = only(BASE + "routing:\n  breaker: {failure_treshold: 3}\n")
    assert (problem.line, problem.path) == (9, "routing.breaker.failure_treshold")
    assert "did you mean 'failure_threshold'?" in problem.message


def test_unknown_section_lists_the_allowed_ones():
    """An unknown top-level key with no close match lists the sections that exist."""
    problem = only(BASE + "cashe_rules: {}\n")
    assert (problem.line, problem.path) == (8, "cashe_rules")
    assert "expected one of: version, models, routes" in problem.message


def test_duplicate_key_is_reported_at_the_duplicate():
    """A key written twice in one mapping is an error at the second one's line."""
    problem = only("""\
        version: 1
        models:
          small:
            endpoint: http://127.0.0.1:9101/v1
            tier: 1
            tier: 2
        routes: [{name: chat, candidates: [small]}]
        """)
    assert (problem.line, problem.path) == (6, "models.small.tier")
    assert problem.message == "duplicate key 'tier' (first at line 5)"


@pytest.mark.parametrize(("line", "expected"), [
    ("  small: {endpoint: 'http://h/v1', context_window: '8192'}", "expected an integer, got string '8192'"),
    ("  small: {endpoint: 'http://h/v1', tier: true}", "expected an integer, got boolean 'true'"),
    ("  small: {endpoint: 'http://h/v1', size_b: yes}", "expected a number, got boolean 'yes'"),
    ("  small: {endpoint: 'http://h/v1', context_window: 8192.5}", "expected an integer, got number '8192.5'"),
    ("  small: {endpoint: 'http://h/v1', price: [0.1, 0.2]}", "expected a mapping, got a list"),
    ("  small: {endpoint: 'http://h/v1', tier: }", "expected an integer, got an empty value"),
    ("  small: {endpoint: 'http://h/v1', api_key_env: 12}", "expected a string, got integer '12'"),
    ("  small: {endpoint: 'http://h/v1', price: {input_per_mtok: .inf}}", "must be a finite number, got Infinity"),
])
def test_wrong_types_are_rejected(line, expected):
    """Strings for numbers, booleans for integers, lists for mappings and nulls for required values are errors."""
    problem = only(f"version: 1\nmodels:\n{line}\nroutes: [{{name: r, candidates: [small]}}]\n")
    assert problem.line == 3 and problem.message == expected


@pytest.mark.parametrize(("text", "line", "path"), [
    ("models: {a: {endpoint: 'http://h'}}\nroutes: [{name: r, candidates: [a]}]\n", 1, "version"),
    ("version: 1\nroutes: [{name: r, candidates: [a]}]\n", 1, "models"),
    ("version: 1\nmodels: {a: {endpoint: 'http://h'}}\n", 1, "routes"),
    ("version: 1\nmodels:\n  a: {tier: 1}\nroutes: [{name: r, candidates: [a]}]\n", 3, "models.a.endpoint"),
    ("version: 1\nmodels: {a: {endpoint: 'http://h'}}\nroutes:\n  - candidates: [a]\n", 4, "routes[0].name"),
    ("version: 1\nmodels: {a: {endpoint: 'http://h'}}\nroutes:\n  - name: r\n", 4, "routes[0].candidates"),
])
def test_missing_required_keys(text, line, path):
    """Each required key, when absent, is reported at its mapping's line with the key's path."""
    problem = only(text)
    assert (problem.line, problem.path, problem.message) == (line, path, "missing required key")


def test_version_must_be_one():
    """A policy written for another format version is refused."""
    problem = only(BASE.replace("version: 1", "version: 2"))
    assert (problem.line, problem.path) == (1, "version")
    assert "unsupported version 2" in problem.message


def model_with(fields: str) -> str:
    """A valid one-model policy whose model (on line 3) also has `fields`."""
    return f"version: 1\nmodels:\n  x: {{endpoint: 'http://h', {fields}}}\nroutes: [{{name: r, candidates: [x]}}]\n"


@pytest.mark.parametrize(("text", "line", "path", "message"), [
    (model_with("price: {output_per_mtok: -0.5}"), 3, "models.x.price.output_per_mtok", "must not be negative, got -0.5"),
    (model_with("context_window: 0"), 3, "models.x.context_window", "must be greater than 0, got 0"),
    (model_with("max_concurrency: -4"), 3, "models.x.max_concurrency", "must be greater than 0, got -4"),
    (model_with("latency_prior: {ttft_ms: -1}"), 3, "models.x.latency_prior.ttft_ms", "must not be negative, got -1.0"),
    (model_with("timeouts: {total_s: -30}"), 3, "models.x.timeouts.total_s", "must be greater than 0, got -30.0"),
    (model_with("tier: -1"), 3, "models.x.tier", "must not be negative, got -1"),
    (BASE + "routing: {explore_share: 1.5}\n", 8, "routing.explore_share", "must be between 0 and 1, got 1.5"),
    (BASE + "routing: {explore_share: -0.1}\n", 8, "routing.explore_share", "must be between 0 and 1, got -0.1"),
    (BASE + "routing: {queue_timeout_ms: -5}\n", 8, "routing.queue_timeout_ms", "must not be negative, got -5.0"),
])
def test_nonsense_numbers_are_rejected(text, line, path, message):
    """Negative prices, zero windows or concurrency, negative latencies and timeouts, shares outside [0,1] fail."""
    problem = only(text)
    assert (problem.line, problem.path, problem.message) == (line, path, message)


def test_unknown_candidate_and_fallback_models_suggest_the_close_one():
    """Route candidates and fallbacks naming undefined models are errors at their exact item, with did-you-mean."""
    problems = problems_of(BASE + """\
  - name: smart
    candidates: [small, medium, mediun]
    fallback:
      - larg
""")
    assert where(problems) == [(9, "routes[1].candidates[2]"), (11, "routes[1].fallback[0]")]
    assert problems[0].message == "unknown model 'mediun' (did you mean 'medium'?)"
    assert problems[1].message == "unknown model 'larg' (expected one of: small, medium)"


def test_duplicate_route_names_are_rejected():
    """Two routes with one name are an error at the second, pointing back at the first."""
    problem = only(BASE + "  - name: chat\n    candidates: [small]\n")
    assert (problem.line, problem.path) == (8, "routes[1].name")
    assert problem.message == "duplicate route 'chat' (first at line 6, routes[0].name)"


def test_tenant_references_and_key_hashes_are_checked():
    """Tenants must name defined routes, hold 64-hex key hashes, and never share a key hash."""
    problems = problems_of(BASE + f"""\
tenants:
  acme:
    keys_sha256: [{HASH_A}, {HASH_B.upper()}]
    routes: [chat, caht]
  zeta:
    keys_sha256:
      - {HASH_A}
""")
    assert where(problems) == [(10, "tenants.acme.keys_sha256[1]"), (11, "tenants.acme.routes[1]"),
                               (14, "tenants.zeta.keys_sha256[0]")]
    assert "64 lower-case hex digits" in problems[0].message
    assert problems[1].message == "unknown route 'caht' (did you mean 'chat'?)"
    assert problems[2].message.startswith("duplicate API key hash") and "tenants.acme.keys_sha256[0]" in problems[2].message


@pytest.mark.parametrize(("section", "path", "message"), [
    ("routes:\n  - {name: r, candidates: [small], match: {endpoints: [chat, embedding]}}",
     "routes[0].match.endpoints[1]", "'embedding' is not one of chat, completions, embeddings, responses (did you mean 'embeddings'?)"),
    ("routes:\n  - {name: r, candidates: [small], sla: {on_violation: drop}}",
     "routes[0].sla.on_violation", "'drop' is not one of best_effort, reject"),
    ("routes:\n  - {name: r, candidates: [small]}\ntenants: {t: {budget: {on_exhausted: downgrad}}}",
     "tenants.t.budget.on_exhausted", "'downgrad' is not one of reject, downgrade (did you mean 'downgrade'?)"),
    ("routes:\n  - {name: r, candidates: [small]}\nstore: {on_store_failure: open}",
     "store.on_store_failure", "'open' is not one of allow, deny"),
])
def test_choices_are_enforced(section, path, message):
    """Endpoints, on_violation, on_exhausted and on_store_failure accept only their documented values."""
    text = "version: 1\nmodels:\n  small: {endpoint: 'http://h'}\n" + section + "\n"
    problem = only(text)
    assert (problem.line, problem.path, problem.message) == (len(text.splitlines()), path, message)


@pytest.mark.parametrize(("fields", "path", "message"), [
    ("endpoint: 'localhost:8000'", "models.small.endpoint", "must be a URL (http or https) with a host, got 'localhost:8000'"),
    ("endpoint: 'http://h', encoding: gpt2", "models.small.encoding", "'gpt2' is not one of cl100k_base, o200k_base"),
    ("endpoint: 'http://h', gpus: {source: rocm}", "models.small.gpus.source", "'rocm' is not one of nvml, dcgm"),
    ("endpoint: 'http://h', gpus: {source: dcgm}", "models.small.gpus.url",
     "required when source is dcgm (the DCGM exporter's /metrics URL)"),
])
def test_model_endpoint_encoding_and_gpu_source_are_checked(fields, path, message):
    """Endpoints must be http(s) URLs, encodings known, GPU sources nvml or dcgm, and dcgm needs a URL."""
    problem = only(f"version: 1\nmodels:\n  small: {{{fields}}}\nroutes: [{{name: r, candidates: [small]}}]\n")
    assert (problem.line, problem.path, problem.message) == (3, path, message)


def test_header_regex_is_compiled_and_bad_regex_is_an_error():
    """A header value written /regex/ must compile; the error names the header's key path and line."""
    problem = only(BASE + "    match:\n      headers:\n        X-Team: '/ml-(/'\n")
    assert (problem.line, problem.path) == (10, "routes[0].match.headers.X-Team")
    assert problem.message.startswith("invalid regex /ml-(/")


def test_a_header_regex_with_a_lookaround_or_backreference_is_refused():
    """Header regexes are RE2 (linear-time matching on values clients choose): a lookahead or a backreference,
    which only a backtracking engine has, is a problem that says why."""
    for pattern in ("ml-(?!test).*", r"(a)\1"):
        problem = only(BASE + f"    match:\n      headers:\n        X-Team: '/{pattern}/'\n")
        assert problem.path == "routes[0].match.headers.X-Team"
        assert "RE2" in problem.message and "no lookarounds, no backreferences" in problem.message


def test_prompt_token_range_must_not_be_empty():
    """prompt_tokens.max below min is reported at max."""
    problem = only(BASE + "    match: {prompt_tokens: {min: 100, max: 10}}\n")
    assert (problem.line, problem.path) == (8, "routes[0].match.prompt_tokens.max")


def test_defaults_names_and_tuples():
    """Names come from keys, upstream_model defaults to the key, lists become tuples, defaults stay."""
    policy = parse_policy(BASE + "  - {name: embed, candidates: [small], fallback: [medium]}\n")
    small = policy.models["small"]
    assert (small.name, small.upstream_model, small.tier, small.encoding) == ("small", "small", 1, "o200k_base")
    assert policy.routes[1].fallback == ("medium",) and isinstance(policy.routes[0].candidates, tuple)
    assert policy.routes[0].match == model.Match() and policy.tenants == {}
    assert policy.source == "<string>"
    assert policy.content_sha256 == hashlib.sha256(
        (BASE + "  - {name: embed, candidates: [small], fallback: [medium]}\n").encode()).hexdigest()


def test_problem_string_names_file_line_and_path():
    """A problem prints as file:line: key.path: message, ready for an SRE's terminal."""
    problem = only(BASE.replace("[small, medium]", "[small, mediun]"))
    assert str(problem) == "p.yaml:7: routes[0].candidates[1]: unknown model 'mediun' (did you mean 'medium'?)"


@pytest.mark.parametrize("section", [
    load.PRICE, load.LATENCY_PRIOR, load.TIMEOUTS, load.GPUS, load.MODEL, load.MATCH, load.SLA, load.CACHE,
    load.ROUTE, load.LIMITS, load.BUDGET, load.TENANT, load.SERVER, load.BREAKER, load.ROUTING, load.STORE,
    load.TELEMETRY, load.LEDGER, load.ENERGY, load.POLICY,
], ids=lambda section: section.cls.__name__)
def test_every_dataclass_field_has_a_yaml_key(section):
    """Each section's keys cover exactly its dataclass's fields, so no field is unreachable from YAML."""
    attrs = {spec.attr or key for key, spec in ((key, section.spec(key)) for key in section.specs) if not spec.spread}
    if section is load.MATCH:
        attrs |= {"prompt_tokens_min", "prompt_tokens_max"}
    if section is load.POLICY:
        attrs |= {"source", "content_sha256"}
    assert attrs | set(section.named) == {f.name for f in dataclasses.fields(section.cls)}


def test_plain_exponent_numbers_are_numbers():
    """`1e-7` unquoted is a number, though PyYAML's YAML 1.1 rules would read it as a string."""
    policy = parse_policy(model_with("price: {input_per_mtok: 1e-7}, size_b: 7e0"))
    assert policy.models["x"].price.input_per_mtok == Decimal("1e-7") and policy.models["x"].size_b == 7.0
    assert only(model_with("size_b: '7e0'")).message == "expected a number, got string '7e0'"


@pytest.mark.parametrize(("name", "path"), [
    ("'}odd'", "tenants.}odd"), ("'a{b}'", "tenants.a{b}"), ("''", "tenants."), ("' '", "tenants. "),
])
def test_tenant_names_must_keep_their_redis_hash_tag(name, path):
    """A tenant name that is blank or holds a brace is refused at its line: its Redis keys (`{tenant}` hash tags)
    would lose their tag and spread over Redis Cluster slots."""
    problem = only(BASE + f"tenants:\n  {name}: {{}}\n")
    assert (problem.line, problem.path) == (9, path)
    assert problem.message == ("a tenant name must not be empty" if not name.strip("' ") else
                               "a tenant name must not contain '{' or '}' (they mark Redis Cluster hash tags)")


def test_store_key_prefix_must_not_hold_a_brace():
    """`store.key_prefix` with a brace is refused: it would move or break the hash tag of every key."""
    problem = only(BASE + "store: {key_prefix: 'gw{x}'}\n")
    assert (problem.line, problem.path, problem.message) == (
        8, "store.key_prefix", "must not contain '{' or '}' (they mark Redis Cluster hash tags)")


def test_a_minimal_policy_gets_the_defaults_the_readme_documents():
    """Every key left out takes the default the README's policy reference states, in its unit."""
    policy = parse_policy(BASE + "tenants:\n  t: {}\n")
    small, route, tenant = policy.models["small"], policy.routes[0], policy.tenants["t"]
    assert (small.provider, small.size_b, small.tier, small.context_window, small.max_concurrency) == (
        "openai", 0.0, 1, 8192, 64)
    assert (small.latency_prior.ttft_ms, small.latency_prior.tpot_ms) == (500.0, 20.0)
    assert (small.timeouts.connect_s, small.timeouts.first_byte_s, small.timeouts.total_s) == (5.0, 60.0, 600.0)
    assert (small.price.input_per_mtok, small.price.cached_input_per_mtok, small.gpus) == (0, None, None)
    assert (route.sla.min_tier, route.sla.on_violation, route.default_output_tokens) == (0, "best_effort", 256)
    assert route.cache == model.CacheRule(enabled=False, ttl_s=3600, mode="exact", nondeterministic=False)
    assert route.match.endpoints == ("chat", "completions", "embeddings") and route.match.models == ("*",)
    assert (tenant.budget.usd_per_day, tenant.budget.on_exhausted, tenant.priority) == (None, "reject", 1)
    assert tenant.limits == model.Limits(requests_per_minute=None, tokens_per_minute=None, concurrent=None)
    assert (policy.server.max_body_bytes, policy.server.grace_period_s, policy.server.client_timeout_s) == (
        20 * 1024 * 1024, 15.0, 60.0)
    assert policy.server.admin_token_env == "GATEWAY_ADMIN_TOKEN"
    routing = policy.routing
    assert (routing.explore_share, routing.latency_window_s, routing.prior_weight, routing.max_attempts) == (
        0.0, 300.0, 5, 4)
    assert (routing.breaker.failure_threshold, routing.breaker.open_s, routing.queue_timeout_ms) == (5, 30.0, 0.0)
    store = policy.store
    assert (store.on_store_failure, store.timeout_ms, store.key_prefix, store.max_connections) == (
        "allow", 100.0, "gw", 256)
    assert (policy.telemetry.tenant_label_top_n, policy.telemetry.prometheus) == (20, False)
    assert (policy.ledger.path, policy.ledger.max_bytes, policy.ledger.backups) == (None, 64 * 1024 * 1024, 5)
    assert policy.energy.sample_interval_s == 0.25


@pytest.mark.parametrize(("text", "path", "message"), [
    (model_with("size_b: -1"), "models.x.size_b", "must not be negative, got -1.0"),
    (model_with("gpus: {source: nvml, idle_w: -5}"), "models.x.gpus.idle_w", "must not be negative, got -5.0"),
    (model_with("gpus: {source: nvml, ids: ['']}"), "models.x.gpus.ids[0]", "must not be empty"),
    (BASE + "    sla: {max_energy_j: 0}\n", "routes[0].sla.max_energy_j", "must be greater than 0, got 0.0"),
    (BASE + "    cache: {ttl_s: 0}\n", "routes[0].cache.ttl_s", "must be greater than 0, got 0"),
    (BASE + "    match: {models: ['']}\n", "routes[0].match.models[0]", "must not be empty"),
    (BASE + "  - {name: ' ', candidates: [small]}\n", "routes[1].name", "must not be empty"),
    (BASE + "tenants:\n  t: {limits: {concurrent: 0}}\n", "tenants.t.limits.concurrent",
     "must be greater than 0, got 0"),
    (BASE + "tenants:\n  t: {priority: -1}\n", "tenants.t.priority", "must not be negative, got -1"),
    (BASE + "tenants:\n  t: {budget: {usd_per_day: 2e9}}\n", "tenants.t.budget.usd_per_day",
     "must be at most 1e+09, got 2000000000.0"),
    (BASE + f"tenants:\n  t: {{keys_sha256: ['{HASH_A}a']}}\n", "tenants.t.keys_sha256[0]",
     "must be a SHA-256 as 64 lower-case hex digits"),
    (BASE + "server: {grace_period_s: -1}\n", "server.grace_period_s", "must not be negative, got -1.0"),
    (BASE + "server: {client_timeout_s: 3601}\n", "server.client_timeout_s", "must be at most 3600, got 3601.0"),
    (BASE + "routing: {latency_window_s: 0}\n", "routing.latency_window_s", "must be greater than 0, got 0.0"),
    (BASE + "routing: {breaker: {failure_threshold: 0}}\n", "routing.breaker.failure_threshold",
     "must be greater than 0, got 0"),
    (BASE + "routing: {max_attempts: 0}\n", "routing.max_attempts", "must be greater than 0, got 0"),
    (BASE + "store: {timeout_ms: 0}\n", "store.timeout_ms", "must be greater than 0, got 0.0"),
    (BASE + "telemetry: {tenant_label_top_n: -1}\n", "telemetry.tenant_label_top_n", "must not be negative, got -1"),
    (BASE + "ledger: {backups: 0}\n", "ledger.backups", "must be greater than 0, got 0"),
    (BASE + "energy: {sample_interval_s: 0}\n", "energy.sample_interval_s", "must be greater than 0, got 0.0"),
    (BASE.replace("[small, medium]", "[]"), "routes[0].candidates", "must not be empty"),
    ("version: 1\nmodels: {}\nroutes: [{name: r, candidates: []}]\n", "models", "must define at least one model"),
])
def test_every_documented_bound_is_enforced(text, path, message):
    """A zero where the README needs a positive value (timeouts, windows, intervals, backups kept), a negative
    where it needs none, a blank name, an over-long key hash, money past 1e9 USD and an empty list of models or
    candidates are each a problem, the first in the file, at their key path."""
    problems = problems_of(text)
    assert [(problem.path, problem.message) for problem in problems][:1] == [(path, message)], problems


def test_values_on_a_documented_bound_are_accepted():
    """A bound is inclusive where the README says so: explore_share 0, prior_weight 1024, client_timeout_s of an
    hour, an equal prompt_tokens min and max; and a header value of one '/' is that exact value, not a regex."""
    policy = parse_policy(BASE + """\
    match: {prompt_tokens: {min: 100, max: 100}, headers: {x-path: '/'}}
routing: {explore_share: 0, prior_weight: 1024}
server: {client_timeout_s: 3600}
""")
    match = policy.routes[0].match
    assert (match.prompt_tokens_min, match.prompt_tokens_max) == (100, 100)
    assert match.headers == (model.HeaderMatch("x-path", "/"),)
    assert (policy.routing.explore_share, policy.routing.prior_weight) == (0.0, 1024)
    assert policy.server.client_timeout_s == 3600.0


def test_a_cross_field_problem_is_at_the_line_of_the_key_it_blames():
    """A GPU named twice in a block-style `gpus:` is reported at the `ids:` line, not at the mapping's first."""
    problem = only("""\
        version: 1
        models:
          small:
            endpoint: http://h
            gpus:
              source: nvml
              ids: [0, 0]
        routes: [{name: r, candidates: [small]}]
        """)
    assert (problem.line, problem.path) == (7, "models.small.gpus.ids")


def test_a_yaml_syntax_error_names_the_line_of_what_it_left_open():
    """An unclosed flow mapping is reported where the parser gave up, and names the line where it opened."""
    problem = only("version: 1\nmodels:\n  small: {endpoint: 'http://h'\nroutes: [{name: r, candidates: [small]}]\n")
    assert problem.line == 4
    assert problem.message.endswith("(while parsing a flow mapping at line 3)")


def test_a_file_that_is_not_utf8_names_the_byte(tmp_path):
    """A policy saved in Latin-1 is one problem naming the file and the offset of the first bad byte."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + b"# caf\xe9\n")
    [problem] = check_policy(path)
    assert (problem.file, problem.line) == (str(path), None)
    assert problem.message == f"not UTF-8 text: invalid continuation byte at byte {len(BASE) + 5}"


def test_a_mapping_that_merges_itself_is_a_located_problem():
    """A mapping whose merge key (<<) names its own anchor is refused at its line, not read as empty."""
    problem = only(BASE + "routing: &r\n  <<: *r\n")
    assert (problem.line, problem.path) == (8, "routing")
    assert "nested too deeply" in problem.message


def test_a_header_named_twice_in_different_case_is_a_duplicate_key():
    """HTTP header names ignore case and the loader lower-cases them: `X-Team` and `x-team` in one match are one
    header given two conditions, a route that can never match, reported as a duplicate at the second one's line."""
    problem = only(BASE + "    match: {headers: {X-Team: a, x-team: b}}\n")
    assert (problem.line, problem.path) == (8, "routes[0].match.headers.x-team")
    assert "duplicate header 'x-team'" in problem.message and "'X-Team'" in problem.message


def test_a_model_named_twice_in_a_routes_candidates_is_a_located_problem():
    """`candidates: [small, small]` (a typo for `[small, medium]`) would plan small twice, so a call that failed on
    it "falls back" to the very model that just failed; it is refused at the second mention, as a duplicate GPU id
    is. The same for a fallback named twice."""
    found = problems_of(BASE.replace("[small, medium]", "[small, small]\n    fallback: [medium, medium]"))
    assert [(p.line, p.path) for p in found] == [(7, "routes[0].candidates[1]"), (8, "routes[0].fallback[1]")]
    assert all("more than once" in p.message for p in found), found


@pytest.mark.parametrize("section, path", [
    ("    timeouts: {total_s: 600000}", "models.small.timeouts.total_s"),
    ("    timeouts: {first_byte_s: 60000}", "models.small.timeouts.first_byte_s"),
    ("    timeouts: {connect_s: 5000}", "models.small.timeouts.connect_s"),
])
def test_a_model_timeout_written_in_milliseconds_is_refused_as_the_client_timeout_is(section, path):
    """`total_s: 600000` (600 s written in ms) lets a hung model hold a call slot for a week; like
    server.client_timeout_s and a latency prior (at most an hour, "a call bounded by total_s never takes longer"),
    a model's timeouts are at most an hour."""
    text = BASE.replace('  small: {endpoint: "http://127.0.0.1:9101/v1"}',
                        '  small:\n    endpoint: "http://127.0.0.1:9101/v1"\n' + section)
    found = problems_of(text)
    assert [(p.line, p.path) for p in found] == [(5, path)], found
    assert "at most 3600" in found[0].message


def test_a_tab_used_to_indent_is_named_as_a_tab_with_what_to_write_instead():
    """A tab is invisible in most editors, and PyYAML says only "found character '\\t' that cannot start any token":
    the problem says, at its line, that YAML indents with spaces."""
    found = problems_of(BASE.replace("    candidates:", "\tcandidates:"))
    assert [p.line for p in found] == [7], found
    assert "indent with spaces" in found[0].message, found[0].message


def test_a_name_yaml_reads_as_a_boolean_or_a_number_is_referred_to_as_it_is_defined():
    """Mapping keys are names as written (`no:` defines model 'no', `1:` model '1', `on:` tenant 'on'), so the same
    word written where such a name is referred to means that name too, not a boolean or number to refuse."""
    policy = parse_policy(textwrap.dedent("""\
        version: 1
        models:
          no: {endpoint: "http://127.0.0.1:9101/v1"}
          1: {endpoint: "http://127.0.0.1:9102/v1"}
        routes:
          - name: r
            match: {tenants: [on]}
            candidates: [no]
            fallback: [1]
        tenants:
          on: {routes: [r]}
        telemetry: {tenant_labels: [on]}
        """))
    assert (policy.routes[0].candidates, policy.routes[0].fallback) == (("no",), ("1",))
    assert policy.routes[0].match.tenants == ("on",) and policy.telemetry.tenant_labels == ("on",)
