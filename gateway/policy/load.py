"""Policy YAML -> frozen `Policy`, with every problem located by file, line and key path.

The shape of the file is declared once, below, as one `Section` per dataclass:
YAML key -> converter (type, bounds, choices, references). The generic walker in
`gateway.policy.validate` does the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from gateway.energy.pools import sharing_problem
from gateway.errors import PolicyError, PolicyProblem
from gateway.ledger import MAX_BACKUPS
from gateway.outcomes import ANONYMOUS
from gateway.policy.header_regex import compile_header_regex
from gateway.policy.model import (
    ENDPOINTS, MAX_USD, Breaker, Budget, CacheRule, Energy, GpuSource, HeaderMatch, LatencyPrior, Ledger,
    Limits, Match, Model, Policy, Price, Route, Routing, Server, Sla, Store, Telemetry, Tenant, Timeouts,
)
from gateway.policy.validate import (
    INT, INVALID, NULL, STR, Check, Converter, Section, Spec, Walk, definition, did_you_mean, flag, integer,
    items, join, line_of, mapping_entries, money, named, real, reference, scalar, text,
)
from gateway.routing.estimates import MAX_SAMPLES
from gateway.routing.needs import FEATURES
from gateway.routing.pins import MAX_PIN_TTL_S
from gateway.supervisor import MAX_GRACE_PERIOD_S

SUPPORTED_VERSION = 1
ENCODINGS = ("cl100k_base", "o200k_base")


def choice(*options: str) -> Converter:
    """A string out of a fixed set."""
    return text(one_of(options))


def positive(value: Any) -> str | None:
    """Rejects zero and below."""
    return None if value > 0 else f"must be greater than 0, got {value}"


def non_negative(value: Any) -> str | None:
    """Rejects negatives."""
    return None if value >= 0 else f"must not be negative, got {value}"


def at_most(limit: float, why: str = "") -> Callable[[Any], str | None]:
    """Rejects values above `limit`; `why`, when given, tells the reader why the limit is there."""
    def check(value: Any) -> str | None:
        return None if value <= limit else f"must be at most {shown(limit)}{because(why)}, got {value}"
    return check


def at_least(limit: float, why: str = "") -> Callable[[Any], str | None]:
    """Rejects values below `limit`; `why`, when given, tells the reader why the limit is there."""
    def check(value: Any) -> str | None:
        return None if value >= limit else f"must be at least {shown(limit)}{because(why)}, got {value}"
    return check


def shown(limit: float) -> str:
    """A limit as a message quotes it: an integer in full (315360000, not 3.1536e+08), a float short."""
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def because(why: str) -> str:
    """` (why)`, or nothing."""
    return f" ({why})" if why else ""


def fraction(value: Any) -> str | None:
    """Rejects values outside [0, 1]."""
    return None if 0 <= value <= 1 else f"must be between 0 and 1, got {value}"


def not_blank(value: str) -> str | None:
    """Rejects an empty string."""
    return None if value.strip() else "must not be empty"


def header_safe(value: str) -> str | None:
    """Rejects control characters (a line break from a folded YAML scalar, say): model, route and tenant names are
    sent in response headers, which cannot carry them."""
    if any(ord(char) < 0x20 or 0x7f <= ord(char) < 0xa0 for char in value):
        return "must not contain control characters such as line breaks (names are sent in response headers)"
    return None


def hash_tag_safe(value: str) -> str | None:
    """Rejects braces: Redis keys are `{key_prefix}:{{tenant}}:...`, and a brace in either would move or break the
    tenant's hash tag, spreading keys that must share a Redis Cluster slot over several."""
    return "must not contain '{' or '}' (they mark Redis Cluster hash tags)" if "{" in value or "}" in value else None


def not_anonymous(value: str) -> str | None:
    """Rejects `anonymous`, the name of the open gateway's callers: a tenant of that name would share their stored
    responses (`gateway.routing.pins`), outcome reports and metrics label, before and after a reload."""
    return f"'{ANONYMOUS}' names the open gateway's callers (without tenants)" if value == ANONYMOUS else None


