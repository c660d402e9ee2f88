"""Every field of a live answer survives the cache: assembled from a stream, and replayed as a stream
the openai SDK adds up to the cached answer (reasoning, annotations, audio, a null content, service
tier, moderation)."""

from __future__ import annotations

import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.cache.assemble import assemble_stream
from gateway.cache.entry import CacheEntry
from gateway.cache.replay import replay_sse
from tests.test_cache_replay import parse_sse, serve_sse

HEADER = {"id": "chatcmpl-9", "created": 1700000000, "model": "sim-small-1b"}
USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
ANNOTATION = {"type": "url_citation", "url_citation": {
    "url": "https://example.com", "title": "Example", "start_index": 0, "end_index": 2}}
SECOND_ANNOTATION = {"type": "url_citation", "url_citation": {
    "url": "https://example.org", "title": "Other", "start_index": 3, "end_index": 5}}
MODERATION = {"input": {"type": "moderation_results", "model": "omni-moderation-latest", "results": []},
              "output": {"type": "moderation_results", "model": "omni-moderation-latest", "results": []}}


def chat_body(message: dict, finish_reason: str = "stop", **top: object) -> dict:
    return {**HEADER, "object": "chat.completion", **top, "usage": USAGE,
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "logprobs": None,
                         "finish_reason": finish_reason}]}


def chunk(delta: dict, finish_reason: str | None = None, **top: object) -> dict:
    return {**HEADER, "object": "chat.completion.chunk", **top,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


ANSWERS = {
    "reasoning": chat_body({"content": "42", "reasoning_content": "six times seven"}),
    "annotations": chat_body({"content": "Hi there", "refusal": None, "annotations": [ANNOTATION]}),
    "audio": chat_body({"content": None, "audio": {
        "id": "audio_1", "data": "UklGRg==", "transcript": "Hi there", "expires_at": 1700003600}}),
    "refusal": chat_body({"content": None, "refusal": "I can't help with that."}),
    "tool calls": chat_body({"content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}, "tool_calls"),
    "service tier": chat_body({"content": "Hi"}, service_tier="default", system_fingerprint="fp_1"),
    "moderation": chat_body({"content": "Hi"}, moderation=MODERATION),
}


async def sdk_stream(body: dict) -> tuple[list[ChatCompletionChunk], ChatCompletion]:
    """The chunks and the final completion the openai SDK's stream helper makes of the replayed `body`."""
    events = replay_sse(CacheEntry("chat", body), include_usage=True)
    runner = await serve_sse({"/v1/chat/completions": events})
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{runner.addresses[0][1]}/v1", api_key="sk-test",
                         max_retries=0)
    try:
        async with client.chat.completions.stream(
                model="auto", messages=[{"role": "user", "content": "hi"}],
                stream_options={"include_usage": True}) as stream:
            chunks = [event.chunk async for event in stream if event.type == "chunk"]
            return chunks, await stream.get_final_completion()
    finally:
        await client.close()
        await runner.cleanup()


def comparable(completion: ChatCompletion) -> dict:
    """A completion as plain data, without the SDK's own fields, to compare stream and JSON answers."""
    data = completion.model_dump()
    for choice in data["choices"]:
        choice["message"].pop("parsed", None)
        for call in choice["message"].get("tool_calls") or ():
            call.pop("index", None)
            call["function"].pop("parsed_arguments", None)
    return data


@pytest.mark.parametrize("name", ANSWERS)
async def test_the_sdk_adds_a_replayed_stream_up_to_the_cached_answer(name: str) -> None:
    """The openai SDK's completion of a replayed stream equals its parse of the cached non-stream answer."""
    body = ANSWERS[name]
    chunks, final = await sdk_stream(body)
    assert comparable(final) == comparable(ChatCompletion.model_validate(body))
    assert {c.service_tier for c in chunks} == {body.get("service_tier")}


@pytest.mark.parametrize("name", ANSWERS)
def test_a_replayed_stream_assembles_back_to_the_cached_answer(name: str) -> None:
    """Assembling the chunks of a replayed answer gives the cached body back, every field included."""
    body = ANSWERS[name]
    chunks = parse_sse(replay_sse(CacheEntry("chat", body), include_usage=True))
    assert assemble_stream("chat", chunks) == body


def test_a_null_content_is_replayed_as_null() -> None:
    """The role delta of a message whose content is null carries a null content, not an empty string."""
    first = parse_sse(replay_sse(CacheEntry("chat", ANSWERS["tool calls"]), include_usage=False))[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}


def test_streamed_text_fields_are_concatenated() -> None:
    """Reasoning and any other text field a delta carries add up like the content does."""
    chunks = [chunk({"role": "assistant", "content": "", "reasoning_content": "six "}),
              chunk({"reasoning_content": "times seven", "reasoning": "six"}),
              chunk({"reasoning": " by seven"}),
              chunk({"content": "42", "reasoning_content": None}), chunk({}, "stop")]
    message = assemble_stream("chat", chunks)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "42", "reasoning_content": "six times seven",
                       "reasoning": "six by seven"}


def test_streamed_lists_extend_objects_merge_and_other_values_replace() -> None:
    """Unknown delta fields are kept: lists extended, objects merged field by field, numbers the last one."""
    chunks = [chunk({"role": "assistant", "content": None,
                     "audio": {"id": "audio_1", "transcript": "Hi", "data": "Ukl"}, "score": 1}),
              chunk({"audio": {"transcript": " there", "data": "GRg==", "expires_at": 1700003600},
                     "annotations": [ANNOTATION], "score": 2}),
              chunk({"annotations": [SECOND_ANNOTATION]}), chunk({}, "stop")]
    message = assemble_stream("chat", chunks)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "score": 2,
                       "audio": {"id": "audio_1", "transcript": "Hi there", "data": "UklGRg==",
                                 "expires_at": 1700003600},
                       "annotations": [ANNOTATION, SECOND_ANNOTATION]}


