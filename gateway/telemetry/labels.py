"""Bounded tenant labels: metric cardinality stays fixed however many tenants call."""

from __future__ import annotations

import threading
from collections.abc import Iterable

OTHER = "other"


class TenantLabels:
    """Allowlisted tenants, then the first `top_n` distinct tenants seen, keep their name; the rest are `other`."""

    def __init__(self, allowlist: Iterable[str] = (), top_n: int = 20) -> None:
        self._allowed = frozenset(allowlist)
        self._top_n = max(0, top_n)
        self._seen: set[str] = set()
        self._current: frozenset[str] | None = None     # the tenants that may still call, once a reload said so
        self._lock = threading.Lock()

    def allow(self, tenants: Iterable[str]) -> None:
        """Keep these tenants' names too, whoever was seen first."""
        self._allowed = self._allowed | frozenset(tenants)

    def keep_only(self, tenants: Iterable[str]) -> None:
        """Forget the seen tenants not among these (a reload removed them): their top-N places go to the next
        tenants seen, instead of to names that will never call again."""
        kept = frozenset(tenants)
        with self._lock:
            self._current = kept    # a request of a removed tenant ending later (a stream) takes no place back
            self._seen &= kept

    def label(self, tenant: str) -> str:
        """The metric label for a tenant."""
        if tenant in self._allowed or tenant in self._seen:
            return tenant
        with self._lock:
            if len(self._seen) < self._top_n and (self._current is None or tenant in self._current):
                self._seen.add(tenant)
                return tenant
            return tenant if tenant in self._seen else OTHER
