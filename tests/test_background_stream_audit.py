"""Streamed background responses and the streamed retrieval against broken model servers and clients (helper's
audit of c3052e1): a background response its server has named is never generated twice by a fallback; a retrieval
stream its server cuts, or whose client stalls, is never ended as if whole; a stream cancelled while relayed ends
with its cancel, not with an error charged to its model."""

from __future__ import annotations

import json
import socket
import threading
import time

import requests
from aiohttp import web

from tests.support.harness import ledgered_harness, ledgered_raw_model_gateway
from tests.test_e2e_responses_background import (KEYS, POLICY, RAW_PRICE, RAW_ROUTE, SLOW, USAGE, BackgroundServer,
                                                 ledger_line, response, sse, wait_until)

CREATED = sse("response.created", 0, response=response("queued"))
IN_PROGRESS = sse("response.in_progress", 1, response=response("in_progress"))
COMPLETED = sse("response.completed", 9, response=response("completed", USAGE, "Once."))
#: route `raw-fallback`: the scripted model, falling back to the simulated `medium`
FALLBACK_ROUTE = RAW_ROUTE + """  - name: raw-fallback
    match: {{models: ["raw-fallback"], endpoints: [responses]}}
    candidates: [raw]
    fallback: [medium]
"""


def delta(number: int, text: str) -> bytes:
    return sse("response.output_text.delta", number, delta=text, item_id="msg_bg1", output_index=0, content_index=0)


class StreamingServer(BackgroundServer):
    """A model server taking background responses whose streamed create call sends `created_events` and then cuts
    the connection, and whose retrieval stream sends `events` as they are (bytes, delay) and then ends."""

    def __init__(self) -> None:
        super().__init__()
        self.created_events: list[tuple[bytes, float]] = []

    async def _create(self, request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return await super()._create(request)
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await answer.prepare(request)
        for event, _ in self.created_events:
            await answer.write(event)
        request.transport.close()
        return answer


def streaming_gateway(tmp_path, server: StreamingServer, tail: str = ""):
    return ledgered_raw_model_gateway(tmp_path, first_byte_s=2, tail=FALLBACK_ROUTE + tail, raw_keys=RAW_PRICE,
                                      raw=server)


def created(harness) -> str:
    """The id of a background response just created (unstreamed) on model `raw`."""
    return requests.post(f"{harness.base_url}/v1/responses", timeout=10, json={
        "model": "raw-responses", "input": "Hi", "background": True}).json()["id"]


def test_a_background_stream_its_model_drops_once_it_has_named_it_is_not_generated_again_elsewhere(tmp_path):
    """The server named the response (`response.created`), then the connection broke before any output: the server
    generates it all the same, so it is the client's (an in-band error, its id to read it on) and booked once it
    has ended. On c3052e1 the opening events were held and `medium` was tried: the client got a second response,
    the first generated on `raw` and never booked."""
    server = StreamingServer()
    server.created_events = [(CREATED, 0), (IN_PROGRESS, 0)]
    server.looks = [(200, response("completed", USAGE, "Once."))]
    with streaming_gateway(tmp_path, server) as (harness, _):
        answer = requests.post(f"{harness.base_url}/v1/responses", timeout=10, json={
            "model": "raw-fallback", "input": "Hi", "background": True, "stream": True})
        line = wait_until(lambda: ledger_line(harness, answer.headers["x-request-id"]), timeout_s=5)
    events = answer.content.split(b"\n\n")[:-1]
    assert (answer.headers["x-gateway-model"], events[0], events[1]) == \
        ("raw", CREATED.strip(b"\n"), IN_PROGRESS.strip(b"\n"))
    assert events[-1].startswith(b"event: error\n") and len(events) == 3
    assert [attempt["model"] for attempt in line["attempts"]] == ["raw"]
    assert (line["background"], line["output_tokens"], line["tokens_estimated"]) == ("completed", 40, False)


def test_a_retrieval_stream_its_server_ends_early_ends_with_an_in_band_error(tmp_path):
    """Events, then the server's clean end with no end event, or one cut half-way through an event: the client is
    told in-band (on c3052e1 the stream ended as if whole, the half event passed on for the SDK to choke on)."""
    server = StreamingServer()
    with streaming_gateway(tmp_path, server) as (harness, _):
        url = f"{harness.base_url}/v1/responses/{created(harness)}?stream=true"
        got = {}
        for cut in (b"", b'data: {"type": "response.output_text.del'):
            server.events = [(delta(2, "Once"), 0.0), (cut, 0.0)]
            got[cut] = requests.get(url, timeout=10)
    for answer in got.values():
        first, last = answer.content.split(b"\n\n")[:-1]
        assert (answer.status_code, first) == (200, delta(2, "Once").strip(b"\n")), answer.content
        assert last.startswith(b"event: error\n") and b"ended the stream early" in last, last
        assert answer.headers["X-Accel-Buffering"] == "no"     # as the create call's stream: no proxy buffers it


def test_a_retrieval_streams_client_that_stalls_is_cut_not_ended_as_whole(tmp_path):
    """A client that takes nothing for client_timeout_s has its connection closed; on c3052e1 the gateway gave up
    its writes and then ended the stream cleanly, and the client, reading on, took the events it lost for the whole
    stream."""
    server = StreamingServer()
    server.events = [(delta(2, "A" * 200_000), 0.0)] * 200 + [(COMPLETED, 0.0)]
    with streaming_gateway(tmp_path, server, "server: {{client_timeout_s: 0.5}}\n") as (harness, _):
        response_id = created(harness)
        with socket.create_connection(("127.0.0.1", harness.port)) as client:
            client.sendall(f"GET /v1/responses/{response_id}?stream=true HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            time.sleep(2.0)                 # reads nothing meanwhile
            client.settimeout(5)
            read = []
            try:
                while piece := client.recv(1 << 20):
                    read.append(piece)
            except ConnectionResetError:
                pass
    got = b"".join(read)
    assert got.startswith(b"HTTP/1.1 200") and len(got) < 30_000_000
    assert not got.endswith(b"0\r\n\r\n"), got[-100:]      # no last chunk: the stream was cut, not whole


def test_a_background_stream_cancelled_while_relayed_ends_with_its_cancel_and_is_booked_so(tmp_path):
    """`response.cancelled` ends the stream (on c3052e1 an in-band `ended the stream early` error followed it, the
    request booked as the model's failure, `upstream_bad_response`)."""
    harness = ledgered_harness(POLICY, tmp_path, sims={"small": SLOW, "medium": SLOW, "large": SLOW})
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    try:
        answer = requests.post(f"{harness.base_url}/v1/responses", headers=headers, stream=True, timeout=10, json={
            "model": "auto", "input": "Tell me a story.", "background": True, "stream": True,
            "max_output_tokens": 100})
        lines = answer.iter_lines()
        response_id = next(json.loads(line[6:])["response"]["id"] for line in lines if line.startswith(b"data:"))
        cancel = threading.Timer(0.4, requests.post, (f"{harness.base_url}/v1/responses/{response_id}/cancel",),
                                 dict(headers=headers, timeout=5))
        cancel.start()
        events = [json.loads(line[6:]) for line in lines if line.startswith(b"data:")]
        cancel.join()
        line = wait_until(lambda: ledger_line(harness, answer.headers["x-request-id"]), timeout_s=5)
    finally:
        harness.stop()
    assert events[-1]["type"] == "response.cancelled", events[-1]
    assert (line["status"], line["outcome"], line["background"]) == (200, "success", "cancelled")
    assert line["output_tokens"] == events[-1]["response"]["usage"]["output_tokens"] < 100
