"""`gateway policy explain` and `gateway policy check` against the live gateway on the same policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from gateway.cli import main as gateway_cli
from tests.support.harness import Harness
from tests.support.policies import latency, models, standard_model, tenants

REPO = Path(__file__).resolve().parents[1]

#: the standard models with the latency priors the SLA cases below are computed from
POLICY = models(
    standard_model("small", latency_prior=latency(5, 5)),
    standard_model("medium", latency_prior=latency(5, 1)),
    standard_model("large", latency_prior=latency(10, 1)),
) + """
routes:
  - name: vip
    match: {{models: ["*"], tenants: [vip]}}
    candidates: [large]
  - name: beta
    match: {{models: [auto], headers: {{x-route: beta}}}}
    candidates: [medium, large]
  - name: default
    match: {{models: [auto, "gpt-*"], endpoints: [chat, completions]}}
    candidates: [small, medium, large]
    sla: {{p95_latency_ms: 2000}}
    fallback: [large]
  - name: tight
    match: {{models: [tight]}}
    candidates: [small, medium, large]
    sla: {{p95_latency_ms: 150}}
  - name: smart
    match: {{models: [smart]}}
    candidates: [small, medium, large]
    sla: {{min_tier: 2}}
  - name: strict
    match: {{models: [strict]}}
    candidates: [small]
    sla: {{p95_latency_ms: 150, on_violation: reject}}
  - name: cheap
    match: {{models: [cheap], prompt_tokens: {{max: 50}}}}
    candidates: [small]
  - name: capped
    match: {{models: [capped]}}
    candidates: [small]
    sla: {{max_cost_usd: 0.00002, on_violation: reject}}
""" + tenants({"team": "team-key", "vip": "vip-key"})

SIMS = {"small": dict(ttft_ms=5, tpot_ms=5), "medium": dict(ttft_ms=5, tpot_ms=1, context_window=32768),
        "large": dict(ttft_ms=10, tpot_ms=1, context_window=131072)}

LONG = "word " * 9000

#: (case id, endpoint, body, headers, tenant, expected model or refusal status)
CASES = [
    ("smallest-fits", "chat", {"model": "auto", "max_tokens": 10}, {}, "team", "small"),
    ("glob-alias", "chat", {"model": "gpt-4o-mini", "max_tokens": 10}, {}, "team", "small"),
    ("context-too-long-for-small", "chat", {"model": "auto", "max_tokens": 10, "content": LONG}, {}, "team",
     "medium"),
    ("min-tier-header", "chat", {"model": "auto", "max_tokens": 10}, {"x-gateway-min-tier": "3"}, "team",
     "large"),
    ("header-route", "chat", {"model": "auto", "max_tokens": 10}, {"x-route": "beta"}, "team", "medium"),
    ("latency-sla-drops-small", "chat", {"model": "tight", "max_tokens": 50}, {}, "team", "medium"),
    ("latency-sla-keeps-small", "chat", {"model": "tight", "max_tokens": 10}, {}, "team", "small"),
    ("max-latency-header", "chat", {"model": "auto", "max_tokens": 30}, {"x-gateway-max-latency-ms": "100"},
     "team", "medium"),
    ("route-min-tier", "chat", {"model": "smart", "max_tokens": 10}, {}, "team", "medium"),
    ("reject", "chat", {"model": "strict", "max_tokens": 50}, {}, "team", 503),
    ("prompt-range", "chat", {"model": "cheap", "max_tokens": 5}, {}, "team", "small"),
    ("prompt-out-of-range", "chat", {"model": "cheap", "max_tokens": 5, "content": "word " * 100}, {}, "team",
     404),
    ("tenant-route", "chat", {"model": "auto", "max_tokens": 10}, {}, "vip", "large"),
    ("completions", "completions", {"model": "auto", "max_tokens": 10}, {}, "team", "small"),
    # a batch of prompts is n choices for each: four 50-token answers pass the route's cost ceiling, one does not
    ("one-prompt-within-cost", "completions", {"model": "capped", "max_tokens": 50}, {}, "team", "small"),
    ("batch-over-cost", "completions", {"model": "capped", "max_tokens": 50, "content": ["a", "b", "c", "d"]}, {},
     "team", 503),
    # each prompt of a batch is read on its own: four of 3,000 tokens fit small's 8k window, as one of 9,000 does not
    ("batch-each-fits-small", "completions", {"model": "auto", "max_tokens": 10, "content": ["word " * 3000] * 4},
     {}, "team", "small"),
]


@pytest.fixture(scope="module")
def gw():
    harness = Harness(POLICY, SIMS).start()
    yield harness
    harness.stop()


def request_body(endpoint: str, spec: dict) -> dict:
    """The OpenAI request body of one case."""
    spec = dict(spec)
    content = spec.pop("content", "Hello there")
    if endpoint == "completions":
        return {**spec, "prompt": content}
    return {**spec, "messages": [{"role": "user", "content": content}]}


def live(gw, endpoint: str, body: dict, headers: dict, tenant: str) -> str | int:
    """The model the running gateway served the request with, or its error status."""
    client = gw.openai(api_key=f"{tenant}-key")
    create = client.completions if endpoint == "completions" else client.chat.completions
    try:
        return create.with_raw_response.create(**body, extra_headers=headers).headers["x-gateway-model"]
    except openai.APIStatusError as exc:
        return exc.status_code


def explain_cli(policy_path: Path, tmp_path: Path, capsys, body: dict, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gateway policy explain` on a request (a chat one unless `--endpoint` says)."""
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps(body))
    code = gateway_cli(["policy", "explain", str(policy_path), "--request", str(request_file), *args])
    out, err = capsys.readouterr()
    return code, out, err