def test_a_stream_keeps_service_tier_and_moderation_but_not_obfuscation() -> None:
    """The service tier all chunks repeat and the moderation one chunk carries are kept; padding is not."""
    chunks = [chunk({"role": "assistant", "content": ""}, service_tier="default", obfuscation="x1"),
              chunk({"content": "Hi"}, service_tier="default", obfuscation="yy2"),
              chunk({}, "stop", service_tier="default", moderation=MODERATION, obfuscation="z")]
    body = assemble_stream("chat", chunks)
    assert (body["service_tier"], body["moderation"]) == ("default", MODERATION)
    assert "obfuscation" not in body


#: Azure OpenAI's content-filter results: per prompt on the answer, per choice on each choice
FILTERS = {"hate": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}
PROMPT_FILTERS = [{"prompt_index": 0, "content_filter_results": FILTERS}]


def test_azures_filter_results_and_other_choice_fields_survive_a_stream_assembled_for_the_cache() -> None:
    """Azure opens a stream with a choices-less chunk carrying `prompt_filter_results` (id and model empty) and
    puts `content_filter_results` on its choices; vLLM adds `stop_reason` to the finishing one: the cached answer
    keeps them where a non-stream answer has them."""
    opening = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
               "prompt_filter_results": PROMPT_FILTERS}
    chunks = [opening, chunk({"role": "assistant", "content": ""}),
              {**chunk({"content": "Hi"}), "choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None,
                                                        "finish_reason": None, "content_filter_results": FILTERS}]},
              {**chunk({}, "stop"), "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop",
                                                 "stop_reason": None, "content_filter_results": {}}]}]
    body = assemble_stream("chat", chunks)
    assert body["prompt_filter_results"] == PROMPT_FILTERS and body["id"] == HEADER["id"]
    assert body["choices"][0]["content_filter_results"] == {}       # the last value a choice carried
    assert "stop_reason" not in body["choices"][0]                   # a null one adds nothing


def test_azures_filter_results_are_replayed_in_a_stream_from_a_non_stream_answer() -> None:
    """A cached Azure answer replayed as a stream carries its prompt's filter results on the first chunk and each
    choice's on that choice's finishing chunk; assembled again, it is the cached answer."""
    body = chat_body({"content": "Hi"}, prompt_filter_results=PROMPT_FILTERS)
    body["choices"][0]["content_filter_results"] = FILTERS
    body["choices"][0]["stop_reason"] = 7
    chunks = parse_sse(replay_sse(CacheEntry("chat", body), include_usage=True))
    assert chunks[0]["prompt_filter_results"] == PROMPT_FILTERS
    finishing = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert (finishing["choices"][0]["content_filter_results"], finishing["choices"][0]["stop_reason"]) == (FILTERS, 7)
    assert assemble_stream("chat", chunks) == body


