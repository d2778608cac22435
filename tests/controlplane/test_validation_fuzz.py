"""Generate's request checks against arbitrary requests (hypothesis, derandomized: the same requests each
run of a given hypothesis version): every request is either refused with an `InvalidRequest` (the gRPC
API's INVALID_ARGUMENT, with a message) or turned into engine terms the engine can run; no other exception
escapes, and the cheap pre-check (`check_fields`, run before the prompt is encoded) never refuses a request
the full check accepts. And a valid request with exactly one field out of range is refused, naming it."""

from __future__ import annotations

import math
import re

import pytest

from google.protobuf.struct_pb2 import Struct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.chat_template import load_chat_template

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.tokenizer import ByteTokenizer
from controlplane.validation import (
    MAX_LOGIT_BIAS_VALUE,
    MAX_LOGPROBS,
    MAX_N,
    InvalidRequest,
    Limits,
    ValidatedRequest,
    check_fields,
    validate_generate,
)

VOCAB = 260
LIMITS = Limits(vocab_size=VOCAB, max_model_len=64, eos_token_ids=frozenset({257}))
TOKENIZER = ByteTokenizer()
CHATML = load_chat_template("tiny")

# edge values first: hypothesis shrinks toward them, and they are where checks go wrong
floats = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 1e-30, 100.0, 101.0]),
                   st.floats(width=32))  # NaN and infinities included
int32 = st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
uint32 = st.one_of(st.sampled_from([0, 1, VOCAB - 1, VOCAB, 2**32 - 1]), st.integers(0, 2**32 - 1))
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=80)  # protobuf strings are valid UTF-8


def mostly(valid: st.SearchStrategy, anything: st.SearchStrategy) -> st.SearchStrategy:
    """A value in range four times in five, else any value of the type: a request with a dozen fields
    set is then often accepted whole, so the checks on accepted requests get exercised too."""
    return st.integers(0, 4).flatmap(lambda pick: anything if pick == 4 else valid)


token_id = mostly(st.integers(0, VOCAB - 1), uint32)
OPTIONAL = {
    "request_id": mostly(st.from_regex(r"[A-Za-z0-9_.-]{1,24}", fullmatch=True), text),
    "max_tokens": mostly(st.integers(1, 80), int32),
    "temperature": mostly(st.floats(0, 2), floats),
    "top_p": mostly(st.floats(0.01, 1), floats),
    "top_k": mostly(st.integers(-1, 50), int32),
    "min_p": mostly(st.floats(0, 1), floats),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(mostly(st.text("abc ", min_size=1, max_size=5), text), max_size=3),
    "stop_token_ids": st.lists(token_id, max_size=3),
    "ignore_eos": st.booleans(),
    "repetition_penalty": mostly(st.floats(0.5, 2), floats),
    "presence_penalty": mostly(st.floats(-2, 2), floats),
    "frequency_penalty": mostly(st.floats(-2, 2), floats),
    "logprobs": mostly(st.integers(0, MAX_LOGPROBS), uint32),
    "min_tokens": mostly(st.integers(0, 70), uint32),
    "n": mostly(st.integers(0, MAX_N), uint32),
    "priority": mostly(st.just(0), int32),  # this server schedules fcfs: any other priority is refused
    "logit_bias": st.dictionaries(token_id, mostly(st.floats(-100, 100), floats), max_size=3),
    "allowed_token_ids": st.lists(token_id, max_size=3),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "prompt_logprobs": mostly(st.integers(0, MAX_LOGPROBS), uint32),
    "truncate_prompt_tokens": mostly(st.integers(1, 70), uint32),
    "detokenize": st.booleans(),
}


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    fields: dict[str, object] = {}
    prompt = draw(mostly(st.sampled_from(["text", "token_ids"]), st.sampled_from(["chat", "none"])))
    if prompt == "text":
        fields["text"] = draw(mostly(st.text("hello wrld", min_size=1, max_size=70), text))
    elif prompt == "token_ids":
        fields["token_ids"] = {"ids": draw(mostly(st.lists(token_id, min_size=1, max_size=40),
                                                  st.lists(token_id, max_size=70)))}
    elif prompt == "chat":  # this model has no chat template: always refused, never a crash
        fields["chat"] = {"messages": [{"role": draw(st.sampled_from(["user", "system", ""])), "content": draw(text)}]}
    for name, strategy in OPTIONAL.items():
        if draw(st.booleans()):
            fields[name] = draw(strategy)
    return pb.GenerateRequest(**fields)


