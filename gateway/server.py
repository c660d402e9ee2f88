"""Running the gateway: one process or N workers on one port, signals, hot reload."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import re
import signal
import shutil
import socket
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from urllib.parse import quote

import orjson
from aiohttp import __version__ as aiohttp_version
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID
from yarl import URL

from gateway.admin import Worker
from gateway.app import HOLDER, METRICS_ELSEWHERE, build_app, metrics_app
from gateway.errors import ClientError, ClientTooSlow, GatewayError, PolicyError
from gateway.policy.model import Policy
from gateway.responses import error_response, new_request_id, request_id
from gateway.runtime import ADMIN, SIGNAL, WATCHER, PolicyHolder, Runtime, file_stat
from gateway.services import SERVICES, Services, ledger_problem, policy_encodings
from gateway.stores import redis_url, redis_url_problem
from gateway.supervisor import HANDLED, Supervisor, blocked_signals, say_serving, stop_with_parent
from gateway.telemetry.config import TelemetryConfig, parse_resource_attributes
from gateway.telemetry.peers import WORKER_LABEL, Peers, make_folder
from gateway.tokens import get_encoding
from gateway.tasks import BackgroundTasks

log = logging.getLogger("gateway")

#: the listen backlog of the gateway's sockets
BACKLOG = 1024
#: workers are forked: they share the parent's loaded modules and encodings (and need no pickling)
FORK = multiprocessing.get_context("fork")

#: what a raw header line quoted by an aiohttp parser error is logged as
REDACTED = "[header value redacted]"
#: the repr of a bytes value, as parser errors quote the line they stopped at: b'...' or b"..."
QUOTED_BYTES = re.compile(r"(?<!\w)(?:b'(?:[^'\\]|\\.)*'" r'|b"(?:[^"\\]|\\.)*")')


def http_url(host: str, port: int) -> str:
    """The URL of host:port, an IPv6 address in brackets (`http://[::1]:8080`); all addresses for an empty host."""
    return str(URL.build(scheme="http", host=host or "0.0.0.0", port=port))


class ListenError(RuntimeError):
    """The gateway could not listen where it was told to (port taken, address not on this host)."""


class RedactParserErrors(logging.Filter):
    """Keeps raw header values (an API key among them) out of the record aiohttp's server logs at ERROR for a
    request its parser refused, before any gateway code runs: `Got more than 8190 bytes when reading:
    b'Bearer sk-...'`. The record stays, message and traceback; only the quoted bytes become REDACTED."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            exc_type, exc, traceback = record.exc_info
            record.exc_info = (exc_type, redacted(exc), traceback)
            record.exc_text = None          # a handler may have formatted the original already
        return True


def redacted(exc: HttpProcessingError) -> HttpProcessingError:
    """A copy of a parser error whose message and arguments quote no raw bytes (the original is left as is)."""
    copy = type(exc).__new__(type(exc))
    copy.__dict__.update(vars(exc))
    copy.message = QUOTED_BYTES.sub(REDACTED, exc.message)
    copy.args = tuple(REDACTED if isinstance(arg, bytes) else QUOTED_BYTES.sub(REDACTED, arg)
                      if isinstance(arg, str) else arg for arg in exc.args)
    return copy.with_traceback(exc.__traceback__)


def redact_parser_errors(logger: logging.Logger = logging.getLogger("aiohttp.server")) -> None:
    """Install `RedactParserErrors` on aiohttp's server logger, once."""
    if not any(isinstance(existing, RedactParserErrors) for existing in logger.filters):
        logger.addFilter(RedactParserErrors())


#: what a connection whose request head did not come in time is answered before it is closed
HEAD_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                       b"x-request-id: %s\r\nConnection: close\r\n\r\n%s")


