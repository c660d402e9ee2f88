"""The request ledger: shared by worker processes, rotated without losing lines, and calm on a full disk."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import signal
import tempfile
import threading
import traceback
import urllib.request
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway import ledger as ledger_module
from gateway.errors import PolicyError
from gateway.ledger import QUEUE_LINES, Ledger
from gateway.policy.load import parse_policy
from gateway.policy.model import Ledger as LedgerConfig
from tests.support.harness import DEFAULT_POLICY, Harness

REPO_ROOT = Path(__file__).resolve().parent.parent

#: one process writing `lines` numbered records to a ledger, as one `gateway run` worker does
WRITER = """
import sys, time
from gateway.ledger import QUEUE_LINES, Ledger
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


def warnings_said(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "gateway.ledger"]


def stalled_disk(path: Path) -> int:
    """Make `path` a FIFO and open its reading end without reading: a ledger there blocks in write() once the
    pipe is full, as on a hung disk. The reading end, to let it go on."""
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def read_lines(reader: int, count: int | None = None, timeout_s: float = 5.0) -> list[dict]:
    """Read `count` lines from the FIFO (or, with None, until its writer closes it)."""
    data, deadline = b"", time.monotonic() + timeout_s
    while count is None or data.count(b"\n") < count:
        assert time.monotonic() < deadline, "timed out"
        try:
            chunk = os.read(reader, 1 << 16)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        if not chunk and count is None:
            break                                # every writer closed it
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def files_held_open(directory: Path) -> list[str]:
    """The files under `directory` this process has open."""
    held = []
    for fd in os.scandir("/proc/self/fd"):
        with contextlib.suppress(OSError):        # a descriptor closed meanwhile
            if (target := os.readlink(fd.path)).startswith(f"{directory}/"):
                held.append(target)
    return held


NOBODY = 65534


