"""What a chat request needs of a model beyond text: images, audio, files or tools.

A model's `supports` (policy) lists what it takes beyond text; a model without
the key takes anything. The planner drops a model that lacks something the
request uses ("unsupported: images"), as it drops one whose context is too
small: a text-only model sent an image answers 400 (vLLM: "not a multimodal
model"), which no fallback follows. A request no model of its route takes is
a 400 naming what it uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from types import MappingProxyType
from typing import Any

#: what a model's `supports` may list, in the order refusals name them
FEATURES = ("images", "audio", "files", "tools")
#: a request that uses nothing beyond text (the one object, shared)
NO_NEEDS: Mapping[str, str] = MappingProxyType({})
#: content part types (chat messages, and the Responses API's input messages) and the feature each needs
PART_FEATURES = {"image_url": "images", "input_audio": "audio", "file": "files",
                 "input_image": "images", "input_file": "files"}
#: the field that holds each endpoint's messages
MESSAGES_FIELD = {"chat": "messages", "responses": "input"}
#: the request field that most often uses each feature
USUAL_FIELD = {"images": "messages", "audio": "messages", "files": "messages", "tools": "tools"}


def request_needs(endpoint: str, body: Mapping[str, Any]) -> Mapping[str, str]:
    """Feature -> the request field that uses it (the `param` of a refusal), in the order first seen; NO_NEEDS
    for a request of text alone and for completions and embeddings. Content parts of type image_url,
    input_audio and file (chat), input_image, input_file and input_audio (the Responses API's `input`); audio
    asked as output (`modalities` naming audio, or an `audio` object); `tools` or the legacy `functions`, when
    not empty and not with `tool_choice` (`function_call`) "none". A part of an unknown type needs nothing (the
    model server judges it)."""
    field = MESSAGES_FIELD.get(endpoint)
    if field is None:
        return NO_NEEDS
    needs: dict[str, str] = {}
    messages = body.get(field)
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if type(content) is not list and field == "input" and isinstance(message, dict):
            content = message.get("output")     # a tool's output: a text, or parts (a screenshot's input_image)
        if type(content) is not list:
            continue            # a string: text alone, as most are
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if type(kind) is str and (feature := PART_FEATURES.get(kind)) is not None:
                needs.setdefault(feature, field)
    modalities = body.get("modalities")
    if isinstance(body.get("audio"), dict) or isinstance(modalities, list) and "audio" in modalities:
        needs.setdefault("audio", "modalities")
    for param, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        if body.get(param) and body.get(choice) != "none":     # tools the model is told not to call need nothing
            needs.setdefault("tools", param)
    return needs or NO_NEEDS


@cache
def recorded_needs(features: tuple[str, ...]) -> Mapping[str, str]:
    """The needs of a request whose record names what it used (a ledger line's `uses`), each feature's field the
    usual one."""
    return MappingProxyType({feature: USUAL_FIELD[feature] for feature in features}) if features else NO_NEEDS


def canonical(features: Iterable[str]) -> tuple[str, ...]:
    """The features named among `features`, in FEATURES order (names this gateway does not know are left out)."""
    named = set(features)
    return tuple(feature for feature in FEATURES if feature in named)


def lacking(supports: frozenset[str] | None, needs: Mapping[str, str]) -> tuple[str, ...]:
    """What of `needs` a model that `supports` these features lacks, in FEATURES order (None: it takes all)."""
    if supports is None or not needs:
        return ()
    return tuple(feature for feature in FEATURES if feature in needs and feature not in supports)
