"""A fixed-response upstream that costs almost no CPU: nginx with a generated config in a temp dir.

`POST /v1/chat/completions` answers a canned chat completion; `POST
/stream/v1/chat/completions` answers a canned SSE stream. Both use `return`,
because nginx's static-file handler refuses POST with 405.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson


#: the path prefix of the streaming location; a model's endpoint `http://HOST:PORT/stream/v1` selects it
STREAM_PREFIX = "/stream"

CHAT_ANSWER = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench-upstream",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! This is a canned answer."},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 24, "completion_tokens": 8, "total_tokens": 32},
}

STREAM_WORDS = ("Hello", "!", " This", " is", " a", " canned", " stream", ".")


def chat_body() -> bytes:
    """The canned non-streamed answer."""
    return orjson.dumps(CHAT_ANSWER)


def sse_body() -> bytes:
    """The canned stream: role chunk, one chunk per word, finish chunk, usage chunk, [DONE]."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "bench-upstream"}
    deltas = [{"role": "assistant", "content": ""}] + [{"content": word} for word in STREAM_WORDS]
    chunks = [{**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [], "usage": CHAT_ANSWER["usage"]})
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def nginx_string(data: bytes) -> str:
    """`data` as a single-quoted nginx config string (nginx unescapes \\n, \\' and \\\\)."""
    text = data.decode().replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{text}'"


def nginx_config(prefix: Path, port: int) -> str:
    """A self-contained, non-daemon nginx config with one worker, listening on 127.0.0.1:port."""
    return f"""
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_buffer_size 1m;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 {nginx_string(chat_body())};
        }}
        location = {STREAM_PREFIX}/v1/chat/completions {{
            default_type text/event-stream;
            return 200 {nginx_string(sse_body())};
        }}
        location = /healthz {{ return 200 'ok'; }}
    }}
}}
"""


def nginx_command(workdir: Path, port: int) -> list[str]:
    """Write the config under `workdir/nginx`; the command that runs nginx on it in the foreground."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_config(prefix, port))
    return [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]


def nginx_available() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()