class OpenAIErrorsHandler(web.RequestHandler):
    """aiohttp's connection protocol, answering what it refuses before any gateway code runs (a header line past
    8190 bytes, too many headers, a broken chunk, a Content-Encoding it cannot decode, a line that is not HTTP)
    in OpenAI's error shape with an x-request-id, where aiohttp answers plain text. Logged as aiohttp logs it.

    It also bounds the wait for a request head (`head_timeout_s`, the policy's `server.client_timeout_s`): from a
    new connection, or from the first byte of a head after a response, the head must be whole in time, else the
    connection is answered 408 and closed. aiohttp itself waits its keep-alive timeout (an hour) for one, so a
    client trickling heads (slowloris) could hold connections and their buffers that long. An idle keep-alive
    connection that sends nothing is left to aiohttp's keep-alive timeout."""

    head_timeout_s: Callable[[], float] | None = None   # set by OpenAIErrorsServer
    _head_timer: asyncio.TimerHandle | None = None
    _heads_seen = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_count != self._heads_seen:     # a whole head came (the parser counts each)
            self._heads_seen = self._request_count
            self._disarm_head_timer()
        elif self._head_timer is None and not self._request_in_progress and self._waiter is not None \
                and not self._waiter.done():    # idle, and a new head begins
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self.head_timeout_s is not None:
            self._head_timer = self._loop.call_later(self.head_timeout_s(), self._head_overdue, self._heads_seen)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self, heads_seen: int) -> None:
        self._head_timer = None
        if self._request_count != heads_seen or self.transport is None or self.transport.is_closing():
            return
        body = orjson.dumps(ClientTooSlow(f"no whole request head came within {self.head_timeout_s():g} s "
                                          f"(server.client_timeout_s)").body())
        self.transport.write(HEAD_TIMEOUT_ANSWER % (len(body), new_request_id().encode(), body))
        self.force_close()

    def stop_reading_after_answer(self) -> None:
        """Close the connection once the answer under way is written, without aiohttp's lingering read of what is
        left of the request's body (`app.close_on_unread_body`)."""
        if hasattr(self, "_lingering_time"):
            self._lingering_time = 0.0      # read after each answer: the connection closes, its body unread

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)    # logs; raises once part of a response was sent
        if status >= 500:
            error = GatewayError("internal error")
        else:
            said = redacted(exc).message if isinstance(exc, HttpProcessingError) else message
            error = ClientError(f"could not read the request: {said or 'malformed HTTP'}")
        error.status = status
        response = error_response(error, request_id=request_id(request))
        response.force_close()
        return response


class OpenAIErrorsServer(web.Server):
    """aiohttp's server, its connections served by `OpenAIErrorsHandler` (each given `head_timeout_s`)."""

    head_timeout_s: Callable[[], float] | None = None

    def __call__(self) -> web.RequestHandler:
        handler = OpenAIErrorsHandler(self, loop=self._loop, **self._kwargs)
        handler.head_timeout_s = self.head_timeout_s
        return handler


class GatewayRunner(web.AppRunner):
    """An AppRunner whose server answers aiohttp's own refusals in OpenAI's error shape (`OpenAIErrorsHandler`)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()           # starts the app up, as AppRunner does
        # aiohttp has no public hook for this: an aiohttp whose server lacks what is used here keeps its own
        # plain-text refusals rather than failing to serve
        if not all(hasattr(server, name) for name in _SERVER_PARTS):
            log.warning("aiohttp %s: its own HTTP refusals stay plain text (its server changed shape)",
                        aiohttp_version)
            return server
        ours = OpenAIErrorsServer(server.request_handler, request_factory=server.request_factory,
                                  handler_cancellation=server.handler_cancellation, **server._kwargs)
        if all(hasattr(web.RequestHandler, name) for name in _HANDLER_PARTS):
            holder: PolicyHolder = self.app[HOLDER]
            ours.head_timeout_s = lambda: holder.current.policy.server.client_timeout_s
        else:
            log.warning("aiohttp %s: request heads are waited for as long as aiohttp waits (its connection "
                        "handler changed shape)", aiohttp_version)
        return ours


#: the parts of aiohttp's web.Server that OpenAIErrorsServer is built from
_SERVER_PARTS = ("request_handler", "request_factory", "handler_cancellation", "_kwargs", "_loop")
#: the parts of aiohttp's RequestHandler that OpenAIErrorsHandler's head timer reads
_HANDLER_PARTS = ("_request_count", "_request_in_progress", "_waiter", "_loop", "force_close")


def install_uvloop() -> None:
    """Use uvloop when it is installed: the faster event loop for a proxy."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


#: how long a changed policy file must stay the same before the watcher reads it
SETTLED_S = 0.25


