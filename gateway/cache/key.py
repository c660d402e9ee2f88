"""The cache key and the rules for when a request may use the cache.

The key is tenant-scoped: two tenants asking the same question never share
an answer. It hashes everything that can change the answer and nothing that
only changes its delivery (stream, stream_options) or bookkeeping (user,
metadata, store, service_tier). `model` is left out because the route and
the resolved model (alias or tier) already name it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from gateway.policy.model import CacheRule

#: v2: entries name the model that answered; v3: the order of keys inside a body field counts (an entry of v2 could
#: answer a request whose schema lists its properties in another order)
KEY_VERSION = "v3"

#: body fields that never change the answer; every other field is hashed (`safety_identifier` is OpenAI's
#: successor to `user`, `prompt_cache_key` a hint for the provider's own prompt cache)
EXCLUDED_FIELDS = frozenset(
    {"stream", "stream_options", "user", "metadata", "store", "service_tier", "model", "safety_identifier",
     "prompt_cache_key"})

#: the answer-changing fields we know of (documentation: unknown fields are hashed too)
ANSWER_FIELDS = (
    "messages", "prompt", "input", "tools", "tool_choice", "functions", "function_call",
    "response_format", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
    "seed", "n", "logprobs", "top_logprobs", "logit_bias", "presence_penalty",
    "frequency_penalty", "parallel_tool_calls", "dimensions", "encoding_format",
    "reasoning_effort")

#: numeric fields where 0 and 0.0 (or 1 and 1.0) mean the same thing
FLOAT_FIELDS = frozenset({"temperature", "top_p", "presence_penalty", "frequency_penalty"})


def cache_key(*, prefix: str, tenant: str, route: str, resolved: str, endpoint: str,
              body: dict[str, Any]) -> str:
    """`{prefix}:c:{KEY_VERSION}:{sha256}` of the canonical JSON of who asked, where, and what.

    The body's own fields are put in name order; what they hold is hashed as sent: the order of an object's
    keys inside a field can change the answer (a JSON schema's `properties` are generated in their order, and a
    tool's are shown to the model in it), so two requests differing there never share an entry."""
    material = {
        "body": answer_fields(body), "endpoint": endpoint, "resolved": resolved, "route": route, "tenant": tenant,
    }
    digest = hashlib.sha256(orjson.dumps(material)).hexdigest()
    return f"{prefix}:c:{KEY_VERSION}:{digest}"


def answer_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body without the fields that cannot change the answer, numbers normalised, in name order."""
    kept = {}
    for name in sorted(body):
        if name in EXCLUDED_FIELDS:
            continue
        value = body[name]
        if name in FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kept[name] = value
    return kept


def is_cacheable(body: Mapping[str, Any], rule: CacheRule, *, endpoint: str | None = None) -> bool:
    """Whether the route caches and the request is deterministic enough to share an answer.

    Embeddings are deterministic, so with `endpoint="embeddings"` only `rule.enabled`
    matters. For chat and completions: one choice (`n` absent or 1), and either the
    route opts into caching sampled answers (`nondeterministic`), or the request pins
    the sampling (`temperature == 0`, or a `seed`). An absent temperature means the
    provider default (1.0): not cacheable. The Responses API is never cached: a response is stored by its
    server under its own `id` (`store` defaults to true), which a later request names (`previous_response_id`):
    a stored answer would carry another response's id, unknown to the server that would be asked to continue it.
    """
    if not rule.enabled or endpoint == "responses":
        return False
    if endpoint == "embeddings":
        return True
    if body.get("n") not in (None, 1):
        return False
    return rule.nondeterministic or body.get("temperature") == 0 or body.get("seed") is not None


def cache_control(headers: Mapping[str, str]) -> tuple[bool, bool]:
    """`(lookup, store)` from the request's Cache-Control header(s).

    `no-cache`: do not answer from the cache, but store the fresh answer.
    `no-store`: do not store this answer (nor anything about it); a lookup is
    still allowed, since reading a cached answer stores nothing.
    Both directives: neither. Other directives are ignored. Works with plain
    dicts and with aiohttp's case-insensitive multidict (every header line counts).
    """
    directives = set(_directives(value for name, value in headers.items()
                                 if name.lower() == "cache-control"))
    return "no-cache" not in directives, "no-store" not in directives


def cache_use(headers: Mapping[str, str], body: Mapping[str, Any]) -> tuple[bool, bool]:
    """`(lookup, store)` for a request: its Cache-Control directives (`cache_control`), and no lookup for a
    completion the provider is asked to keep (`store: true`), which only a call does (its answer is still stored)."""
    lookup, store = cache_control(headers)
    return lookup and body.get("store") is not True, store


def _directives(values: Iterable[str]) -> Iterable[str]:
    """Lower-cased directive names of comma-separated Cache-Control values."""
    for value in values:
        for part in value.split(","):
            name = part.split("=", 1)[0].strip().lower()
            if name:
                yield name
