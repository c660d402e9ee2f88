"""The request ledger: one compact JSON line per request, in a rotating file, never prompt text.

Writes go through a queue to a listener thread, so disk I/O never runs on the
event loop. The ledger feeds the what-if replay and offline reports.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
from pathlib import Path

import orjson

from gateway.policy.model import Ledger as LedgerConfig


class Ledger:
    """Appends records to `path` (rotated at `max_bytes`, keeping `backups` old files)."""

    def __init__(self, config: LedgerConfig) -> None:
        path = Path(config.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = logging.handlers.RotatingFileHandler(path, maxBytes=config.max_bytes,
                                                          backupCount=config.backups, encoding="utf-8")
        self._file.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, self._file)
        self._logger = logging.Logger(f"gateway.ledger.{path}")
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._logger.propagate = False
        self._listener.start()

    def write(self, record: dict) -> None:
        """Queue one record; the listener thread writes it."""
        self._logger.info(orjson.dumps(record, default=str).decode())

    def close(self) -> None:
        """Write what is queued and close the file."""
        self._listener.stop()
        self._file.close()
