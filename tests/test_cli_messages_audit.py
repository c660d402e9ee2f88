"""What a README walkthrough met in the commands' words: an error said twice, on stdout, or blaming the wrong
thing; a flag named by its field; a report path found unwritable only after the whole replay; two request headers
refused with another code than their kind."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pynvml
import pytest

from bench.machine import free_port
from gateway.app import build_app
from gateway.cli import main as gateway_cli
from gateway.energy.command import main as gpu_command
from gateway.replay.cli import main as replay_main
from gateway.runtime import PolicyHolder
from gateway.server import run_server
from tests.support.fake_pynvml import FakeNvml

DEMO_POLICY = Path(__file__).resolve().parents[1] / "gateway" / "data" / "demo.yaml"

NO_GPUS_POLICY = """version: 1
models:
  small:
    endpoint: http://127.0.0.1:1/v1
routes:
  - name: default
    candidates: [small]
"""


# -- gateway gpu -----------------------------------------------------------------


def test_gpu_without_nvml_says_why_once_on_stderr(capsys, caplog):
    """`gateway gpu` without NVML exits 1 with one line on stderr saying "NVML not available" once, and nothing on
    stdout; no log line says it again (naming the command's pseudo-model of every GPU)."""
    out = io.StringIO()
    code = gpu_command(["--once"], nvml_module=FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), out=out)
    err = capsys.readouterr().err
    assert (code, out.getvalue()) == (1, "")
    assert err.count("NVML not available") == 1 and err.startswith("gateway gpu: ") and err.count("\n") == 1, err
    assert not [record for record in caplog.records if record.levelname == "WARNING"], caplog.text


def test_gpu_with_a_policy_whose_models_have_no_gpus_says_it_of_the_policy(tmp_path, capsys):
    """`gateway gpu --policy P` where no model has `gpus:` exits 1 saying so of P on stderr, not blaming NVML."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(NO_GPUS_POLICY)
    out = io.StringIO()
    code = gpu_command(["--policy", str(policy), "--once"], out=out)
    err = capsys.readouterr().err
    assert (code, out.getvalue()) == (1, "")
    assert err == f"gateway gpu: no model of {policy} has gpus: (nothing to measure)\n"


# -- gateway keys hash -----------------------------------------------------------


@pytest.mark.parametrize(("stdin", "says"), [
    ("\nsecret\n", "gateway keys hash: the first line of stdin is empty: give the secret on it\n"),
    ("", "gateway keys hash: nothing on stdin\n")])
def test_keys_hash_tells_an_empty_first_line_from_nothing_on_stdin(stdin, says):
    """`printf '\\nsecret\\n' | gateway keys hash` is refused (exit 2) for its empty first line, not said to have
    nothing on stdin; stdin with nothing at all is still "nothing on stdin"."""
    done = subprocess.run([sys.executable, "-m", "gateway", "keys", "hash"], input=stdin, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", says)


# -- gateway policy explain --header ---------------------------------------------


def test_explain_header_without_a_colon_is_a_usage_error_of_the_flag(tmp_path, capsys):
    """`gateway policy explain --header bad` exits 2 as argparse's usage errors do, naming `--header`, not as a
    request the gateway would refuse."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}))
    code = gateway_cli(["policy", "explain", str(DEMO_POLICY), "--request", str(request), "--header", "bad"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == "gateway policy explain: error: argument --header: must look like NAME:VALUE, got 'bad'\n"


# -- gateway replay --------------------------------------------------------------


def test_replay_checks_its_report_paths_before_replaying(tmp_path, capsys):
    """A `--json` in a directory that does not exist exits 1 "cannot write" before any request is replayed (no
    report on stdout, no "requests replayed"); the `--out` it could write is not left behind, empty."""
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"timestamp": i, "input_tokens": 10, "output_tokens": 5}) + "\n"
                               for i in range(3)))
    report, unwritable = tmp_path / "report.md", tmp_path / "missing" / "report.json"
    code = replay_main(["--policy", str(DEMO_POLICY), "--traffic", str(traffic), "--out", str(report),
                        "--json", str(unwritable)])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.startswith(f"gateway replay: cannot write {unwritable}: ") and "replayed" not in err, err
    assert not report.exists()


def test_replay_refuses_a_directory_as_report_before_replaying(tmp_path, capsys):
    """`--out` naming a directory is refused "cannot write" with exit 1, without replaying (nothing on stdout)."""
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text(json.dumps({"timestamp": 0, "input_tokens": 10, "output_tokens": 5}) + "\n")
    code = replay_main(["--policy", str(DEMO_POLICY), "--traffic", str(traffic), "--chart", str(tmp_path)])
    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err.startswith(f"gateway replay: cannot write {tmp_path}: ") and "replayed" not in err, err


# -- x-gateway-task-id, x-gateway-workflow ---------------------------------------


async def _chat_with_header(name: str, value: bytes) -> tuple[int, dict]:
    """A chat request carrying header `name: value` (raw bytes on the wire: aiohttp's client sends no byte that is
    not UTF-8) to a gateway serving the demo policy: its status and body."""
    environ = {"OTEL_SDK_DISABLED": "true"}
    app = build_app(PolicyHolder.from_file(DEMO_POLICY, environ), environ=environ)
    ready, stop, port = asyncio.Event(), asyncio.Event(), free_port()
    server = asyncio.create_task(run_server(app, "127.0.0.1", port, ready=ready, stop=stop))
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()
    try:
        await asyncio.wait_for(ready.wait(), 30)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n%s: %s\r\n\r\n%s"
                     % (len(body), name.encode(), value, body))
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)
    finally:
        stop.set()
        await server


@pytest.mark.parametrize("name", ["x-gateway-task-id", "x-gateway-workflow"])
@pytest.mark.parametrize("value", [b"t" * 257, b"caf\xff"], ids=["too-long", "not-utf8"])
async def test_a_refused_grouping_header_is_an_invalid_header_naming_it(name, value):
    """A task id or workflow too long or not UTF-8 is refused as the other `x-gateway-*` headers are: a 400
    `invalid_header` whose `param` is the header."""
    status, body = await _chat_with_header(name, value)
    error = body["error"]
    assert (status, error["code"], error["param"]) == (400, "invalid_header", name), body
