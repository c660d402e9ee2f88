"""Traffic to replay: the Azure trace CSV, the gateway's ledger JSONL, or a generic JSONL.

Every reader yields `ReplayRequest`s with the arrival time as seconds after the
first request, sorted by arrival (stable, so equal times keep file order). A
line that cannot be read is a TrafficError naming the file and the line. Files
are UTF-8 (a leading byte order mark is dropped), plain or gzipped.
"""

from __future__ import annotations

import csv
import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO

from gateway.replay.fields import (
    DEFAULT_ALIAS, TrafficError, count, endpoint, flag, json_object, seconds, text,
)

FORMATS = ("auto", "azure", "ledger", "jsonl")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
GZIP_MAGIC = b"\x1f\x8b"
#: the longest trace replayed: beyond it, timestamps are mixed (seconds and milliseconds) or wrong
MAX_SPAN_S = 31 * 86_400.0

Row = tuple[int, float, dict[str, Any]]         # (line, arrival epoch seconds, ReplayRequest fields)


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
    stream: bool = True
    recorded_answer: str = "call"       # how the traffic's own gateway answered: call | cache_hit | refused

    @property
    def streamed(self) -> bool:
        """Whether the answer comes as a stream: embeddings never do."""
        return self.stream and self.endpoint != "embeddings"


def read_traffic(path: str | Path, fmt: str = "auto", limit: int | None = None) -> list[ReplayRequest]:
    """The first `limit` requests of a traffic file by arrival, arrivals relative to the first."""
    path = Path(path)
    if fmt not in FORMATS:
        raise TrafficError(f"unknown traffic format {fmt!r}; expected one of {', '.join(FORMATS)}")
    try:
        fmt = detect_format(path) if fmt == "auto" else fmt
        rows = list(READERS[fmt](path))
    except (OSError, EOFError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise TrafficError(f"{path}: cannot read the traffic file: {reason}") from exc
    rows.sort(key=itemgetter(1))
    rows = rows[:limit]
    if not rows:
        return []
    _check_span(path, rows)
    start_s = rows[0][1]
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
    """azure for .csv (or .csv.gz); for JSON lines, ledger when the first request line (outcome lines
    skipped) has `ts`, else jsonl."""
    if path.name.lower().removesuffix(".gz").endswith(".csv"):
        return "azure"
    saw_outcome = False
    for number, line in _lines(path):
        if line.strip():
            record = json_object(path, number, line)
            if record.get("type") != "outcome":
                return "ledger" if "ts" in record else "jsonl"
            saw_outcome = True
    return "ledger" if saw_outcome else "jsonl"


def _check_span(path: Path, rows: list[Row]) -> None:
    """Refuse arrivals spread over more than MAX_SPAN_S (rows sorted by arrival)."""
    (first_line, first_s, _), (last_line, last_s, _) = rows[0], rows[-1]
    if last_s - first_s > MAX_SPAN_S:
        raise TrafficError(
            f"{path}: the arrivals span {(last_s - first_s) / 86_400:.3g} days (line {first_line} to line "
            f"{last_line}), more than the {MAX_SPAN_S / 86_400:g} days a replay takes: are seconds and "
            f"milliseconds mixed, or is a timestamp wrong?")


def _azure_rows(path: Path) -> Iterator[Row]:
    """Rows of the Azure LLM inference trace: TIMESTAMP (ISO 8601 or seconds), ContextTokens, GeneratedTokens."""
    reader = csv.reader(line for _, line in _lines(path))
    header = next(reader, None)
    if header is None:
        raise TrafficError(f"{path}: the file is empty; expected the header {','.join(AZURE_COLUMNS)}")
    if tuple(h.strip() for h in header[:3]) != AZURE_COLUMNS:
        raise TrafficError(f"{path}:1: expected the header {','.join(AZURE_COLUMNS)}, got {header}")
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        if len(row) < 3:
            raise TrafficError(f"{path}:{line}: expected 3 columns, got {len(row)}")
        yield line, seconds(path, line, "TIMESTAMP", row[0]), {
            "input_tokens": count(path, line, "ContextTokens", row[1]),
            "output_tokens": count(path, line, "GeneratedTokens", row[2])}


def _ledger_rows(path: Path) -> Iterator[Row]:
    """Request records of the gateway's ledger; outcome lines are skipped."""
    for line, record in _json_lines(path):
        if record.get("type") == "outcome":
            continue
        prompt = record.get("input_tokens") or record.get("prompt_tokens")
        yield line, seconds(path, line, "ts", record.get("ts")), {
            "input_tokens": count(path, line, "input_tokens", prompt if prompt is not None else 0),
            "output_tokens": count(path, line, "output_tokens", record.get("output_tokens", 0)),
            "alias": text(path, line, "alias", record.get("alias")) or DEFAULT_ALIAS,
            "endpoint": endpoint(path, line, record.get("endpoint")),
            "tenant": text(path, line, "tenant", record.get("tenant")),
            "recorded_route": text(path, line, "route", record.get("route")),
            "stream": flag(path, line, "stream", record.get("stream")),
            "recorded_answer": _recorded_answer(record)}


def _recorded_answer(record: dict[str, Any]) -> str:
    """cache_hit: answered from the cache; refused: a 4xx before any model was chosen; else call."""
    if record.get("cache") == "hit":
        return "cache_hit"
    status = record.get("status")
    if isinstance(status, int) and 400 <= status < 500 and record.get("model") is None:
        return "refused"
    return "call"


def _jsonl_rows(path: Path) -> Iterator[Row]:
    """Generic records: {timestamp, input_tokens, output_tokens, tenant?, route?, model?, endpoint?, stream?}."""
    for line, record in _json_lines(path):
        for key in ("timestamp", "input_tokens", "output_tokens"):
            if key not in record:
                raise TrafficError(f"{path}:{line}: missing key {key!r}")
        yield line, seconds(path, line, "timestamp", record["timestamp"]), {
            "input_tokens": count(path, line, "input_tokens", record["input_tokens"]),
            "output_tokens": count(path, line, "output_tokens", record["output_tokens"]),
            "alias": text(path, line, "model", record.get("model")) or DEFAULT_ALIAS,
            "endpoint": endpoint(path, line, record.get("endpoint")),
            "tenant": text(path, line, "tenant", record.get("tenant")),
            "recorded_route": text(path, line, "route", record.get("route")),
            "stream": flag(path, line, "stream", record.get("stream"))}


READERS: dict[str, Callable[[Path], Iterator[Row]]] = {"azure": _azure_rows, "ledger": _ledger_rows,
                                                       "jsonl": _jsonl_rows}


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line."""
    for number, line in _lines(path):
        if line.strip():
            yield number, json_object(path, number, line)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, gunzipped when gzipped; a leading byte order mark is dropped."""
    with _open_bytes(path) as stream:
        for number, raw in enumerate(stream, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise TrafficError(f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line is "
                                   f"{raw[exc.start:exc.start + 1]!r}); save the file as UTF-8") from exc
            yield number, line


def _open_bytes(path: Path) -> BinaryIO:
    """The file as bytes, gunzipped when it starts with the gzip magic number."""
    with path.open("rb") as stream:
        gzipped = stream.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else path.open("rb")