#: what a tenant's name must be (`gateway keys new --tenant` applies them too)
TENANT_NAME_CHECKS = (not_blank, header_safe, hash_tag_safe, not_anonymous)


def tenant_name_problem(name: str) -> str | None:
    """Why `name` cannot name a tenant; None when it can."""
    return next((problem for check in TENANT_NAME_CHECKS if (problem := check(name)) is not None), None)


def sha256_hex(value: str) -> str | None:
    """Accepts exactly 64 lower-case hex digits."""
    return None if re.fullmatch(r"[0-9a-f]{64}", value) else "must be a SHA-256 as 64 lower-case hex digits"


def one_of(options: tuple[str, ...]) -> Check:
    """A check that a string is one of `options`."""
    def check(value: str) -> str | None:
        if value in options:
            return None
        return f"'{value}' is not one of {', '.join(options)}{did_you_mean(value, options, list_all=False)}"
    return check


def url_with(*schemes: str) -> Check:
    """A check that a string is a URL with one of `schemes` and a host (or a path for unix). A refused URL is
    quoted without its credentials (`redis://:PASSWORD@host`): the message reaches logs and the admin API."""
    def check(value: str) -> str | None:
        shown = without_credentials(value)
        try:        # the port is read now: one that is no port, or out of range, would fail every call later
            parts = urlsplit(value)
            port = parts.port
        except ValueError as exc:       # also a '[' without ']' (an IPv6 host half written)
            return f"must be a URL ({' or '.join(schemes)}) with a host, got '{shown}': {url_refusal(exc, value)}"
        if port == 0:
            return f"must name a port from 1 to 65535 (or none), got '{shown}'"
        if parts.scheme in schemes and (parts.netloc or parts.scheme == "unix"):
            return None
        return f"must be a URL ({' or '.join(schemes)}) with a host, got '{shown}'"
    return check


def url_refusal(exc: ValueError, url: str) -> str:
    """Why a URL parser refused `url`, unless its reason quotes a piece of the URL's user or password (a password
    holding a '/' is read as a port up to it): then what to do instead."""
    reason = str(exc)
    userinfo = url.split("//", 1)[-1].rpartition("@")[0]
    if any(len(piece) > 1 and piece in reason for piece in re.split(r"[:/?#]", userinfo)):
        return "a '/', '?' or '#' in its user or password must be percent-encoded ('/' as %2F)"
    return reason


def without_credentials(text: str) -> str:
    """`text`, a URL, with its user and password replaced by `***`: all from after its scheme (and the slashes
    after it, two or not) to its last `@` (a password may hold a `/`, a quote or a space its writer did not
    encode)."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:/*)?.*@", lambda m: f"{m.group(1) or ''}***@", text,
                  flags=re.DOTALL)


def supported_version(version: int) -> str | None:
    """Rejects every version but the one this gateway reads."""
    if version == SUPPORTED_VERSION:
        return None
    return f"unsupported version {version} (this gateway reads version {SUPPORTED_VERSION})"


def distinct_gpu_ids(values: dict[str, Any]) -> tuple[str, str] | None:
    """Each GPU named once: a model's GPU time is priced per GPU it names."""
    ids = values.get("ids") or ()
    repeated = sorted({gpu for gpu in ids if ids.count(gpu) > 1})
    if repeated:
        return "ids", f"names GPU {', '.join(repeated)} more than once (its time would be priced once per mention)"
    return None


def dcgm_needs_url(values: dict[str, Any]) -> tuple[str, str] | None:
    """GPUs measured through a DCGM exporter need the exporter's URL."""
    if values.get("source") == "dcgm" and not values.get("url"):
        return "url", "required when source is dcgm (the DCGM exporter's /metrics URL)"
    return None


def gpus_shared_whole(values: dict[str, Any]) -> tuple[str, str] | None:
    """Models on shared GPUs name the same ones (gateway.energy.pools): each GPU is measured once."""
    models = values.get("models") or {}
    problem = sharing_problem({name: model.gpus for name, model in models.items() if model.gpus is not None})
    return ("models", problem) if problem else None


