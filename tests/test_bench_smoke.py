"""Smoke test of the benchmark harness: `python -m bench` runs end to end with tiny durations."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.options import SECTIONS
from bench.sections import expected_keys

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("wrk", "nginx", "redis-server")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
TABLE_COLUMNS = 8


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of the results table (header and separator left out)."""
    lines = markdown.split("## Results", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in lines[2:]]


@pytest.mark.skipif(bool(MISSING), reason=f"the bench needs {', '.join(MISSING)} (apt-get install -y nginx wrk "
                                          "redis-server)")
def test_bench_writes_a_complete_results_table(tmp_path: Path) -> None:
    """With 1 s runs the bench starts every process, runs every section and writes a table with every row."""
    argv = [sys.executable, "-m", "bench", "--duration", "1", "--runs", "1", "--streams", "20",
            "--stream-requests", "6", "--replay-seconds", "1", "--out", str(tmp_path), "--no-dated-copy"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = (tmp_path / "latest.md").read_text()
    rows = table_rows(markdown)
    assert all(len(cells) == TABLE_COLUMNS for cells in rows), [c for c in rows if len(c) != TABLE_COLUMNS]
    figures = [cells for cells in rows if cells[0]]             # section headings have an empty id
    assert [cells[0].strip("`") for cells in figures] == expected_keys(SECTIONS)
    assert all(cells[2] for cells in figures), "every figure has a value (or n/a)"
    assert "## Summary" in markdown and "machine:" in markdown


@pytest.mark.skipif("nginx" in MISSING, reason="bench.client_call needs nginx (apt-get install -y nginx)")
def test_client_call_bench_prints_one_row_per_contender() -> None:
    """`python -m bench.client_call` with a few calls prints the bare call, the parsed URL and the gateway's
    transport, each with its µs and its ratio to the bare call (1.00× for the bare call itself)."""
    argv = [sys.executable, "-m", "bench.client_call", "--calls", "20", "--rounds", "1"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d.]+)× \|$", done.stdout, flags=re.M)
    assert [name.strip() for name, _, _ in rows] == ["bare", "bare, URL parsed once", "gateway transport"]
    assert rows[0][2] == "1.00" and all(float(us) > 0 for _, us, _ in rows)
