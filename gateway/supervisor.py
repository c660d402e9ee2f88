"""Supervising N worker processes: restart one that dies, pass signals on, kill one that will not stop, exit
with the worst status.

`gateway run --workers N` runs one `Supervisor`; it knows nothing of the gateway beyond the function that
starts a worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

log = logging.getLogger("gateway")

#: the signals the supervisor passes on: drain and stop (SIGTERM, SIGINT), reload (SIGHUP)
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: a pid as a worker writes it to the ready pipe
PID_BYTES = 4
#: a stopping worker waits up to one grace period for each of: policy reloads under way, its requests (aiohttp
#: rounds its two half-grace waits up by under a second each) and its background work (admission releases,
#: cache writes)
GRACE_PERIODS_PER_STOP = 3
#: then it closes the rest (the ledger up to 3 s, the stores, the telemetry flush up to 5 s), with room to
#: spare: a worker still running GRACE_PERIODS_PER_STOP grace periods and this margin after the stop is
#: killed (SIGKILL)
KILL_MARGIN_S = 15.0
#: the longest `server.grace_period_s` a policy may give, a day: a drain longer is a typo, and the supervisor waits
#: for a stop (GRACE_PERIODS_PER_STOP grace periods and KILL_MARGIN_S) in one poll(2), whose timeout is at most 2^31 ms
#: (about 24.8 days): past about 8 days its SIGTERM raised OverflowError and left the workers unreaped
MAX_GRACE_PERIOD_S = 86_400
#: prctl(2)'s option that sets the signal a process gets when its parent dies (Linux)
PR_SET_PDEATHSIG = 1


@dataclass
class Slot:
    """One of the supervisor's N places for a worker: its process, or when one is due to start there."""

    index: int
    process: BaseProcess | None = None
    restart_at: float | None = None         # time.monotonic()
    serving: bool = False                   # its process said it serves (its pid on the ready pipe)