def energy_measured(values: dict[str, Any]) -> tuple[str, str] | None:
    """A route with `sla.max_energy_j` names only candidates whose GPUs are measured (`gpus`): any other's energy
    is unknown, and it would never be held to the limit."""
    models = values.get("models") or {}
    unmeasured = [f"{route.name}: {', '.join(names)}" for route in values.get("routes") or ()
                  if isinstance(route, Route) and route.sla.max_energy_j is not None
                  and (names := [name for name in route.candidates
                                 if isinstance(models.get(name), Model) and models[name].gpus is None])]
    if not unmeasured:
        return None
    return "routes", (f"sla.max_energy_j needs candidates whose GPUs are measured (gpus:); without gpus: "
                      f"{'; '.join(unmeasured)}")


def min_not_above_max(values: dict[str, Any]) -> tuple[str, str] | None:
    """A prompt-size range must not be empty."""
    low, high = values.get("prompt_tokens_min"), values.get("prompt_tokens_max")
    if low is not None and high is not None and low > high:
        return "max", f"must not be below min ({low}), got {high}"
    return None


def header_matches(walk: Walk, node: Node, path: str) -> Any:
    """`headers: {name: value}`; a value written `/regex/` is a regex; names lower-cased."""
    entries = mapping_entries(walk, node, path)
    if entries is INVALID:
        return INVALID
    found, seen = [], {}
    for name, (key_node, value_node) in entries.items():
        first = seen.setdefault(name.lower(), (name, key_node))
        if first[1] is not key_node:        # header names ignore case: two conditions on one header never both hold
            found.append(walk.report(key_node, join(path, name.lower()), f"duplicate header '{name}' (first at line "
                                     f"{line_of(first[1])} as '{first[0]}'; header names ignore case)"))
        else:
            found.append(header_match(walk, name, value_node, join(path, name)))
    return INVALID if any(match is INVALID for match in found) else tuple(found)


def header_match(walk: Walk, name: str, node: Node, path: str) -> Any:
    """One header condition: an exact value or a compiled-to-check regex."""
    if not isinstance(node, ScalarNode) or node.tag == NULL:
        return walk.report(node, path, "expected a header value or /regex/")
    value = node.value
    if len(value) < 2 or not (value.startswith("/") and value.endswith("/")):
        return HeaderMatch(name.lower(), value)
    try:
        compile_header_regex(value[1:-1])
    except ValueError as exc:
        return walk.report(node, path, f"invalid regex {value}: {exc}")
    return HeaderMatch(name.lower(), value[1:-1], regex=True)


def not_left_empty(convert: Converter) -> Converter:
    """`tenants:` with nothing after it (its entries commented out, say) is refused: read as no tenants, it would
    run the gateway open, without API keys; `tenants: {}`, or no `tenants:` at all, says that on purpose."""
    def checked(walk: Walk, node: Node, path: str) -> Any:
        if isinstance(node, ScalarNode) and node.tag == NULL:
            return walk.report(node, path, "written but empty: with no tenants the gateway runs open, without API "
                                           "keys; list the tenants, or write `tenants: {}` to run open on purpose")
        return convert(walk, node, path)
    return checked


PRICE = Section(Price, {
    "input_per_mtok": money(non_negative, at_most(MAX_USD)),
    "output_per_mtok": money(non_negative, at_most(MAX_USD)),
    "cached_input_per_mtok": money(non_negative, at_most(MAX_USD)),
    "cache_write_input_per_mtok": money(non_negative, at_most(MAX_USD)),
    "audio_input_per_mtok": money(non_negative, at_most(MAX_USD)),
    "audio_output_per_mtok": money(non_negative, at_most(MAX_USD)),
})
#: the longest latency a prior may state, an hour: a call bounded by `total_s` never takes longer in practice, and
#: larger figures overflow the GPU-time price of a prediction
MAX_PRIOR_MS = 3_600_000
LATENCY_PRIOR = Section(LatencyPrior, {"ttft_ms": real(non_negative, at_most(MAX_PRIOR_MS)),
                                       "tpot_ms": real(non_negative, at_most(MAX_PRIOR_MS))})
