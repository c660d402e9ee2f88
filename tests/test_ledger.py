"""The request ledger: shared by worker processes, rotated without losing lines, and calm on a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import urllib.request
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.errors import PolicyError
from gateway.ledger import Ledger
from gateway.policy.load import parse_policy
from gateway.policy.model import Ledger as LedgerConfig
from tests.support.harness import DEFAULT_POLICY, Harness

REPO_ROOT = Path(__file__).resolve().parent.parent

#: one process writing `lines` numbered records to a ledger, as one `gateway run` worker does
WRITER = """
import sys, time
from gateway.ledger import Ledger
from gateway.policy.model import Ledger as LedgerConfig
path, writer, lines, max_bytes, backups = sys.argv[1], sys.argv[2], *(int(arg) for arg in sys.argv[3:6])
ledger = Ledger(LedgerConfig(path=path, max_bytes=max_bytes, backups=backups))
time.sleep(max(0.0, float(sys.argv[6]) - time.time()))          # all writers at once, so their rotations overlap
for seq in range(lines):
    ledger.write({"writer": writer, "seq": seq, "pad": "x" * (40 + seq % 50)})
    time.sleep(0.0005)
ledger.close()
"""


def ledger_files(path: Path) -> list[Path]:
    """The ledger and its backups (not the hidden lock file)."""
    return sorted(path.parent.glob(path.name + "*"))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for file in ledger_files(path) for line in file.read_text().splitlines()]


def ledger(path: Path, max_bytes: int = 1 << 20, backups: int = 2) -> Ledger:
    return Ledger(LedgerConfig(path=str(path), max_bytes=max_bytes, backups=backups))


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# several processes, one path ------------------------------------------------------------------------

def test_workers_rotating_one_ledger_keep_each_ones_newest_lines_whole(tmp_path):
    """Four processes writing and rotating one ledger: every line is whole, each writer's kept lines run
    without a gap up to its last one, and each backup was rotated full (not a file another worker had
    just started), so what is kept is the newest `backups` files' worth."""
    path, writers, lines, max_bytes, backups = tmp_path / "ledger.jsonl", 4, 2000, 40_000, 3
    start = str(time.time() + 2)
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{index}", str(lines),
                                   str(max_bytes), str(backups), start], cwd=REPO_ROOT) for index in range(writers)]
    assert [process.wait(60) for process in processes] == [0] * writers
    kept = records(path)                       # json.loads fails on a torn or interleaved line
    for index in range(writers):
        seqs = sorted(record["seq"] for record in kept if record["writer"] == f"w{index}")
        assert seqs and seqs == list(range(seqs[0], lines)), f"w{index} lost lines inside what was kept"
    sizes = {file.name: file.stat().st_size for file in ledger_files(path)}
    assert len(sizes) == backups + 1, sizes
    longest_line = 200
    assert all(max_bytes - longest_line < size <= max_bytes + longest_line
               for name, size in sizes.items() if name != path.name), sizes


def test_a_deleted_ledger_is_created_again(tmp_path):
    """A ledger file deleted while the gateway runs comes back, and later lines land in it."""
    path = tmp_path / "ledger.jsonl"
    book = ledger(path)
    book.write({"seq": 0})
    wait_for(path.exists)
    wait_for(lambda: path.stat().st_size > 0)
    path.unlink()
    seq = 1
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:      # noticed within FOLLOW_INTERVAL_S
        book.write({"seq": seq})
        seq += 1
        time.sleep(0.05)
    book.write({"seq": seq})
    book.close()
    assert path.exists()
    assert records(path)[-1] == {"seq": seq}


def test_backups_zero_is_a_located_policy_problem():
    """`ledger.backups: 0` would leave nowhere to rotate to, so the policy names it at its line."""
    text = textwrap.dedent("""\
        version: 1
        models:
          small: {endpoint: "http://127.0.0.1:9101/v1"}
        routes: [{name: chat, candidates: [small]}]
        ledger: {path: /tmp/ledger.jsonl, backups: 0}
        """)
    with pytest.raises(PolicyError) as raised:
        parse_policy(text, source="p.yaml")
    [problem] = raised.value.problems
    assert (problem.line, problem.path, problem.message) == (5, "ledger.backups", "must be greater than 0, got 0")


