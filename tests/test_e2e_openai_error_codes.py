"""End to end: a request the gateway refuses while parsing raises, in the official openai SDK, the error OpenAI's
API raises for it: status 400, type `invalid_request_error`, and OpenAI's own `code` and `param`."""

from __future__ import annotations

import openai
import pytest

from tests.support.harness import Harness

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "auto", "messages": MESSAGES}


@pytest.fixture(scope="module")
def gw():
    harness = Harness().start()
    yield harness
    harness.stop()


def refused(gw, path: str, body: dict | None = None, *, content: bytes | None = None) -> openai.BadRequestError:
    """The SDK's exception for a POST of `body` (or raw `content`) to `path`."""
    client = gw.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        if content is None:
            client.post(path, body=body, cast_to=object)
        else:
            client.post(path, content=content, cast_to=object, options={"headers": {
                "Content-Type": "application/json"}})
    assert (caught.value.status_code, caught.value.type) == (400, "invalid_request_error")
    return caught.value


@pytest.mark.parametrize("path, body, param", [
    ("/chat/completions", {"model": "auto"}, "messages"),
    ("/completions", {"model": "auto"}, "prompt"),
    ("/embeddings", {"model": "text-embedding-3-small"}, "input"),
    ("/chat/completions", {"model": "auto", "messages": [{"content": "hi"}]}, "messages[0].role"),
])
def test_a_missing_required_field_is_missing_required_parameter(gw, path, body, param):
    """A required field left out is `missing_required_parameter` naming it, nested ones by their path."""
    error = refused(gw, path, body)
    assert (error.code, error.param) == ("missing_required_parameter", param)
    assert error.body["message"] == f"Missing required parameter: '{param}'."


@pytest.mark.parametrize("field, value, param, expected", [
    ("max_tokens", "5", "max_tokens", "expected an integer, but got a string instead"),
    ("max_tokens", 1.5, "max_tokens", "expected an integer, but got a decimal instead"),
    ("temperature", "hot", "temperature", "expected a number, but got a string instead"),
    ("stream", "yes", "stream", "expected a boolean, but got a string instead"),
    ("messages", "hello", "messages", "expected an array, but got a string instead"),
    ("messages", ["hello"], "messages[0]", "expected an object, but got a string instead"),
    ("model", 5, "model", "expected a string, but got an integer instead"),
    ("max_tokens", True, "max_tokens", "expected an integer, but got a boolean instead"),
    ("messages", [{"role": 5, "content": "hi"}], "messages[0].role", "expected a string, but got an integer instead"),
    ("seed", "42", "seed", "expected an integer, but got a string instead"),
    ("stop", 5, "stop", "expected one of a string or an array, but got an integer instead"),
])
def test_a_field_of_the_wrong_json_type_is_invalid_type(gw, field, value, param, expected):
    """A field of the wrong JSON type is `invalid_type` naming the field, the type expected and the one sent."""
    error = refused(gw, "/chat/completions", {**CHAT, field: value})
    assert (error.code, error.param) == ("invalid_type", param)
    assert error.body["message"] == f"Invalid type for '{param}': {expected}."


@pytest.mark.parametrize("field, value, code, bound", [
    ("max_tokens", 0, "integer_below_min_value", ">= 1"),
    ("max_completion_tokens", -3, "integer_below_min_value", ">= 1"),
    ("n", 0, "integer_below_min_value", ">= 1"),
    ("temperature", 3, "decimal_above_max_value", "<= 2"),
    ("temperature", -0.5, "decimal_below_min_value", ">= 0"),
    ("top_p", 1.5, "decimal_above_max_value", "<= 1"),
])
def test_a_number_out_of_its_range_names_the_bound_it_passed(gw, field, value, code, bound):
    """A number below or above its range is `integer_`/`decimal_` `below_min_value`/`above_max_value`, with the
    bound and the value in OpenAI's words."""
    client = gw.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="auto", messages=MESSAGES, **{field: value})
    error = caught.value
    assert (error.status_code, error.type, error.code, error.param) == (400, "invalid_request_error", code, field)
    assert f"Expected a value {bound}, but got {value} instead." in error.message