class Supervisor:
    """Keeps N worker processes running and passes SIGTERM, SIGINT and SIGHUP on to them.

    A worker that exits while no stop was asked for is logged (pid, exit status or signal) and started
    again after a back-off that doubles with each recent exit; `crash_limit` exits within `crash_window_s`
    stop the others instead, unless one of them serves: then the failing one is retried every
    `max_backoff_s`. `spawn(index)` starts a worker and returns its process, or None when it could not
    (having said why): an exit with status 1. A worker says it serves by writing its pid to `ready_fd`
    (`say_serving`), inherited through fork; one that never does is never counted as serving. A stop
    signal is passed on once (one during start-up starts no more workers); a worker must handle it at any
    time, so one killed by it is a failure. One still running GRACE_PERIODS_PER_STOP × the workers' grace
    period (`grace_period_s`, the gateway's start-up one) + `kill_margin_s` after the stop was passed on is killed
    (SIGKILL), a failure too. `run` returns once every worker is gone: 0 when each exited 0 when asked to stop, else the
    first failure's status (its exit code, 1 for an unasked exit 0, or 128 + the signal that killed it), also
    when the worker that failed was restarted and served on.
    """

    def __init__(self, spawn: Callable[[int], BaseProcess | None], workers: int, *, grace_period_s: float = 0.0,
                 kill_margin_s: float = KILL_MARGIN_S, crash_limit: int = 5, crash_window_s: float = 60.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> None:
        self.spawn = spawn
        self.slots = [Slot(index) for index in range(workers)]
        self.grace_period_s, self.kill_margin_s = grace_period_s, kill_margin_s
        self.crash_limit, self.crash_window_s = crash_limit, crash_window_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.crashes: deque[float] = deque()
        self.stop_signal: int | None = None     # the signal that asked for the stop, once one did
        self.kill_at: float | None = None       # time.monotonic() when the workers still running get SIGKILL
        self.status = 0
        self.ready_r, self.ready_fd = os.pipe()

    @property
    def kill_after_s(self) -> float:
        """How long after a stop a worker still running is killed."""
        return GRACE_PERIODS_PER_STOP * self.grace_period_s + self.kill_margin_s

    def run(self) -> int:
        try:
            return self._supervise()
        except BaseException:
            self._abandon()
            raise
        finally:
            os.close(self.ready_r)
            os.close(self.ready_fd)

    def _abandon(self) -> None:
        """After an unexpected error: stop every live worker (SIGTERM unless a stop was passed on already, SIGKILL
        past the deadline), then wait for each, leaving none unsupervised."""
        # `_supervise` gave the signals their former handlers back: a stop signal now must not end this process
        # before its workers (a hung one would be left behind), and it asks for nothing more than is under way
        previous = {sig: signal.signal(sig, _already_stopping) for sig in HANDLED}
        try:
            log.error("supervisor failed: stopping %d worker(s)", len(self._live()))
            if self.stop_signal is None:
                self._stop(signal.SIGTERM)
            deadline = self.kill_at if self.kill_at is not None else time.monotonic()     # None: killed already
            for slot in self._live():
                slot.process.join(max(0.0, deadline - time.monotonic()))
            self._kill_stragglers()
            for slot in self._live():
                slot.process.join()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _supervise(self) -> int:
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in HANDLED}   # the work is done in `_on`
        previous_fd = signal.set_wakeup_fd(wake_w)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        try:
            for slot in self.slots:
                self._take_signals(wake_r)      # a stop during start-up (Ctrl-C after a large N) is acted on now
                if self.stop_signal is None:    # a stop, or a crash-limit stop, while starting: the rest never start
                    self._start(slot)
            while self._running():
                self._step(wake_r)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
        if self.status:
            log.error("exiting with status %d: a worker failed (logged above)", self.status)
        return self.status

    def _running(self) -> bool:
        return any(slot.process or (slot.restart_at is not None and self.stop_signal is None) for slot in self.slots)

    def _step(self, wake_r: int) -> None:
        """Wait for a signal, a worker's exit, a restart falling due or the stop's deadline, and act on it."""
        ready = wait([wake_r, self.ready_r, *(slot.process.sentinel for slot in self.slots if slot.process)],
                     self._next_due_s())
        if wake_r in ready:
            self._take_signals(wake_r)
        if self.ready_r in ready:
            self._serving(os.read(self.ready_r, 4096))
        for slot in self.slots:
            if slot.process and slot.process.sentinel in ready:
                self._exited(slot)
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= time.monotonic() and self.stop_signal is None:
                self._start(slot)
        if self.kill_at is not None and self.kill_at <= time.monotonic():
            self._kill_stragglers()

    def _take_signals(self, wake_r: int) -> None:
        """Act on each signal delivered so far (its number written to the non-blocking wake pipe)."""
        try:
            signals = os.read(wake_r, 512)
        except BlockingIOError:
            return
        for signum in signals:
            self._on(signum)

    def _next_due_s(self) -> float | None:
        """Seconds until the next restart falls due or, once stopping, until the stop's deadline; None: nothing due."""
        if self.stop_signal is None:
            due = [slot.restart_at for slot in self.slots if slot.restart_at is not None]
        else:
            due = [self.kill_at] if self.kill_at is not None else []
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _on(self, signum: int) -> None:
        if signum == signal.SIGHUP and self.stop_signal is None:
            log.info("SIGHUP: %d worker(s) reload the policy", len(self._live()))
            self._forward(signum)
        elif signum in (signal.SIGTERM, signal.SIGINT) and self.stop_signal is None:
            log.info("%s: stopping %d worker(s)", signal.Signals(signum).name, len(self._live()))
            self._stop(signum)
        elif signum in (signal.SIGTERM, signal.SIGINT):     # passed on once: a worker drains only once
            log.info("%s: already stopping", signal.Signals(signum).name)

    def _stop(self, signum: int) -> None:
        """Pass a stop on to every worker, once, and set when those still running then are killed."""
        self.stop_signal = signum
        self.kill_at = time.monotonic() + self.kill_after_s
        self._forward(signum)

    def _kill_stragglers(self) -> None:
        """SIGKILL to each worker still running at the stop's deadline; its exit then counts as a failure."""
        self.kill_at = None
        for slot in self._live():
            log.error("worker %d (pid %d) still running %.1f s after %s: killing it", slot.index, slot.process.pid,
                      self.kill_after_s, signal.Signals(self.stop_signal).name)
        self._forward(signal.SIGKILL)

    def _serving(self, pids: bytes) -> None:
        for offset in range(0, len(pids), PID_BYTES):
            pid = int.from_bytes(pids[offset:offset + PID_BYTES], "little")
            for slot in self._live():
                slot.serving = slot.serving or slot.process.pid == pid

    def _forward(self, signum: int) -> None:
        for slot in self._live():
            with contextlib.suppress(ProcessLookupError):   # gone already: its sentinel says so next
                os.kill(slot.process.pid, signum)

    def _live(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.process]

    def _start(self, slot: Slot) -> None:
        slot.restart_at = None
        with blocked_signals(HANDLED):      # the worker starts with them blocked and installs its own handlers
            slot.process = self.spawn(slot.index)
        if slot.process is None:
            self._crashed(slot, 1)
            return
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)

    def _exited(self, slot: Slot) -> None:
        process, slot.process, slot.serving = slot.process, None, False
        process.join()
        code, pid = process.exitcode, process.pid
        process.close()
        how = describe_exit(code)
        if self.stop_signal is None:
            log.error("worker %d (pid %d) %s", slot.index, pid, how)
            self._crashed(slot, exit_status(code) or 1)     # gone unasked: a failure, whatever its status
        elif code == 0:
            log.info("worker %d (pid %d) stopped", slot.index, pid)
        else:
            log.error("worker %d (pid %d) %s while stopping", slot.index, pid, how)
            self.status = self.status or exit_status(code)

    def _crashed(self, slot: Slot, status: int) -> None:
        """An exit nobody asked for: start it again after a back-off, or stop all when they keep dying."""
        self.status = self.status or status
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes[0] < now - self.crash_window_s:
            self.crashes.popleft()
        serving = sum(other.serving for other in self.slots)
        if len(self.crashes) >= self.crash_limit and not serving:
            log.error("%d worker exits within %.0f s: stopping all workers", len(self.crashes), self.crash_window_s)
            self._stop(signal.SIGTERM)
            return
        if len(self.crashes) >= self.crash_limit:   # the others serve on: keep trying, at the slowest pace
            log.error("%d worker exits within %.0f s, %d worker(s) serving on: restarting worker %d every %.0f s",
                      len(self.crashes), self.crash_window_s, serving, slot.index, self.max_backoff_s)
            slot.restart_at = now + self.max_backoff_s
            return
        delay_s = min(self.max_backoff_s, self.backoff_s * 2 ** (len(self.crashes) - 1))
        slot.restart_at = now + delay_s
        log.warning("restarting worker %d in %.1f s", slot.index, delay_s)