async def watch_policy(holder: PolicyHolder, interval_s: float = 1.0, settled_s: float = SETTLED_S) -> None:
    """Reload whenever the file is not the version the holder last read (edits, ConfigMap symlink swaps), once it
    has stayed the same for `settled_s`: a file written in place in parts is not read half-way (cut at the end of a
    line, a policy can be valid with some of its tenants or routes missing)."""
    while True:
        await asyncio.sleep(interval_s)
        if not holder.changed_on_disk():
            continue
        changed = file_stat(holder.path)
        await asyncio.sleep(settled_s)
        if file_stat(holder.path) != changed:
            continue                    # still being written: looked at again at the next tick
        try:
            await holder.reload_async(WATCHER)
        except Exception:               # the watcher outlives any one bad reload
            log.exception("policy reload from %s failed unexpectedly", holder.path)


#: allocations between young-generation collections (CPython's default: 700)
GC_YOUNG_THRESHOLD = 10_000


def freeze_startup_objects() -> None:
    """Move what start-up made (modules, the policy, the SDKs' state: about 100k objects, alive as long as
    the process) to the collector's permanent generation, so full collections stop walking them; each
    otherwise stalled the event loop for tens of milliseconds under load.

    Then collect the young generation every GC_YOUNG_THRESHOLD allocations, not every 700: a request's
    objects mostly die by reference count first, so the collector walks far fewer survivors, and older
    collections come much less often. At saturation the collector's share of CPU fell from about 4 % to
    1 %; each young pass takes about 2 ms instead of 0.2 ms."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def run_server(app: web.Application, host: str, port: int, *, sockets: list[socket.socket] | None = None,
                     ready: asyncio.Event | None = None, stop: asyncio.Event | None = None,
                     freeze_gc: bool = False, metrics_sockets: list[socket.socket] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop`), then drain in-flight requests within the grace period.

    `sockets`: serve on these (bound by `listen_sockets`) instead of binding host:port here.
    `metrics_sockets`: serve GET /metrics on these alone (`gateway run --metrics-port`), not on the API's.
    `freeze_gc`: freeze the start-up objects once serving (`freeze_startup_objects`); for a process that
    runs one gateway, not for tests that start many.
    """
    holder: PolicyHolder = app[HOLDER]
    grace_s = holder.started.server.grace_period_s
    redact_parser_errors()
    # aiohttp waits shutdown_timeout for handlers, then cancels their requests and waits as long again
    # (a stream goes on writing meanwhile): half the grace period each keeps the drain within it
    if metrics_sockets is not None:
        app[METRICS_ELSEWHERE] = True
    runner = GatewayRunner(app, handler_cancellation=True, shutdown_timeout=grace_s / 2, access_log=None)
    await runner.setup()
    sites = ([web.SockSite(runner, sock, backlog=BACKLOG) for sock in sockets] if sockets is not None
             else [web.TCPSite(runner, host, port, backlog=BACKLOG)])
    metrics_runner = web.AppRunner(metrics_app(app), access_log=None) if metrics_sockets is not None else None
    try:
        for sock in (*(sockets or ()), *(metrics_sockets or ())):   # listened on here: uvloop, unlike asyncio,
            sock.listen(BACKLOG)            # starts serving a socket whose listen() failed (another took the port)
        for site in sites:
            await site.start()
        if metrics_runner is not None:
            await metrics_runner.setup()
            for sock in metrics_sockets:
                await web.SockSite(metrics_runner, sock, backlog=BACKLOG).start()
    except OSError as exc:                  # port taken, address not ours, host unknown (gaierror)
        await runner.cleanup()
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    if freeze_gc:
        freeze_startup_objects()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads = BackgroundTasks()
    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.spawn(holder.reload_async(SIGNAL), name="policy-reload"))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)    # one sent during start-up is handled now
    watcher = asyncio.create_task(watch_policy(holder))
    log.info("gateway listening on %s (policy %s)%s", http_url(host, port), holder.path,
             f"; GET /metrics on {http_url(host, metrics_sockets[0].getsockname()[1])}" if metrics_sockets else "")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining in-flight requests (up to %.0f s)", grace_s)
        services = app.get(SERVICES)
        if services is not None:
            services.draining = True        # /readyz says so at once, before reloads under way are awaited
            services.drain_ends_s = loop.time() + grace_s
        ending = loop.call_later(grace_s - min(1.0, grace_s / 10), end_in_flight, services) \
            if services is not None else None
        watcher.cancel()
        ignore_while_draining(loop)
        await reloads.drain(timeout_s=grace_s)
        await runner.cleanup()
        if metrics_runner is not None:      # scraped until the drain is over
            await metrics_runner.cleanup()
        if ending is not None:
            ending.cancel()
        restore_signal_handlers(loop, previous)


