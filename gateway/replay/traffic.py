"""Traffic to replay: the Azure trace CSV, the gateway's ledger JSONL, or a generic JSONL.

`read_traffic` gives `ReplayRequest`s with the arrival time as seconds after
the first request, sorted by arrival (equal times keep file order); with a
limit it keeps only the earliest rows while reading. A line that cannot be
read is a TrafficError naming the file and the line. Files are UTF-8 (a
leading byte order mark is dropped), plain or gzipped; a CSV's lines may end in
LF, CRLF or CR alone.
"""

from __future__ import annotations

import csv
import gzip
import heapq
import io
import statistics
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from gateway.replay.fields import (
    DEFAULT_ALIAS, TrafficError, count, endpoint, features, flag, json_object, seconds, text,
)

FORMATS = ("auto", "azure", "ledger", "jsonl")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
GZIP_MAGIC = b"\x1f\x8b"
#: the longest trace replayed: beyond it, timestamps are mixed (seconds and milliseconds) or wrong
MAX_SPAN_S = 31 * 86_400.0
#: the most seconds a timestamp may count (about the year 5138 after 1970): beyond it, it counts milliseconds
MAX_SECONDS = 1e11



class Row(NamedTuple):
    """One request as read, compact until the first arrival is known: a ReplayRequest's fields, the arrival
    still in epoch seconds; rows order by (arrival, line)."""

    arrival_s: float
    line: int
    input_tokens: int
    output_tokens: int
    alias: str = DEFAULT_ALIAS
    endpoint: str = "chat"
    tenant: str | None = None
    recorded_route: str | None = None
    stream: bool = True
    recorded_answer: str = "call"
    cached_input_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    status: int | None = None       # the status the trace's gateway answered (a ledger's; None: answered)
    uses: tuple[str, ...] = ()      # what it used beyond text (a ledger's): images, audio, files, tools
    cache_write_input_tokens: int = 0   # of input_tokens, written to the provider's prompt cache (a ledger's)
    context_tokens: int | None = None   # of input_tokens, what each model's context must hold (a ledger's)
    continues_on: str | None = None     # the model whose stored response it continued (a ledger's)

    @property
    def failed_live(self) -> bool:
        """Its call failed in the trace (a 5xx): it wrote nothing the trace knows (one whose client left keeps
        what it was sent)."""
        return self.recorded_answer == "call" and self.status is not None and self.status >= 500 \
            and not self.output_tokens

    @property
    def whole(self) -> bool:
        """Answered whole in the trace (a 2xx: not failed, not a client that left mid-way)."""
        return self.status is None or 200 <= self.status < 300


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
    cached_input_tokens: int = 0        # of input_tokens, served from the provider's prompt cache (a ledger's)
    audio_input_tokens: int = 0         # of input_tokens, audio (a ledger's: priced at the audio input price)
    audio_output_tokens: int = 0        # of output_tokens, audio (a ledger's)
    output_estimated: bool = False      # its call failed in the trace: output_tokens is its route's median output
    uses: tuple[str, ...] = ()          # what it used beyond text (a ledger's `uses`): the models it may go to
    cache_write_input_tokens: int = 0   # of input_tokens, written to the provider's prompt cache (a ledger's)
    #: of input_tokens, what each model's context window must hold, when less (a ledger's: a completions batch's
    #: longest prompt; none of a Responses API request with `truncation: auto`); None: all of them
    context_tokens: int | None = None
    #: the model whose stored response it continued (`previous_response_id`, a ledger's `continues`): only that
    #: model has it, as live
    continues_on: str | None = None

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
        rows = earliest(READERS[fmt](path), limit)
    except (OSError, EOFError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise TrafficError(f"{path}: cannot read the traffic file: {reason}") from exc
    if not rows:
        return []
    _check_span(path, rows)
    start_s = rows[0].arrival_s
    medians = _median_outputs(rows)
    requests: list[Any] = rows
    for index, row in enumerate(rows):     # in place: each row is dropped as its request is made
        output_tokens = row.output_tokens if not row.failed_live else \
            medians.get(row.recorded_route, medians.get(None, 0))
        requests[index] = ReplayRequest(row.arrival_s - start_s, row.input_tokens, output_tokens, row.alias,
                                        row.endpoint, row.tenant, row.recorded_route, row.line, row.stream,
                                        row.recorded_answer, row.cached_input_tokens, row.audio_input_tokens,
                                        row.audio_output_tokens, row.failed_live, row.uses,
                                        row.cache_write_input_tokens, row.context_tokens, row.continues_on)
    return requests


def _median_outputs(rows: list[Row]) -> dict[str | None, int]:
    """The median output of the calls answered whole (not failed, not cut, not refused, not cache hits), by
    recorded route, and of all of them (under None): what a call that failed in the trace is replayed as writing,
    the same whatever the replayed policy, so replays of one traffic still compare."""
    by_route: dict[str | None, list[int]] = {None: []}
    for row in rows:
        if row.recorded_answer == "call" and row.whole:
            by_route.setdefault(row.recorded_route, []).append(row.output_tokens)
            by_route[None].append(row.output_tokens)
    return {route: int(statistics.median(outputs)) for route, outputs in by_route.items() if outputs}


def earliest(rows: Iterable[Row], limit: int | None) -> list[Row]:
    """The `limit` earliest rows (all without a limit) by (arrival, line), sorted so; with a limit only that
    many are held while reading: a heap whose top is the latest kept."""
    if limit is None:
        return sorted(rows)
    kept: list[tuple[float, int, Row]] = []        # (-arrival, -line, row): a max-heap by (arrival, line)
    for row in rows:
        entry = (-row.arrival_s, -row.line, row)
        if len(kept) < limit:
            heapq.heappush(kept, entry)
        elif entry > kept[0]:                       # earlier than the latest kept: it takes that one's place
            heapq.heapreplace(kept, entry)
    return sorted(row for _, _, row in kept)


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
    for number, line in _lines(path, newline="\n"):
        if line.strip():
            record = json_object(path, number, line)
            if record.get("type") != "outcome":
                return "ledger" if "ts" in record else "jsonl"
            saw_outcome = True
    return "ledger" if saw_outcome else "jsonl"


def _check_span(path: Path, rows: list[Row]) -> None:
    """Refuse arrivals spread over more than MAX_SPAN_S (rows sorted by arrival)."""
    (first_s, first_line), (last_s, last_line) = rows[0][:2], rows[-1][:2]
    if last_s - first_s > MAX_SPAN_S:
        raise TrafficError(
            f"{path}: the arrivals span {(last_s - first_s) / 86_400:.3g} days (line {first_line} to line "
            f"{last_line}), more than the {MAX_SPAN_S / 86_400:g} days a replay takes: are seconds and "
            f"milliseconds mixed, or is a timestamp wrong?")
    if max(abs(first_s), abs(last_s)) >= MAX_SECONDS:
        line, value = (first_line, first_s) if abs(first_s) >= MAX_SECONDS else (last_line, last_s)
        raise TrafficError(
            f"{path}:{line}: the timestamp {value:.0f} is more than 3,000 years of seconds: are the timestamps "
            f"milliseconds? They must be seconds (or ISO 8601 times)")


def _azure_rows(path: Path) -> Iterator[Row]:
    """Rows of the Azure LLM inference trace: TIMESTAMP (ISO 8601 or seconds), ContextTokens, GeneratedTokens."""
    reader = csv.reader(line for _, line in _lines(path, newline=""))
    try:
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
            yield Row(seconds(path, line, "TIMESTAMP", row[0]), line,
                      count(path, line, "ContextTokens", row[1]), count(path, line, "GeneratedTokens", row[2]))
    except csv.Error as exc:
        raise TrafficError(f"{path}:{reader.line_num}: not valid CSV: {exc}") from exc


def _ledger_rows(path: Path) -> Iterator[Row]:
    """Request records of the gateway's ledger; outcome lines are skipped."""
    for line, record in _json_lines(path):
        if record.get("type") == "outcome":
            continue
        prompt = record.get("input_tokens") or record.get("prompt_tokens")
        input_tokens = count(path, line, "input_tokens", prompt if prompt is not None else 0)
        output_tokens = count(path, line, "output_tokens", record.get("output_tokens", 0))
        yield Row(seconds(path, line, "ts", record.get("ts")), line,
                  input_tokens,
                  output_tokens,
                  _name(text(path, line, "alias", record.get("alias"))) or DEFAULT_ALIAS,
                  _name(endpoint(path, line, record.get("endpoint"))),
                  _name(text(path, line, "tenant", record.get("tenant"))),
                  _name(text(path, line, "route", record.get("route"))),
                  flag(path, line, "stream", record.get("stream")), _recorded_answer(record),
                  min(input_tokens, _answered(path, line, record, "cached_input_tokens")),
                  min(input_tokens, _answered(path, line, record, "audio_input_tokens")),
                  min(output_tokens, _answered(path, line, record, "audio_output_tokens")),
                  status if isinstance(status := record.get("status"), int) else None,
                  features(path, line, "uses", record.get("uses")),
                  min(input_tokens, _answered(path, line, record, "cache_write_input_tokens")),
                  _context_tokens(record, input_tokens),
                  _name(model) if record.get("continues") is True and isinstance(model := record.get("model"), str)
                  else None)


def _context_tokens(record: dict[str, Any], input_tokens: int) -> int | None:
    """Of a ledger line's input tokens, what each model's context window had to hold live, when less than all of
    them (`longest_prompt_tokens` below `prompt_tokens`, both the gateway's count: a completions batch's longest
    prompt, in proportion; 0 for a Responses API request with `truncation: auto`); None otherwise."""
    longest, prompt = record.get("longest_prompt_tokens"), record.get("prompt_tokens")
    if type(longest) is not int or type(prompt) is not int or not 0 <= longest < prompt:
        return None
    return input_tokens * longest // prompt


def _answered(path: Path, line: int, record: dict[str, Any], name: str) -> int:
    """A count of the answered (last) attempt that the account stage priced apart: its input tokens served from
    the provider's prompt cache (`cached_input_tokens`), its audio tokens in and out, its input written to that
    cache; 0 when the line has no attempts (or was written before it kept that count)."""
    attempts = record.get("attempts")
    if not isinstance(attempts, list) or not attempts or not isinstance(attempts[-1], dict):
        return 0
    return count(path, line, f"attempts[-1].{name}", attempts[-1].get(name) or 0)


def _recorded_answer(record: dict[str, Any]) -> str:
    """cache_hit: answered from the cache; refused: a 4xx before any model was called (refused before routing,
    or by the tenant's rate limit or budget after it: the line then names the first planned model, but no
    attempt); else call."""
    if record.get("cache") == "hit":
        return "cache_hit"
    status = record.get("status")
    if isinstance(status, int) and 400 <= status < 500 and (record.get("model") is None
                                                            or record.get("models_tried") == []):
        return "refused"
    return "call"


def _jsonl_rows(path: Path) -> Iterator[Row]:
    """Generic records: {timestamp, input_tokens, output_tokens, tenant?, route?, model?, endpoint?, stream?}."""
    for line, record in _json_lines(path):
        for key in ("timestamp", "input_tokens", "output_tokens"):
            if key not in record:
                raise TrafficError(f"{path}:{line}: missing key {key!r}")
        yield Row(seconds(path, line, "timestamp", record["timestamp"]), line,
                  count(path, line, "input_tokens", record["input_tokens"]),
                  count(path, line, "output_tokens", record["output_tokens"]),
                  _name(text(path, line, "model", record.get("model"))) or DEFAULT_ALIAS,
                  _name(endpoint(path, line, record.get("endpoint"))),
                  _name(text(path, line, "tenant", record.get("tenant"))),
                  _name(text(path, line, "route", record.get("route"))),
                  flag(path, line, "stream", record.get("stream")))


def _name(value: str | None) -> str | None:
    """An alias, tenant or route name, interned: a trace repeats a few names on every line."""
    return sys.intern(value) if value is not None else None


READERS: dict[str, Callable[[Path], Iterator[Row]]] = {"azure": _azure_rows, "ledger": _ledger_rows,
                                                       "jsonl": _jsonl_rows}


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line."""
    for number, line in _lines(path, newline="\n"):
        if line.strip():
            yield number, json_object(path, number, line)


def _lines(path: Path, newline: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, gunzipped when gzipped; a leading byte order mark is dropped.
    `newline` as open() takes it: "" ends lines at LF, CRLF or CR and leaves the ends to the csv module,
    "\n" ends them at LF alone (JSON lines)."""
    with io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", errors="surrogateescape",
                          newline=newline) as stream:
        for number, line in enumerate(stream, 1):
            if not line.isascii():
                _check_utf8(path, number, line)
            yield number, line


def _check_utf8(path: Path, number: int, line: str) -> None:
    """A TrafficError naming the first byte of the line that is not UTF-8 (read as a lone surrogate)."""
    raw = line.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrafficError(f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line is "
                           f"{raw[exc.start:exc.start + 1]!r}); save the file as UTF-8") from exc


def _open_bytes(path: Path) -> BinaryIO:
    """The file as bytes, gunzipped when it starts with the gzip magic number."""
    with path.open("rb") as stream:
        gzipped = stream.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else path.open("rb")
