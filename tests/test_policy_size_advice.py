"""A route whose candidates mix models with and without `size_b` is said by `policy check`: the size-less are tried
first."""

from __future__ import annotations

from gateway.cli import main
from gateway.fleet import Fleet
from gateway.policy.advice import advice
from gateway.policy.load import parse_policy

POLICY = """
version: 1
models:
  small: {endpoint: "http://127.0.0.1:1/v1", size_b: 1}
  large: {endpoint: "http://127.0.0.1:2/v1", size_b: 70}
  hosted: {endpoint: "http://127.0.0.1:3/v1"}
  other: {endpoint: "http://127.0.0.1:4/v1"}
routes:
  - name: mixed
    match: {models: [mixed]}
    candidates: [small, hosted, large]
  - name: sized
    match: {models: [sized]}
    candidates: [small, large]
  - name: unsized
    match: {models: [unsized]}
    candidates: [hosted, other]
"""

MIXED_NOTE = ("routes.mixed.candidates: hosted has size_b 0 (the default when none is set), so it is tried before "
              "small, large: the router picks the smallest candidate that meets the SLA; give every candidate its "
              "size_b")


def test_a_route_mixing_sized_and_size_less_candidates_gets_a_note_that_is_true():
    """Only the route that mixes candidates with and without size_b is noted, and the planner does try the
    size-less one first, as the note says."""
    policy = parse_policy(POLICY)
    assert advice(policy) == [MIXED_NOTE]
    decision = Fleet(policy).router(policy).decide(policy.routes[0], prompt_tokens=10, max_tokens=10, stream=False)
    assert [model.name for model in decision.plan] == ["hosted", "small", "large"]


def test_several_size_less_candidates_are_named_together():
    """Two size-less candidates beside a sized one are named in one note, in the route's order."""
    policy = parse_policy(POLICY.replace("candidates: [small, hosted, large]", "candidates: [other, small, hosted]"))
    assert advice(policy)[0] == ("routes.mixed.candidates: other, hosted have size_b 0 (the default when none is "
                                 "set), so they are tried before small: the router picks the smallest candidate "
                                 "that meets the SLA; give every candidate its size_b")


def test_policy_check_prints_the_size_note_and_still_exits_0(tmp_path, capsys):
    """`policy check` prints the note on stderr after `ok` and exits 0: the policy is valid."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    assert main(["--log-level", "WARNING", "policy", "check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok\n"
    assert err == f"{path}: note: {MIXED_NOTE}\n"
