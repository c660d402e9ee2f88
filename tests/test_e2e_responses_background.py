"""End to end: background responses (`background: true`) through the gateway with the official openai SDK: answered
queued at once, booked (tokens, cost, budget, ledger line, spans) once they have ended, whoever sees the end first,
the gateway's own looks or the client's retrieval; the tenant's admission held meanwhile; what the gateway cannot
see the end of booked `unsettled`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from decimal import Decimal

import openai
import pytest
import requests
from aiohttp import web

from gateway.background import ENDED
from gateway.tenancy.identity import sha256_hex
from tests.support import policies
from tests.support.accounting import api_cost, ledger_lines, ledger_record
from tests.support.harness import DEFAULT_SIMS, Harness, ledgered_harness, ledgered_raw_model_gateway, raw_model_policy
from tests.test_e2e_telemetry import exported_trace, new_traceparent, otel_environ

RAW_PRICE = "    price: {{input_per_mtok: 1, output_per_mtok: 2}}\n"
RAW_ROUTE = """  - name: raw-responses
    match: {{models: ["raw-responses"], endpoints: [responses]}}
    candidates: [raw]
"""


def wait_until(check, timeout_s: float = 15.0, what: str = "the condition"):
    """Poll `check` until it returns something true; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.05)


def ledger_line(harness, request_id: str) -> dict | None:
    """The request's ledger line, None while it is not written."""
    return next((line for line in ledger_lines(harness.ledger_path) if line.get("request_id") == request_id), None)


KEYS = {"acme": "sk-acme-background", "solo": "sk-solo-background"}
POLICY = policies.standard_models("small", "medium", "large") + """
routes:
  - name: agents
    match: {{models: ["auto"], endpoints: [responses]}}
    candidates: [small]
tenants:
  acme: {{keys_sha256: ["%s"]}}
  solo: {{keys_sha256: ["%s"], limits: {{concurrent: 1}}, budget: {{usd_per_day: 100}}}}
""" % tuple(sha256_hex(key) for key in KEYS.values())
#: the simulated model generates 40 tokens in about 0.8 s
SLOW = dict(ttft_ms=20, tpot_ms=20)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    harness = ledgered_harness(POLICY, tmp_path_factory.mktemp("ledger"),
                               sims={"small": SLOW, "medium": SLOW, "large": SLOW},
                               environ={**os.environ, "GATEWAY_PROMETHEUS": "1"})
    yield harness
    harness.stop()


def client(gw, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=KEYS[tenant], max_retries=0)


def started(gw, tenant: str = "acme", tokens: int = 40):
    """A background response just created: (the raw answer, its response)."""
    raw = client(gw, tenant).responses.with_raw_response.create(
        model="auto", input="Tell me a story.", max_output_tokens=tokens, background=True)
    return raw, raw.parse()


def test_a_background_response_is_answered_queued_and_booked_once_its_client_sees_it_ended(gw):
    """Generated in about 3 s: the gateway's own looks come at 1, 2.5 and 4.75 s, so the client's retrieval that
    sees the end first is what settles it."""
    raw, queued = started(gw, tokens=150)
    assert (queued.status, queued.usage, raw.headers["x-gateway-model"]) == ("queued", None, "small")
    rid = raw.headers["x-request-id"]
    assert ledger_line(gw, rid) is None                 # nothing is known of what it used yet
    done = wait_until(lambda: (r := client(gw).responses.retrieve(queued.id)).status in ENDED and r,
                      what="the response's end")
    line = wait_until(lambda: ledger_line(gw, rid), timeout_s=1, what="the ledger line")     # booked at once
    assert (line["background"], line["tokens_estimated"]) == ("incomplete", False)     # its max_output_tokens
    assert (line["input_tokens"], line["output_tokens"]) == (done.usage.input_tokens, done.usage.output_tokens)
    assert Decimal(line["cost_usd"]) == api_cost(done.usage.input_tokens, done.usage.output_tokens, "0.10", "0.20")
    assert line["latency_s"] < 0.5 < line["attempts"][0]["duration_s"]