def test_the_prompt_s_filter_results_are_replayed_on_the_first_chunk_only() -> None:
    """A field a live stream sends once (Azure's `prompt_filter_results`) is replayed once, on the first chunk,
    not repeated on every chunk."""
    body = chat_body({"content": "Hi"}, prompt_filter_results=PROMPT_FILTERS)
    chunks = parse_sse(replay_sse(CacheEntry("chat", body), include_usage=True))
    assert ["prompt_filter_results" in c for c in chunks] == [True] + [False] * (len(chunks) - 1)


def test_a_choice_s_logprobs_are_replayed_and_add_up_to_the_cached_answer() -> None:
    """A cached answer's token logprobs are replayed in the stream, so the stream assembles back to it."""
    body = chat_body({"content": "Hi"})
    body["choices"][0]["logprobs"] = {"content": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
                                                   "top_logprobs": []}]}
    chunks = parse_sse(replay_sse(CacheEntry("chat", body), include_usage=True))
    assert [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]] == \
        [body["choices"][0]["logprobs"]]
    assert assemble_stream("chat", chunks) == body


def test_a_tool_call_cached_without_arguments_is_replayed_with_empty_arguments() -> None:
    """A cached tool call with no `arguments` is replayed with `""`, the string a live stream sends, not null."""
    body = chat_body({"content": None, "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "f"}}]},
                     "tool_calls")
    chunks = parse_sse(replay_sse(CacheEntry("chat", body), include_usage=False))
    calls = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert [call["function"] for call in calls] == [{"name": "f", "arguments": ""}]


def test_a_completions_choice_s_own_fields_are_replayed_on_its_finishing_chunk() -> None:
    """A completions answer's choice fields beside its text (vLLM's `stop_reason`, Azure's filter results) are
    replayed on the choice's finishing chunk, so the stream assembles back to the cached answer."""
    body = {**HEADER, "object": "text_completion", "usage": USAGE,
            "choices": [{"index": 0, "text": "Hi", "logprobs": None, "finish_reason": "stop", "stop_reason": 7,
                         "content_filter_results": FILTERS}]}
    chunks = parse_sse(replay_sse(CacheEntry("completions", body), include_usage=True))
    finishing = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert (finishing["choices"][0]["stop_reason"], finishing["choices"][0]["content_filter_results"]) == (7, FILTERS)
    assert assemble_stream("completions", chunks) == body


def test_the_answer_s_header_fields_are_the_first_chunk_s() -> None:
    """A server that stamps each chunk with its own `created` (or fingerprint) gives the cached answer the first
    chunk's, not the last one's."""
    chunks = [chunk({"role": "assistant", "content": ""}, system_fingerprint="fp_1"),
              {**chunk({"content": "Hi"}), "created": HEADER["created"] + 1, "system_fingerprint": "fp_2"},
              {**chunk({}, "stop"), "created": HEADER["created"] + 2, "system_fingerprint": "fp_3"}]
    body = assemble_stream("chat", chunks)
    assert (body["created"], body["system_fingerprint"]) == (HEADER["created"], "fp_1")


def test_a_null_top_level_field_on_a_later_chunk_keeps_the_value_an_earlier_chunk_carried() -> None:
    """Azure's `prompt_filter_results` sent on the first chunk and null on later ones stays in the cached answer,
    and a field only ever null adds nothing."""
    chunks = [{**chunk({"role": "assistant", "content": ""}), "prompt_filter_results": PROMPT_FILTERS},
              {**chunk({"content": "Hi"}), "prompt_filter_results": None, "x_extra": None},
              {**chunk({}, "stop"), "prompt_filter_results": None}]
    body = assemble_stream("chat", chunks)
    assert body["prompt_filter_results"] == PROMPT_FILTERS
    assert "x_extra" not in body


def test_a_chunk_after_the_finish_does_not_unfinish_the_choice() -> None:
    """Azure may send a choice's filter results on a chunk after its finishing one, with a null finish reason:
    the answer still ends with `stop`, and is cached."""
    trailing = {**chunk({}), "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": None,
                                          "content_filter_results": FILTERS}]}
    body = assemble_stream("chat", [chunk({"role": "assistant", "content": "Hi"}), chunk({}, "stop"), trailing])
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["content_filter_results"] == FILTERS


