"""The active policy and everything derived from it, swapped whole on reload.

A request takes the `Runtime` that is current when it arrives and keeps it to
the end, so a reload never changes the rules under a request in flight.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import PolicyError
from gateway.policy.load import load_policy
from gateway.policy.model import Policy
from gateway.routing.matcher import RouteIndex
from gateway.tenancy.identity import AdminAuth, Identity, tenant_key_hashes

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class Runtime:
    """One validated policy and its indexes."""

    policy: Policy
    routes: RouteIndex
    identity: Identity
    admin: AdminAuth

    @classmethod
    def build(cls, policy: Policy, environ) -> "Runtime":
        return cls(policy=policy, routes=RouteIndex(policy.routes),
                   identity=Identity(policy),
                   admin=AdminAuth(policy.server, environ, tenant_key_hashes=tenant_key_hashes(policy)))


@dataclass
class ReloadStatus:
    """What the last reload did: shown by `GET /admin/policy` and counted in metrics."""

    loaded_unix_s: float = field(default_factory=time.time)
    reloads: int = 0
    failures: int = 0
    last_error: str | None = None


class PolicyHolder:
    """Holds the current Runtime; `reload()` swaps it atomically or keeps the old one."""

    def __init__(self, runtime: Runtime, environ, path: str | Path | None = None) -> None:
        self.current = runtime
        self.environ = environ
        self.path = Path(path) if path else None
        self.status = ReloadStatus()
        self.listeners: list = []           # callables given each new Runtime

    @classmethod
    def from_file(cls, path: str | Path, environ) -> "PolicyHolder":
        return cls(Runtime.build(load_policy(path), environ), environ, path)

    def reload(self) -> bool:
        """Load the file again; on any error keep serving the old policy and say why."""
        if self.path is None:
            self.status.last_error = "the policy was not loaded from a file"
            return False
        try:
            runtime = Runtime.build(load_policy(self.path), self.environ)
        except PolicyError as exc:
            self.status.failures += 1
            self.status.last_error = str(exc)
            log.error("policy reload failed; still serving %s\n%s",
                      self.current.policy.content_sha256[:12], exc)
            return False
        if runtime.policy.content_sha256 == self.current.policy.content_sha256:
            self.status.last_error = None
            return True
        self.current = runtime
        self.status = ReloadStatus(reloads=self.status.reloads + 1, failures=self.status.failures)
        for listener in self.listeners:
            listener(runtime)
        log.info("policy reloaded from %s (sha256 %s)", self.path, runtime.policy.content_sha256[:12])
        return True
