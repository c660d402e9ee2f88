"""What a new user or an SRE walking the README meets where the README's promise held but the words did not:
a refusal that names the wrong setting, a global flag taken once where argparse takes it twice."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from bench.machine import free_port
from gateway.app import build_app
from gateway.cli import main
from gateway.runtime import PolicyHolder
from gateway.server import run_server

DEMO_POLICY = Path(__file__).resolve().parents[1] / "gateway" / "data" / "demo.yaml"


async def _call(policy: Path, environ: dict[str, str], method: str, path: str, body: dict | None = None):
    """`method path` on a gateway serving `policy` under `environ` alone (no OTLP endpoint: nothing is exported):
    its status and JSON body."""
    app = build_app(PolicyHolder.from_file(policy, environ), environ=environ)
    ready, stop, port = asyncio.Event(), asyncio.Event(), free_port()
    server = asyncio.create_task(run_server(app, "127.0.0.1", port, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        async with aiohttp.ClientSession() as session:
            async with session.request(method, f"http://127.0.0.1:{port}{path}", json=body) as reply:
                return reply.status, await reply.json()
    finally:
        stop.set()
        await server


async def _get_metrics(policy: Path, environ: dict[str, str]) -> tuple[int, dict]:
    return await _call(policy, environ, "GET", "/metrics")


async def test_metrics_turned_off_by_otel_sdk_disabled_says_so(tmp_path):
    """README: /metrics is a 404 "with `OTEL_SDK_DISABLED=true`", even when `telemetry.prometheus: true`. The 404
    must name that variable: it used to say "set telemetry.prometheus or GATEWAY_PROMETHEUS=1", which the operator
    had set, leaving nothing in the answer to point at the variable that turned it off."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(DEMO_POLICY.read_text() + "\ntelemetry:\n  prometheus: true\n")
    status, body = await _get_metrics(policy, {"OTEL_SDK_DISABLED": "true"})
    message = body["error"]["message"]
    assert status == 404 and body["error"]["code"] == "not_found"
    assert "OTEL_SDK_DISABLED" in message, message
    assert "set telemetry.prometheus" not in message, message


async def test_metrics_off_names_every_documented_switch():
    """README: /metrics is served "when `telemetry.prometheus: true`, `GATEWAY_PROMETHEUS=1` or
    `OTEL_METRICS_EXPORTER=prometheus`"; the 404 of a gateway with none of them names all three."""
    status, body = await _get_metrics(DEMO_POLICY, {})
    message = body["error"]["message"]
    assert status == 404
    for switch in ("telemetry.prometheus", "GATEWAY_PROMETHEUS=1", "OTEL_METRICS_EXPORTER=prometheus"):
        assert switch in message, message


@pytest.mark.parametrize("flags", [["--log-level", "INFO", "--log-level", "WARNING"],
                                   ["--log-level=INFO", "--log-level", "WARNING"]])
def test_a_repeated_log_level_reaches_a_command_that_parses_its_own_arguments(flags, monkeypatch, capsys):
    """README: `--log-level` is a global flag "for every command". Given twice (a wrapper script's default, then the
    operator's), argparse takes the last for `policy check`; `keys`, `gpu`, `replay` and `simulate-backend` parse
    their own arguments, and used to refuse the second flag as "unrecognized arguments"."""
    monkeypatch.setattr("sys.stdin", io.StringIO("a secret\n"))
    assert main([*flags, "keys", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"a secret").hexdigest()
    assert main([*flags, "policy", "check", str(DEMO_POLICY)]) == 0


@pytest.mark.parametrize("command", [["policy", "check", str(DEMO_POLICY)], ["keys", "hash"]])
def test_a_bad_gateway_log_level_is_said_as_the_variables(command):
    """README: the level comes from `--log-level LEVEL` "(or `GATEWAY_LOG_LEVEL`)", an unknown one a usage error.
    When it came from the variable, the error names the variable: it used to blame `argument --log-level`, a flag
    the operator never typed, and print the usage as if the command line were wrong."""
    result = subprocess.run([sys.executable, "-m", "gateway", *command], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, env={**os.environ, "GATEWAY_LOG_LEVEL": "bogus"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "GATEWAY_LOG_LEVEL" in result.stderr and "unknown log level 'bogus'" in result.stderr, result.stderr
    assert "--log-level" not in result.stderr, result.stderr



@pytest.mark.parametrize(("command", "shown"), [
    (["--help"], ["--log-level LEVEL", "GATEWAY_LOG_LEVEL"]),
    (["run", "--help"], ["(default 0.0.0.0)", "(default 8080)", "(default 1;"]),
    (["demo", "--help"], ["(default 127.0.0.1)", "(default 8080)"]),
])
def test_help_gives_the_defaults_the_readme_gives(command, shown, capsys):
    """README's Commands table: `gateway demo [--host 127.0.0.1] [--port 8080]`, `gateway run [--host 0.0.0.0]
    [--port 8080] [--workers 1]`, and the global `--log-level LEVEL` (or `GATEWAY_LOG_LEVEL`). Their `--help` listed
    these flags bare, without a word or a default, so a user reading `--help` alone could not tell where a gateway
    would listen."""
    with pytest.raises(SystemExit) as done:
        main(command)
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    for text in shown:
        assert text in out, out


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_a_demo_given_a_duration(stop):
    """README: the demo "serves ... until Ctrl-C (`--port`, `--host`, `--duration S`)". With `--duration`, a Ctrl-C
    (or SIGTERM) used to stop the gateway's listener but not the process, which slept on until the duration was over,
    its port refusing connections; a second Ctrl-C then ended it with a KeyboardInterrupt traceback. The demo must end
    on the first one, exit 0."""
    demo = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", "0", "--duration", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        seen = _read_until(demo, "Press Ctrl-C to stop.", timeout_s=60)
        assert "Press Ctrl-C to stop." in seen, seen[-2000:]
        demo.send_signal(stop)
        status = demo.wait(timeout=30)          # the 120 s duration is far off: only the signal can end it in time
        rest = demo.stdout.read().decode(errors="replace")
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert status == 0 and "Traceback" not in rest, rest[-2000:]


def _read_until(process: subprocess.Popen, marker: str, timeout_s: float) -> str:
    """What `process` wrote until a line holding `marker`, or until `timeout_s` passed (read unbuffered, so a line
    the pipe delivered with others is not left in a buffer the selector cannot see)."""
    seen, deadline = b"", time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while marker.encode() not in seen and time.monotonic() < deadline:
            if selector.select(timeout=deadline - time.monotonic()):
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
    return seen.decode(errors="replace")
