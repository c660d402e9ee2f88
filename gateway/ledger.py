"""The request ledger: one compact JSON line per request, in a rotating file, never prompt text.

Writes go through a queue to a writer thread, so disk I/O never runs on the
event loop. The ledger feeds the what-if replay and offline reports.

Several processes (`gateway run --workers N`) may share one path: each line is
one `write()` to a file opened with O_APPEND, so lines never interleave;
rotation happens under an flock on a hidden sibling file (made at the first
rotation, so a path that never rotates, /dev/stdout, needs none), and a writer
whose file was rotated, moved or deleted by someone else reopens the path before
its next line. A
rotation that fails (no lock file in a read-only directory, a directory at a
backup's name) is said once and the file grows past `max_bytes` until one works.
A line that is lost (the write fails on a full disk, the queue is full behind a
stalled disk, the ledger is closed) is counted in `write_errors`; each episode
and its end are said once. A line the disk took only part of is cut back off
the file, so every line in it stays parseable JSON.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import stat
import threading
import time
from pathlib import Path

import orjson

from gateway.policy.model import Ledger as LedgerConfig

log = logging.getLogger("gateway.ledger")

OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
#: after a rotation fails, lines go on into the full file, and rotating is tried again this much later
ROTATE_RETRY_S = 30.0
#: the most lines waiting for the writer; past it new lines are dropped and counted. Lines are ~0.5 KiB, so a
#: stalled disk holds at most ~5 MiB per worker, yet 1,000 requests a second ride out a 10 s stall losing none
QUEUE_LINES = 10_000
#: the most backups `ledger.backups` may keep: each rotation renames every one of them, holding the ledger's lock, so
#: a billion would stall the writer for an hour at each rotation
MAX_BACKUPS = 1000
#: how long closing waits for the writer to write what is queued; a hung disk must not hold up shutdown
CLOSE_TIMEOUT_S = 3.0


class LedgerFile:
    """A JSON-lines file that processes share: appended to, rotated at `max_bytes` keeping `backups` files."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._lock_fd = -1                 # opened at the first rotation: a path never rotated needs no lock file
        self._fd = -1
        self._torn = False                 # a line cut short stays in the file: the next one starts on a new line
        self._rotate_at_s = 0.0            # no rotating before this (monotonic), set when a rotation fails
        self._rotation_failing = False
        self._open()

    def append(self, line: bytes) -> None:
        """Write one whole line with one write(), to the file now at the path (one stat, about a microsecond,
        so a line is never written into a file an operator deleted), rotating first when it would take the
        file past `max_bytes`."""
        self._follow()
        if self._rotates:
            size = os.lseek(self._fd, 0, os.SEEK_END)
            if size and size + len(line) > self.max_bytes and time.monotonic() >= self._rotate_at_s:
                self._try_rotate(len(line))
        if self._torn:
            line = b"\n" + line
        written = os.write(self._fd, line)
        if written < len(line):
            self._torn = not self._cut_fragment(written)
            raise OSError(f"only {written} of {len(line)} bytes written")
        self._torn = False

    def _cut_fragment(self, written: int) -> bool:
        """Take a short write's bytes back off the end of the file, so no unparseable fragment stays there;
        False when they cannot be (a pipe, or another worker has appended since): the next line then starts
        on a new line."""
        if not self._rotates or written == 0:
            return written == 0
        try:
            end = os.lseek(self._fd, 0, os.SEEK_CUR)      # just past the fragment (O_APPEND wrote at the end)
            if os.fstat(self._fd).st_size != end:
                return False
            os.ftruncate(self._fd, end - written)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Close the file and the lock file; closing again closes nothing (their numbers may be reused)."""
        fd, lock_fd = self._fd, self._lock_fd
        self._fd = self._lock_fd = -1
        try:
            if fd >= 0:
                os.close(fd)
        finally:
            if lock_fd >= 0:
                os.close(lock_fd)

    def _follow(self) -> None:
        """Reopen the path when the open file is no longer the one there (another worker rotated it, an
        operator moved or deleted it)."""
        if not self._is_open_file(_stat(self.path)):
            self._open()

    def _try_rotate(self, adding: int) -> None:
        """Rotate; when that fails, say so once and go on appending past `max_bytes` (losing no line), trying
        again `ROTATE_RETRY_S` later."""
        try:
            self._rotate(adding)
        except OSError as exc:
            self._rotate_at_s = time.monotonic() + ROTATE_RETRY_S
            if not self._rotation_failing:
                self._rotation_failing = True
                log.warning("ledger %s: cannot rotate (%s); it grows past max_bytes, and rotating is tried "
                            "again every %g s", self.path, exc, ROTATE_RETRY_S)
            return
        if self._rotation_failing:
            self._rotation_failing = False
            log.warning("ledger %s: rotating again", self.path)

    def _rotate(self, adding: int) -> None:
        """Shift the files under the lock, unless another process already has; then write to the new file."""
        if self._lock_fd < 0:
            self._lock_fd = os.open(self.path.with_name(f".{self.path.name}.lock"),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            current = _stat(self.path)        # looked at again under the lock: another worker may have rotated
            if self._is_open_file(current) and current.st_size and current.st_size + adding > self.max_bytes:
                for index in range(self.backups - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(f"{self.path}.{index}", f"{self.path}.{index + 1}")
                os.replace(self.path, f"{self.path}.1")
            self._open()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open(self) -> None:
        fd = os.open(self.path, OPEN_FLAGS, 0o644)
        opened = os.fstat(fd)
        old, self._fd = self._fd, fd
        self._identity = (opened.st_dev, opened.st_ino)
        self._rotates = stat.S_ISREG(opened.st_mode)     # /dev/stdout and the like are written, never rotated
        if old >= 0:
            os.close(old)

    def _is_open_file(self, found: os.stat_result | None) -> bool:
        return found is not None and (found.st_dev, found.st_ino) == self._identity


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


class Ledger:
    """Appends records to `path` (rotated at `max_bytes`, keeping `backups` old files).

    Opening raises OSError when the file cannot be created; after that, nothing raises: a line that is lost
    (a failed write, a full queue, a write after closing) is counted in `write_errors` and said once an episode.
    """

    def __init__(self, config: LedgerConfig) -> None:
        path = Path(config.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:         # a part of the path is a file: say that, not "File exists"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename) from exc
        self.path = path
        self._file = LedgerFile(path, config.max_bytes, config.backups)
        self._failed = 0                       # lines whose write failed; counted by the writer thread only
        self._dropped = 0                      # lines never queued (queue full, closed); counted by write()
        self._failed_before_outage: int | None = None   # _failed when the current outage began
        self._dropped_before: int | None = None         # _dropped when the current dropping began
        self._closed = False
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()   # bounded by write(): put is cheap
        self._writer = threading.Thread(target=self._drain, name="ledger-writer", daemon=True)
        self._writer.start()

    @property
    def write_errors(self) -> int:
        """Lines lost: failed writes (disk full, file unreachable) and lines dropped before the disk."""
        return self._failed + self._dropped

    def write(self, record: dict) -> None:
        """Queue one record for the writer thread; when the queue is full or the ledger closed, count it lost."""
        if self._closed or self._queue.qsize() >= QUEUE_LINES:
            self._drop()
            return
        try:
            line = orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:      # a value JSON cannot hold (text that is no UTF-8): this line alone
            self._dropped += 1
            log.exception("ledger %s: a line could not be written as JSON, and is counted lost", self.path)
            return
        self._queue.put(line)
        if self._dropped_before is not None and self._queue.qsize() < QUEUE_LINES // 2:
            log.warning("ledger %s: the disk caught up, %d lines were dropped", self.path,
                        self._dropped - self._dropped_before)
            self._dropped_before = None

    def close(self) -> None:
        """Write what is queued within `CLOSE_TIMEOUT_S` and close the file; what a hung disk left is counted."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._writer.join(CLOSE_TIMEOUT_S)
        if self._writer.is_alive():            # stuck in a write: it closes the file if that write ever returns
            unwritten = self._take_queued()
            self._dropped += unwritten
            self._queue.put(None)
            log.warning("ledger %s: the disk took too long (over %g s), %d queued lines are not written",
                        self.path, CLOSE_TIMEOUT_S, unwritten)

    def _drop(self) -> None:
        """Count a line that was never queued; the first of an episode says why."""
        self._dropped += 1
        if self._dropped_before is not None:
            return
        self._dropped_before = self._dropped - 1
        if self._closed:
            log.warning("ledger %s: lines written after closing are lost, and counted", self.path)
        else:
            log.warning("ledger %s: %d lines are waiting for the disk; new lines are dropped, and counted, "
                        "until it catches up", self.path, QUEUE_LINES)

    def _take_queued(self) -> int:
        """Empty the queue; how many lines it held."""
        taken = 0
        with contextlib.suppress(queue.Empty):
            while True:
                taken += self._queue.get_nowait() is not None
        return taken

    def _drain(self) -> None:
        """The writer thread: write queued lines until told to stop, then close the file (it owns it)."""
        while (line := self._queue.get()) is not None:
            self._append(line)
        try:
            self._file.close()
        except OSError as exc:
            log.warning("ledger %s: closing it failed: %s", self.path, exc)

    def _append(self, line: bytes) -> None:
        try:
            self._file.append(line)
        except OSError as exc:
            self._failed += 1
            if self._failed_before_outage is None:
                self._failed_before_outage = self._failed - 1
                log.warning("ledger %s: cannot write (%s); lines are lost, and counted, until it can",
                            self.path, exc.strerror or exc)
            return
        if self._failed_before_outage is not None:
            log.warning("ledger %s: writing again, %d lines were lost", self.path,
                        self._failed - self._failed_before_outage)
            self._failed_before_outage = None