def _check_accepted(valid: ValidatedRequest, request: pb.GenerateRequest) -> None:
    prompt = valid.prompt_token_ids
    assert 1 <= len(prompt) < LIMITS.max_model_len and all(0 <= t < VOCAB for t in prompt)
    assert 1 <= valid.stop.max_tokens <= LIMITS.max_model_len - len(prompt)  # room for every token it may make
    assert valid.stop.min_tokens <= valid.stop.max_tokens
    assert all(t < VOCAB for t in valid.stop.stop_token_ids) and all(valid.stop.stop_strings)
    s = valid.sampling
    assert math.isfinite(s.temperature) and s.temperature >= 0
    assert 0 < s.top_p <= 1 and 0 <= s.min_p <= 1 and s.top_k >= 0
    assert math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0
    assert -2 <= s.presence_penalty <= 2 and -2 <= s.frequency_penalty <= 2
    assert all(t < VOCAB and abs(b) <= MAX_LOGIT_BIAS_VALUE for t, b in s.logit_bias)
    assert all(t < VOCAB for t in s.allowed_token_ids)
    assert s.logprobs is None or s.logprobs <= MAX_LOGPROBS
    assert s.prompt_logprobs is None or s.prompt_logprobs <= MAX_LOGPROBS
    assert 1 <= valid.n <= MAX_N and valid.request_id and valid.request_id.isprintable()
    check_fields(request, LIMITS)  # the pre-check must not refuse what the full check accepts (raises here)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_every_request_is_accepted_whole_or_refused_with_a_message(request: pb.GenerateRequest) -> None:
    try:
        valid = validate_generate(request, TOKENIZER, LIMITS)
    except InvalidRequest as exc:
        assert str(exc)  # the message the client gets
        return
    _check_accepted(valid, request)


json_leaf = st.one_of(st.none(), st.booleans(), floats, st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=6)
json_object = st.dictionaries(mostly(st.sampled_from(["name", "arguments", "type", "enable_thinking"]),
                                     st.text(max_size=12)), json_value, max_size=3)


def _struct(value: dict) -> Struct:
    struct = Struct()
    struct.update(value)
    return struct


@st.composite
def chats(draw: st.DrawFn) -> pb.GenerateRequest:
    messages = []
    for _ in range(draw(mostly(st.integers(1, 4), st.integers(0, 6)))):
        message = pb.ChatMessage(role=draw(mostly(st.sampled_from(["system", "user", "assistant", "tool"]), text)),
                                 content=draw(text))
        if draw(st.booleans()):
            message.name = draw(text)
        for call in draw(st.lists(json_object, max_size=2)):
            message.tool_calls.append(_struct(call))
        messages.append(message)
    chat = pb.ChatPrompt(messages=messages, continue_final_message=draw(st.booleans()))
    if draw(st.booleans()):
        chat.add_generation_prompt = draw(st.booleans())
    if draw(st.booleans()):
        chat.chat_template_kwargs.CopyFrom(_struct(draw(json_object)))
    for tool in draw(st.lists(json_object, max_size=2)):
        chat.tools.append(_struct(tool))
    return pb.GenerateRequest(chat=chat, max_tokens=draw(mostly(st.integers(1, 8), int32)))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(chats())
def test_every_chat_is_rendered_whole_or_refused_with_a_message(request: pb.GenerateRequest) -> None:
    """Chat messages through the ChatML template of the presets: tool calls, tools and template kwargs
    as arbitrary JSON (NaN included, which JSON cannot hold), empty or odd roles, continue_final_message."""
    limits = Limits(vocab_size=VOCAB, max_model_len=4096)
    try:
        valid = validate_generate(request, TOKENIZER, limits, CHATML)
    except InvalidRequest as exc:
        assert str(exc)
        return
    assert 1 <= len(valid.prompt_token_ids) < limits.max_model_len
    assert 1 <= valid.stop.max_tokens <= limits.max_model_len - len(valid.prompt_token_ids)