# a disk that fills up -------------------------------------------------------------------------------

def test_a_full_disk_is_counted_and_said_once_then_recovery_once(tmp_path, caplog, capfd):
    """Lines to a full disk are counted in write_errors with one warning and no traceback; when the path
    is writable again, one more warning says how many were lost, and lines flow again."""
    path = tmp_path / "ledger.jsonl"
    path.symlink_to("/dev/full")
    book = ledger(path)
    with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
        for seq in range(3):
            book.write({"seq": seq})
        wait_for(lambda: book.write_errors == 3)
        path.unlink()                                # space is freed: the path is a plain file again
        book.write({"seq": 3})
        book.close()
    assert book.write_errors == 3
    assert [record.getMessage() for record in caplog.records] == [
        f"ledger {path}: cannot write (No space left on device); lines are lost, and counted, until it can",
        f"ledger {path}: writing again, 3 lines were lost"]
    assert records(path) == [{"seq": 3}]
    assert "Traceback" not in capfd.readouterr().err


def test_requests_succeed_on_a_full_disk_and_shutdown_finishes(capfd):
    """With the ledger on /dev/full, requests are answered, the lost lines are counted (and exported as
    gateway.ledger.write_errors), nothing is dumped to stderr, and shutting down closes everything after the
    ledger too."""
    environ = {**os.environ, "GATEWAY_PROMETHEUS": "1", "OTEL_METRIC_EXPORT_INTERVAL": "60000"}
    gateway = Harness(DEFAULT_POLICY + "ledger: {{path: /dev/full}}\n", environ=environ).start()
    services = gateway.services
    try:
        client = gateway.openai()
        for index in range(5):
            client.chat.completions.create(model="auto", max_tokens=2,
                                           messages=[{"role": "user", "content": f"hi {index}"}])
        wait_for(lambda: services.recorder.ledger.write_errors == 5)
        with urllib.request.urlopen(f"{gateway.base_url}/metrics", timeout=10) as response:
            exposition = response.read().decode()
        assert re.search(r"^gateway_ledger_write_errors_total(\{[^}]*\})? 5\.0$", exposition, re.MULTILINE), exposition
    finally:
        gateway.stop()
    assert services.session.closed
    assert "Traceback" not in capfd.readouterr().err


def test_one_failing_shutdown_step_skips_none_of_the_rest(monkeypatch):
    """A shutdown step that raises (here the ledger's) is logged, and the later ones still run."""
    gateway = Harness().start()
    services = gateway.services
    shut_down = []
    telemetry_shutdown = services.telemetry.shutdown

    def refuse():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(services.recorder, "close", refuse)
    monkeypatch.setattr(services.telemetry, "shutdown", lambda: shut_down.append(telemetry_shutdown()))
    gateway.stop()
    assert services.session.closed
    assert shut_down == [True]


# start-up -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_a_ledger_that_cannot_be_created_stops_the_start_in_one_line(tmp_path, workers):
    """`gateway run` with a ledger under a file exits 1 saying so in one line per worker, with no traceback."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent("""\
        version: 1
        models:
          small: {endpoint: "http://127.0.0.1:9/v1"}
        routes: [{name: chat, candidates: [small]}]
        ledger: {path: /dev/null/ledger.jsonl}
        """))
    run = subprocess.run([sys.executable, "-m", "gateway", "run", "--policy", str(policy), "--host", "127.0.0.1",
                          "--port", "0", "--workers", str(workers)], capture_output=True, text=True, timeout=60,
                         cwd=REPO_ROOT, stdin=subprocess.DEVNULL, env={**os.environ, "OTEL_SDK_DISABLED": "true"})
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    said = [line for line in run.stderr.splitlines() if "ledger" in line]
    assert said and all(line.endswith("cannot open the ledger /dev/null/ledger.jsonl "
                                      "([Errno 20] Not a directory: '/dev/null'), not starting") for line in said)
