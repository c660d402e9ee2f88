"""Route matching: first match in policy order, globs, endpoints, tenants, headers, prompt size."""

from __future__ import annotations

import subprocess
import sys

import pytest
from multidict import CIMultiDict

from gateway.errors import PolicyError
from gateway.policy.model import HeaderMatch, Match, Route
from gateway.routing import matcher
from gateway.routing.matcher import RouteIndex


def route(name: str, **match: object) -> Route:
    """A route with the given match and one candidate."""
    return Route(name=name, match=Match(**match), candidates=("small",))


def names(index: RouteIndex, alias: str = "auto", endpoint: str = "chat", tenant: str | None = None,
          headers: dict[str, str] | None = None, prompt_tokens: int = 100) -> str | None:
    """The name of the matched route, or None."""
    found = index.match(endpoint, alias, tenant, headers or {}, prompt_tokens)
    return found.name if found else None


def test_first_route_in_policy_order_wins():
    """When two routes match, the earlier one in the policy is chosen."""
    index = RouteIndex((route("a", models=("auto",)), route("b", models=("auto",))))
    assert names(index) == "a"


def test_glob_route_before_exact_route_wins_by_order():
    """A glob route listed first beats a later exact-alias route: merging keeps policy order."""
    index = RouteIndex((route("glob", models=("gpt-*",)), route("exact", models=("gpt-4o",))))
    assert names(index, "gpt-4o") == "glob"
    index = RouteIndex((route("exact", models=("gpt-4o",)), route("glob", models=("gpt-*",))))
    assert names(index, "gpt-4o") == "exact"
    assert names(index, "gpt-3.5") == "glob"


def test_unknown_alias_matches_nothing_without_catch_all():
    """An alias no route names gives None, and a trailing `*` route catches it."""
    index = RouteIndex((route("a", models=("auto",)),))
    assert names(index, "other") is None
    index = RouteIndex((route("a", models=("auto",)), route("any")))
    assert names(index, "other") == "any"


def test_endpoint_kind_must_match():
    """A chat-only route does not take embeddings requests."""
    index = RouteIndex((route("chat", endpoints=("chat",)), route("emb", endpoints=("embeddings",))))
    assert names(index, endpoint="chat") == "chat"
    assert names(index, endpoint="embeddings") == "emb"
    assert names(index, endpoint="completions") is None


def test_tenant_list_restricts_and_empty_means_any():
    """A route naming tenants takes only them; an anonymous request skips it."""
    index = RouteIndex((route("acme", tenants=("acme",)), route("rest")))
    assert names(index, tenant="acme") == "acme"
    assert names(index, tenant="globex") == "rest"
    assert names(index, tenant=None) == "rest"


def test_header_exact_and_regex_with_case_insensitive_names():
    """Header conditions match exactly or by full regex, and a CIMultiDict's names are case-insensitive."""
    index = RouteIndex((
        route("exact", headers=(HeaderMatch("X-Team", "search"),)),
        route("regex", headers=(HeaderMatch("x-priority", r"high|urgent", regex=True),)),
        route("rest"),
    ))
    assert names(index, headers=CIMultiDict({"X-TEAM": "search"})) == "exact"
    assert names(index, headers={"x-team": "searching"}) == "rest"
    assert names(index, headers=CIMultiDict({"X-Priority": "urgent"})) == "regex"
    assert names(index, headers={"x-priority": "urgently"}) == "rest"
    assert names(index, headers={}) == "rest"


def test_an_exact_header_value_is_matched_case_sensitively():
    """Header names ignore case, values do not: `x-team: Search` is not the `search` team's route."""
    index = RouteIndex((route("search", headers=(HeaderMatch("x-team", "search"),)), route("rest")))
    assert names(index, headers=CIMultiDict({"X-Team": "search"})) == "search"
    assert names(index, headers=CIMultiDict({"X-Team": "Search"})) == "rest"


def test_a_header_value_that_is_no_utf8_matches_no_regex():
    """aiohttp reads header bytes that are no UTF-8 (Latin-1's "été") as lone surrogates: such a value matches no
    regex, and the next route takes the request (RE2 raised on it: a 500 and a traceback)."""
    index = RouteIndex((route("gold", headers=(HeaderMatch("x-team", "gold|platinum|.t.", regex=True),)),
                        route("rest")))
    for value in ("gold\udcff", "\udce9t\udce9"):
        assert names(index, headers=CIMultiDict({"x-team": value})) == "rest"
    assert names(index, headers=CIMultiDict({"x-team": "été"})) == "gold"


def test_prompt_token_range_is_inclusive():
    """A route for long prompts takes prompts inside its inclusive range only."""
    index = RouteIndex((route("long", prompt_tokens_min=4000), route("short", prompt_tokens_max=3999)))
    assert names(index, prompt_tokens=4000) == "long"
    assert names(index, prompt_tokens=3999) == "short"