VALID = {"request_id": "r-1", "text": "hello", "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
         "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
         "logprobs": 2, "prompt_logprobs": 1, "min_tokens": 2, "n": 2, "stop": ["\n"], "stop_token_ids": [3],
         "logit_bias": {7: 5.0}, "allowed_token_ids": [1, 2, 3, 7], "truncate_prompt_tokens": 4}
ONE_WRONG = [  # (field, value, what the message names)
    ("request_id", "a\nb", "request_id"), ("request_id", "x" * 257, "request_id"),
    ("text", "", "text"), ("token_ids", {"ids": [5, VOCAB]}, "token_ids[1]"), ("token_ids", {"ids": []}, "prompt"),
    ("token_ids", {"ids": [5] * 64}, "prompt"),
    ("max_tokens", 0, "max_tokens"), ("max_tokens", -3, "max_tokens"), ("min_tokens", 9, "min_tokens"),
    ("temperature", -0.1, "temperature"), ("temperature", math.nan, "temperature"),
    ("temperature", math.inf, "temperature"),
    ("top_p", 0.0, "top_p"), ("top_p", 1.5, "top_p"), ("top_p", math.nan, "top_p"), ("top_k", -2, "top_k"),
    ("min_p", -0.1, "min_p"), ("min_p", 1.5, "min_p"), ("min_p", math.nan, "min_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"), ("repetition_penalty", math.nan, "repetition_penalty"),
    ("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", -2.5, "frequency_penalty"),
    ("presence_penalty", math.inf, "presence_penalty"),
    ("logprobs", MAX_LOGPROBS + 1, "logprobs"), ("prompt_logprobs", MAX_LOGPROBS + 1, "prompt_logprobs"),
    ("n", MAX_N + 1, "n must"), ("priority", 1, "priority"),
    ("stop", [""], "stop[0]"), ("stop", ["x" * 257], "stop[0]"), ("stop", ["a"] * 33, "stop"),
    ("stop_token_ids", [VOCAB], "stop_token_ids[0]"), ("stop_token_ids", [1] * 257, "stop_token_ids"),
    ("logit_bias", {7: 101.0}, "logit_bias[7]"), ("logit_bias", {VOCAB: 1.0}, "logit_bias"),
    ("logit_bias", {7: math.nan}, "logit_bias[7]"), ("allowed_token_ids", [VOCAB], "allowed_token_ids"),
    ("truncate_prompt_tokens", 0, "truncate_prompt_tokens"), ("truncate_prompt_tokens", 64, "truncate_prompt_tokens"),
]


def test_the_valid_request_is_accepted() -> None:
    """The baseline of the one-field cases below: every field set, all in range."""
    valid = validate_generate(pb.GenerateRequest(**VALID), TOKENIZER, LIMITS)
    assert valid.n == 2 and valid.stop.max_tokens == 8 and len(valid.prompt_token_ids) == 4


@pytest.mark.parametrize(("field", "value", "named"), ONE_WRONG, ids=[f"{f}={str(v)[:12]}" for f, v, _ in ONE_WRONG])
def test_one_field_out_of_range_is_refused_by_name(field: str, value: object, named: str) -> None:
    # a token_ids prompt replaces the text, and is not truncated (a long one must be refused)
    fields = {k: v for k, v in VALID.items() if field != "token_ids" or k not in ("text", "truncate_prompt_tokens")}
    fields[field] = value
    request = pb.GenerateRequest(**fields)
    with pytest.raises(InvalidRequest, match=re.escape(named)):
        validate_generate(request, TOKENIZER, LIMITS)
    if field not in ("text", "token_ids", "truncate_prompt_tokens"):  # the pre-check sees no prompt
        with pytest.raises(InvalidRequest, match=re.escape(named)):
            check_fields(request, LIMITS)
