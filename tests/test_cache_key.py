"""The cache key, the cacheability rules and Cache-Control handling."""

from __future__ import annotations

from multidict import CIMultiDict

from gateway.cache.key import ANSWER_FIELDS, cache_control, cache_key, is_cacheable
from gateway.policy.model import CacheRule

BODY = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
WHERE = {"prefix": "gw", "tenant": "acme", "route": "chat-default", "resolved": "small",
         "endpoint": "chat"}


def key_of(body: dict, **changes: str) -> str:
    return cache_key(**{**WHERE, **changes}, body=body)


def test_key_is_stable_and_prefixed() -> None:
    """The same request gives the same key, in the documented `{prefix}:c:v3:{sha256}` shape."""
    key = key_of(BODY)
    assert key == key_of(dict(reversed(list(BODY.items()))))
    prefix, kind, version, digest = key.split(":")
    assert (prefix, kind, version, len(digest)) == ("gw", "c", "v3", 64)


def test_delivery_and_bookkeeping_fields_do_not_change_the_key() -> None:
    """stream, stream_options, user, metadata, store, service_tier and model leave the key alone."""
    noisy = {**BODY, "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
             "metadata": {"a": "b"}, "store": True, "service_tier": "auto", "model": "gpt-4o-mini"}
    assert key_of(noisy) == key_of(BODY)


def test_answer_fields_change_the_key() -> None:
    """Temperature, messages, tools, unknown extra fields, tenant, route and resolved model all do."""
    base = key_of(BODY)
    variants = [
        key_of({**BODY, "temperature": 0.5}),
        key_of({**BODY, "messages": [{"role": "user", "content": "hello"}]}),
        key_of({**BODY, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        key_of({**BODY, "some_new_field": 1}),
        key_of(BODY, tenant="other"),
        key_of(BODY, route="chat-smart"),
        key_of(BODY, resolved="large"),
        key_of(BODY, endpoint="completions"),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_every_answer_changing_field_changes_the_key() -> None:
    """Each field that can change the answer (seed, response_format, stop, max_tokens, tools...) is in the key:
    a request differing only there never gets another request's answer."""
    keys = {key_of({**BODY, name: {"differs": name}}) for name in ANSWER_FIELDS}
    assert len(keys | {key_of(BODY)}) == len(ANSWER_FIELDS) + 1


def test_integer_and_float_temperature_share_a_key() -> None:
    """`temperature: 0` and `temperature: 0.0` are the same request."""
    assert key_of({**BODY, "temperature": 0.0}) == key_of(BODY)


def test_integer_and_float_sampling_parameters_share_a_key() -> None:
    """`top_p: 1` and `top_p: 1.0` (and the penalties) are the same request."""
    for name in ("top_p", "presence_penalty", "frequency_penalty"):
        assert key_of({**BODY, name: 1}) == key_of({**BODY, name: 1.0}), name


def test_cacheability_rules() -> None:
    """Only enabled routes with one choice and pinned sampling (or nondeterministic opt-in) cache."""
    on = CacheRule(enabled=True)
    assert is_cacheable({"temperature": 0}, on)
    assert is_cacheable({"temperature": 0.7, "seed": 7}, on)
    assert not is_cacheable({"temperature": 0.7}, on)
    assert not is_cacheable({}, on)
    assert not is_cacheable({"temperature": 0, "n": 2}, on)
    assert is_cacheable({"temperature": 0, "n": 1}, on)
    assert not is_cacheable({"temperature": 0}, CacheRule(enabled=False))
    assert is_cacheable({"temperature": 0.9}, CacheRule(enabled=True, nondeterministic=True))


def test_nondeterministic_routes_still_cache_one_choice_only() -> None:
    """`nondeterministic: true` lifts the temperature and seed condition, never the `n` one: n=2 is not cached."""
    sampled = CacheRule(enabled=True, nondeterministic=True)
    assert is_cacheable({"temperature": 0.9, "n": 1}, sampled)
    assert not is_cacheable({"temperature": 0.9, "n": 2}, sampled)
    assert not is_cacheable({"temperature": 0, "n": 3}, sampled)


def test_embeddings_are_cacheable_without_temperature() -> None:
    """Embeddings are deterministic: an enabled route caches them."""
    body = {"input": "hello"}
    assert is_cacheable(body, CacheRule(enabled=True), endpoint="embeddings")
    assert not is_cacheable(body, CacheRule(enabled=False), endpoint="embeddings")


def test_cache_control_directives() -> None:
    """no-cache skips the lookup but stores; no-store looks up but does not store."""
    assert cache_control({}) == (True, True)
    assert cache_control({"Cache-Control": "no-cache"}) == (False, True)
    assert cache_control({"cache-control": "No-Store"}) == (True, False)
    assert cache_control({"Cache-Control": "max-age=0, no-cache, no-store"}) == (False, False)


def test_cache_control_reads_every_header_line() -> None:
    """A multidict with two Cache-Control lines honours both."""
    headers = CIMultiDict([("Cache-Control", "no-cache"), ("cache-control", "no-store")])
    assert cache_control(headers) == (False, False)


def test_a_seed_of_zero_pins_the_sampling() -> None:
    """`seed: 0` is a seed like any other: a sampled request that sends it is cacheable."""
    assert is_cacheable({"temperature": 0.7, "seed": 0}, CacheRule(enabled=True))


def test_a_no_cache_directive_with_a_field_list_still_skips_the_lookup() -> None:
    """`no-cache="Set-Cookie"` and `no-store=x` are still their directives: the argument after `=` is ignored."""
    assert cache_control({"Cache-Control": 'no-cache="Set-Cookie"'}) == (False, True)
    assert cache_control({"Cache-Control": "no-store=x"}) == (True, False)
