"""Policy files built to hurt the loader: each is a located problem, found fast, and a reload keeps serving."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from gateway.policy.load import check_policy
from gateway.tenancy.identity import sha256_hex
from tests.support.harness import DEFAULT_POLICY, Harness

DEMO = Path("gateway/data/demo.yaml").read_text()
DEEP = "\nextra: " + "[" * 600 + "]" * 600 + "\n"


def merge_bomb(levels: int, fan: int = 10) -> str:
    """Each level merges the one below `fan` times: fan ** levels expansions if each alias is read again."""
    lines = ["  x0: &a0 {explore_share: 0.1}"]
    lines += [f"  x{i}: &a{i} {{<<: [" + ", ".join([f"*a{i - 1}"] * fan) + "]}" for i in range(1, levels + 1)]
    return DEMO + "\nanchors:\n" + "\n".join(lines) + f"\nrouting:\n  <<: *a{levels}\n"


def test_yaml_nested_too_deeply_is_a_problem_of_the_file(tmp_path):
    """600 levels of nesting make the YAML parser recurse too deep: a problem naming the file, not a crash."""
    path = tmp_path / "deep.yaml"
    path.write_text(DEMO + DEEP)
    [problem] = check_policy(path)
    assert problem.file == str(path) and "nested too deeply" in problem.message


def test_a_merge_key_bomb_is_read_in_linear_time(tmp_path):
    """Sixteen levels of ten-fold merges (10**16 expansions if each alias were read again) check at once."""
    path = tmp_path / "bomb.yaml"
    path.write_text(merge_bomb(16))
    started = time.perf_counter()
    problems = check_policy(path)
    assert time.perf_counter() - started < 5.0
    assert any("anchors" in p.path for p in problems)


@pytest.mark.parametrize("section, key, value", [("routing", "prior_weight", "100000000000000000000"),
                                                 ("routing", "prior_weight", "1000000000")])
def test_a_prior_weight_the_estimator_cannot_hold_is_refused(tmp_path, section, key, value):
    """prior_weight becomes that many pseudo-samples: above 1024 it is a policy error, not an OOM at start-up."""
    path = tmp_path / "pw.yaml"
    path.write_text(DEMO + f"\n{section}: {{{key}: {value}}}\n")
    [problem] = check_policy(path)
    assert problem.path == f"{section}.{key}" and "at most 1024" in problem.message


def test_an_absurd_price_is_refused(tmp_path):
    """A price beyond 1e9 USD per million tokens is a policy error (it used to break the cost arithmetic)."""
    path = tmp_path / "price.yaml"
    path.write_text(DEMO.replace("input_per_mtok: 0.05", "input_per_mtok: 1e25", 1))
    assert "input_per_mtok: 1e25" in path.read_text()
    [problem] = check_policy(path)
    assert problem.path.endswith("price.input_per_mtok") and "at most 1e+09" in problem.message


def test_a_reload_of_a_file_nested_too_deeply_is_a_422_and_the_old_policy_serves():
    """The admin reload answers 422 with the problem; the gateway keeps serving its policy."""
    harness = Harness(DEFAULT_POLICY + 'server:\n  admin_token_sha256: "%s"\n' % sha256_hex("admin-token")).start()
    try:
        harness.policy_path.write_text(harness.policy_path.read_text() + DEEP)
        reply = requests.post(f"{harness.base_url}/admin/policy/reload", headers={"x-admin-token": "admin-token"},
                              timeout=30)
        assert reply.status_code == 422 and "nested too deeply" in reply.text
        assert harness.openai().chat.completions.create(
            model="auto", max_tokens=3, messages=[{"role": "user", "content": "still here"}]).choices
    finally:
        harness.stop()
