"""`gateway replay` traffic files: ledger detection, odd timestamps, encodings, --limit and empty files."""

from __future__ import annotations

import gzip
import json
import time
import tracemalloc
from pathlib import Path

import pytest

from gateway.replay import TrafficError, read_traffic
from gateway.replay.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "gateway" / "data" / "demo.yaml"
HEADER_CSV = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n" \
        "2023-11-16 18:15:50.9951690,396,109\n"


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def new_york_time(monkeypatch):
    """The process's local time zone set to New York for one test."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_ledger_starting_with_an_outcome_line_is_read_as_a_ledger(tmp_path):
    """A ledger whose first line is an outcome line (no `ts`, as the gateway writes them) is detected as a ledger."""
    outcome = {"type": "outcome", "task_id": "t1", "request_id": None, "outcome": "success",
               "route": "chat-default", "tenant": "acme", "workflow": "-", "cost_usd": "0.0001"}
    path = _jsonl(tmp_path / "ledger.jsonl", [
        outcome, {"ts": 100.0, "alias": "auto", "input_tokens": 10, "output_tokens": 5},
        {"ts": 101.5, "alias": "smart", "input_tokens": 20, "output_tokens": 6}])
    assert [(r.arrival_s, r.alias, r.line) for r in read_traffic(path)] == [(0.0, "auto", 2), (1.5, "smart", 3)]


def test_a_ledger_of_outcome_lines_only_has_no_requests_to_replay(tmp_path):
    """A ledger holding only outcome lines is read as a ledger with nothing to replay, not as generic JSONL whose
    lines lack a timestamp."""
    path = _jsonl(tmp_path / "ledger.jsonl", [{"type": "outcome", "task_id": "t1", "outcome": "success"}])
    assert read_traffic(path) == []


@pytest.mark.parametrize("timestamp", ["NaN", "Infinity", "-Infinity", "1" + "0" * 400])
def test_non_finite_timestamp_names_file_and_line(tmp_path, timestamp):
    """A NaN, infinite or overflowing timestamp is a TrafficError naming the file and line, not a crash later."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 1, "input_tokens": 5, "output_tokens": 5}\n'
                    f'{{"timestamp": {timestamp}, "input_tokens": 5, "output_tokens": 5}}\n')
    with pytest.raises(TrafficError, match=f"^{path}:2: timestamp: expected a finite number"):
        read_traffic(path)


@pytest.mark.parametrize("later", ["1704067260000", "1e300"])
def test_trace_spanning_more_than_31_days_is_refused(tmp_path, capsys, later):
    """Arrivals spread beyond 31 days (seconds mixed with milliseconds, an absurd time) exit 1 with a hint."""
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": "2024-01-01T00:00:00Z", "input_tokens": 5, "output_tokens": 5}\n'
                    f'{{"timestamp": {later}, "input_tokens": 5, "output_tokens": 5}}\n')
    assert main(["--policy", str(DEMO), "--traffic", str(path), "--out", str(tmp_path / "r.md")]) == 1
    err = capsys.readouterr().err
    assert f"{path}: the arrivals span" in err and "seconds and milliseconds mixed" in err
    assert "Traceback" not in err


def test_a_trace_spanning_exactly_31_days_is_replayed(tmp_path):
    """Arrivals 31 days apart, the longest span a replay takes, are read, not refused as mixed units."""
    path = _jsonl(tmp_path / "t.jsonl", [{"timestamp": t, "input_tokens": 5, "output_tokens": 5}
                                         for t in (1_700_000_000, 1_700_000_000 + 31 * 86_400)])
    assert [r.arrival_s for r in read_traffic(path)] == [0.0, 31 * 86_400.0]


def test_non_utf8_traffic_is_a_traffic_error_with_file_and_line(tmp_path):
    """A Latin-1 CSV is a TrafficError naming the file and the line of the first bad byte."""
    path = tmp_path / "latin1.csv"
    path.write_bytes((AZURE + "2023-11-16 18:15:52.1,3\xe9,4\n").encode("latin-1"))
    with pytest.raises(TrafficError, match=f"^{path}:4: not UTF-8 text"):
        read_traffic(path)


def test_gzipped_and_bom_csv_are_read(tmp_path):
    """A gzipped trace (by its content, whatever its name) and a CSV with a UTF-8 byte order mark read as plain."""
    plain = tmp_path / "trace.csv"
    plain.write_text(AZURE)
    zipped = tmp_path / "trace.csv.gz"
    zipped.write_bytes(gzip.compress(AZURE.encode()))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(AZURE.replace("\n", "\r\n").encode("utf-8-sig"))
    expected = read_traffic(plain)
    assert len(expected) == 2
    assert read_traffic(zipped) == read_traffic(bom) == expected


def test_blank_lines_in_a_csv_are_skipped(tmp_path):
    """Blank lines between rows and at the end of an Azure CSV are skipped; the rows keep their line numbers."""
    path = tmp_path / "blank.csv"
    path.write_text(AZURE.replace("\n2023", "\n\n2023") + "\n\n")
    assert [(r.input_tokens, r.line) for r in read_traffic(path)] == [(374, 3), (396, 5)]


