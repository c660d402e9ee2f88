"""End to end with other clients than Python's: the official openai npm SDK on Node.js, and curl.

An application written in JavaScript points the SDK's baseURL at the gateway
and changes nothing else; so does a shell script with curl. The Node.js
scenarios live in tests/js/drive.mjs and run once per module, in one Node
process; each test here checks one scenario's outcome.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.harness import Harness

JS_DIR = Path(__file__).parent / "js"


def _install_sdk() -> None:
    """The pinned openai package (tests/js/package-lock.json), installed from the npm registry once."""
    if (JS_DIR / "node_modules" / "openai" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail("Node.js and npm are needed (scripts/test installs them: apt-get install nodejs npm)")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=JS_DIR, check=True, timeout=300)


@pytest.fixture(scope="module")
def gw():
    harness = Harness().start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def node_run(gw) -> dict:
    """Every scenario of drive.mjs, run once against the gateway: name -> {ok, value | error}."""
    _install_sdk()
    done = subprocess.run(["node", str(JS_DIR / "drive.mjs"), f"{gw.base_url}/v1"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _value(node_run: dict, scenario: str) -> dict:
    result = node_run[scenario]
    assert result["ok"], f"{scenario} failed in Node.js: {result.get('error')}"
    return result["value"]


def test_js_chat_completion(node_run):
    """A non-streamed chat completion comes back in the shape the npm SDK parses, with the gateway's headers."""
    chat = _value(node_run, "chat")
    assert chat["role"] == "assistant"
    assert len(chat["content"].split()) == 5
    assert chat["completion_tokens"] == 5
    assert chat["model_header"] == "small"
    assert float(chat["cost_header"]) > 0


def test_js_stream_with_usage(node_run):
    """A stream is read chunk by chunk by the npm SDK; include_usage ends it with a usage chunk and no choices."""
    stream = _value(node_run, "stream")
    assert stream["pieces"] == 8
    assert len(stream["text"].split()) == 8
    assert stream["usage"]["completion_tokens"] == 8
    assert stream["usage"]["total_tokens"] == stream["usage"]["prompt_tokens"] + 8
    assert stream["last_choices"] == 0


def test_js_stream_helper_assembles_completion(node_run):
    """The SDK's own stream helper rebuilds the whole completion from the gateway's deltas."""
    helper = _value(node_run, "streamHelper")
    assert len(helper["content"].split()) == 6
    assert helper["finish_reason"] == "length"


def test_js_completions_embeddings_and_models(node_run):
    """Text completions, embeddings and the model list work from Node.js as from Python."""
    assert _value(node_run, "completions")["completion_tokens"] == 4
    embeddings = _value(node_run, "embeddings")
    assert embeddings["count"] == 2 and embeddings["dimensions"] > 0
    assert {"auto", "gpt-4o-mini", "smart", "text-embedding-3-small"} <= set(_value(node_run, "models")["ids"])


def test_js_errors_are_api_errors(node_run):
    """An unknown model raises the SDK's APIError with OpenAI's status, type and code; malformed JSON gets a 400."""
    unknown = _value(node_run, "unknownModel")
    assert unknown["raised"] and unknown["is_api_error"]
    assert (unknown["status"], unknown["type"], unknown["code"]) == (404, "invalid_request_error", "model_not_found")
    assert "no-such-model" in unknown["message"]
    bad = _value(node_run, "badJson")
    assert bad["status"] == 400
    assert bad["body"]["error"]["type"] == "invalid_request_error"
    assert "JSON" in bad["body"]["error"]["message"]


def test_js_abort_mid_stream(node_run, gw):
    """A Node.js client that aborts after the first chunk ends its stream; the gateway answers its next request."""
    aborted = _value(node_run, "abortMidStream")
    assert 1 <= aborted["received"] < 200
    assert len(aborted["after"].split()) == 2


def _curl(*args: str) -> str:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed (apt-get install curl)"
    done = subprocess.run([curl, "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_curl_chat_and_stream(gw):
    """curl gets a chat completion as JSON, and with -N a stream of SSE `data:` lines ending in [DONE]."""
    url = f"{gw.base_url}/v1/chat/completions"
    body = {"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi from curl"}]}
    answer = json.loads(_curl(url, "-H", "Content-Type: application/json", "-d", json.dumps(body)))
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["completion_tokens"] == 3
    streamed = _curl("-N", url, "-H", "Content-Type: application/json", "-d", json.dumps({**body, "stream": True}))
    events = [line[len("data: "):] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    text = "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])
    assert len(text.split()) == 3
