"""Background responses (`background: true`) against broken model servers and clients that leave: whatever a
server's looks answer, the request is booked once and its admission given back; a status that is no string is no
end, and no 500; a client leaving while the response's pin is written leaves it settled with what it used."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests
from aiohttp import web

from gateway import background
from tests.support.harness import ledgered_harness
from tests.support.redis_server import RedisServer
from tests.test_e2e_responses_background import (KEYS, POLICY, SLOW, USAGE, BackgroundServer, create, ledger_line,
                                                 response, scripted_gateway, wait_until)


class RawLooks(BackgroundServer):
    """A model server whose looks (GET) answer the next of `raw_looks` ((status, body bytes)), the last one again once
    they run out; its create call answers `created` when set."""

    def __init__(self, raw_looks: list[tuple[int, bytes]], created: dict | None = None) -> None:
        super().__init__()
        self.raw_looks = raw_looks
        self.created = created

    async def _create(self, request: web.Request) -> web.Response:
        if self.created is None:
            return await super()._create(request)
        return web.json_response(self.created)

    async def _look(self, request: web.Request) -> web.Response:
        status, body = self.raw_looks[min(self.looked, len(self.raw_looks) - 1)]
        self.looked += 1
        return web.Response(status=status, body=body or None, content_type="application/json")


COMPLETED = (200, web.json_response(response("completed", USAGE, "Once upon a time.")).body)


def booked(harness, rid: str) -> dict:
    """The request's ledger line once written, nothing left waiting for it."""
    line = wait_until(lambda: ledger_line(harness, rid), timeout_s=8, what="the ledger line")
    assert len(harness.services.settlements) == 0
    return line


@pytest.mark.parametrize("odd", [(204, b""), (200, b'{"id": "resp_bg1", "status": ["completed"]}')],
                         ids=["204", "status-a-list"])
def test_a_look_answered_oddly_is_looked_at_again_and_the_response_booked_once_it_ends(tmp_path, odd):
    """A 204 or a status that is no string (on f6fc658: the watching task died, the request never booked, its
    admission held for ever) is no end: the next look sees it completed and books it."""
    server = RawLooks([odd, COMPLETED])
    with scripted_gateway(tmp_path, server) as (harness, _):
        rid = create(harness).headers["x-request-id"]
        line = booked(harness, rid)
        assert (line["background"], line["output_tokens"], line["tokens_estimated"]) == ("completed", 40, False)
        assert server.looked == 2


def test_a_create_answer_whose_status_is_no_string_is_relayed_and_settled_later(tmp_path):
    """On f6fc658 the create call was a 500 internal error (the status compared as a set member), the response
    generated on its model all the same and never booked."""
    server = RawLooks([COMPLETED], created=response("queued") | {"status": {"state": "queued"}})
    with scripted_gateway(tmp_path, server) as (harness, _):
        created = create(harness)
        assert created.http_response.status_code == 200
        line = booked(harness, created.headers["x-request-id"])
        assert (line["background"], line["output_tokens"]) == ("completed", 40)


def test_a_clients_retrieval_whose_status_is_no_string_is_relayed_not_a_500(tmp_path):
    """The client's own retrieval is relayed as its server answered it (on f6fc658: a 500 internal error)."""
    server = RawLooks([(200, b'{"id": "resp_bg1", "object": "response", "status": [1]}'), COMPLETED])
    with scripted_gateway(tmp_path, server) as (harness, _):
        created = create(harness)
        retrieved = harness.http("GET", f"{harness.base_url}/v1/responses/{created.parse().id}")
        assert retrieved["status"] == [1]
        line = booked(harness, created.headers["x-request-id"])
        assert line["background"] == "completed"


def test_a_client_leaving_while_the_pin_is_written_leaves_its_response_settled_with_what_it_used(tmp_path):
    """Redis frozen: the pin's write waits its timeout, and the client leaves meanwhile. The model generates the
    response all the same: it is booked once it has ended (on f6fc658: a 499 of no token, its 40 output tokens
    never booked)."""
    redis = RedisServer().start()
    harness = ledgered_harness(POLICY + "store: {{timeout_ms: 1500}}\n", tmp_path,
                               sims={"small": SLOW, "medium": SLOW, "large": SLOW},
                               environ={**os.environ, "GATEWAY_REDIS_URL": redis.url})
    try:
        redis.process.send_signal(signal.SIGSTOP)
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{harness.base_url}/v1/responses", timeout=0.5,
                          headers={"Authorization": f"Bearer {KEYS['acme']}", "x-request-id": "left-early"},
                          json={"model": "auto", "input": "Tell me a story.", "background": True,
                                "max_output_tokens": 40})
        time.sleep(1.2)                 # the pin's write gives up
        redis.process.send_signal(signal.SIGCONT)
        line = booked(harness, "left-early")
        assert (line["status"], line["outcome"]) == (499, "client_disconnected")
        assert (line["background"], line["output_tokens"], line["tokens_estimated"]) == ("incomplete", 40, False)
    finally:
        redis.process.send_signal(signal.SIGCONT)
        harness.stop()
        redis.stop()


def test_a_server_failing_every_look_for_too_long_has_its_response_booked_unsettled(tmp_path, monkeypatch):
    """A model server down (or answering nonsense) for FAILING_FOR_MOST_S: the request is booked `unsettled` and its
    admission given back, not held until stored_response_ttl_s (a day); an answer meanwhile starts the count again.
    The looks' timings are shortened here (their constants), the code is the gateway's."""
    monkeypatch.setattr(background, "POLL_FIRST_S", 0.05)
    monkeypatch.setattr(background, "POLL_MOST_S", 0.1)
    monkeypatch.setattr(background, "FAILING_FOR_MOST_S", 1.0)
    failing = (503, b'{"error": {"message": "down"}}')
    in_progress = web.json_response(response("in_progress")).body
    server = RawLooks([failing] * 6 + [(200, in_progress)] + [failing])
    with scripted_gateway(tmp_path, server) as (harness, _):
        started = time.monotonic()
        line = booked(harness, create(harness).headers["x-request-id"])
        took_s = time.monotonic() - started
    assert (line["background"], line["tokens_estimated"]) == ("unsettled", True)
    assert took_s > 1.4 and server.looked > 8     # the in_progress answer started the count again