def end_in_flight(services: Services) -> None:
    """The drain's time is nearly out: end each request still served with a 503 `shutting_down` (in-band for a
    stream already under way), not with a connection cut as aiohttp's own ending would, which the client could
    not tell from a network failure."""
    ending = [(ctx, task) for ctx, task in services.in_flight.values() if not task.done()]
    for ctx, task in ending:
        ctx.cut_by_shutdown = True
        task.cancel()
    if ending:
        log.warning("%d request(s) still running at the end of the grace period ended with 503 shutting_down",
                    len(ending))


def ignore_while_draining(loop: asyncio.AbstractEventLoop) -> None:
    """A further SIGTERM or SIGINT during the drain (systemd's to the whole group, a second Ctrl-C) is logged
    once and ignored, where its default action would cut the drain; a SIGHUP reloads nothing."""
    said: set[int] = set()

    def ignore(signum: int) -> None:
        if not said:
            log.info("%s ignored: already draining", signal.Signals(signum).name)
        said.add(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ignore, sig)
    loop.add_signal_handler(signal.SIGHUP, ignore, signal.SIGHUP)


def restore_signal_handlers(loop: asyncio.AbstractEventLoop, previous: dict) -> None:
    """The handlers there before `run_server`, with the signals held meanwhile: none meets the default action
    that `remove_signal_handler` leaves for a moment."""
    with blocked_signals(previous):
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def listen_sockets(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> list[socket.socket]:
    """Sockets bound to host:port, one per address the host names (as aiohttp's TCPSite binds them; port 0:
    one free port for all), listening unless `listen` is false; ListenError, in one line, when it cannot."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _name, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], sockets[0].getsockname()[1] if len(sockets) > 1 else port, *address[2:]))
            if listen:
                sock.listen(BACKLOG)
    except OSError as exc:                  # port taken, address not ours, host unknown (gaierror)
        for sock in sockets:
            sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {(exc.strerror or str(exc)).lower()}") from exc
    return sockets


def claim_port(host: str, port: int) -> list[socket.socket]:
    """Sockets that hold the port N workers share, for as long as they are open; checked free first: a bind
    without SO_REUSEPORT fails on a port another process listens on (another gateway's reuse-port workers too),
    where the workers' binds would share it. Held, bound but never listening, with SO_REUSEPORT and no
    SO_REUSEADDR (set only to bind past TIME_WAIT): the workers' reuse-port binds share the port, any other
    bind fails, even while no worker listens (they listen once serving)."""
    probe = listen_sockets(host, port, listen=False)
    claimed = probe[0].getsockname()[1]
    for sock in probe:
        sock.close()
    held = listen_sockets(host, claimed, reuse_port=True, listen=False)
    for sock in held:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    return held


def serve(policy: Path, *, host: str, port: int, workers: int = 1, metrics_port: int | None = None) -> int:
    """`gateway run`: validate the policy, then serve in this process or with `workers` worker processes;
    `metrics_port`: GET /metrics there alone, not on the API's port."""
    if workers < 1:
        raise ValueError(f"workers is 1 or more, got {workers}")
    if metrics_port is not None and metrics_port == port != 0:
        log.error("--metrics-port must differ from --port (%d): /metrics is served there alone", port)
        return 1
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})      # until its handler is installed
    try:
        holder = PolicyHolder.from_file(policy, os.environ)
    except PolicyError as exc:
        log.error("invalid policy, not starting:\n%s", exc)
        return 1
    try:
        if workers == 1:
            # bound now, listening once serving: until then a connection is refused, not kept waiting
            return _serve_here(holder, host, listen_sockets(host, port, listen=False),
                               metrics_sockets=listen_sockets(host, metrics_port, listen=False)
                               if metrics_port is not None else None)
        held = claim_port(host, port)
        metrics_held = claim_port(host, metrics_port) if metrics_port is not None else []
    except ListenError as exc:
        log.error("%s", exc)
        return 1
    problem = redis_url_problem(holder.current.policy, os.environ) or ledger_problem(holder.current.policy)
    if problem is not None:
        log.error("%s", problem)        # said once here, not by each worker in turn until the crash limit
        return 1
    for name in policy_encodings(holder.current.policy):
        get_encoding(name)              # loaded once here: forked workers share its memory
    # the workers' private folder (mode 0700): their metrics sockets, and their GPU energy words without Redis
    prometheus = TelemetryConfig.from_env(holder.current.policy.telemetry, environ=os.environ).prometheus
    shared = redis_url(holder.current.policy, os.environ) is not None
    peers_folder = make_folder(workers) if prometheus or not shared else None
    if prometheus and peers_folder is not None:
        log.info("%d workers: each scrape of /metrics gathers every worker's series, labelled %s (through "
                 "their sockets in %s)", workers, WORKER_LABEL, peers_folder)
    if not shared:
        measured = any(model.gpus for model in holder.current.policy.models.values())
        log.warning("%d workers without Redis: the cache, limits, budgets and outcomes are each worker's own "
                    "(POST /v1/outcomes finds only the tasks its worker served)%s; set GATEWAY_REDIS_URL", workers,
                    ", and each worker books the whole energy of the GPUs it samples among its own requests (the "
                    "workers' books add up to N times what the GPUs used)"
                    if measured and peers_folder is None else "")
        if measured and peers_folder is not None:
            log.info("%d workers without Redis share the energy of the GPUs they sample through %s", workers,
                     peers_folder)

    port = held[0].getsockname()[1]
    metrics_port = metrics_held[0].getsockname()[1] if metrics_held else None
    started = holder.current.policy     # its ledger, store, telemetry and grace period serve every worker

    def spawn(slot: int) -> BaseProcess | None:
        sockets: list[socket.socket] = []
        try:        # bound, listening once the worker serves: the kernel sends a starting worker no connection
            sockets = listen_sockets(host, port, reuse_port=True, listen=False)
            metrics_sockets = listen_sockets(host, metrics_port, reuse_port=True, listen=False) \
                if metrics_port is not None else []
        except ListenError as exc:
            for sock in sockets:        # the API's, bound before the metrics port failed
                sock.close()
            log.error("worker %d: %s", slot, exc)
            return None
        keep = {sock.fileno() for sock in (*sockets, *metrics_sockets)} | {supervisor.ready_fd}
        inherited = sorted(open_fds() - {0, 1, 2} - keep)
        peers = Peers(peers_folder, slot, workers, metrics=prometheus) if peers_folder is not None else None
        process = FORK.Process(target=_worker_process, name=f"gateway-worker-{slot}",
                               args=(policy, started, host, sockets, inherited, supervisor.ready_fd, os.getpid(),
                                     peers), kwargs={"worker": Worker(slot, workers),
                                                     "metrics_sockets": metrics_sockets or None})
        try:
            process.start()
        except OSError as exc:          # fork failed: EAGAIN at a pid limit, ENOMEM
            log.error("worker %d: cannot start a process: %s", slot, exc.strerror or exc)
            return None
        finally:
            for sock in (*sockets, *metrics_sockets):
                sock.close()            # the worker's now: closed there, the port stops taking connections
        return process

    supervisor = Supervisor(spawn, workers, grace_period_s=started.server.grace_period_s)
    try:
        return supervisor.run()
    finally:
        for sock in (*held, *metrics_held):
            sock.close()
        if peers_folder is not None:
            shutil.rmtree(peers_folder, ignore_errors=True)


