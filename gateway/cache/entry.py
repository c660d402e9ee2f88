"""What the cache stores: one complete OpenAI non-stream response, and its bytes.

Streamed answers are assembled into the equivalent non-stream response
first (`gateway.cache.assemble`), so one entry replays as either a JSON body
or an SSE stream, whichever the next client asks for.

Bytes on the wire: one format byte, then orjson. Entries over 1 KiB are
zlib-compressed (format byte 1); smaller ones are stored plain (format byte 0).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson

from gateway.cache.assemble import StreamAssembler

#: finish reasons of an answer the cache keeps: a normal end. Not `content_filter`, not a missing reason, and not
#: tool calls (nor a message carrying any, whatever its reason): an agent's next step is its own to take again
COMPLETE_FINISH_REASONS = frozenset({"stop", "length"})
COMPRESS_OVER_BYTES = 1024
#: what is compressed at a time: a step's output is weighed against the entry limit before the next
COMPRESS_STEP_BYTES = 256 * 1024
#: endpoints an entry may answer
ENDPOINTS = frozenset(("chat", "completions", "embeddings"))
DEFAULT_MAX_ENTRY_BYTES = 1024 * 1024
FORMAT_PLAIN = 0
FORMAT_ZLIB = 1


@dataclass(frozen=True)
class CacheEntry:
    """One cached answer: the endpoint and the full non-stream response body."""

    endpoint: str
    body: dict[str, Any]
    created_unix_s: float = field(default_factory=time.time)
    #: what producing the answer cost: what each hit on it saves
    cost_usd: Decimal | None = None
    #: the policy model that answered: a hit is served only to a request that model may answer
    model: str | None = None
    #: the upstream model it called then: a model given another upstream model no longer serves this answer
    upstream_model: str | None = None


def entry_from_response(endpoint: str, body: Any) -> CacheEntry | None:
    """An entry for a non-stream response, or None when the answer is not complete."""
    if not isinstance(body, dict) or "error" in body:
        return None
    if endpoint == "embeddings":
        return CacheEntry(endpoint, body) if isinstance(body.get("data"), list) else None
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    if all(_complete(choice) for choice in choices):
        return CacheEntry(endpoint, body)
    return None


def _complete(choice: Any) -> bool:
    """A choice that ended normally and is no tool step: some servers end a tool call with `stop` (vLLM, for a
    named or required `tool_choice`), so the calls themselves are looked at, not only the finish reason."""
    if not isinstance(choice, dict) or not isinstance(reason := choice.get("finish_reason"), str):
        return False
    message = choice.get("message")
    if "message" in choice and not isinstance(message, dict):
        return False                        # a chat choice whose message is no object: a stream could not replay it
    if isinstance(message, dict) and (message.get("tool_calls") or message.get("function_call")):
        return False
    return reason in COMPLETE_FINISH_REASONS


def audio_expired(body: dict[str, Any], now_unix_s: float) -> bool:
    """Whether a chat answer carries audio the model server no longer keeps (`audio.expires_at` passed): a next
    turn that names its `id`, as multi-turn audio conversations do, would be refused, so it is no answer to give."""
    for choice in body.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        audio = message.get("audio") if isinstance(message, dict) else None
        expires_at = audio.get("expires_at") if isinstance(audio, dict) else None
        if isinstance(expires_at, (int, float)) and not isinstance(expires_at, bool) and expires_at <= now_unix_s:
            return True
    return False


def entry_from_stream(assembled: StreamAssembler) -> CacheEntry | None:
    """An entry for a finished stream, from its chunks as they were folded in (without [DONE]); none for a stream
    without choices."""
    if assembled.endpoint not in ("chat", "completions"):
        return None
    return entry_from_response(assembled.endpoint, assembled.body())


def encode_entry(entry: CacheEntry, *, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
                 ) -> bytes | None:
    """The stored bytes of an entry, or None when they would exceed `max_entry_bytes`."""
    stored = {"e": entry.endpoint, "b": entry.body, "t": entry.created_unix_s}
    if entry.cost_usd is not None:
        stored["c"] = str(entry.cost_usd)
    if entry.model is not None:
        stored["m"] = entry.model
    if entry.upstream_model is not None:
        stored["u"] = entry.upstream_model
    raw = orjson.dumps(stored)
    if len(raw) > COMPRESS_OVER_BYTES:
        return _compressed(raw, max_entry_bytes)
    data = bytes([FORMAT_PLAIN]) + raw
    return data if len(data) <= max_entry_bytes else None


def _compressed(raw: bytes, max_entry_bytes: int) -> bytes | None:
    """`raw` zlib-compressed behind its format byte (the bytes zlib.compress gives), COMPRESS_STEP_BYTES at a time,
    given up as soon as the output passes `max_entry_bytes`: an answer far too large to keep (a batch of
    embeddings: 30 MB) costs the event loop what compressing its first few MB takes, not seconds."""
    compressor = zlib.compressobj()
    parts = [bytes([FORMAT_ZLIB])]
    size = 1
    view = memoryview(raw)
    for start in range(0, len(raw), COMPRESS_STEP_BYTES):
        part = compressor.compress(view[start:start + COMPRESS_STEP_BYTES])
        size += len(part)
        if size > max_entry_bytes:
            return None
        parts.append(part)
    parts.append(compressor.flush())
    return b"".join(parts) if size + len(parts[-1]) <= max_entry_bytes else None


def decode_entry(data: bytes) -> CacheEntry | None:
    """The entry stored in `data`; None for bytes we cannot read, or for an entry of a shape the gateway would not
    have stored (another build's, a hand-written one): a miss, never an error, nor a broken answer served as a hit."""
    if not data:
        return None
    try:
        raw = _payload(data)
        stored = orjson.loads(raw)
        cost_usd = Decimal(stored["c"]) if "c" in stored else None
        model, upstream_model = stored.get("m"), stored.get("u")
        endpoint, body, created = stored["e"], stored["b"], stored["t"]
    except (zlib.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError, ArithmeticError):
        return None
    if endpoint not in ENDPOINTS or entry_from_response(endpoint, body) is None or \
            not isinstance(created, (int, float)) or (cost_usd is not None and not (cost_usd.is_finite() and
                                                                                    cost_usd >= 0)):
        return None
    return CacheEntry(endpoint, body, created, cost_usd, model if isinstance(model, str) else None,
                      upstream_model if isinstance(upstream_model, str) else None)


def _payload(data: bytes) -> bytes:
    """The JSON bytes behind the format byte."""
    if data[0] == FORMAT_ZLIB:
        return zlib.decompress(data[1:])
    if data[0] == FORMAT_PLAIN:
        return data[1:]
    raise ValueError(f"unknown cache entry format {data[0]}")