def explained(policy_path: Path, tmp_path: Path, capsys, endpoint: str, body: dict, headers: dict,
              tenant: str) -> str | int:
    """What `gateway policy explain` chooses for the request, or the status it says it would refuse with."""
    code, out, err = explain_cli(policy_path, tmp_path, capsys, body, "--endpoint", endpoint, "--tenant", tenant,
                                 *(f"--header={k}:{v}" for k, v in headers.items()))
    if code == 2:
        return int(err.split("refused:")[1].split()[0])
    assert code == 0, err
    return out.strip().splitlines()[-1].removeprefix("choice: ")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_explain_agrees_with_live_routing(gw, tmp_path, capsys, case):
    """For each case the CLI's choice is the model the live gateway serves (or the same refusal)."""
    _, endpoint, spec, headers, tenant, expected = case
    body = request_body(endpoint, spec)
    assert explained(gw.policy_path, tmp_path, capsys, endpoint, body, headers, tenant) == expected
    assert live(gw, endpoint, body, headers, tenant) == expected


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m gateway ARGS` in a real subprocess."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          cwd=REPO, input=stdin, timeout=60)


def test_explain_command_prints_every_candidate(gw):
    """`python -m gateway policy explain` reads the request from stdin and explains each candidate's verdict."""
    body = request_body("chat", {"model": "tight", "max_tokens": 50})
    done = run_cli("policy", "explain", str(gw.policy_path), "--request", "-", "--tenant", "team",
                   stdin=json.dumps(body))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "route tight: p95_latency_ms 150" in out
    assert "dropped: latency 250ms > 150ms" in out
    assert out.strip().endswith("choice: medium")


def test_explain_prints_a_batchs_longest_prompt_beside_all_its_tokens(gw, tmp_path, capsys):
    """For a batch, explain says how long its longest prompt is (what each model's context must hold) beside the
    tokens it is priced at; one prompt has no such note."""
    batch = request_body("completions", {"model": "auto", "max_tokens": 5, "content": ["hello world", "hi"]})
    code, out, err = explain_cli(gw.policy_path, tmp_path, capsys, batch, "--endpoint", "completions",
                                 "--tenant", "team")
    assert code == 0, err
    assert out.splitlines()[0] == ("prompt tokens: 3 (o200k_base; longest prompt 2, which each model's context "
                                   "must hold)")
    single = request_body("completions", {"model": "auto", "max_tokens": 5, "content": "hello world"})
    code, out, err = explain_cli(gw.policy_path, tmp_path, capsys, single, "--endpoint", "completions",
                                 "--tenant", "team")
    assert (code, out.splitlines()[0]) == (0, "prompt tokens: 2 (o200k_base)")


def test_explain_says_whether_the_sla_is_met(gw):
    """`sla met: yes` when the choice meets the route's SLA; `sla met: no` when no candidate does and best
    effort chose (tight's 150 ms with 5,000 output tokens: every model predicted far over it)."""
    said = {}
    for max_tokens in (10, 5000):
        done = run_cli("policy", "explain", str(gw.policy_path), "--request", "-", "--tenant", "team",
                       stdin=json.dumps(request_body("chat", {"model": "tight", "max_tokens": max_tokens})))
        assert done.returncode == 0, done.stderr
        said[max_tokens] = [line.strip() for line in done.stdout.splitlines() if "sla met:" in line]
    assert said == {10: ["sla met: yes"], 5000: ["sla met: no"]}


def test_policy_check_accepts_a_good_policy(gw):
    """`gateway policy check` exits 0 on the policy the gateway is serving."""
    done = run_cli("policy", "check", str(gw.policy_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{gw.policy_path}: ok"


def test_policy_check_reports_file_line_errors(tmp_path):
    """`gateway policy check` exits 1 and prints every problem as file:line: key path: message."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\n"
        "models:\n"
        "  small:\n"
        "    endpoint: http://127.0.0.1:9/v1\n"
        "    upstream_model: s\n"
        "    tierr: 1\n"
        "    price: {input_per_mtok: -1}\n"
        "routes:\n"
        "  - name: chat\n"
        "    candidates: [smal]\n"
        "  - name: chat\n"
        "    candidates: [small]\n")
    done = run_cli("policy", "check", str(bad), str(REPO / "tests/policies/many_errors.yaml"))
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert any(line.startswith(f"{bad}:6: models.small.tierr: ") and "did you mean" in line for line in lines)
    assert any(line.startswith(f"{bad}:7: models.small.price.input_per_mtok: ") for line in lines)
    assert any(line.startswith(f"{bad}:10: routes[0].candidates") and "'smal'" in line for line in lines)
    assert any(line.startswith(f"{bad}:11: routes[1].name") and "duplicate" in line for line in lines)
    assert any("many_errors.yaml:" in line for line in lines)


def offline_policy(tmp_path: Path, tail: str = "") -> Path:
    """The test policy, plus `tail`, in a file of its own; explain calls no model, so no simulator is needed."""
    path = tmp_path / "policy.yaml"
    path.write_text((POLICY + tail).format(**{name: "http://127.0.0.1:9/v1" for name in SIMS}))
    return path


def test_explain_on_a_policy_with_problems_exits_1_naming_them(tmp_path, capsys):
    """A policy that does not load is the policy's problem (exit 1, its file named), not a refused request."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nmodels: {}\nroutes: []\n")
    code, out, err = explain_cli(broken, tmp_path, capsys, request_body("chat", {"model": "auto"}))
    assert (code, out) == (1, "")
    assert str(broken) in err and "would be refused" not in err


def test_explain_as_a_tenant_the_policy_lacks_is_a_refusal_naming_it(tmp_path, capsys):
    """`--tenant` naming no tenant of the policy is refused (exit 2), not explained as an anonymous request."""
    body = request_body("chat", {"model": "auto", "max_tokens": 10})
    code, out, err = explain_cli(offline_policy(tmp_path), tmp_path, capsys, body, "--tenant", "nobody")
    assert (code, out) == (2, "")
    assert "no tenant named 'nobody'" in err
    assert "argument --tenant" in err and "would be refused" not in err     # the command line's fault, said so


def test_explain_reads_a_header_written_with_a_space_after_the_colon(tmp_path, capsys):
    """`--header "x-route: beta"` matches the beta route, as that header does on a live request."""
    body = request_body("chat", {"model": "auto", "max_tokens": 10})
    code, out, err = explain_cli(offline_policy(tmp_path), tmp_path, capsys, body, "--tenant", "team",
                                 "--header", "x-route: beta")
    assert code == 0, err
    assert out.strip().endswith("choice: medium")


@pytest.mark.parametrize("header", [":beta", " :beta", "x-route"])
def test_explain_refuses_a_header_without_a_name_or_a_colon(tmp_path, capsys, header):
    """A `--header` that is not NAME:VALUE is refused with the form it must take."""
    body = request_body("chat", {"model": "auto", "max_tokens": 10})
    code, out, err = explain_cli(offline_policy(tmp_path), tmp_path, capsys, body, "--header", header)
    assert (code, out) == (2, "")
    assert "argument --header: must look like NAME:VALUE" in err


def test_explain_without_a_tenant_on_a_policy_with_tenants_says_live_would_refuse_it(tmp_path, capsys):
    """On a policy with tenants a request without an API key is refused live (401); explain without `--tenant`
    must not instead answer for a caller that cannot exist: here the catch-all route's small, where tenant vip,
    the only other kind of caller there is, gets the vip route's large."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(small="http://127.0.0.1:9/v1", medium="http://127.0.0.1:9/v1",
                                  large="http://127.0.0.1:9/v1"))
    body = request_body("chat", {"model": "auto", "max_tokens": 10})
    code, out, err = explain_cli(path, tmp_path, capsys, body)
    assert code == 2, out
    assert "401" in err and "--tenant" in err, err
