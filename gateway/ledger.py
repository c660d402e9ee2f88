"""The request ledger: one compact JSON line per request, in a rotating file, never prompt text.

Writes go through a queue to a writer thread, so disk I/O never runs on the
event loop. The ledger feeds the what-if replay and offline reports.

Several processes (`gateway run --workers N`) may share one path: each line is
one `write()` to a file opened with O_APPEND, so lines never interleave;
rotation happens under an flock on a hidden sibling file, and a writer whose
file was rotated, moved or deleted by someone else reopens the path.
A write that fails (disk full) loses that line and counts it in
`write_errors`; the outage and the recovery are each said once.
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

#: how often a writer checks that its open file is still the one at the path (another worker rotated
#: it, an operator moved or deleted it); a rotation by another worker is also noticed at the next line
FOLLOW_INTERVAL_S = 1.0
OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


class LedgerFile:
    """A JSON-lines file that processes share: appended to, rotated at `max_bytes` keeping `backups` files."""

    def __init__(self, path: Path, max_bytes: int, backups: int, follow_interval_s: float = FOLLOW_INTERVAL_S):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.follow_interval_s = follow_interval_s
        self._lock_fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._fd = -1
        self._torn = False                 # the last line was cut short: the next one starts on a new line
        self._open()

    def append(self, line: bytes) -> None:
        """Write one whole line with one write(), rotating first when it would take the file past `max_bytes`."""
        try:
            if time.monotonic() >= self._follow_at_s:
                self._follow()
            if self._rotates:
                size = os.lseek(self._fd, 0, os.SEEK_END)
                if size and size + len(line) > self.max_bytes:
                    self._rotate(len(line))
            if self._torn:
                line = b"\n" + line
            written = os.write(self._fd, line)
        except OSError:
            self._follow_at_s = 0.0            # look at the path again before the next line
            raise
        self._torn = written < len(line)
        if self._torn:
            raise OSError(f"only {written} of {len(line)} bytes written")

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        finally:
            os.close(self._lock_fd)

    def _follow(self) -> None:
        """Reopen the path when the open file is no longer the one there."""
        self._follow_at_s = time.monotonic() + self.follow_interval_s
        if not self._is_open_file(_stat(self.path)):
            self._open()

    def _rotate(self, adding: int) -> None:
        """Shift the files under the lock, unless another process already has; then write to the new file."""
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
        self._follow_at_s = time.monotonic() + self.follow_interval_s
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

    Opening raises OSError when the file cannot be created; after that, a disk error never raises:
    it is counted in `write_errors` and said once per outage.
    """

    def __init__(self, config: LedgerConfig) -> None:
        path = Path(config.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:         # a part of the path is a file: say that, not "File exists"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename) from exc
        self.path = path
        self.write_errors = 0                  # lines lost to failed writes (disk full, file unreachable)
        self._file = LedgerFile(path, config.max_bytes, config.backups)
        self._lost_before_outage: int | None = None    # write_errors when the current outage began
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._drain, name="ledger-writer", daemon=True)
        self._writer.start()

    def write(self, record: dict) -> None:
        """Queue one record; the writer thread writes it."""
        self._queue.put(orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE))

    def close(self) -> None:
        """Write what is queued and close the file."""
        self._queue.put(None)
        self._writer.join()
        try:
            self._file.close()
        except OSError as exc:
            log.warning("ledger %s: closing it failed: %s", self.path, exc)

    def _drain(self) -> None:
        while (line := self._queue.get()) is not None:
            self._append(line)

    def _append(self, line: bytes) -> None:
        try:
            self._file.append(line)
        except OSError as exc:
            self.write_errors += 1
            if self._lost_before_outage is None:
                self._lost_before_outage = self.write_errors - 1
                log.warning("ledger %s: cannot write (%s); lines are lost, and counted, until it can",
                            self.path, exc.strerror or exc)
            return
        if self._lost_before_outage is not None:
            log.warning("ledger %s: writing again, %d lines were lost", self.path,
                        self.write_errors - self._lost_before_outage)
            self._lost_before_outage = None