def open_fds() -> set[int]:
    """The file descriptors open in this process (the one that lists them, closed by then, left out)."""
    listed = {int(name) for name in os.listdir("/dev/fd")}
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _serve_here(holder: PolicyHolder, host: str, sockets: list[socket.socket], *, ready_fd: int | None = None,
                peers: Peers | None = None, worker: Worker | None = None,
                metrics_sockets: list[socket.socket] | None = None) -> int:
    """Serve in this process on `sockets`; 1, said in one line, when it cannot listen. `ready_fd`: once serving,
    tell the supervisor there (`say_serving`); `peers`: the other workers' metrics (`gateway.telemetry.peers`);
    `worker`: which of `gateway run --workers N` this process is (the admin API says so); `metrics_sockets`: the
    metrics port's (`--metrics-port`)."""
    install_uvloop()
    port = sockets[0].getsockname()[1]
    try:
        asyncio.run(_serve_app(build_app(holder, peers=peers, worker=worker), host, port, sockets, ready_fd,
                               metrics_sockets))
    except ListenError as exc:
        log.error("%s", exc)
        return 1
    return 0


async def _serve_app(app: web.Application, host: str, port: int, sockets: list[socket.socket],
                     ready_fd: int | None, metrics_sockets: list[socket.socket] | None = None) -> None:
    ready = asyncio.Event()
    told = asyncio.create_task(_tell_serving(ready, ready_fd))
    try:
        await run_server(app, host, port, sockets=sockets, ready=ready, freeze_gc=True,
                         metrics_sockets=metrics_sockets)
    finally:
        told.cancel()