@pytest.mark.parametrize("field, value", [("temperature", 2), ("temperature", 0), ("top_p", 1), ("n", 1)])
def test_a_number_on_the_bound_of_its_range_is_taken(gw, field, value):
    """The bounds themselves are inside the range: `temperature` 0 and 2, `top_p` 1, `n` 1 are answered."""
    params = {"max_tokens": 1, field: value}
    assert gw.openai().chat.completions.create(model="auto", messages=MESSAGES, **params).choices


def test_an_empty_messages_array_is_empty_array(gw):
    """`messages: []` is `empty_array` on `messages`, as OpenAI answers it."""
    with pytest.raises(openai.BadRequestError) as caught:
        gw.openai().chat.completions.create(model="auto", messages=[])
    error = caught.value
    assert (error.status_code, error.type, error.code, error.param) == (400, "invalid_request_error",
                                                                       "empty_array", "messages")
    assert error.body["message"].startswith("Invalid 'messages': empty array.")


def test_a_body_that_is_not_json_has_no_code(gw):
    """A body that does not parse as JSON is a 400 about the JSON body with neither code nor param, as OpenAI's."""
    error = refused(gw, "/chat/completions", content=b'{"model": "auto", "messages": [')
    assert (error.code, error.param) == (None, None)
    assert error.body["message"].startswith("We could not parse the JSON body of your request")


@pytest.mark.parametrize("body", [{"messages": MESSAGES}, {"model": "", "messages": MESSAGES}])
def test_a_missing_model_is_answered_as_openai_answers_it(gw, body):
    """No model (or an empty one) is OpenAI's "you must provide a model parameter", with neither code nor
    param."""
    error = refused(gw, "/chat/completions", body)
    assert (error.code, error.param, error.body["message"]) == (None, None, "you must provide a model parameter")


def test_a_body_that_is_not_an_object_keeps_the_gateways_code(gw):
    """JSON that is not an object (no code of OpenAI's known for it) keeps `invalid_request`, and the gateway
    answers the next request."""
    error = refused(gw, "/chat/completions", content=b"[1, 2]")
    assert (error.code, error.param) == ("invalid_request", None)
    assert gw.openai().chat.completions.create(model="auto", messages=MESSAGES, max_tokens=1).choices


@pytest.mark.parametrize("path, body, param", [
    ("/completions", {"model": "auto", "prompt": [1.5, "x"]}, "prompt"),
    ("/embeddings", {"model": "text-embedding-3-small", "input": [{"a": 1}]}, "input"),
    ("/chat/completions", {"model": "auto", "messages": ["hi"]}, "messages[0]"),
    ("/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "tools": {"a": 1}},
     "tools"),
])
def test_a_prompt_or_tool_list_of_the_wrong_shape_is_invalid_type(gw, path, body, param):
    """A prompt, input, message or tool list whose items are of the wrong JSON type is `invalid_type` on that
    field, as OpenAI answers it (it was the gateway's own `invalid_request`)."""
    error = refused(gw, path, body)
    assert (error.status_code, error.code, error.param) == (400, "invalid_type", param)


@pytest.mark.parametrize("path, body, param, got", [
    ("/completions", {"model": "auto", "prompt": 5}, "prompt", "an integer"),
    ("/embeddings", {"model": "text-embedding-3-small", "input": {"text": "hi"}}, "input", "an object"),
])
def test_a_prompt_or_input_that_is_neither_text_nor_an_array_is_invalid_type_in_openais_words(gw, path, body, param,
                                                                                             got):
    """A prompt or input that is neither a string nor an array is `invalid_type` on it, in OpenAI's words."""
    error = refused(gw, path, body)
    assert (error.code, error.param) == ("invalid_type", param)
    assert error.body["message"] == (f"Invalid type for '{param}': expected one of a string or an array, but got "
                                     f"{got} instead.")