def test_the_gateway_settles_a_background_response_nobody_polls(gw):
    """And says how many it watches, per model, as a gauge."""
    raw, _ = started(gw)
    assert watched_gauge(gw) == {"small": 1.0}
    line = wait_until(lambda: ledger_line(gw, raw.headers["x-request-id"]), timeout_s=8, what="the ledger line")
    assert (line["background"], line["output_tokens"], line["tokens_estimated"]) == ("incomplete", 40, False)
    assert watched_gauge(gw) in ({}, {"small": 0.0})


def watched_gauge(gw) -> dict[str, float]:
    """gateway.background.watched from /metrics, by model."""
    text = requests.get(f"{gw.base_url}/metrics", timeout=10).text
    return {line.split('gateway_model_selected="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("gateway_background_watched{")}


def test_a_cancelled_background_response_is_booked_with_what_it_generated(gw):
    raw, queued = started(gw, tokens=200)               # about 4 s
    time.sleep(0.6)
    cancelled = client(gw).responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    line = wait_until(lambda: ledger_line(gw, raw.headers["x-request-id"]), timeout_s=2, what="the ledger line")
    assert line["background"] == "cancelled" and 0 < line["output_tokens"] < 200
    assert line["output_tokens"] == cancelled.usage.output_tokens


def test_a_background_response_holds_its_tenants_admission_until_it_ends(gw):
    """The tenant's concurrent slot and budget hold are kept while the model works for it, then settled."""
    before = gw.call(gw.services.stores.budgets.usage(gw.holder.current.policy.tenants["solo"]))
    raw, queued = started(gw, tenant="solo")
    with pytest.raises(openai.RateLimitError):          # concurrent: 1, held by the response being generated
        started(gw, tenant="solo")
    held = gw.call(gw.services.stores.budgets.usage(gw.holder.current.policy.tenants["solo"]))
    assert held.held_usd > 0 and held.spent_day_usd == before.spent_day_usd
    wait_until(lambda: client(gw, "solo").responses.retrieve(queued.id).status in ENDED)
    line = wait_until(lambda: ledger_line(gw, raw.headers["x-request-id"]), timeout_s=2, what="the ledger line")
    after = wait_until(lambda: (u := gw.call(gw.services.stores.budgets.usage(
        gw.holder.current.policy.tenants["solo"]))).held_usd == 0 and u, timeout_s=2)
    assert after.spent_day_usd - before.spent_day_usd == Decimal(line["cost_usd"])
    started(gw, tenant="solo")                          # its slot is free again


def test_a_background_stream_relayed_whole_is_booked_with_its_end(gw):
    raw = client(gw).responses.with_raw_response.create(model="auto", input="Tell me a story.",
                                                        max_output_tokens=16, background=True, stream=True)
    with raw.parse() as stream:
        events = list(stream)
    assert events[-1].type == "response.incomplete" and events[-1].response.background
    line = wait_until(lambda: ledger_line(gw, raw.headers["x-request-id"]), timeout_s=5, what="the ledger line")
    assert (line["status"], line["background"], line["output_tokens"], line["tokens_estimated"]) == \
        (200, "incomplete", 16, False)


def test_a_background_stream_its_client_leaves_is_settled_and_read_on_from_where_it_was_cut(gw):
    """The client reads a few events and leaves: the server generates the response all the same; the request is
    booked 499 with all it used once it has ended. The client reads it on with `starting_after`, and that stream's
    end settles it at once (before the gateway's own look, 1 s after the cut)."""
    raw = client(gw).responses.with_raw_response.create(model="auto", input="Tell me a story.",
                                                        max_output_tokens=60, background=True, stream=True)
    rid = raw.headers["x-request-id"]
    with raw.parse() as stream:
        seen = []
        for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta" and len(seen) > 6:
                break
    response_id = seen[0].response.id
    with client(gw).responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number) as rest:
        read_on = list(rest)
    assert read_on[0].sequence_number == seen[-1].sequence_number + 1 and read_on[-1].type == "response.incomplete"
    text = "".join(e.delta for e in seen + read_on if e.type == "response.output_text.delta")
    assert text == read_on[-1].response.output[0].content[0].text       # nothing lost, nothing twice
    line = wait_until(lambda: ledger_line(gw, rid), timeout_s=0.5, what="the ledger line")
    assert (line["status"], line["outcome"], line["background"]) == (499, "client_disconnected", "incomplete")
    assert (line["output_tokens"], line["tokens_estimated"]) == (60, False)


# a model server whose stored response says what each test scripts ------------------------------------------------

def response(status: str, usage: dict | None = None, text: str = "") -> dict:
    output = [{"type": "message", "id": "msg_bg1", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}] if text else []
    return {"id": "resp_bg1", "object": "response", "created_at": 1, "status": status, "model": "fake",
            "background": True, "output": output, "usage": usage, "error": None}


USAGE = {"input_tokens": 11, "output_tokens": 40, "total_tokens": 51}


class BackgroundServer:
    """A model server taking background responses: its create call answers `queued`; each look (GET) answers the
    next of `looks` ((status, body)), the last one again once they run out."""

    def __init__(self) -> None:
        self.looks: list[tuple[int, dict]] = [(200, response("in_progress"))]
        self.looked = 0
        self.look_ids: set[str | None] = set()     # the x-request-id of each look: its create call's, or a client's
        self.create_status = "queued"
        self.events: list[tuple[bytes, float]] = []
        self.streamed: list[dict] = []          # the query of each stream asked for
        self.stream_refusal: tuple[int, dict] | None = None     # (status, body) a stream is refused with
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> BackgroundServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/responses", self._create)
        app.router.add_get("/v1/responses/{response_id}", self._look)
        app.router.add_delete("/v1/responses/{response_id}", self._delete)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _create(self, request: web.Request) -> web.Response:
        ended = self.create_status == "completed"
        return web.json_response(response(self.create_status, USAGE if ended else None, "Done." if ended else ""))

    async def _look(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("stream") == "true":
            return await self._stream(request)
        status, body = self.looks[min(self.looked, len(self.looks) - 1)]
        self.looked += 1
        self.look_ids.add(request.headers.get("x-request-id"))
        return web.json_response(body, status=status)

    async def _delete(self, request: web.Request) -> web.Response:
        """Deleted: looked at after, it is not found."""
        response_id = request.match_info["response_id"]
        self.looks = [(404, {"error": {"message": f"Response with id '{response_id}' not found."}})]
        return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """The response's events (`events`: each after its delay), as a server streams a background response."""
        self.streamed.append(dict(request.query))
        if self.stream_refusal is not None:
            status, body = self.stream_refusal
            return web.json_response(body, status=status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event, delay_s in self.events:
            await asyncio.sleep(delay_s)
            await response.write(event)
        await response.write_eof()
        return response

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def scripted(tmp_path):
    server = BackgroundServer()
    with scripted_gateway(tmp_path, server) as (harness, _):
        yield harness, server


def scripted_gateway(tmp_path, server: BackgroundServer):
    """A gateway with model `raw` served by `server`, priced, its ledger in `tmp_path`."""
    return ledgered_raw_model_gateway(tmp_path, first_byte_s=2, tail=RAW_ROUTE, raw_keys=RAW_PRICE, raw=server)


def create(harness, **fields):
    return harness.openai().responses.with_raw_response.create(
        **{"model": "raw-responses", "input": "Write a long story.", "background": True, **fields})


def test_the_gateways_looks_ride_out_server_errors_and_book_the_ended_response(scripted):
    harness, server = scripted
    server.looks = [(503, {"error": {"message": "busy"}}), (200, response("in_progress")),
                    (200, response("completed", USAGE, "Once upon a time."))]
    created = create(harness)
    assert created.parse().status == "queued" and created.headers["x-gateway-model"] == "raw"
    rid = created.headers["x-request-id"]
    line = wait_until(lambda: ledger_line(harness, rid), timeout_s=10, what="the ledger line")
    assert server.looked == 3
    assert (line["background"], line["status"], line["outcome"]) == ("completed", 200, "success")
    assert (line["input_tokens"], line["output_tokens"], line["tokens_estimated"]) == (11, 40, False)
    assert Decimal(line["cost_usd"]) == Decimal("0.000091")       # 11 × $1 + 40 × $2 per million
    [attempt] = line["attempts"]
    assert attempt["duration_s"] > 2.0 > line["latency_s"]     # the generation's time; the create call's


def test_a_response_its_server_no_longer_has_is_booked_unsettled_with_its_prompt(scripted):
    harness, server = scripted
    server.looks = [(404, {"error": {"message": "Response with id 'resp_bg1' not found."}})]
    rid = create(harness).headers["x-request-id"]
    line = wait_until(lambda: ledger_line(harness, rid), timeout_s=10, what="the ledger line")
    assert (line["background"], line["output_tokens"], line["tokens_estimated"]) == ("unsettled", 0, True)
    assert line["input_tokens"] > 0


def test_a_response_still_generated_at_stop_is_booked_unsettled_without_holding_the_stop(tmp_path):
    server = BackgroundServer()
    with scripted_gateway(tmp_path, server) as (harness, _):
        rid = create(harness).headers["x-request-id"]
        started = time.monotonic()
        harness.call(harness.runner.cleanup())
        stopped_s = time.monotonic() - started
        harness.runner = None
    line = ledger_record(harness.ledger_path, rid)
    assert (line["background"], line["tokens_estimated"]) == ("unsettled", True)
    assert stopped_s < 4.0, stopped_s           # one last look, not a wait for its end
    assert server.looked >= 1


def test_a_background_response_its_server_answers_ended_is_booked_at_once(scripted):
    """A server that generated it before answering (or ignores `background`): nothing is left to wait for."""
    harness, server = scripted
    server.create_status = "completed"
    raw = create(harness)
    assert raw.parse().status == "completed"
    line = wait_until(lambda: ledger_line(harness, raw.headers["x-request-id"]), timeout_s=5)
    assert (line["output_tokens"], line["background"], server.looked) == (40, "completed", 0)   # with its answer


def test_a_background_responses_spans_say_how_it_ended_and_what_it_used(receiver):
    """Exported once it has ended: the SERVER span (the create call's time) with `gateway.background.status`, the
    CLIENT span with the ended response's usage, not the queued answer's none."""
    server = BackgroundServer().start()
    server.looks = [(200, response("completed", USAGE, "Once upon a time."))]
    environ = otel_environ(receiver.http_endpoint, "http/protobuf", "gw-background")
    harness = Harness(raw_model_policy(server.url, first_byte_s=2, tail=RAW_ROUTE, raw_keys=RAW_PRICE),
                      sims={name: dict(ttft_ms=1, tpot_ms=0) for name in DEFAULT_SIMS}, environ=environ).start()
    try:
        trace_id, traceparent = new_traceparent()
        harness.openai().responses.create(model="raw-responses", input="Hi.", background=True,
                                          extra_headers={"traceparent": traceparent})
        spans = exported_trace(harness, receiver, trace_id, spans=3)     # SERVER, gateway.route, CLIENT
        [server_span] = [span for span in spans if span.kind == "SERVER"]
        [call] = [span for span in spans if span.kind == "CLIENT"]
        assert server_span.attributes["gateway.background.status"] == "completed"
        assert server_span.attributes["gateway.cost.usd"] == pytest.approx(0.000091)
        assert (call.attributes["gen_ai.usage.input_tokens"], call.attributes["gen_ai.usage.output_tokens"]) == (11, 40)
        assert server_span.end_ns - server_span.start_ns < 0.5e9      # the create call's time, not the generation's
        assert server.looked == 1
    finally:
        harness.stop()
        server.stop()


def sse(kind: str, sequence_number: int, **fields) -> bytes:
    """One Responses API event as a server streams it."""
    payload = {"type": kind, "sequence_number": sequence_number, **fields}
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()


def test_a_background_stream_read_on_is_relayed_and_its_end_settles_the_request(scripted):
    """`retrieve(id, stream=True, starting_after=N)`: the server's events, relayed as they come, its query passed
    on; the end event settles the request at once, before the gateway's next look."""
    harness, server = scripted
    server.events = [(sse("response.output_text.delta", 5, delta="Once", item_id="msg_bg1", output_index=0,
                          content_index=0), 0.0),
                     (sse("response.completed", 6, response=response("completed", USAGE, "Once.")), 0.2)]
    created = create(harness)
    response_id, rid = created.parse().id, created.headers["x-request-id"]
    with harness.openai().responses.retrieve(response_id, stream=True, starting_after=4) as stream:
        kinds = [event.type for event in stream]
    assert kinds == ["response.output_text.delta", "response.completed"]
    assert server.streamed == [{"stream": "true", "starting_after": "4"}]
    line = wait_until(lambda: ledger_line(harness, rid), timeout_s=0.5, what="the ledger line")
    assert (line["background"], line["output_tokens"], server.looked) == ("completed", 40, 0)


def test_a_background_stream_whose_server_goes_silent_ends_with_an_in_band_error(tmp_path):
    server = BackgroundServer()
    server.events = [(sse("response.in_progress", 1, response=response("in_progress")), 0.0), (b"", 5.0)]
    with ledgered_raw_model_gateway(tmp_path, first_byte_s=2, total_s=1, tail=RAW_ROUTE, raw=server) as (harness, _):
        response_id = create(harness).parse().id
        started = time.monotonic()
        answer = requests.get(f"{harness.base_url}/v1/responses/{response_id}", params={"stream": "true"},
                              timeout=10)
        took_s = time.monotonic() - started
    assert answer.status_code == 200 and answer.headers["x-gateway-model"] == "raw"
    *events, last = answer.content.split(b"\n\n")[:-1]
    assert [event.split(b"\n")[0] for event in events + [last]] == [b"event: response.in_progress", b"event: error"]
    assert b'"code":"upstream_timeout"' in last and 1.0 <= took_s < 4.0, (last, took_s)


def test_a_background_stream_its_server_no_longer_has_is_not_found_and_forgotten(scripted):
    harness, server = scripted
    created = create(harness)
    response_id = created.parse().id
    server.stream_refusal = (404, {"error": {"message": f"Response with id '{response_id}' not found."}})
    with pytest.raises(openai.NotFoundError, match=response_id):
        harness.openai().responses.retrieve(response_id, stream=True)
    with pytest.raises(openai.NotFoundError):   # forgotten: its server is not asked again
        harness.openai().responses.retrieve(response_id)
    assert server.look_ids <= {created.headers["x-request-id"]} and len(server.streamed) == 1  # (the gateway's own)


def test_a_background_response_its_client_deletes_is_booked_unsettled_without_a_warning(scripted, caplog):
    """Deleted through the gateway while generated: its watch finds it gone, as after a server's restart, but says
    so at INFO (its client's doing, no news for an SRE), not WARNING."""
    caplog.set_level(logging.INFO, logger="gateway")
    harness, server = scripted
    created = create(harness)
    harness.openai().responses.delete(created.parse().id)
    line = wait_until(lambda: ledger_line(harness, created.headers["x-request-id"]), timeout_s=10)
    assert line["background"] == "unsettled"
    gone = [record for record in caplog.records if "is no longer on model" in record.getMessage()]
    assert [record.levelname for record in gone] == ["INFO"] and "deleted by its client" in gone[0].getMessage()
