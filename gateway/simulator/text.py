"""The simulator's own token rule, filler answers and embedding vectors, all deterministic.

Token rule (documented, and deliberately simple; real upstreams tokenize their own way):
a text has one token per run of word characters and one per other non-space character,
`len(re.findall(r"\\w+|[^\\w\\s]", text))`. A chat prompt counts the text of every message
plus 3 per message plus 3; a prompt given as token ids counts one per id.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import re
import struct
from typing import Any

TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
TOKENS_PER_MESSAGE = 3
TOKENS_PER_CHAT = 3

FILLER_WORDS = (
    "the", "model", "answer", "is", "simulated", "and", "each", "word", "stands", "for", "one",
    "token", "of", "output", "so", "latency", "cost", "energy", "can", "be", "measured", "without",
    "a", "GPU", "gateway", "routes", "request", "to", "smallest", "that", "meets", "its", "SLA",
    "cache", "hit", "fallback", "tenant", "budget", "span", "metric", "trace", "stream", "chunk",
)


def count_text_tokens(text: str) -> int:
    """Tokens in `text` by the simulator's rule."""
    return len(TOKEN_PATTERN.findall(text))


def count_prompt_tokens(prompt: Any) -> int:
    """Tokens in a completions/embeddings prompt: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return count_text_tokens(prompt)
    if isinstance(prompt, int):
        return 1
    return sum(count_prompt_tokens(item) for item in prompt)


def count_chat_tokens(messages: list[dict[str, Any]]) -> int:
    """Tokens in a chat prompt: message texts, plus 3 per message, plus 3."""
    text_tokens = sum(count_text_tokens(message_text(message)) for message in messages)
    return text_tokens + TOKENS_PER_MESSAGE * len(messages) + TOKENS_PER_CHAT


def message_text(message: dict[str, Any]) -> str:
    """The text of one chat message, whether its content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part["text"] for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def stable_seed(value: Any, seed: int) -> int:
    """A 64-bit seed derived from `value` (any JSON-like data) and the config seed."""
    digest = hashlib.blake2b(f"{seed}:{value!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def filler_tokens(count: int, prompt: Any, seed: int) -> list[str]:
    """`count` answer pieces, one word per token, the same for the same prompt and seed."""
    words = random.Random(stable_seed(prompt, seed)).choices(FILLER_WORDS, k=count)
    return [word if index == 0 else f" {word}" for index, word in enumerate(words)]


def embedding_vector(text: Any, dims: int, seed: int) -> list[float]:
    """A unit-length vector of `dims` floats seeded by the input's hash."""
    rng = random.Random(stable_seed(text, seed))
    values = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def encode_base64(vector: list[float]) -> str:
    """A vector as OpenAI's base64 encoding: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
