"""The command line's global flags reach every command, also those that parse their own arguments."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys

import pytest

from gateway.cli import main
from gateway.demo import snippet

DEMO = "gateway/data/demo.yaml"


@pytest.mark.parametrize("flag", [["--log-level", "WARNING"], ["--log-level=WARNING"], []])
def test_log_level_may_precede_a_command_that_parses_its_own_arguments(flag, monkeypatch, capsys):
    """`gateway --log-level WARNING keys hash` runs the command instead of refusing the flag."""
    monkeypatch.setattr("sys.stdin", io.StringIO("a secret\n"))
    assert main([*flag, "keys", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"a secret").hexdigest()


def test_log_level_still_precedes_the_commands_argparse_knows(capsys):
    assert main(["--log-level", "WARNING", "policy", "check", "gateway/data/demo.yaml"]) == 0
    assert "ok" in capsys.readouterr().out


def gateway(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)


def test_a_port_in_use_is_said_in_one_line():
    """`gateway run` on a taken port, or on an address that is no host, exits 1 with one line, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = gateway("run", "--policy", DEMO, "--host", "127.0.0.1", "--port", str(busy.getsockname()[1]))
    assert taken.returncode == 1 and "Traceback" not in taken.stderr
    assert "cannot listen on 127.0.0.1" in taken.stderr and "address already in use" in taken.stderr
    no_host = gateway("run", "--policy", DEMO, "--host", "256.1.1.1", "--port", "1")
    assert no_host.returncode == 1 and "Traceback" not in no_host.stderr and "cannot listen" in no_host.stderr


@pytest.mark.parametrize("command", [["run", "--policy", DEMO], ["demo"]])
def test_a_port_out_of_range_is_refused(command):
    """--port 99999 is refused (it used to be taken modulo 65536: 34463)."""
    result = gateway(*command, "--port", "99999")
    assert result.returncode == 2 and "a port is 0 to 65535" in result.stderr


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_fewer_than_one_worker_is_refused(workers):
    """`gateway run --workers 0` (or negative) is a usage error, not one worker in disguise."""
    result = gateway("run", "--policy", "no-such-policy.yaml", "--workers", workers)
    assert result.returncode == 2 and "workers are 1 or more" in result.stderr


def test_more_workers_than_the_cores_can_use_is_refused():
    """`--workers 100000` (a typo) is a usage error naming the limit, 8 a core, before any process is forked."""
    result = gateway("run", "--policy", "no-such-policy.yaml", "--workers", "100000")
    most = 8 * (os.cpu_count() or 1)
    assert result.returncode == 2 and f"at most {most}" in result.stderr


@pytest.mark.parametrize("where", ["flag", "environment"])
@pytest.mark.parametrize("command", [["policy", "check", DEMO], ["keys", "hash"]])
def test_an_unknown_log_level_is_refused_in_one_line(where, command, monkeypatch):
    """A log level that does not exist, given as a flag or in GATEWAY_LOG_LEVEL, is a usage error (exit 2)."""
    if where == "flag":
        result = gateway("--log-level", "bogus", *command)
    else:
        monkeypatch.setenv("GATEWAY_LOG_LEVEL", "bogus")
        result = gateway(*command)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown log level 'bogus'" in result.stderr