#: the longest a model's call may be waited for, an hour, as server.client_timeout_s (a larger figure is most
#: likely milliseconds written in a `_s` key)
MAX_TIMEOUT_S = MAX_PRIOR_MS / 1000
#: the shortest a model's call may be waited for, 1 ms: no model server connects or answers sooner, so a shorter
#: timeout (most likely seconds written in milliseconds' place) fails every call at once
MIN_TIMEOUT_S = 0.001
_TIMEOUT = real(positive, at_least(MIN_TIMEOUT_S, "1 ms; no model server answers sooner"), at_most(MAX_TIMEOUT_S))
TIMEOUTS = Section(Timeouts, {"connect_s": _TIMEOUT, "first_byte_s": _TIMEOUT, "total_s": _TIMEOUT})
GPUS = Section(GpuSource, {
    "source": Spec(choice("nvml", "dcgm"), required=True),
    "ids": items(scalar((INT, STR), "a GPU index or UUID", str, not_blank)),
    "url": text(url_with("http", "https")),
    "hostname": text(not_blank),
    "idle_w": real(non_negative),
}, checks=(dcgm_needs_url, distinct_gpu_ids))
MODEL = Section(Model, {
    "endpoint": Spec(text(url_with("http", "https")), required=True),
    "upstream_model": text(not_blank),
    "provider": text(not_blank),
    "api_key_env": text(not_blank),
    "size_b": real(non_negative),
    "tier": integer(non_negative),
    "supports": items(choice(*FEATURES), distinct=True),
    "context_window": integer(positive),
    "max_concurrency": integer(positive),
    "price": PRICE,
    "gpu_hour_usd": money(non_negative, at_most(MAX_USD)),
    "energy_usd_per_kwh": money(non_negative, at_most(MAX_USD)),
    "latency_prior": LATENCY_PRIOR,
    "encoding": choice(*ENCODINGS),
    "timeouts": TIMEOUTS,
    "gpus": GPUS,
}, named=("name", "upstream_model"))

PROMPT_TOKENS = Section(dict, {
    "min": Spec(integer(non_negative), attr="prompt_tokens_min"),
    "max": Spec(integer(non_negative), attr="prompt_tokens_max"),
}, checks=(min_not_above_max,))
MATCH = Section(Match, {
    "models": items(text(not_blank)),
    "endpoints": items(choice(*ENDPOINTS)),
    "tenants": items(reference("tenant")),
    "headers": header_matches,
    "prompt_tokens": Spec(PROMPT_TOKENS, spread=True),
})
SLA = Section(Sla, {
    "p95_latency_ms": real(positive),
    "p95_ttft_ms": real(positive),
    "min_tier": integer(non_negative),
    "max_cost_usd": money(non_negative, at_most(MAX_USD)),
    "max_energy_j": real(positive),
    "on_violation": choice("best_effort", "reject"),
})
#: the longest a cached answer may be kept, ten years: longer is "forever", which no model's answer is worth, and far
#: longer is refused by Redis (an expiry past 2^63 ms from now: `ERR invalid expire time`), which then stores nothing
MAX_CACHE_TTL_S = 10 * 365 * 86_400
CACHE = Section(CacheRule, {
    "enabled": flag(),
    "ttl_s": integer(positive, at_most(MAX_CACHE_TTL_S, "ten years; Redis refuses far longer expiries, and stores "
                                                        "nothing")),
    "mode": choice("exact"),
    "nondeterministic": flag(),
})
ROUTE = Section(Route, {
    "name": Spec(definition("route", not_blank, header_safe), required=True),
    "match": Spec(MATCH, missing=Match),
    "candidates": Spec(items(reference("model"), non_empty=True, distinct=True), required=True),
    "sla": SLA,
    "fallback": items(reference("model"), distinct=True),
    "cache": CACHE,
    "default_output_tokens": integer(positive),
})

