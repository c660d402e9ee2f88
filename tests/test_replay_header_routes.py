"""`gateway replay` and routes that match on request headers: the traffic has no headers, so a request such a
route could take is given the route its line recorded, and one with no usable recorded route is counted and
warned of."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.policy.model import HeaderMatch, LatencyPrior, Match, Model, Policy, Route
from gateway.replay import ReplayRequest, render_markdown, replay, summarize
from gateway.replay.cli import main

SEARCH = Route("search", Match(models=("auto",), headers=(HeaderMatch("x-team", "search"),)), candidates=("large",))
SEARCH_REGEX = Route("search-any", Match(models=("auto",), headers=(HeaderMatch("x-team", "search-.*", regex=True),)),
                     candidates=("large",))
DEFAULT = Route("chat-default", Match(models=("auto",)), candidates=("small",))
SMART = Route("smart", Match(models=("smart",)), candidates=("large",))


def _policy(*routes: Route) -> Policy:
    models = {name: Model(name, f"http://127.0.0.1:1/{name}", name, latency_prior=LatencyPrior(1, 0))
              for name in ("small", "large")}
    return Policy(version=1, models=models, routes=routes)


def test_a_header_matched_route_is_taken_from_the_recorded_route():
    """Requests a header-matched route could take get the route their line recorded (exact or regex match), or
    the headerless match without one; requests no header route could take are matched as before, uncounted."""
    policy = _policy(SEARCH, SEARCH_REGEX, DEFAULT, SMART)
    requests = [ReplayRequest(0.0, 10, 5, recorded_route="search"),
                ReplayRequest(0.1, 10, 5, recorded_route="search-any"),
                ReplayRequest(0.2, 10, 5, recorded_route="chat-default"),
                ReplayRequest(0.3, 10, 5),
                ReplayRequest(0.4, 10, 5, recorded_route="gone-since"),
                ReplayRequest(0.5, 10, 5, alias="smart", recorded_route="search")]
    result = replay(policy, requests)
    assert [(o.route, o.label) for o in result.outcomes] == [
        ("search", "large"), ("search-any", "large"), ("chat-default", "small"), ("chat-default", "small"),
        ("chat-default", "small"), ("smart", "large")]
    summary = summarize(result)
    assert (summary.routed_by_recorded_route, summary.matched_without_headers) == (3, 2)
    markdown = render_markdown(summary)
    assert "| routed by their recorded route (header-matched routes) | 3 |" in markdown
    assert "| matched without headers (header-matched routes not simulated) | 2 |" in markdown


def test_a_recorded_header_route_behind_a_headerless_match_is_not_taken():
    """A request the headerless route matches first can never reach a header-matched route placed after it: its
    recorded route (from an older policy order) is not used, and it is counted as matched without headers."""
    late_search = Route("late-search", SEARCH.match, candidates=("large",))
    result = replay(_policy(SEARCH, DEFAULT, late_search), [ReplayRequest(0.0, 10, 5, recorded_route="late-search")])
    assert [(o.route, o.label) for o in result.outcomes] == [("chat-default", "small")]
    summary = summarize(result)
    assert (summary.routed_by_recorded_route, summary.matched_without_headers) == (0, 1)


def test_a_policy_without_header_routes_ignores_recorded_routes():
    """Without header-matched routes, routing is the policy's own: a recorded route is neither used nor counted."""
    result = replay(_policy(DEFAULT, SMART), [ReplayRequest(0.0, 10, 5, recorded_route="smart")])
    assert [(o.route, o.label) for o in result.outcomes] == [("chat-default", "small")]
    summary = summarize(result)
    assert (summary.routed_by_recorded_route, summary.matched_without_headers) == (0, 0)
    assert "recorded route" not in render_markdown(summary)


def test_the_cli_warns_once_when_header_routes_cannot_be_simulated(tmp_path, capsys):
    """A trace with no route names (the Azure CSV) under a policy with a header-matched route gets one warning
    line, however many requests and policies, and the report counts them."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("""version: 1
models:
  small: {endpoint: "http://127.0.0.1:1/v1", latency_prior: {ttft_ms: 1, tpot_ms: 0}}
  large: {endpoint: "http://127.0.0.1:2/v1", latency_prior: {ttft_ms: 1, tpot_ms: 0}}
routes:
  - name: search
    match: {models: ["auto"], headers: {x-team: search}}
    candidates: [large]
  - name: chat-default
    match: {models: ["auto"]}
    candidates: [small]
""")
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(f"{t},10,5\n" for t in range(4)))
    report = tmp_path / "report.json"
    assert main(["--policy", str(policy), "--baseline", str(policy), "--traffic", str(trace),
                 "--out", str(tmp_path / "report.md"), "--json", str(report)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: header-matched routes are not simulated for 4 requests") == 1
    assert json.loads(report.read_text())["policies"]["new"]["matched_without_headers"] == 4
    assert "| matched without headers (header-matched routes not simulated) | 4 | 4 |" in \
        Path(tmp_path / "report.md").read_text()