def test_broken_gzip_is_a_traffic_error(tmp_path):
    """A truncated gzip file is a TrafficError naming the file, not a traceback."""
    path = tmp_path / "trace.csv.gz"
    path.write_bytes(gzip.compress((AZURE * 200).encode())[:60])
    with pytest.raises(TrafficError, match=f"^{path}: cannot read the traffic file"):
        read_traffic(path)


def test_times_without_a_zone_are_utc_whatever_the_host_zone(tmp_path, new_york_time):
    """An ISO time without a zone is UTC, so it sorts beside `Z` times the same way on every host."""
    path = _jsonl(tmp_path / "t.jsonl", [
        {"timestamp": "2024-01-01T00:00:20+00:00", "input_tokens": 3, "output_tokens": 3},
        {"timestamp": "2024-01-01T00:00:00", "input_tokens": 1, "output_tokens": 1},
        {"timestamp": "2024-01-01T00:00:10Z", "input_tokens": 2, "output_tokens": 2}])
    assert [(r.arrival_s, r.input_tokens) for r in read_traffic(path)] == [(0.0, 1), (10.0, 2), (20.0, 3)]


def test_limit_takes_the_first_requests_by_arrival(tmp_path):
    """--limit N keeps the N earliest arrivals of an unsorted file, not its first N lines."""
    path = _jsonl(tmp_path / "t.jsonl", [{"timestamp": t, "input_tokens": 1, "output_tokens": 1}
                                         for t in (3600, 0, 1800, 1, 2)])
    assert [(r.arrival_s, r.line) for r in read_traffic(path, limit=3)] == [(0.0, 2), (1.0, 4), (2.0, 5)]


@pytest.mark.parametrize(("name", "text"), [("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
                                            ("header.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"),
                                            ("empty.csv", "")])
def test_empty_traffic_exits_1_with_a_message(tmp_path, capsys, name, text):
    """An empty or header-only traffic file exits 1 saying so, instead of writing an empty report."""
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "r.md"
    assert main(["--policy", str(DEMO), "--traffic", str(path), "--out", str(out)]) == 1
    assert "the file is empty" in capsys.readouterr().err
    assert not out.exists()


def test_limit_keeps_ties_in_file_order(tmp_path):
    """--limit keeps the N earliest by (arrival, line): equal arrivals keep file order, across the cut too."""
    path = _jsonl(tmp_path / "t.jsonl", [{"timestamp": t, "input_tokens": i, "output_tokens": 1}
                                         for i, t in enumerate((5, 1, 5, 1, 5, 0, 5))])
    assert [r.input_tokens for r in read_traffic(path, limit=4)] == [5, 1, 3, 0]
    assert [r.input_tokens for r in read_traffic(path)] == [5, 1, 3, 0, 2, 4, 6]


def test_limit_holds_only_the_rows_it_keeps(tmp_path):
    """--limit 10 on a 100,000-row trace holds about ten rows while reading, not every row (traced peak under
    2 MB; every row held took over 30 MB)."""
    path = tmp_path / "big.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" +
                    "".join(f"{(i * 7919) % 100_000 / 10:.1f},{i % 4000},{i % 500}\n" for i in range(100_000)))
    tracemalloc.start()
    try:
        requests = read_traffic(path, limit=10)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.arrival_s for r in requests] == pytest.approx([i / 10 for i in range(10)])
    assert peak_bytes < 2_000_000


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bigfield.csv", HEADER_CSV + '0,"' + "1" * 200_000 + '",5\n', ":2: not valid CSV: field larger than field limit"),
    ("deep.jsonl", '{"timestamp": 0, "input_tokens": 1, "output_tokens": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
     ":2: not valid JSON: nested too deeply")])
def test_unreadable_lines_are_one_traffic_error_line(tmp_path, capsys, name, content, message):
    """A CSV field past the csv module's limit and JSON nested 100,000 deep exit 1 with one line naming the file
    and line, not a traceback."""
    path = tmp_path / name
    path.write_text(content)
    assert main(["--policy", str(DEMO), "--traffic", str(path), "--out", str(tmp_path / "r.md")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gateway replay: {path}{message}")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_csv_with_cr_only_line_ends_is_read(tmp_path):
    """A CSV whose lines end in CR alone (old Mac, some exports) reads as its LF twin, line numbers included."""
    lf = tmp_path / "lf.csv"
    lf.write_text(AZURE + "2023-11-16 18:15:52.1,3,4\n")
    cr = tmp_path / "cr.csv"
    cr.write_bytes(lf.read_bytes().replace(b"\n", b"\r"))
    assert read_traffic(cr) == read_traffic(lf)
    assert [r.line for r in read_traffic(cr)] == [2, 3, 4]
    bad = tmp_path / "bad.csv"
    bad.write_bytes((AZURE + "2023-11-16 18:15:52.1,x,4\n").replace("\n", "\r").encode())
    with pytest.raises(TrafficError, match=f"^{bad}:4: ContextTokens"):
        read_traffic(bad)