def test_demo_on_port_zero_tours_the_port_it_got():
    """`gateway demo --port 0` serves on a free port and runs its tour there (it used to post to port 0)."""
    result = gateway("demo", "--port", "0", "--duration", "0.5", timeout_s=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    ready = next(line for line in result.stdout.splitlines() if "The gateway is ready at" in line)
    port = int(ready.rsplit(":", 1)[1])
    assert port > 0
    assert "same again (cache)     200" in result.stdout
    again = next(line for line in result.stdout.splitlines() if line.startswith("same again (cache)"))
    assert again.split()[-2] == "hit"                    # the tour's repeat is answered from the cache



def test_demo_leaves_no_working_folder_behind(tmp_path):
    """`gateway demo` writes its policy to a folder of its own under the temporary directory, and removes it when
    it stops (each run used to leave one)."""
    result = subprocess.run([sys.executable, "-m", "gateway", "demo", "--port", "0", "--duration", "0.3"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "same again (cache)     200" in result.stdout     # it did run, with its policy in tmp_path
    assert list(tmp_path.glob("gateway-demo-*")) == []


def test_demo_snippet_points_curl_and_the_sdk_at_the_gateways_v1():
    """The snippet `gateway demo` prints posts with curl to BASE/v1/chat/completions and gives the SDK BASE/v1."""
    text = snippet("http://127.0.0.1:8080")
    assert "curl -s http://127.0.0.1:8080/v1/chat/completions " in text
    assert 'OpenAI(base_url="http://127.0.0.1:8080/v1"' in text


def ipv6_loopback() -> bool:
    """Whether this machine can listen on ::1."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_demo_on_an_ipv6_address_tours_it_with_its_address_in_brackets():
    """`gateway demo --host ::1` runs its tour at http://[::1]:PORT (it built http://::1:PORT, which no client can
    read, and ended in a traceback)."""
    result = gateway("demo", "--host", "::1", "--port", "0", "--duration", "0.5", timeout_s=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "The gateway is ready at http://[::1]:" in result.stdout
    assert "same again (cache)     200" in result.stdout


@pytest.mark.parametrize("duration", ["nan", "inf", "-1", "0", "soon"])
def test_a_demo_duration_that_is_no_positive_number_of_seconds_is_a_usage_error(duration):
    """`--duration nan` ran for ever and a negative one stopped at once: both are usage errors (exit 2)."""
    result = gateway("demo", "--port", "0", "--duration", duration, timeout_s=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--duration" in result.stderr


def test_demo_on_a_taken_port_is_said_in_one_line():
    """`gateway demo` on a port in use exits 1 with one line, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = gateway("demo", "--port", str(busy.getsockname()[1]))
    assert taken.returncode == 1 and "Traceback" not in taken.stderr
    assert "address already in use" in taken.stderr


def test_explain_with_an_unreadable_request_file_is_a_usage_error(tmp_path):
    """A --request file that cannot be read is said as such (exit 2), not as a request the gateway would refuse."""
    result = gateway("policy", "explain", DEMO, "--request", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot read the request file" in result.stderr and "would be refused" not in result.stderr


def test_log_lines_name_the_process_that_wrote_them(tmp_path):
    """Each log line carries its process id, so the lines of `--workers N` can be told apart."""
    process = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--policy", str(tmp_path / "missing.yaml")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1 and f" ERROR [{process.pid}] " in err, err


def test_a_port_one_past_the_last_is_refused():
    """--port 65536, the first number past the last port, is refused like any other out of range."""
    result = gateway("run", "--policy", DEMO, "--port", "65536")
    assert result.returncode == 2 and "a port is 0 to 65535, got 65536" in result.stderr


def test_exactly_the_most_workers_the_cores_can_use_are_taken(tmp_path):
    """`--workers` at the limit, 8 a core, is taken: the command goes on to read its policy (exit 1 on a missing
    one), where one more is a usage error (exit 2)."""
    most = 8 * (os.cpu_count() or 1)
    missing = str(tmp_path / "missing.yaml")
    taken = gateway("run", "--policy", missing, "--workers", str(most))
    assert taken.returncode == 1 and "at most" not in taken.stderr, taken.stderr
    assert gateway("run", "--policy", missing, "--workers", str(most + 1)).returncode == 2


def test_an_unknown_log_level_given_with_equals_is_refused_before_a_delegated_command():
    """`gateway --log-level=bogus keys hash` is the same usage error as `--log-level bogus`."""
    result = gateway("--log-level=bogus", "keys", "hash")
    assert result.returncode == 2 and "unknown log level 'bogus'" in result.stderr
