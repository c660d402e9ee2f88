"""The Responses API's shapes (`POST /v1/responses`): the `response` object and its stream of named events.

The answer itself (its tokens, its finish reason, its timing) is planned and made as chat's is; only the
shapes differ. An answer cut short (chat's finish reason "length") is an `incomplete` response.
"""

from __future__ import annotations

from typing import Any

from gateway.simulator.answers import Answer, StreamScript

#: the events sent before the first delta, with it: created, in_progress, output_item.added, content_part.added
HEAD_EVENTS = 4


def response_body(answer: Answer, include_usage: bool = True) -> dict[str, Any]:
    """The finished `response` object: one assistant message holding the answer's text."""
    usage = response_usage(answer) if include_usage else None
    return _response(answer, _final_status(answer), [_message(answer, "".join(answer.tokens))], usage)


def pending_body(answer: Answer, status: str) -> dict[str, Any]:
    """The `response` object of a background response not yet done (`queued` or `in_progress`): no output yet,
    no usage."""
    return _response(answer, status, [], None)


def cancelled_body(answer: Answer, generated: int) -> dict[str, Any]:
    """The `response` object of a background response cancelled after `generated` of its output tokens: an
    unfinished message holding their text (no message when none), its usage counting them."""
    text = "".join(answer.tokens[:generated])
    output = [_message(answer, text) | {"status": "incomplete"}] if generated else []
    return _response(answer, "cancelled", output, response_usage(answer, generated))


def response_usage(answer: Answer, output_tokens: int | None = None) -> dict[str, Any]:
    """The answer's usage in the Responses API's names, with no cached or reasoning tokens; `output_tokens`, when
    given, counts those output tokens instead of all of them (a cancelled answer's)."""
    usage = answer.usage
    if output_tokens is None:
        output_tokens = usage["completion_tokens"]
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["prompt_tokens"] + output_tokens}


def response_stream_script(answer: Answer, include_usage: bool) -> StreamScript:
    """Every event of the streamed answer, in OpenAI's order, timed as chat's chunks are: the head with the first
    token, one `response.output_text.delta` per token, the tail with the last token."""
    text = "".join(answer.tokens)
    last = max(len(answer.tokens) - 1, 0)
    place = {"item_id": _message_id(answer), "output_index": 0}
    events = [
        (0, {"type": "response.created", "response": _response(answer, "in_progress", [], None)}),
        (0, {"type": "response.in_progress", "response": _response(answer, "in_progress", [], None)}),
        (0, {"type": "response.output_item.added", "output_index": 0,
             "item": _message(answer, None)}),
        (0, {"type": "response.content_part.added", **place, "content_index": 0, "part": _output_text("")}),
    ]
    events += [(index, {"type": "response.output_text.delta", **place, "content_index": 0, "delta": token,
                        "logprobs": []}) for index, token in enumerate(answer.tokens)]
    done = response_body(answer, include_usage)
    events += [
        (last, {"type": "response.output_text.done", **place, "content_index": 0, "text": text, "logprobs": []}),
        (last, {"type": "response.content_part.done", **place, "content_index": 0, "part": _output_text(text)}),
        (last, {"type": "response.output_item.done", "output_index": 0, "item": done["output"][0]}),
        (last, {"type": f"response.{done['status']}", "response": done}),
    ]
    chunks = [(at_token, event | {"sequence_number": number}) for number, (at_token, event) in enumerate(events)]
    return StreamScript(chunks, drop_after=HEAD_EVENTS + max(1, len(answer.tokens) // 2), named_events=True)


def stored_input_items(body: dict[str, Any], answer: Answer) -> list[dict[str, Any]]:
    """A stored response's input items, in order, each with an id (`GET /v1/responses/{id}/input_items`): a text
    input is one user message of `input_text`; given items keep their own id, or are given one."""
    given = body.get("input")
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": given}]}]
    base = answer.response_id.removeprefix("resp_")
    items = []
    for index, item in enumerate(given):
        item = {"type": "message", **item} if "role" in item else dict(item)
        if item.get("type") == "message":
            item.setdefault("status", "completed")
            if isinstance(item.get("content"), str):
                item["content"] = [{"type": "input_text", "text": item["content"]}]
        item.setdefault("id", f"msg_{base}_{index}")
        items.append(item)
    return items


def _final_status(answer: Answer) -> str:
    return "incomplete" if answer.finish_reason == "length" else "completed"


def _response(answer: Answer, status: str, output: list[dict[str, Any]],
              usage: dict[str, Any] | None) -> dict[str, Any]:
    """The `response` object with the fields the SDK's `Response` model requires and those OpenAI sends as null."""
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {"id": answer.response_id, "object": "response", "created_at": answer.created, "status": status,
            "error": None, "incomplete_details": incomplete, "instructions": None, "max_output_tokens": None,
            "model": answer.model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": "disabled", "usage": usage, "metadata": {}}


def _message(answer: Answer, text: str | None) -> dict[str, Any]:
    """The assistant message item: in progress and empty while `text` is None, else finished with it."""
    status = "in_progress" if text is None else _final_status(answer)
    content = [] if text is None else [_output_text(text)]
    return {"type": "message", "id": _message_id(answer), "status": status, "role": "assistant", "content": content}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _message_id(answer: Answer) -> str:
    """The message item's id, derived from the response's so that every event names the same item."""
    return "msg_" + answer.response_id.removeprefix("resp_")
