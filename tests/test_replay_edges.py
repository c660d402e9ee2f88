"""`gateway replay` at its edges: timestamps in seconds, odd token counts, bad flags, whole answers' TTFT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.replay import read_traffic
from gateway.replay.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "gateway" / "data" / "demo.yaml"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def _replay_json(tmp_path: Path, traffic: Path, *flags: str) -> dict:
    """Run `gateway replay` on the demo policy as a user would; the JSON report."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "gateway", "replay", "--policy", str(DEMO), "--traffic",
                           str(traffic), "--json", str(report), "--out", str(tmp_path / "report.md"), *flags],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(report.read_text())


def one_row_csv(tmp_path: Path) -> Path:
    """An Azure CSV trace of one well-formed request, for the tests of command-line flags."""
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "2023-11-16 18:15:46,10,5\n")
    return path


def test_azure_csv_timestamps_in_seconds_are_replayed(tmp_path):
    """A CSV whose TIMESTAMP column holds seconds (epoch or relative) replays, as the README promises."""
    path = tmp_path / "seconds.csv"
    path.write_text(HEADER + "1700000000.5,10,5\n1700000002,20,6\n1700000001.25,30,7\n")
    assert [(r.arrival_s, r.input_tokens) for r in read_traffic(path)] == [(0.0, 10), (0.75, 30), (1.5, 20)]
    relative = tmp_path / "relative.csv"
    relative.write_text(HEADER + "0,10,5\n0.5,20,6\n")
    assert _replay_json(tmp_path, relative)["policies"]["new"]["requests"] == 2


@pytest.mark.parametrize("timestamp", ["nan", "inf", "1e999"])
def test_non_finite_csv_seconds_name_the_line(tmp_path, capsys, timestamp):
    """A CSV TIMESTAMP of NaN or infinite seconds is an error naming the file and line, exit 1."""
    path = tmp_path / "t.csv"
    path.write_text(HEADER + f"0,10,5\n{timestamp},10,5\n")
    assert main(["--policy", str(DEMO), "--traffic", str(path)]) == 1
    assert f"{path}:3: TIMESTAMP: expected a finite number of seconds" in capsys.readouterr().err


@pytest.mark.parametrize("tokens", ["1\u00b2", "\u2460"])
def test_token_counts_with_non_decimal_digits_are_a_traffic_error(tmp_path, capsys, tokens):
    """A token count written with superscript or circled digits is an error naming the line, not a traceback."""
    path = tmp_path / "t.csv"
    path.write_text(HEADER + f"2023-11-16 18:15:46,{tokens},5\n", encoding="utf-8")
    assert main(["--policy", str(DEMO), "--traffic", str(path)]) == 1
    assert f"{path}:2: ContextTokens: expected a non-negative whole number" in capsys.readouterr().err


@pytest.mark.parametrize("watts", ["nan", "inf", "0", "-5"])
def test_power_w_must_be_a_finite_number_of_watts_above_zero(tmp_path, capsys, watts):
    """--power-w small=nan (or inf) is a usage error, exit 2, not a report of `nan` joules; so is 0 or less: no GPU
    serves on no power."""
    path = one_row_csv(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(["--policy", str(DEMO), "--traffic", str(path), "--power-w", f"small={watts}"])
    assert caught.value.code == 2
    assert "finite WATTS > 0" in capsys.readouterr().err


def test_whole_answers_have_no_ttft_in_the_report(tmp_path):
    """Non-streamed answers have no TTFT, as live (the ledger's ttft_s is null): the report's TTFT percentiles
    are the streams' alone, and n/a when no answer streamed."""
    whole_only = tmp_path / "whole.jsonl"
    whole_only.write_text("".join(json.dumps({"timestamp": t, "input_tokens": 50, "output_tokens": 400,
                                              "stream": False}) + "\n" for t in range(5)))
    summary = _replay_json(tmp_path, whole_only)["policies"]["new"]
    assert summary["served"] == 5 and summary["latency"] is not None
    assert summary["ttft"] is None
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"timestamp": t, "input_tokens": 50, "output_tokens": 400,
                                         "stream": t == 0}) + "\n" for t in range(5)))
    summary = _replay_json(tmp_path, mixed, "--seed", "3")["policies"]["new"]
    ttft = summary["ttft"]
    assert ttft["p50_ms"] == ttft["p99_ms"] < summary["latency"]["p50_ms"] / 10     # the one stream's TTFT


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_limit_below_one_is_a_usage_error(tmp_path, capsys, limit):
    """--limit 0 (or less) is a usage error, exit 2, not a claim that the traffic file is empty."""
    path = one_row_csv(tmp_path)
    assert main(["--policy", str(DEMO), "--traffic", str(path), "--limit", limit]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err


def test_power_w_for_a_model_no_policy_has_is_a_usage_error(tmp_path, capsys):
    """--power-w naming a model in neither policy (a typo) exits 2 naming it, instead of a report whose energy is
    silently n/a."""
    path = one_row_csv(tmp_path)
    out = tmp_path / "r.md"
    assert main(["--policy", str(DEMO), "--traffic", str(path), "--power-w", "smal=300", "--out", str(out)]) == 2
    assert "--power-w names unknown models: smal" in capsys.readouterr().err
    assert not out.exists()
