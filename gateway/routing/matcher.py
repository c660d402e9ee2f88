"""Route matching: the first route, in policy order, whose `match` holds.

Exact aliases are indexed in a dict; glob aliases (`*`, `?`, `[...]`) sit in a
short separate list. For each requested alias the two are merged once, in
policy order, and the merged list is kept in a bounded per-index cache, so a
lookup costs one dict hit plus the checks of the routes that name that alias.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Collection, Mapping
from typing import Any

from gateway.errors import PolicyError, PolicyProblem
from gateway.policy.header_regex import compile_header_regex
from gateway.policy.model import Route

_GLOB_CHARS = frozenset("*?[")
#: distinct requested aliases whose merged route list is remembered
_ALIAS_CACHE_MAX = 4096
#: the longest requested alias remembered (the parse stage refuses a longer `model`; a caller of the index that
#: does not must not pin memory with 4096 long aliases): a longer one is merged on every call
_ALIAS_CACHE_CHARS = 256


def is_glob(alias: str) -> bool:
    """Whether a route alias is an fnmatch pattern rather than a literal name."""
    return not _GLOB_CHARS.isdisjoint(alias)


class CompiledRoute:
    """One route's match, precompiled for cheap checks."""

    __slots__ = ("order", "route", "endpoints", "tenants", "headers", "prompt_min", "prompt_max")

    def __init__(self, order: int, route: Route, source: str = "<memory>") -> None:
        match = route.match
        self.order = order
        self.route = route
        self.endpoints = frozenset(match.endpoints)
        self.tenants = frozenset(match.tenants)
        self.headers = tuple(_compile_header(order, j, h.name, h.value, h.regex, source)
                             for j, h in enumerate(match.headers))
        self.prompt_min = match.prompt_tokens_min if match.prompt_tokens_min is not None else -1
        self.prompt_max = match.prompt_tokens_max if match.prompt_tokens_max is not None else sys.maxsize

    def holds(self, endpoint: str, tenant: str | None, headers: Mapping[str, str],
              prompt_tokens: int) -> bool:
        """Whether this route takes the request (its alias already matched)."""
        if self.endpoints and endpoint not in self.endpoints:
            return False
        if self.tenants and tenant not in self.tenants:
            return False
        if not self.prompt_min <= prompt_tokens <= self.prompt_max:
            return False
        for name, pattern, value in self.headers:
            got = headers.get(name)
            if got is None:
                return False
            if pattern is None:
                if got != value:
                    return False
            elif not _full_match(pattern, got):
                return False
        return True


def _full_match(pattern: Any, value: str) -> bool:
    """Whether the RE2 `pattern` matches all of `value`. A value that is no UTF-8 text (aiohttp keeps such bytes
    as lone surrogates, which RE2 cannot be given) matches no regex."""
    try:
        return pattern.fullmatch(value) is not None
    except UnicodeEncodeError:
        return False


def _compile_header(order: int, index: int, name: str, value: str, regex: bool,
                    source: str) -> tuple[str, Any, str]:
    """A header condition as (lower-case name, compiled RE2 regex or None, exact value)."""
    if not regex:
        return name.lower(), None, value
    try:
        return name.lower(), compile_header_regex(value), value
    except ValueError as exc:
        problem = PolicyProblem(source, None, f"routes[{order}].match.headers[{index}].value",
                                f"invalid regex {value!r}: {exc}")
        raise PolicyError([problem]) from exc


class RouteIndex:
    """Finds the first route, in policy order, that takes a request."""

    def __init__(self, routes: tuple[Route, ...], source: str = "<memory>") -> None:
        self._exact: dict[str, list[CompiledRoute]] = {}
        self._globs: list[tuple[re.Pattern[str], CompiledRoute]] = []
        for order, route in enumerate(routes):
            self._add(CompiledRoute(order, route, source))
        self._by_alias: dict[str, tuple[CompiledRoute, ...]] = {}

    def _add(self, compiled: CompiledRoute) -> None:
        """Index one route under each of its aliases."""
        for alias in dict.fromkeys(compiled.route.match.models or ("*",)):
            if is_glob(alias):
                self._globs.append((re.compile(fnmatch.translate(alias)), compiled))
            else:
                self._exact.setdefault(alias, []).append(compiled)

    def routes_for(self, alias: str) -> tuple[CompiledRoute, ...]:
        """The routes whose aliases match `alias`, in policy order."""
        merged = self._by_alias.get(alias)
        if merged is None:
            merged = self._merge(alias)
            if len(alias) > _ALIAS_CACHE_CHARS:
                return merged
            if len(self._by_alias) >= _ALIAS_CACHE_MAX:
                self._by_alias.clear()
            self._by_alias[alias] = merged
        return merged

    def _merge(self, alias: str) -> tuple[CompiledRoute, ...]:
        """Exact and glob routes for one alias, merged by policy order."""
        found = {c.order: c for c in self._exact.get(alias, ())}
        for pattern, compiled in self._globs:
            if pattern.match(alias):
                found.setdefault(compiled.order, compiled)
        return tuple(found[order] for order in sorted(found))

    def match(self, endpoint: str, alias: str, tenant: str | None, headers: Mapping[str, str],
              prompt_tokens: int, allowed: Collection[str] = ()) -> Route | None:
        """The first route whose match holds, among those named in `allowed` (the tenant's allow list; empty:
        every route), or None.

        `headers` must answer `.get` for lower-case names: aiohttp's
        CIMultiDictProxy or a dict with lower-cased keys.
        """
        for compiled in self.routes_for(alias):
            if (not allowed or compiled.route.name in allowed) and \
                    compiled.holds(endpoint, tenant, headers, prompt_tokens):
                return compiled.route
        return None