LIMITS = Section(Limits, {
    "requests_per_minute": integer(positive), "tokens_per_minute": integer(positive), "concurrent": integer(positive),
})
BUDGET = Section(Budget, {
    "usd_per_day": money(non_negative, at_most(MAX_USD)),
    "usd_per_month": money(non_negative, at_most(MAX_USD)),
    "on_exhausted": choice("reject", "downgrade"),
})
TENANT = Section(Tenant, {
    "keys_sha256": items(definition("API key hash", sha256_hex, secret=True)),
    "routes": items(reference("route")),
    "models": items(text(not_blank)),
    "limits": LIMITS,
    "budget": BUDGET,
    "priority": integer(non_negative),
}, named=("name",))

SERVER = Section(Server, {
    "max_body_bytes": integer(positive),
    "max_answer_bytes": integer(positive),
    "metrics_admin_only": flag(),
    "grace_period_s": real(non_negative, at_most(MAX_GRACE_PERIOD_S, "a day; a stop waits up to three grace periods, "
                                                                   "and --workers cannot wait past about 24 days")),
    "client_timeout_s": real(positive, at_most(MAX_PRIOR_MS / 1000)),
    "admin_token_sha256": text(sha256_hex),
    "admin_token_env": text(not_blank),
})
#: the longest a circuit may stay open, a week: it keeps its model out for that long, and a reload to a shorter
#: open_s does not shorten a circuit already open
MAX_OPEN_S = 7 * 86_400
#: the longest latency window, a week: older samples are no guide to a model's latency now, and the window is also
#: the Redis expiry of shared estimates, which Redis refuses far past it (the stream then never expires)
MAX_LATENCY_WINDOW_S = 7 * 86_400
BREAKER = Section(Breaker, {
    "failure_threshold": integer(positive),
    "open_s": real(positive, at_most(MAX_OPEN_S, "a week; an open circuit keeps its model out that long, even after "
                                                 "a reload")),
})
ROUTING = Section(Routing, {
    "explore_share": real(fraction),
    "latency_window_s": real(positive, at_most(MAX_LATENCY_WINDOW_S, "a week; older samples are no guide")),
    "prior_weight": integer(non_negative, at_most(MAX_SAMPLES)),
    "breaker": BREAKER,
    "max_attempts": integer(positive),
    "queue_timeout_ms": real(non_negative, at_most(MAX_PRIOR_MS, "an hour, as a model's timeouts.total_s")),
    "share_estimates": flag(),
    "stored_response_ttl_s": integer(positive, at_most(MAX_PIN_TTL_S, "30 days, as long as OpenAI keeps a stored "
                                                                      "response")),
})
#: the shortest store timeout, 1 ms: under it no Redis call is answered in time, even a Redis on the same host, and
#: every request meets on_store_failure (0.1 ms could not even connect)
MIN_STORE_TIMEOUT_MS = 1
STORE = Section(Store, {
    "redis_url": text(url_with("redis", "rediss", "unix")),
    "on_store_failure": choice("allow", "deny"),
    "timeout_ms": real(positive, at_least(MIN_STORE_TIMEOUT_MS, "a Redis call cannot be answered sooner, even on "
                                                                "the same host"),
                       at_most(MAX_PRIOR_MS, "an hour; each Redis call of a request may wait this long")),
    "key_prefix": text(hash_tag_safe),
    "cluster": flag(),
    "max_connections": integer(positive),
})
TELEMETRY = Section(Telemetry, {
    "capture_content": flag(),
    "tenant_labels": items(reference("tenant")),
    "tenant_label_top_n": integer(non_negative),
    "prometheus": flag(),
})
# backups >= 1: rotating moves the file to a backup; with none kept the file would have to grow without limit
LEDGER = Section(Ledger, {
    "path": text(not_blank),
    "max_bytes": integer(positive),
    "backups": integer(positive, at_most(MAX_BACKUPS, "each rotation renames every backup")),
})
#: the shortest GPU sampling interval, 10 ms: NVML refreshes a GPU's power no faster, and the sampler's thread
#: would spin, taking the event loop's core (and interpreter) from the requests
MIN_SAMPLE_INTERVAL_S = 0.01
ENERGY = Section(Energy, {"sample_interval_s": real(positive, at_least(MIN_SAMPLE_INTERVAL_S, "10 ms; NVML "
                                                                                          "refreshes power no faster"),
                                                   at_most(MAX_TIMEOUT_S))})