def say_serving(ready_fd: int) -> None:
    """In a worker, once it serves: tell the supervisor, through the pipe end it was given."""
    os.write(ready_fd, os.getpid().to_bytes(PID_BYTES, "little"))   # one write under PIPE_BUF: never split


def _already_stopping(signum: int, _frame) -> None:
    log.info("%s: already stopping", signal.Signals(signum).name)


def stop_with_parent(parent_pid: int) -> None:
    """In a worker, first thing after the fork: get SIGTERM (and so drain, then exit) when the supervisor dies,
    even by SIGKILL, rather than serve on as an orphan; exit 0 at once when `parent_pid`, the supervisor, died
    before that was set. Where the signal cannot be set (not Linux), said at DEBUG. The kernel sends it when the
    thread that forked the worker ends: the supervisor forks from the thread that runs it."""
    try:
        set_parent_death_signal(signal.SIGTERM)
    except OSError as exc:
        log.debug("worker (pid %d) runs on if its supervisor dies: no parent-death signal (%s)", os.getpid(), exc)
    if os.getppid() != parent_pid:
        log.warning("worker (pid %d) not starting: its supervisor (pid %d) is gone", os.getpid(), parent_pid)
        raise SystemExit(0)


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send this process `signum` when its parent dies (prctl(2)); OSError where it cannot."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "prctl(PR_SET_PDEATHSIG) is Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signum)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")


def describe_exit(exitcode: int) -> str:
    """How a process ended, from its multiprocessing exit code (negative: the signal that killed it)."""
    if exitcode >= 0:
        return f"exited with status {exitcode}"
    try:
        return f"was killed by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"was killed by signal {-exitcode}"


def exit_status(exitcode: int) -> int:
    """A process's exit status as a shell reports it: the code, or 128 + the signal that killed it."""
    return 128 - exitcode if exitcode < 0 else exitcode


@contextlib.contextmanager
def blocked_signals(signals):
    """Hold `signals` (pending, not lost) for the block's duration."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
