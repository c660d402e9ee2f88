"""Audit of the late changes: lone surrogates read by the stdlib's json, and the Responses API's fields judged on
that API alone."""

from __future__ import annotations

import pytest
import requests

from tests import test_session_regression_audit as regression
from tests.support.harness import reset_raw_model

#: the regression audit's gateway (the standard models and a scripted one, a chat and a Responses API route)
env = regression.env


@pytest.fixture
def gw(env):
    gw, raw = env
    reset_raw_model(gw, raw)
    return gw


def post_chat(gw, raw: bytes) -> requests.Response:
    """The bytes sent as a chat request's body, as they are."""
    return requests.post(f"{gw.base_url}/v1/chat/completions", data=raw, timeout=10,
                         headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("number", [b"1e400", b"-1e400"])
def test_a_lone_surrogate_beside_a_number_past_a_double_is_still_a_400(gw, number):
    """A number past a double's range (1e400) is a 400 the gateway gives without a surrogate (orjson: "number is
    infinity"); beside a lone surrogate the stdlib read it as infinity and it was passed on as `null`, a value
    the client never sent. Anything else wrong beside a lone surrogate must still be a 400."""
    body = (b'{"model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": "\\ud83d"}], '
            b'"presence_penalty": ' + number + b'}')
    without = post_chat(gw, body.replace(b"\\ud83d", b"hi"))
    assert without.status_code == 400
    response = post_chat(gw, body)
    assert response.status_code == 400, response.text


def test_a_body_in_utf16_is_still_a_400(gw):
    """A body that is not UTF-8 (UTF-16, with its byte order mark) was a 400, as one with a UTF-8 byte order mark
    still is: orjson names every invalid UTF-8 "surrogates not allowed", so the stdlib's json, which guesses
    UTF-16 and UTF-32, read it and the request was served."""
    body = '{"model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}'
    response = post_chat(gw, body.encode("utf-16"))
    assert response.status_code == 400, response.text


def test_a_surrogate_written_as_raw_bytes_is_still_invalid_utf8(gw):
    """A surrogate's three bytes written raw (`\\xed\\xa0\\xbd`, CESU-8) are no UTF-8, which the gateway refuses;
    the change was for a lone surrogate's escape, which is valid JSON, not for bodies that are not UTF-8."""
    body = b'{"model": "auto", "max_tokens": 5, "messages": [{"role": "user", "content": "cut \xed\xa0\xbd"}]}'
    response = post_chat(gw, body)
    assert response.status_code == 400, response.text


HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.mark.parametrize("stray", ["max_tokens", "max_completion_tokens"])
def test_a_responses_requests_stray_chat_limit_does_not_move_it_to_a_larger_model(gw, stray):
    """On the Responses API the answer's limit is `max_output_tokens`; chat's `max_tokens` and
    `max_completion_tokens` are fields it does not have, which its server ignores (the mirror of the chat request
    carrying `max_output_tokens`). A stray 20,000 beside `max_output_tokens: 16` was taken as the limit first and
    moved the request from small (8,192 tokens of context) to medium."""
    raw = gw.openai().responses.with_raw_response.create(
        model="agents", input="Say hello.", max_output_tokens=16, extra_body={stray: 20_000})
    assert raw.status_code == 200
    assert raw.headers["x-gateway-model"] == "small"


@pytest.mark.parametrize("stray", [{"max_tokens": 0}, {"max_completion_tokens": 0}])
def test_chats_limits_on_a_responses_request_are_not_judged_as_chats(gw, stray):
    """Chat's `max_tokens` and `max_completion_tokens` are not the Responses API's fields: a stray 0 on a Responses
    request (with its own `max_output_tokens`) is passed on, not a 400 for a field that API does not have."""
    raw = gw.openai().responses.with_raw_response.create(
        model="agents", input="Say hello.", max_output_tokens=16, extra_body=stray)
    assert raw.status_code == 200