def test_bad_header_regex_is_a_policy_error():
    """An invalid header regex is reported as a PolicyError naming the route's key path."""
    with pytest.raises(PolicyError, match=r"routes\[0\]\.match\.headers\[0\]\.value"):
        RouteIndex((route("bad", headers=(HeaderMatch("x-a", "(", regex=True),)),))


def test_a_backtracking_regex_on_a_crafted_header_value_does_not_stall(tmp_path):
    """`(a+)+b` against 40 `a`s and a `c` takes a backtracking engine hours (each `a` doubles it); header regexes
    run on RE2, linear in the value: the match, in a process of its own, ends at once with no match."""
    script = tmp_path / "match.py"
    script.write_text(
        "from gateway.policy.model import HeaderMatch, Match, Route\n"
        "from gateway.routing.matcher import RouteIndex\n"
        "index = RouteIndex((Route('r', Match(headers=(HeaderMatch('x-team', '(a+)+b', regex=True),)), ('small',)),))\n"
        "print(index.match('chat', 'auto', None, {'x-team': 'a' * 40 + 'c'}, 10))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "None"), done.stderr[-1000:]


def test_many_routes_pick_the_right_one():
    """With 1,000 exact-alias routes and a glob catch-all, each alias reaches its own route."""
    routes = tuple(route(f"r{i}", models=(f"alias-{i}",)) for i in range(1000)) + (route("rest"),)
    index = RouteIndex(routes)
    assert names(index, "alias-0") == "r0"
    assert names(index, "alias-999") == "r999"
    assert names(index, "alias-1000") == "rest"


def test_a_route_with_an_empty_endpoint_list_takes_every_endpoint():
    """`endpoints: []` means any endpoint, as an empty tenant list means any tenant."""
    index = RouteIndex((route("any", endpoints=()),))
    for endpoint in ("chat", "completions", "embeddings"):
        assert names(index, endpoint=endpoint) == "any"


def test_a_route_with_an_empty_model_list_takes_every_alias():
    """`models: []` means any alias, as the default `*` does."""
    index = RouteIndex((route("any", models=()),))
    assert names(index, "auto") == "any"
    assert names(index, "gpt-4o") == "any"


def test_a_route_without_prompt_bounds_takes_an_empty_prompt():
    """A route that sets no prompt_tokens_min takes a request of zero prompt tokens."""
    index = RouteIndex((route("any"),))
    assert names(index, prompt_tokens=0) == "any"


def test_a_glob_alias_must_match_the_whole_requested_name():
    """`gpt-*` takes `gpt-4o` but not `my-gpt-4o`, and `gpt-?` not `gpt-4o`: a glob is anchored at both ends."""
    index = RouteIndex((route("star", models=("gpt-*",)), route("one", models=("o?",))))
    assert names(index, "gpt-4o") == "star"
    assert names(index, "my-gpt-4o") is None
    assert names(index, "o1") == "one"
    assert names(index, "o1-mini") is None


def test_a_bracket_alias_is_a_glob():
    """`gpt-[45]` is a pattern taking `gpt-4` and `gpt-5`, not only the literal name `gpt-[45]`."""
    index = RouteIndex((route("gpt", models=("gpt-[45]",)),))
    assert names(index, "gpt-4") == "gpt"
    assert names(index, "gpt-5") == "gpt"
    assert names(index, "gpt-3") is None


def test_a_header_condition_named_in_capitals_matches_lower_cased_request_headers():
    """The index lower-cases a condition's header name, so `X-Team` and `X-Priority` match a dict of lower-cased
    request headers, as `match` documents, for exact values and regexes alike."""
    index = RouteIndex((route("exact", headers=(HeaderMatch("X-Team", "search"),)),
                        route("regex", headers=(HeaderMatch("X-Priority", "high|urgent", regex=True),)),
                        route("rest")))
    assert names(index, headers={"x-team": "search"}) == "exact"
    assert names(index, headers={"x-priority": "high"}) == "regex"


def test_the_alias_cache_never_answers_one_alias_with_anothers_routes():
    """Aliases are matched as written: after `auto` is looked up and remembered, `AUTO` still finds no route."""
    index = RouteIndex((route("a", models=("auto",)),))
    assert names(index, "auto") == "a"
    assert names(index, "AUTO") is None
    assert names(index, "auto") == "a"


def test_the_alias_cache_stays_bounded_under_made_up_model_names():
    """Clients may send any model name: the remembered aliases never pass their bound, and after the cache is
    cleared an alias is matched as before."""
    index = RouteIndex((route("gpt", models=("gpt-*",)), route("a", models=("auto",))))
    for n in range(2 * matcher._ALIAS_CACHE_MAX + 10):
        assert names(index, f"gpt-{n}") == "gpt"
        assert len(index._by_alias) <= matcher._ALIAS_CACHE_MAX
    assert names(index, "auto") == "a"
    assert names(index, "unknown") is None
