"""The active policy and everything derived from it, swapped whole on reload.

A request takes the `Runtime` that is current when it arrives and keeps it to
the end, so a reload never changes the rules under a request in flight.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import PolicyError, PolicyProblem
from gateway.policy.load import load_policy
from gateway.policy.model import Policy
from gateway.routing.matcher import RouteIndex
from gateway.tenancy.identity import AdminAuth, Identity, tenant_keys

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
                   admin=AdminAuth(policy.server, environ, tenant_keys=tenant_keys(policy), source=policy.source))


#: policy settings read once, at start-up (services.py builds the ledger, telemetry and stores from them, the
#: server its drain timeout), so a reload that changes one applies the rest and says this one waits for a
#: restart; keep in step with what start-up builds
RESTART_ONLY = ("ledger", "telemetry", "store", "server.grace_period_s")

#: where a reload was asked for: the admin API (`POST /admin/policy/reload`, which names none), the file
#: watcher, SIGHUP
ADMIN, WATCHER, SIGNAL = "admin", "watcher", "signal"


def restart_only_changes(started: Policy, loaded: Policy) -> tuple[str, ...]:
    """The RESTART_ONLY settings in which `loaded` differs from `started`, the policy the process started with."""
    def setting(policy: Policy, path: str):
        return functools.reduce(getattr, path.split("."), policy)
    return tuple(path for path in RESTART_ONLY if setting(started, path) != setting(loaded, path))


def wait_for_restart(settings: tuple[str, ...]) -> str:
    """`ledger, store take effect on restart`: what a reload that changed them says."""
    return f"{', '.join(settings)} {'takes' if len(settings) == 1 else 'take'} effect on restart"


@dataclass
class ReloadStatus:
    """What the last reload did: shown by `GET /admin/policy` and counted in metrics."""

    loaded_unix_s: float = field(default_factory=time.time)
    reloads: int = 0
    failures: int = 0
    #: why the last reload failed; None when it succeeded
    error: str | None = None
    #: the RESTART_ONLY settings the file changes but this process still runs with their start-up values
    restart_pending: tuple[str, ...] = ()
    #: who asked for the last reload (ADMIN, WATCHER, SIGNAL)
    origin: str = ADMIN

    @property
    def last_error(self) -> str | None:
        """What `GET /admin/policy` shows as the last reload's problem: why it failed, else which settings
        it could not apply (they take effect on restart), else None."""
        if self.error is not None or not self.restart_pending:
            return self.error
        return f"reloaded, but {wait_for_restart(self.restart_pending)} (read once at start-up)"


def file_stat(path: Path | None) -> tuple[int, int, int] | None:
    """What identifies one version of a file on disk: (mtime_ns, size, inode); None when unreadable."""
    try:
        info = path.stat() if path else None
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino) if info else None


@dataclass(frozen=True)
class _Loaded:
    """One read of the policy file: what was on disk, and the runtime or why there is none."""

    ticket: int
    stat: tuple[int, int, int] | None
    runtime: Runtime | None = None
    error: PolicyError | None = None


class PolicyHolder:
    """Holds the current Runtime; a reload swaps it atomically or keeps the old one.

    `reload_async` parses the file in a thread (a large policy takes a while
    to parse, and the event loop keeps serving meanwhile); `reload` does the
    same inline. Each read takes a ticket first, so a slow read never
    replaces the result of a read that started after it.
    """

    def __init__(self, runtime: Runtime, environ, path: str | Path | None = None,
                 seen_stat: tuple[int, int, int] | None = None) -> None:
        self.current = runtime
        #: the policy the process started with: what RESTART_ONLY settings still run with
        self.started = runtime.policy
        self.environ = environ
        self.path = Path(path) if path else None
        #: the file version the holder last read (good or bad): the watcher reloads when it changes
        self.seen_stat = seen_stat
        self.status = ReloadStatus()
        self.listeners: list = []           # callables given each new Runtime
        self._tickets = 0
        self._applied_ticket = 0
        self._lock = asyncio.Lock()

    @classmethod
    def from_file(cls, path: str | Path, environ) -> "PolicyHolder":
        stat = file_stat(Path(path))
        return cls(Runtime.build(load_policy(path), environ), environ, path, seen_stat=stat)

    def start_with(self, policy: Policy) -> None:
        """Run the RESTART_ONLY settings of `policy`, the one the gateway started with (a worker started to replace
        another is given its supervisor's), whatever the file says now: every worker keeps one ledger, one Redis,
        one telemetry set-up and one grace period until the gateway restarts."""
        self.started = policy
        pending = restart_only_changes(policy, self.current.policy)
        self.status.restart_pending = pending
        if pending:
            log.warning("the policy file has changed since the gateway started, but %s: this worker runs with "
                        "the gateway's start-up values", wait_for_restart(pending))

    def changed_on_disk(self) -> bool:
        """Whether the file is not the version last read (an edit, or a ConfigMap symlink swap)."""
        return self.path is not None and file_stat(self.path) != self.seen_stat

    def reload(self, origin: str = ADMIN) -> bool:
        """Load the file again now; on any error keep serving the old policy and say why."""
        if self.path is None:
            self.status.error = "the policy was not loaded from a file"
            return False
        return self._apply(self._load(self._next_ticket()), origin)

    async def reload_async(self, origin: str = ADMIN) -> bool:
        """Like `reload`, with the file read and validated off the event loop."""
        if self.path is None:
            return self.reload(origin)
        async with self._lock:
            loaded = await asyncio.to_thread(self._load, self._next_ticket())
            return self._apply(loaded, origin)

    def _next_ticket(self) -> int:
        self._tickets += 1
        return self._tickets

    def _load(self, ticket: int) -> _Loaded:
        """Read and validate the file (safe in a worker thread: it touches nothing shared)."""
        stat = file_stat(self.path)
        try:
            return _Loaded(ticket, stat, runtime=Runtime.build(load_policy(self.path), self.environ))
        except PolicyError as exc:
            return _Loaded(ticket, stat, error=exc)
        except Exception as exc:    # boundary: whatever the file does to the loader, the old policy serves on
            log.exception("policy reload: loading %s failed", self.path)
            return _Loaded(ticket, stat, error=PolicyError([PolicyProblem(
                str(self.path), None, "", f"could not load the policy: {type(exc).__name__}: {exc}")]))

    def _apply(self, loaded: _Loaded, origin: str) -> bool:
        """Swap to a freshly read runtime, or record why it failed; stale reads are dropped."""
        if loaded.ticket < self._applied_ticket:
            return self.status.error is None            # a newer read has already been applied
        self._applied_ticket = loaded.ticket
        self.seen_stat = loaded.stat
        self.status.origin = origin
        if loaded.runtime is None:
            self.status.failures += 1
            self.status.error = str(loaded.error)
            log.error("policy reload failed; still serving %s\n%s",
                      self.current.policy.content_sha256[:12], loaded.error)
            return False
        runtime = loaded.runtime
        if runtime.policy.content_sha256 == self.current.policy.content_sha256:
            if self.status.error is not None:   # the failed edit was undone: the log's last word must not be it
                log.info("policy file %s is valid again: the policy served (sha256 %s) is unchanged", self.path,
                         runtime.policy.content_sha256[:12])
            self.status.error = None
            return True
        opened = bool(self.current.policy.tenants) and not runtime.policy.tenants
        self.current = runtime
        if opened:      # an edit that commented out every tenant: from now on anyone may call, without a key
            log.warning("policy reloaded from %s without tenants: the gateway now runs open, without API keys",
                        self.path)
        pending = restart_only_changes(self.started, runtime.policy)
        self.status = ReloadStatus(reloads=self.status.reloads + 1, failures=self.status.failures,
                                   restart_pending=pending, origin=origin)
        for listener in self.listeners:
            listener(runtime)
        log.info("policy reloaded from %s (sha256 %s)", self.path, runtime.policy.content_sha256[:12])
        if pending:
            log.warning("policy reloaded, but %s: the process runs on with their start-up values",
                        wait_for_restart(pending))
        return True
