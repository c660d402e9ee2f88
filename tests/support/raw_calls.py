"""Calls to a gateway by hand: raw bytes on a socket, or a chat completion to a gateway in front of the scripted
model server (`raw_model_gateway`), and what it recorded of them."""

from __future__ import annotations

import asyncio
import time

import requests

from tests.support import accounting
from tests.support.harness import Harness


async def send_raw(port: int, request: bytes, timeout_s: float = 10) -> bytes:
    """Write `request` as it is to the gateway on `port`; everything it answers until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), timeout_s)
    writer.close()
    return answer


def post(harness: Harness, model: str = "raw-only", stream: bool = True, **extra) -> requests.Response:
    """A chat completion with one short message, streamed unless told otherwise."""
    return requests.post(f"{harness.base_url}/v1/chat/completions", timeout=30,
                         json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}],
                               **extra})


def sdk_text(harness: Harness, model: str = "raw-only") -> str:
    """The answer as an application reading the stream with the openai SDK gets it."""
    stream = harness.openai().chat.completions.create(model=model, stream=True,
                                                      messages=[{"role": "user", "content": "hi"}])
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def settled(harness: Harness, model: str) -> None:
    """Wait until the model's calls have ended (the client reads the end a moment before the gateway records it)."""
    deadline_s = time.monotonic() + 5
    while harness.services.fleet.estimates.in_flight(model) and time.monotonic() < deadline_s:
        time.sleep(0.01)


def breaker_failures(harness: Harness, model: str) -> int:
    """The model's consecutive failures, once its calls have ended."""
    settled(harness, model)
    circuit = harness.services.fleet.breakers._circuits.get(model)
    return circuit.failures if circuit is not None else 0


def ledger_record(harness: Harness, request_id: str) -> dict:
    """The ledger line of one request (`harness.ledger_path`, from `ledgered_raw_model_gateway`)."""
    return accounting.ledger_record(harness.ledger_path, request_id)