def test_a_stream_that_sent_no_content_is_cached_with_an_empty_one() -> None:
    """A chat stream whose deltas never carried `content` (role, then the finish) is cached as the non-stream
    answer would be: `content: ""`, which a replay hands back as text, not as a missing field."""
    body = assemble_stream("chat", [chunk({"role": "assistant"}), chunk({}, "length")])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ""}


def test_choices_streamed_out_of_order_are_assembled_in_index_order() -> None:
    """Chunks of choice 1 arriving before choice 0's still add up to choices listed by index, as a non-stream
    answer lists them."""
    def of(index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {**HEADER, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    body = assemble_stream("chat", [of(1, {"role": "assistant", "content": "B"}), of(0, {"content": "A"}),
                                    of(1, {}, "stop"), of(0, {}, "stop")])
    assert [(c["index"], c["message"]["content"]) for c in body["choices"]] == [(0, "A"), (1, "B")]


def test_an_empty_content_beside_streamed_tool_calls_is_assembled_as_null() -> None:
    """A stream that opens with `content: ""` and then calls tools adds up to `content: null` beside the calls,
    as the non-stream answer has it."""
    call = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = assemble_stream("chat", [chunk({"role": "assistant", "content": ""}), chunk({"tool_calls": [call]}),
                                    chunk({}, "tool_calls")])
    message = body["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["id"] == "call_a"


def test_whole_tool_calls_streamed_without_an_index_stay_separate_calls() -> None:
    """An OpenAI-compatible server that sends each tool call whole in one delta and without `index` adds up
    to one call per delta, not to one call with both calls' names and arguments run together."""
    calls = [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}}]
    body = assemble_stream("chat", [chunk({"role": "assistant", "tool_calls": [calls[0]]}),
                                    chunk({"tool_calls": [calls[1]]}), chunk({}, "tool_calls")])
    assert body["choices"][0]["message"]["tool_calls"] == calls


def test_token_logprobs_streamed_over_several_chunks_add_up_to_all_the_tokens() -> None:
    """Each live chunk carries the logprobs of its own tokens: the cached answer keeps every token's, in order,
    not only the last chunk's."""
    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}

    def with_logprobs(delta: dict, logprobs: dict) -> dict:
        streamed = chunk(delta)
        streamed["choices"][0]["logprobs"] = logprobs
        return streamed

    body = assemble_stream("chat", [
        with_logprobs({"role": "assistant", "content": "Hi"}, {"content": [token("Hi", -0.25)]}),
        with_logprobs({"content": " there"}, {"content": [token(" there", -0.5)]}),
        chunk({}, "stop")])
    assert body["choices"][0]["logprobs"] == {"content": [token("Hi", -0.25), token(" there", -0.5)]}


def test_a_completions_answer_s_logprobs_are_replayed_and_add_up_to_the_cached_answer() -> None:
    """A cached completions answer's logprobs ride on its text chunk, so the replayed stream assembles back to it."""
    logprobs = {"tokens": ["Hi"], "token_logprobs": [-0.25], "top_logprobs": [{"Hi": -0.25}], "text_offset": [0]}
    body = {**HEADER, "object": "text_completion", "usage": USAGE,
            "choices": [{"index": 0, "text": "Hi", "logprobs": logprobs, "finish_reason": "stop"}]}
    chunks = parse_sse(replay_sse(CacheEntry("completions", body), include_usage=True))
    assert assemble_stream("completions", chunks) == body


def test_a_type_or_index_in_a_streamed_object_is_replaced_not_concatenated() -> None:
    """An object delta field sent over several chunks concatenates its text but keeps one `type` and `index`, as
    the openai SDK merges them."""
    chunks = [chunk({"role": "assistant", "content": "", "x_step": {"index": "0", "type": "summary", "text": "a"}}),
              chunk({"x_step": {"index": "0", "type": "summary", "text": "b"}}), chunk({}, "stop")]
    message = assemble_stream("chat", chunks)["choices"][0]["message"]
    assert message["x_step"] == {"index": "0", "type": "summary", "text": "ab"}
