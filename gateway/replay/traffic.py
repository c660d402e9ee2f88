"""Traffic to replay: the Azure trace CSV, the gateway's ledger JSONL, or a generic JSONL.

Every reader yields `ReplayRequest`s with the arrival time as seconds after the
first request, sorted by arrival (stable, so equal times keep file order). A
line that cannot be read is a TrafficError naming the file and the line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

from gateway.errors import ClientError
from gateway.policy.model import ENDPOINTS

FORMATS = ("auto", "azure", "ledger", "jsonl")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
DEFAULT_ALIAS = "auto"


class TrafficError(ClientError):
    """A traffic file that cannot be read: names the file and line."""

    code = "invalid_traffic"


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """One request to replay: when it arrives and how many tokens it carries."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    alias: str = DEFAULT_ALIAS
    endpoint: str = "chat"
    tenant: str | None = None
    recorded_route: str | None = None   # the route the traffic's own gateway chose, when known
    line: int = 0


def read_traffic(path: str | Path, fmt: str = "auto", limit: int | None = None) -> list[ReplayRequest]:
    """The first `limit` requests of a traffic file, sorted by arrival, arrivals relative to the first."""
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers: dict[str, Callable[[Path], Iterator[tuple[int, float, dict[str, Any]]]]] = {
        "azure": _azure_rows, "ledger": _ledger_rows, "jsonl": _jsonl_rows}
    if fmt not in readers:
        raise TrafficError(f"unknown traffic format {fmt!r}; expected one of {', '.join(FORMATS)}")
    try:
        rows = list(islice(readers[fmt](path), limit))
    except OSError as exc:
        raise TrafficError(f"{path}: cannot read the traffic file: {exc.strerror or exc}") from exc
    if not rows:
        return []
    start_s = min(arrival for _, arrival, _ in rows)
    rows.sort(key=lambda row: row[1])
    return [ReplayRequest(arrival_s=arrival - start_s, line=line, **fields) for line, arrival, fields in rows]


def sped_up(requests: list[ReplayRequest], window_s: float, speed: float) -> Iterator[tuple[float, ReplayRequest]]:
    """(wall seconds from the start, request) for the requests of the first `window_s × speed` trace
    seconds, replayed `speed` times faster (requests sorted by arrival, as read_traffic gives them)."""
    for request in requests:
        at_s = request.arrival_s / speed
        if at_s > window_s:
            return
        yield at_s, request


def detect_format(path: Path) -> str:
    """azure for .csv; for JSON lines, ledger when the first record has `ts`, else jsonl."""
    if path.suffix.lower() == ".csv":
        return "azure"
    try:
        with path.open(encoding="utf-8") as stream:
            for number, text in enumerate(stream, 1):
                if text.strip():
                    return "ledger" if "ts" in _json_object(path, number, text) else "jsonl"
    except OSError as exc:
        raise TrafficError(f"{path}: cannot read the traffic file: {exc.strerror or exc}") from exc
    return "jsonl"


def _azure_rows(path: Path) -> Iterator[tuple[int, float, dict[str, Any]]]:
    """Rows of the Azure LLM inference trace: TIMESTAMP, ContextTokens, GeneratedTokens."""
    with path.open(encoding="utf-8", newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:3]) != AZURE_COLUMNS:
            raise TrafficError(f"{path}:1: expected the header {','.join(AZURE_COLUMNS)}, got {header}")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) < 3:
                raise TrafficError(f"{path}:{line}: expected 3 columns, got {len(row)}")
            try:
                arrival_s = datetime.fromisoformat(row[0].strip()).timestamp()
            except ValueError as exc:
                raise TrafficError(f"{path}:{line}: TIMESTAMP: not a date and time: {row[0]!r}") from exc
            yield line, arrival_s, {"input_tokens": _count(path, line, "ContextTokens", row[1]),
                                    "output_tokens": _count(path, line, "GeneratedTokens", row[2])}


def _ledger_rows(path: Path) -> Iterator[tuple[int, float, dict[str, Any]]]:
    """Request records of the gateway's ledger; outcome lines are skipped."""
    for line, record in _json_lines(path):
        if record.get("type") == "outcome":
            continue
        prompt = record.get("input_tokens") or record.get("prompt_tokens")
        yield line, _seconds(path, line, "ts", record.get("ts")), {
            "input_tokens": _count(path, line, "input_tokens", prompt if prompt is not None else 0),
            "output_tokens": _count(path, line, "output_tokens", record.get("output_tokens", 0)),
            "alias": _text(path, line, "alias", record.get("alias")) or DEFAULT_ALIAS,
            "endpoint": _endpoint(path, line, record.get("endpoint")),
            "tenant": _text(path, line, "tenant", record.get("tenant")),
            "recorded_route": _text(path, line, "route", record.get("route"))}


def _jsonl_rows(path: Path) -> Iterator[tuple[int, float, dict[str, Any]]]:
    """Generic records: {timestamp, input_tokens, output_tokens, tenant?, route?, model?, endpoint?}."""
    for line, record in _json_lines(path):
        for key in ("timestamp", "input_tokens", "output_tokens"):
            if key not in record:
                raise TrafficError(f"{path}:{line}: missing key {key!r}")
        yield line, _seconds(path, line, "timestamp", record["timestamp"]), {
            "input_tokens": _count(path, line, "input_tokens", record["input_tokens"]),
            "output_tokens": _count(path, line, "output_tokens", record["output_tokens"]),
            "alias": _text(path, line, "model", record.get("model")) or DEFAULT_ALIAS,
            "endpoint": _endpoint(path, line, record.get("endpoint")),
            "tenant": _text(path, line, "tenant", record.get("tenant")),
            "recorded_route": _text(path, line, "route", record.get("route"))}


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line."""
    with path.open(encoding="utf-8") as stream:
        for number, text in enumerate(stream, 1):
            if text.strip():
                yield number, _json_object(path, number, text)


def _json_object(path: Path, line: int, text: str) -> dict[str, Any]:
    """One line parsed as a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise TrafficError(f"{path}:{line}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise TrafficError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
    return value


def _count(path: Path, line: int, key: str, value: Any) -> int:
    """A non-negative whole token count (a digit string is accepted, as CSV gives)."""
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise TrafficError(f"{path}:{line}: {key}: expected a non-negative whole number, got {value!r}")


def _seconds(path: Path, line: int, key: str, value: Any) -> float:
    """A timestamp: seconds (any epoch) as a number, or an ISO 8601 date and time."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise TrafficError(f"{path}:{line}: {key}: not a number or ISO 8601 time: {value!r}") from exc
    raise TrafficError(f"{path}:{line}: {key}: expected seconds or an ISO 8601 time, got {value!r}")


def _text(path: Path, line: int, key: str, value: Any) -> str | None:
    """An optional string field."""
    if value is None or isinstance(value, str):
        return value
    raise TrafficError(f"{path}:{line}: {key}: expected a string, got {value!r}")


def _endpoint(path: Path, line: int, value: Any) -> str:
    """chat (the default), completions or embeddings."""
    if value is None:
        return "chat"
    if value in ENDPOINTS:
        return value
    raise TrafficError(f"{path}:{line}: endpoint: expected one of {', '.join(ENDPOINTS)}, got {value!r}")