async def _tell_serving(ready: asyncio.Event, ready_fd: int | None) -> None:
    await ready.wait()
    if ready_fd is not None:
        say_serving(ready_fd)


def _worker_process(policy: Path, started: Policy, host: str, sockets: list[socket.socket], inherited: list[int],
                    ready_fd: int, supervisor_pid: int, peers: Peers | None = None, *,
                    worker: Worker | None = None, metrics_sockets: list[socket.socket] | None = None) -> None:
    """One worker's life, in a forked process: its own policy holder and app, on the sockets bound for it; the
    policy file as it is now, but the start-up settings (`started`: the ledger, store, telemetry and grace period)
    the gateway started with, as every other worker has.

    `inherited`: the parent's descriptors the worker has no use for (its wake pipe, the other workers' pipes),
    closed here. A stop signal or a SIGHUP during start-up waits (blocked) until `run_server` handles it; after
    the drain, a stop signal exits 0 at once and a SIGHUP is ignored. The supervisor's death, even by SIGKILL,
    is a SIGTERM (`stop_with_parent`)."""
    stop_with_parent(supervisor_pid)
    if worker is not None:
        own_instance_id(os.environ, worker.slot)
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.set_wakeup_fd(-1)            # the supervisor's signal handling, inherited through fork
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_at_once)
    signal.signal(signal.SIGHUP, _ignore)      # not SIG_IGN, which would drop one sent during start-up
    # SIGTERM, SIGINT and SIGHUP stay blocked (as the fork left them) until run_server handles them: a stop
    # during start-up waits for it and drains nothing, rather than raise out of wherever start-up is
    holder = _valid_policy(policy)
    holder.start_with(started)
    announce_admin_reloads(holder, supervisor_pid)
    raise SystemExit(_serve_here(holder, host, sockets, ready_fd=ready_fd, peers=peers, worker=worker,
                                 metrics_sockets=metrics_sockets))


def own_instance_id(environ, slot: int) -> None:
    """In a worker: a `service.instance.id` the operator set in OTEL_RESOURCE_ATTRIBUTES (the pod's name, say)
    reaches every worker; each exports as `ID-SLOT`, so N workers' OTLP series stay apart (without one, the SDK
    gives each process its own)."""
    attributes = environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    given = parse_resource_attributes(attributes).get(SERVICE_INSTANCE_ID)
    if given:
        environ["OTEL_RESOURCE_ATTRIBUTES"] = f"{attributes},{SERVICE_INSTANCE_ID}={quote(f'{given}-{slot}', safe='')}"


#: how often a worker started on an invalid policy file reads it again
INVALID_POLICY_POLL_S = 1.0


def _valid_policy(policy: Path) -> PolicyHolder:
    """The worker's policy holder. A file made invalid since the gateway started (an edit the running workers
    refused, serving on) is read again every INVALID_POLICY_POLL_S until it is valid, the worker not serving
    meanwhile: exiting would have the supervisor restart it into the same file until its crash limit left the
    gateway short of workers for good, or stopped it; starting on an older policy could serve what a valid edit
    since then removed (a revoked key). A stop signal ends the wait."""
    said_stat = None
    while True:
        try:
            return PolicyHolder.from_file(policy, os.environ)
        except PolicyError as exc:
            stat = file_stat(policy)
            if stat != said_stat:
                said_stat = stat
                log.error("the policy file is invalid: this worker waits for a valid one before serving (the "
                          "others serve on):\n%s", exc)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})   # a stop ends the wait
        try:
            time.sleep(INVALID_POLICY_POLL_S)
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})


def _exit_at_once(_signum: int, _frame) -> None:
    raise SystemExit(0)


def _ignore(_signum: int, _frame) -> None:
    pass



def announce_admin_reloads(holder: PolicyHolder, supervisor_pid: int) -> None:
    """In a worker: an admin API reload that changed the policy SIGHUPs the supervisor, which passes SIGHUP on
    to every worker, so all of them serve the file (their watchers miss an edit that keeps size and mtime).
    The reloads SIGHUP makes are not announced again, and the asking worker's own is a no-op."""
    def announce(_runtime: Runtime) -> None:
        if holder.status.origin == ADMIN and os.getppid() == supervisor_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor_pid, signal.SIGHUP)
    holder.listeners.append(announce)