def as_nobody(work) -> None:
    """Run `work` in a forked child that has become uid/gid 65534, as the container's non-root user; fails with
    the child's traceback. (Forked, not a new interpreter: this one may sit where that user cannot read.)"""
    report_reader, report_writer = os.pipe()
    pid = os.fork()
    if pid == 0:                                 # the child: never returns into pytest
        status = 1
        try:
            signal.alarm(20)
            os.close(report_reader)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            pr_set_dumpable = 4                  # after setuid /proc/self/fd (so /dev/stdout) would be root's
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_dumpable, 1, 0, 0, 0)
            work()
            status = 0
        except BaseException:
            os.write(report_writer, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(report_writer)
    with os.fdopen(report_reader, "rb") as report:
        said = report.read().decode()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, said


class Said(logging.Handler):
    """The ledger's log lines, in a forked child where pytest's capture is not looking."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        logging.getLogger("gateway.ledger").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


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


def test_a_backup_name_taken_by_a_directory_grows_the_file_instead_of_losing_lines(tmp_path, caplog, monkeypatch):
    """When rotating fails (a directory at PATH.2), lines go on past max_bytes with one warning, none is lost,
    rotating is tried again later, and once it works that is said too."""
    monkeypatch.setattr(ledger_module, "ROTATE_RETRY_S", 0.3, raising=False)
    path = tmp_path / "ledger.jsonl"
    (tmp_path / "ledger.jsonl.2").mkdir()
    book = ledger(path, max_bytes=300, backups=2)
    with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
        for seq in range(30):
            book.write({"seq": seq, "pad": "x" * 50})
        kept = (path, tmp_path / "ledger.jsonl.1")
        wait_for(lambda: sum(len(file.read_bytes().splitlines()) for file in kept if file.is_file()) == 30)
        assert path.stat().st_size > 300
        (tmp_path / "ledger.jsonl.2").rmdir()
        time.sleep(0.4)
        book.write({"seq": 30})
        book.close()
    assert book.write_errors == 0
    assert sorted(record["seq"] for record in records(path)) == list(range(31))
    assert json.loads(path.read_text()) == {"seq": 30}           # rotated again: alone in a new file
    failed, recovered = warnings_said(caplog)
    assert failed.startswith(f"ledger {path}: cannot rotate ([Errno 21] Is a directory: ") and failed.endswith(
        "; it grows past max_bytes, and rotating is tried again every 0.3 s")
    assert recovered == f"ledger {path}: rotating again"


def blocked_rotation(tmp_path: Path, caplog) -> tuple[Path, Ledger]:
    """A ledger (max_bytes 300) whose second rotation has failed, a directory standing at PATH.2."""
    path = tmp_path / "ledger.jsonl"
    (tmp_path / "ledger.jsonl.2").mkdir()
    book = ledger(path, max_bytes=300, backups=2)
    for seq in range(20):
        book.write({"seq": seq, "pad": "x" * 50})
    wait_for(lambda: any("cannot rotate" in said for said in warnings_said(caplog)))
    return path, book


def test_a_failed_rotation_is_tried_again_only_rotate_retry_s_later(tmp_path, caplog, monkeypatch):
    """Once a rotation has failed, lines go on into the full file until ROTATE_RETRY_S has passed, even when what
    blocked it is gone."""
    monkeypatch.setattr(ledger_module, "ROTATE_RETRY_S", 60.0)
    with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
        path, book = blocked_rotation(tmp_path, caplog)
        (tmp_path / "ledger.jsonl.2").rmdir()
        for seq in range(20, 25):
            book.write({"seq": seq, "pad": "x" * 50})
        book.close()
    assert not (tmp_path / "ledger.jsonl.2").exists()
    assert sorted(record["seq"] for record in records(path)) == list(range(25))


def test_a_rotation_failing_again_and_again_is_said_once(tmp_path, caplog, monkeypatch):
    """A rotation retried at every line (ROTATE_RETRY_S 0) and failing each time warns once, not per line."""
    monkeypatch.setattr(ledger_module, "ROTATE_RETRY_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
        path, book = blocked_rotation(tmp_path, caplog)
        for seq in range(20, 25):
            book.write({"seq": seq, "pad": "x" * 50})
        book.close()
    assert book.write_errors == 0
    assert len(warnings_said(caplog)) == 1


# a non-root user --------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="becomes another user")
def test_a_non_root_user_can_write_the_ledger_to_dev_stdout():
    """`ledger.path: /dev/stdout` (never rotated) opens and writes for a non-root user, who may not create a
    lock file in /dev."""
    def work():
        stdout_reader, stdout_writer = os.pipe()
        os.dup2(stdout_writer, 1)
        book = ledger(Path("/dev/stdout"))
        book.write({"a": 1})
        book.close()
        assert book.write_errors == 0
        assert os.read(stdout_reader, 100) == b'{"a":1}\n'
    as_nobody(work)


@pytest.mark.skipif(os.geteuid() != 0, reason="becomes another user")
def test_a_ledger_in_a_read_only_directory_opens_and_grows_past_max_bytes_keeping_every_line():
    """A ledger file the gateway may write in a directory it may not opens; as it cannot rotate there (no lock
    file, no renames), it warns once and keeps every line in the one file."""
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        path = Path(directory) / "ledger.jsonl"
        path.touch()
        os.chown(path, NOBODY, NOBODY)

        def work():
            said = Said()
            book = ledger(path, max_bytes=200, backups=2)
            for seq in range(20):
                book.write({"seq": seq, "pad": "x" * 30})
            book.close()
            assert book.write_errors == 0
            assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == list(range(20))
            [warning] = said.lines
            assert warning.startswith(f"ledger {path}: cannot rotate ([Errno 13] Permission denied: "), warning
        as_nobody(work)
        assert sorted(os.listdir(directory)) == ["ledger.jsonl"]


# a stalled disk ---------------------------------------------------------------------------------------------

def test_a_stalled_disk_holds_at_most_queue_lines_and_counts_the_dropped(tmp_path, caplog):
    """With the writer stuck in a write, at most QUEUE_LINES lines wait in memory; later ones are dropped,
    counted in write_errors and said once, the catching up is said with the number dropped, and every line was
    either written or counted."""
    path = tmp_path / "ledger.fifo"
    reader = stalled_disk(path)
    in_pipe_at_most = fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ) // len(b'{"seq":0}\n')
    book = ledger(path)
    lines = 2 * QUEUE_LINES + in_pipe_at_most
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
            for seq in range(lines):
                book.write({"seq": seq})
            dropped = book.write_errors
            assert dropped >= lines - QUEUE_LINES - 1 - in_pipe_at_most      # 1: the line stuck in its write
            written = read_lines(reader, lines - dropped)
            book.write({"seq": lines})
            book.close()
        written += read_lines(reader)
    finally:
        os.close(reader)
    seqs = [record["seq"] for record in written]
    assert seqs == sorted(seqs) and seqs[-1] == lines and len(seqs) + dropped == lines + 1
    assert book.write_errors == dropped
    assert warnings_said(caplog) == [
        f"ledger {path}: {QUEUE_LINES} lines are waiting for the disk; new lines are dropped, and counted, "
        "until it catches up",
        f"ledger {path}: the disk caught up, {dropped} lines were dropped"]


def test_closing_gives_up_on_a_hung_disk_and_counts_the_lines_it_left(tmp_path, caplog, monkeypatch):
    """close() with the writer stuck in a write returns after CLOSE_TIMEOUT_S, counting and saying the lines it
    left queued; when the disk wakes, the stuck line lands and the file is closed, but no left line is written."""
    monkeypatch.setattr(ledger_module, "CLOSE_TIMEOUT_S", 0.2, raising=False)
    path = tmp_path / "ledger.fifo"
    reader = stalled_disk(path)
    lines = fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ) // len(b'{"seq":0}\n') + 100
    book = ledger(path)
    closing = threading.Thread(target=book.close)
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
            for seq in range(lines):
                book.write({"seq": seq})
            closing.start()
            closing.join(5)
            assert not closing.is_alive(), "close() waited on the hung disk"
        written = read_lines(reader)             # to the end: the writer closed the file
    finally:
        os.close(reader)
        closing.join()
    assert book.write_errors > 0 and len(written) + book.write_errors == lines
    assert [record["seq"] for record in written] == list(range(len(written)))
    assert warnings_said(caplog) == [
        f"ledger {path}: the disk took too long (over 0.2 s), {book.write_errors} queued lines are not written"]


# closing ----------------------------------------------------------------------------------------------------

def test_closing_twice_leaves_other_files_alone(tmp_path):
    """A second close() closes nothing, not even a file that has since been given the ledger's old numbers."""
    book = ledger(tmp_path / "ledger.jsonl", max_bytes=50)
    book.write({"seq": 0, "pad": "x" * 40})
    book.write({"seq": 1, "pad": "x" * 40})          # rotates: the lock file is open
    book.close()
    others = [os.open(tmp_path / f"other{index}", os.O_WRONLY | os.O_CREAT) for index in range(2)]
    try:
        book.close()
        for fd in others:
            os.fstat(fd)
    finally:
        for fd in others:
            os.close(fd)


def test_closing_closes_the_ledger_and_its_lock_file(tmp_path):
    """After close() this process holds no file of the ledger's open: not the ledger, not the lock file its
    rotation made."""
    book = ledger(tmp_path / "ledger.jsonl", max_bytes=50)
    book.write({"seq": 0, "pad": "x" * 40})
    book.write({"seq": 1, "pad": "x" * 40})          # rotates: the lock file is open
    book.close()
    assert files_held_open(tmp_path) == []


def test_a_line_written_after_closing_is_counted_and_said_once(tmp_path, caplog):
    """Records that come after close() (a late outcome report) are counted as lost, with one warning."""
    path = tmp_path / "ledger.jsonl"
    book = ledger(path)
    book.close()
    with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
        book.write({"late": 1})
        book.write({"late": 2})
    assert book.write_errors == 2
    assert warnings_said(caplog) == [f"ledger {path}: lines written after closing are lost, and counted"]


def test_a_record_json_cannot_hold_is_counted_and_the_others_are_written(tmp_path):
    """Text that is no UTF-8 (a lone surrogate, as aiohttp makes of such header bytes) cannot be JSON: that line is
    counted lost, the writer goes on with the next."""
    path = tmp_path / "ledger.jsonl"
    book = ledger(path)
    book.write({"n": 1})
    book.write({"n": 2, "workflow": "caf\udcff"})
    book.write({"n": 3})
    book.close()
    assert book.write_errors == 1
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 3]


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


def test_shutting_down_writes_the_queued_lines_and_closes_the_ledger(tmp_path):
    """When the gateway stops, every request's line is in the ledger and the gateway holds the file open no
    more."""
    path = tmp_path / "ledger.jsonl"
    environ = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    gateway = Harness(DEFAULT_POLICY + f"ledger: {{{{path: {path}}}}}\n", environ=environ).start()
    try:
        client = gateway.openai()
        for index in range(3):
            client.chat.completions.create(model="auto", max_tokens=2,
                                           messages=[{"role": "user", "content": f"hi {index}"}])
    finally:
        gateway.stop()
    assert len(records(path)) == 3
    assert files_held_open(tmp_path) == []


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
    """`gateway run` with a ledger under a file exits 1 saying so in one line, with no traceback: with workers,
    before any starts (not once by each in turn until the supervisor's crash limit)."""
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
    assert len(said) == 1 and said[0].endswith("cannot open the ledger /dev/null/ledger.jsonl "
                                               "([Errno 20] Not a directory: '/dev/null'), not starting")
    assert "worker" not in run.stderr