POLICY = Section(Policy, {
    "version": Spec(integer(supported_version), required=True),
    "models": Spec(named("model", MODEL, not_blank, header_safe, non_empty=True), required=True),
    "routes": Spec(items(ROUTE, non_empty=True), required=True),
    "tenants": not_left_empty(named("tenant", TENANT, *TENANT_NAME_CHECKS)),
    "server": SERVER,
    "routing": ROUTING,
    "store": STORE,
    "telemetry": TELEMETRY,
    "ledger": LEDGER,
    "energy": ENERGY,
}, checks=(gpus_shared_whole, energy_measured))


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; PolicyError lists every problem."""
    policy, problems = _load(path)
    if problems:
        raise PolicyError(problems)
    return policy


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Validate policy YAML text; PolicyError lists every problem."""
    policy, problems = _parse(text, source, hashlib.sha256(text.encode("utf-8")).hexdigest())
    if problems:
        raise PolicyError(problems)
    return policy


def check_policy(path: str | Path) -> list[PolicyProblem]:
    """Every problem in a policy file, in line order; empty when it is valid."""
    return read_policy(path)[1]


def read_policy(path: str | Path) -> tuple[Policy | None, list[PolicyProblem]]:
    """A policy file read once: the policy when it is valid, and every problem in line order."""
    return _load(path)


def _load(path: str | Path) -> tuple[Policy | None, list[PolicyProblem]]:
    """Read the file's bytes and parse them; unreadable files are one problem."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        return None, [PolicyProblem(source, None, "", f"cannot read the policy file: {exc.strerror or exc}")]
    except UnicodeDecodeError as exc:
        return None, [PolicyProblem(source, None, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}")]
    return _parse(text, source, hashlib.sha256(data).hexdigest())


def _parse(text: str, source: str, content_sha256: str) -> tuple[Policy | None, list[PolicyProblem]]:
    """Compose the YAML, walk it against the sections, resolve references."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        return None, [_syntax_problem(source, exc)]
    except RecursionError:                  # the YAML parser recurses once per level of nesting
        return None, [PolicyProblem(source, None, "", "invalid YAML: nested too deeply")]
    if root is None:
        return None, [PolicyProblem(source, None, "", "the policy file is empty")]
    walk = Walk(source)
    policy = POLICY(walk, root, "")
    if not _has_key(root, "tenants"):       # no tenants: the gateway runs open, and no tenant is ever matched
        walk.defined.setdefault("tenant", {})
    walk.resolve_references()
    if policy is not INVALID and (admin := policy.server.admin_token_sha256):
        if admin in {h for tenant in policy.tenants.values() for h in tenant.keys_sha256}:
            walk.report(_node_at(root, "server", "admin_token_sha256"), "server.admin_token_sha256",
                        "the admin token is also a tenant API key (tenant keys are never accepted as the admin's)")
    if walk.problems or policy is INVALID:
        return None, sorted(walk.problems, key=lambda problem: problem.line or 0)
    return dataclasses.replace(policy, source=source, content_sha256=content_sha256), []


def _node_at(root: Node, *keys: str) -> Node | None:
    """The node at a path of mapping keys, None when the path is not written out so."""
    node: Node | None = root
    for key in keys:
        if not isinstance(node, MappingNode):
            return None
        node = next((value for name, value in node.value if isinstance(name, ScalarNode) and name.value == key), None)
    return node


def _has_key(root: Node, key: str) -> bool:
    """Whether the top-level mapping writes `key`, or may bring it in through a merge key (<<: taken as yes)."""
    return not isinstance(root, MappingNode) or any(
        isinstance(name, ScalarNode) and name.value in (key, "<<") for name, _ in root.value)


def _syntax_problem(source: str, exc: yaml.YAMLError) -> PolicyProblem:
    """A YAML syntax error as a problem at the line where the parser gave up."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})"
    if "'\\t'" in problem:     # a tab is invisible in most editors
        problem += ": a tab; YAML may not indent with tabs, indent with spaces"
    return PolicyProblem(source, mark.line + 1 if mark is not None else None, "", f"invalid YAML: {problem}")
