"""Running the gateway: one process or N workers on one port, signals, hot reload."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import signal
from pathlib import Path

from aiohttp import web

from gateway.app import HOLDER, build_app
from gateway.errors import PolicyError
from gateway.runtime import PolicyHolder
from gateway.services import policy_encodings
from gateway.tokens import get_encoding
from gateway.tasks import BackgroundTasks

log = logging.getLogger("gateway")


class ListenError(RuntimeError):
    """The gateway could not listen where it was told to (port taken, address not on this host)."""


def install_uvloop() -> None:
    """Use uvloop when it is installed: the faster event loop for a proxy."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def watch_policy(holder: PolicyHolder, interval_s: float = 1.0) -> None:
    """Reload whenever the file is not the version the holder last read (edits, ConfigMap symlink swaps)."""
    while True:
        await asyncio.sleep(interval_s)
        if not holder.changed_on_disk():
            continue
        try:
            await holder.reload_async()
        except Exception:               # the watcher outlives any one bad reload
            log.exception("policy reload from %s failed unexpectedly", holder.path)


def freeze_startup_objects() -> None:
    """Move what start-up made (modules, the policy, the SDKs' state: about 100k objects, alive as long as
    the process) to the collector's permanent generation, so full collections stop walking them; each
    otherwise stalled the event loop for tens of milliseconds under load."""
    gc.collect()
    gc.freeze()


async def run_server(app: web.Application, host: str, port: int, *, reuse_port: bool = False,
                     ready: asyncio.Event | None = None, stop: asyncio.Event | None = None,
                     freeze_gc: bool = False) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then drain in-flight requests within the grace period.

    `freeze_gc`: freeze the start-up objects once serving (`freeze_startup_objects`); for a process that
    runs one gateway, not for tests that start many.
    """
    holder: PolicyHolder = app[HOLDER]
    grace_s = holder.current.policy.server.grace_period_s
    # aiohttp waits shutdown_timeout for handlers, then cancels their requests and waits as long again
    # (a stream goes on writing meanwhile): half the grace period each keeps the drain within it
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=grace_s / 2, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
    try:
        await site.start()
    except OSError as exc:                  # port taken, address not ours, host unknown (gaierror)
        await runner.cleanup()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    if freeze_gc:
        freeze_startup_objects()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads = BackgroundTasks()
    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.spawn(holder.reload_async(), name="policy-reload"))
    watcher = asyncio.create_task(watch_policy(holder))
    log.info("gateway listening on http://%s:%d (policy %s)", host, port, holder.path)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining in-flight requests (up to %.0f s)", grace_s)
        watcher.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await reloads.drain(timeout_s=grace_s)
        await runner.cleanup()


def _worker(policy: Path, host: str, port: int, reuse_port: bool) -> int:
    """Serve in this process; 1, said in one line, when it cannot listen."""
    install_uvloop()
    holder = PolicyHolder.from_file(policy, os.environ)
    try:
        asyncio.run(run_server(build_app(holder), host, port, reuse_port=reuse_port, freeze_gc=True))
    except ListenError as exc:
        log.error("%s", exc)
        return 1
    return 0


def _worker_process(policy: Path, host: str, port: int, reuse_port: bool) -> None:
    raise SystemExit(_worker(policy, host, port, reuse_port))


def serve(policy: Path, *, host: str, port: int, workers: int = 1) -> int:
    """`gateway run`: validate the policy, then serve with one or more worker processes."""
    try:
        holder = PolicyHolder.from_file(policy, os.environ)
    except PolicyError as exc:
        log.error("invalid policy, not starting:\n%s", exc)
        return 1
    if workers <= 1:
        return _worker(policy, host, port, reuse_port=False)
    for name in policy_encodings(holder.current.policy):
        get_encoding(name)              # loaded once here: forked workers share its memory
    processes = [multiprocessing.Process(target=_worker_process, args=(policy, host, port, True), daemon=False)
                 for _ in range(workers)]
    for process in processes:
        process.start()
    def forward(signum, _frame):
        for process in processes:
            if process.pid:
                os.kill(process.pid, signum)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for process in processes:
        process.join()
    return max((p.exitcode or 0) for p in processes)
