"""The mutable state of one simulated model: its current config, RNG, counters and recent requests."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, OrderedDict, deque
from typing import Any

from gateway.simulator.background import BackgroundResponse
from gateway.simulator.config import SimConfig

#: how many received requests `GET /sim/requests` can show
RECENT_REQUESTS = 256
#: how many stored Responses API answers the simulator keeps (`GET /v1/responses/{id}`); the oldest go first
STORED_RESPONSES = 10_000
#: a stored response: the `response` object as it was answered, or a background response, whose state changes
StoredResponse = dict[str, Any] | BackgroundResponse


class SimState:
    """Everything one simulator app changes while it runs; reached through the app key STATE."""

    def __init__(self, config: SimConfig) -> None:
        self.initial_config = config
        self.config = config
        self.rng = random.Random(config.seed)
        self.outcomes: dict[str, Counter[str]] = {}
        self.in_flight = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)
        self.closing = asyncio.Event()      # set on shutdown: hanging requests give up
        # the Responses API answers stored (`store`, true unless the request says false): id -> (the response,
        # its input items), as a model server keeps them for GET, DELETE, input_items and cancel
        self.stored: OrderedDict[str, tuple[StoredResponse, list[dict[str, Any]]]] = OrderedDict()

    def store(self, response_id: str, response: StoredResponse, input_items: list[dict[str, Any]]) -> None:
        """Keep a stored response and its input items, forgetting the oldest past STORED_RESPONSES."""
        self.stored[response_id] = (response, input_items)
        while len(self.stored) > STORED_RESPONSES:
            self.stored.popitem(last=False)

    def configure(self, changes: dict[str, Any]) -> SimConfig:
        """Apply runtime changes (ValueError when invalid); a new seed restarts the RNG."""
        if "port" in changes and changes["port"] != self.config.port:
            raise ValueError("port cannot change at runtime")
        self.config = self.config.updated(changes)
        if "seed" in changes:
            self.rng = random.Random(self.config.seed)
        return self.config

    def reset(self) -> SimConfig:
        """Back to the start-up config, a fresh RNG, and no counts, recorded requests or stored responses."""
        self.config = self.initial_config
        self.rng = random.Random(self.config.seed)
        self.outcomes.clear()
        self.recent.clear()
        self.stored.clear()
        return self.config

    def remember(self, method: str, path: str, headers: dict[str, str], body: Any) -> None:
        """Record a received request for `GET /sim/requests`."""
        self.recent.append({"method": method, "path": path, "headers": headers, "body": body,
                            "received_unix_s": time.time()})

    def count(self, path: str, outcome: str) -> None:
        """Count one finished request by endpoint and outcome."""
        self.outcomes.setdefault(path, Counter())[outcome] += 1

    def stats(self) -> dict[str, Any]:
        """`GET /sim/stats`: counts by endpoint and outcome, totals, and requests in flight."""
        by_outcome: Counter[str] = Counter()
        for counter in self.outcomes.values():
            by_outcome.update(counter)
        return {"model": self.config.name, "in_flight": self.in_flight, "total": sum(by_outcome.values()),
                "by_outcome": dict(by_outcome),
                "by_endpoint": {path: dict(counter) for path, counter in self.outcomes.items()}}

    def last_requests(self, count: int) -> list[dict[str, Any]]:
        """The last `count` received requests, oldest first."""
        return list(self.recent)[-count:] if count > 0 else []
