"""Checks a GenerateRequest and turns it into engine terms, or says exactly which field is wrong.

Pure functions: no gRPC context, no engine state beyond the limits passed in. Every rejection is
an `InvalidRequest` whose message names the field.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct

from controlplane.chat_template import ChatMessage, ChatTemplate, ChatTemplateError
from controlplane.generation_defaults import SamplingDefaults
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.sequence import StopParams
from controlplane.structured_output import CompiledGrammar, GrammarCompiler, GrammarError, GrammarSpec
from controlplane.tokenizer import TextTokenizer
from shared.messages import SamplingParams

DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 256
MAX_REQUEST_ID_LEN = 256
MAX_N = 16  # completions of one request (parallel sampling)
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_LOGIT_BIAS_VALUE = 100.0  # |bias|, as OpenAI's API
MAX_CHAT_MESSAGES = 1024
MAX_ROLE_LEN = 64
MAX_CHAT_TOOLS = 128
MAX_GRAMMAR_CHARS = 1 << 20  # a structured output's schema, regex or grammar (or its choices together)
MAX_CHOICES = 1024


class InvalidRequest(ValueError):
    """A client error; the message names the offending field."""


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    priority_scheduling: bool = False  # whether a request may set a priority (--scheduling-policy priority)
    eos_token_ids: frozenset[int] = frozenset()  # the model's: stop tokens unless ignore_eos


@dataclass(frozen=True)
class ValidatedRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: StopParams
    n: int = 1  # completions to sample
    priority: int = 0  # lower is admitted first, under the priority scheduling policy
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only, no text
    grammar: CompiledGrammar | None = None  # structured outputs: what every completion must follow


def _finite(name: str, value: float) -> float:
    if math.isnan(value) or math.isinf(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value}")
    return value


def _check_ids(ids: list[int], limits: Limits) -> None:
    """Every id below the vocabulary size: one C pass; the loop only names the first bad one."""
    if ids and max(ids) >= limits.vocab_size:
        i, token = next((i, t) for i, t in enumerate(ids) if t >= limits.vocab_size)
        raise InvalidRequest(f"token_ids[{i}] = {token} is not a token of this model (vocab_size {limits.vocab_size})")


def _integral(value: object) -> object:
    """A Struct's numbers are all doubles; whole ones become ints, as JSON parsed by Python gives them."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def _as_dict(struct: Struct, field: str) -> dict[str, Any]:
    """A Struct as the JSON object it was sent as (whole numbers as ints); NaN or infinity, which
    JSON cannot hold, is an InvalidRequest naming `field`."""
    try:
        return {k: _integral(v) for k, v in MessageToDict(struct).items()}
    except ValueError as exc:
        raise InvalidRequest(f"{field}: not a JSON value ({exc})") from exc


def chat_text(chat: pb.ChatPrompt, template: ChatTemplate | None) -> str:
    """The prompt text of chat messages, by the model's template; every problem an InvalidRequest."""
    if template is None:
        raise InvalidRequest("chat: this model has no chat template (serve it with --chat-template, or send "
                             "text or token_ids)")
    if len(chat.messages) > MAX_CHAT_MESSAGES:
        raise InvalidRequest(f"chat.messages: at most {MAX_CHAT_MESSAGES} messages, got {len(chat.messages)}")
    messages = []
    for i, message in enumerate(chat.messages):
        if not message.role or len(message.role) > MAX_ROLE_LEN or not message.role.isprintable():
            raise InvalidRequest(f"chat.messages[{i}].role: required, printable, at most {MAX_ROLE_LEN} characters")
        messages.append(ChatMessage(message.role, message.content, message.name or None,
                                    tuple(_as_dict(call, f"chat.messages[{i}].tool_calls[{j}]")
                                          for j, call in enumerate(message.tool_calls)),
                                    message.tool_call_id or None, message.reasoning_content or None))
    if len(chat.tools) > MAX_CHAT_TOOLS:
        raise InvalidRequest(f"chat.tools: at most {MAX_CHAT_TOOLS} tools, got {len(chat.tools)}")
    kwargs = _as_dict(chat.chat_template_kwargs, "chat.chat_template_kwargs") \
        if chat.HasField("chat_template_kwargs") else {}
    tools = [_as_dict(tool, f"chat.tools[{i}]") for i, tool in enumerate(chat.tools)]
    generation_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    try:
        return template.render(messages, generation_prompt, chat.continue_final_message, kwargs, tools)
    except ChatTemplateError as exc:
        raise InvalidRequest(str(exc)) from exc


def _prompt_ids(request: pb.GenerateRequest, tokenizer: TextTokenizer, limits: Limits,
                chat: ChatTemplate | None) -> list[int]:
    which = request.WhichOneof("prompt")
    if which is None:
        raise InvalidRequest("prompt: set text, token_ids or chat")
    if which == "text":
        if not request.text:
            raise InvalidRequest("text: the prompt is empty")
        ids = tokenizer.encode(request.text)
    elif which == "chat":
        ids = tokenizer.encode(chat_text(request.chat, chat), add_special_tokens=False)
    else:
        ids = list(request.token_ids.ids)
        _check_ids(ids, limits)
    if not ids:
        raise InvalidRequest("prompt: no tokens to process")
    if request.HasField("truncate_prompt_tokens"):
        keep = request.truncate_prompt_tokens
        if not 1 <= keep < limits.max_model_len:
            raise InvalidRequest(f"truncate_prompt_tokens must be in [1, {limits.max_model_len - 1}] "
                                 f"(below max_model_len {limits.max_model_len}), got {keep}")
        ids = ids[-keep:]  # the last `keep` tokens, as vLLM's left truncation
    if len(ids) >= limits.max_model_len:
        raise InvalidRequest(
            f"prompt: {len(ids)} tokens, but the model allows at most {limits.max_model_len - 1} "
            f"prompt tokens (max_model_len {limits.max_model_len} includes one generated token)"
        )
    return ids


def _token_rules(request: pb.GenerateRequest,
                 limits: Limits) -> tuple[tuple[tuple[int, float], ...], tuple[int, ...]]:
    """logit_bias as sorted (id, bias) pairs and allowed_token_ids deduplicated, both checked."""
    if len(request.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(request.logit_bias)}")
    bias = []
    for token, value in sorted(request.logit_bias.items()):
        if token >= limits.vocab_size:
            raise InvalidRequest(f"logit_bias: token id {token} is outside the vocabulary (size {limits.vocab_size})")
        value = _finite(f"logit_bias[{token}]", value)
        if abs(value) > MAX_LOGIT_BIAS_VALUE:
            raise InvalidRequest(f"logit_bias[{token}] must be in [-{MAX_LOGIT_BIAS_VALUE:g}, "
                                 f"{MAX_LOGIT_BIAS_VALUE:g}], got {value:.9g}")  # a float32: 9 digits tell it apart
        bias.append((token, value))
    allowed = sorted(set(request.allowed_token_ids))
    if allowed and allowed[-1] >= limits.vocab_size:
        raise InvalidRequest(f"allowed_token_ids: token id {allowed[-1]} is outside the vocabulary "
                             f"(size {limits.vocab_size})")
    return tuple(bias), tuple(allowed)


def _sampling(request: pb.GenerateRequest, limits: Limits, defaults: SamplingDefaults) -> SamplingParams:
    """Unset temperature, top_p, top_k, min_p and repetition_penalty take `defaults` (the model's)."""
    temperature = _finite("temperature", request.temperature) if request.HasField("temperature") \
        else defaults.temperature
    if temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0, got {temperature}")
    top_p = _finite("top_p", request.top_p) if request.HasField("top_p") else defaults.top_p
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    top_k = request.top_k if request.HasField("top_k") else defaults.top_k
    if top_k < -1:
        raise InvalidRequest(f"top_k must be -1, 0 (off) or positive, got {top_k}")
    min_p = _finite("min_p", request.min_p) if request.HasField("min_p") else defaults.min_p
    if not 0.0 <= min_p <= 1.0:
        raise InvalidRequest(f"min_p must be in [0, 1], got {min_p}")
    rep = _finite("repetition_penalty", request.repetition_penalty) if request.HasField("repetition_penalty") \
        else defaults.repetition_penalty
    if rep <= 0:
        raise InvalidRequest(f"repetition_penalty must be > 0, got {rep}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _finite(name, getattr(request, name))
        if not -2.0 <= value <= 2.0:
            raise InvalidRequest(f"{name} must be in [-2, 2], got {value}")
    logprobs = request.logprobs if request.HasField("logprobs") else None
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be at most {MAX_LOGPROBS}, got {logprobs}")
    prompt_logprobs = request.prompt_logprobs if request.HasField("prompt_logprobs") else None
    if prompt_logprobs is not None and prompt_logprobs > MAX_LOGPROBS:
        raise InvalidRequest(f"prompt_logprobs must be at most {MAX_LOGPROBS}, got {prompt_logprobs}")
    logit_bias, allowed = _token_rules(request, limits)
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        min_p=min_p,
        seed=request.seed if request.HasField("seed") else None,
        repetition_penalty=rep,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logprobs=logprobs,
        logit_bias=logit_bias,
        allowed_token_ids=allowed,
        prompt_logprobs=prompt_logprobs,
    )


def _stop(request: pb.GenerateRequest, num_prompt: int, limits: Limits) -> StopParams:
    room = limits.max_model_len - num_prompt
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
    else:  # as vLLM: its completions API defaults to 16, its chat API to all the room the prompt leaves
        max_tokens = room if request.WhichOneof("prompt") == "chat" else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}")
    if request.min_tokens > min(max_tokens, room):
        if request.min_tokens <= max_tokens:  # the prompt leaves less room than max_tokens asks for
            raise InvalidRequest(f"min_tokens ({request.min_tokens}) exceeds the {room} tokens a prompt of "
                                 f"{num_prompt} leaves under max_model_len {limits.max_model_len}")
        raise InvalidRequest(f"min_tokens ({request.min_tokens}) exceeds max_tokens ({max_tokens})")
    max_tokens = min(max_tokens, room)
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}")
    for i, stop in enumerate(request.stop):
        if not stop:
            raise InvalidRequest(f"stop[{i}] is an empty string")
        if len(stop) > MAX_STOP_STRING_LEN:
            raise InvalidRequest(f"stop[{i}] is longer than {MAX_STOP_STRING_LEN} characters")
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(
            f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} token ids, got {len(request.stop_token_ids)}"
        )
    for i, token in enumerate(request.stop_token_ids):
        if token >= limits.vocab_size:
            raise InvalidRequest(f"stop_token_ids[{i}] = {token} is not below vocab_size {limits.vocab_size}")
    return StopParams(
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        stop_token_ids=frozenset(request.stop_token_ids),
        stop_strings=tuple(request.stop),
        ignore_eos=request.ignore_eos,
        include_stop_str_in_output=request.include_stop_str_in_output,
    )


def _structured_outputs(request: pb.GenerateRequest) -> GrammarSpec | None:
    """The request's structured output, its size checked (compiled by `GrammarCompiler.compile`)."""
    if not request.HasField("structured_outputs"):
        return None
    so = request.structured_outputs
    kinds = [kind for kind, given in (("json", so.HasField("json")), ("regex", so.HasField("regex")),
                                      ("choice", bool(so.choice)), ("grammar", so.HasField("grammar")),
                                      ("json_object", so.json_object),
                                      ("structural_tag", so.HasField("structural_tag"))) if given]
    if len(kinds) != 1:
        raise InvalidRequest("structured_outputs: set exactly one of json, regex, choice, grammar, json_object and "
                             "structural_tag" + (f", got {', '.join(kinds)}" if kinds else ""))
    kind = kinds[0]
    pattern = so.whitespace_pattern if so.HasField("whitespace_pattern") else None
    if pattern is not None:
        if kind not in ("json", "json_object"):
            raise InvalidRequest(f"structured_outputs.whitespace_pattern: for json and json_object, not {kind}")
        if so.disable_any_whitespace:
            raise InvalidRequest("structured_outputs: set at most one of whitespace_pattern and disable_any_whitespace")
        if len(pattern) > MAX_GRAMMAR_CHARS:
            raise InvalidRequest(f"structured_outputs.whitespace_pattern: at most {MAX_GRAMMAR_CHARS} characters")
    if kind == "choice":
        if len(so.choice) > MAX_CHOICES:
            raise InvalidRequest(f"structured_outputs.choice: at most {MAX_CHOICES} strings, got {len(so.choice)}")
        text = json.dumps(list(so.choice))
    else:
        text = "" if kind == "json_object" else getattr(so, kind)
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"structured_outputs.{kind}: at most {MAX_GRAMMAR_CHARS} characters, got {len(text)}")
    if kind in ("json", "grammar", "structural_tag") and not text.strip():
        raise InvalidRequest(f"structured_outputs.{kind} is empty")
    return GrammarSpec(kind, text, so.disable_any_whitespace, pattern)  # type: ignore[arg-type]


def compile_grammar(spec: GrammarSpec, grammars: GrammarCompiler | None) -> CompiledGrammar:
    """The spec compiled for the model (slow for a large schema: on a worker thread); a grammar that does
    not compile is an InvalidRequest naming it. GrammarUnavailable (a server without llguidance) passes."""
    if grammars is None:
        raise InvalidRequest("structured_outputs: this server does not take structured outputs")
    try:
        return grammars.compile(spec)
    except GrammarError as exc:
        raise InvalidRequest(f"structured_outputs.{exc}") from exc


def _check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequest(f"request_id longer than {MAX_REQUEST_ID_LEN} characters")
    if not request_id.isprintable():
        raise InvalidRequest("request_id: only printable characters are allowed")


def _check_options(request: pb.GenerateRequest, limits: Limits) -> None:
    n = request.n or 1
    if n > MAX_N:
        raise InvalidRequest(f"n must be at most {MAX_N} completions, got {n}")
    if request.priority and not limits.priority_scheduling:
        raise InvalidRequest(f"priority: {request.priority} needs a server started with --scheduling-policy "
                             "priority (this one admits requests first come, first served)")
    if request.min_tokens and request.allowed_token_ids:
        stoppers = set(request.stop_token_ids) | (set() if request.ignore_eos else set(limits.eos_token_ids))
        if set(request.allowed_token_ids) <= stoppers:
            raise InvalidRequest(f"min_tokens: every token allowed_token_ids allows is a stop token (EOS or "
                                 f"stop_token_ids), so none may be sampled before {request.min_tokens} tokens")
    if request.HasField("detokenize") and not request.detokenize and request.stop:
        raise InvalidRequest("stop: stop strings are matched in the text, which detokenize=false turns off "
                             "(use stop_token_ids)")


def check_fields(request: pb.GenerateRequest, limits: Limits,
                 defaults: SamplingDefaults = SamplingDefaults()) -> None:
    """Every check but the prompt's (no encoding): cheap, so a bad request hears so before anything
    costly, even from a server too busy to take it."""
    _check_request_id(request.request_id)
    _sampling(request, limits, defaults)
    _stop(request, 0, limits)
    _check_options(request, limits)
    _structured_outputs(request)


def validate_generate(
    request: pb.GenerateRequest, tokenizer: TextTokenizer, limits: Limits, chat: ChatTemplate | None = None,
    defaults: SamplingDefaults = SamplingDefaults(), grammars: GrammarCompiler | None = None,
) -> ValidatedRequest:
    """`chat` is the model's chat template (None: it has none), for a request with chat messages;
    `defaults` what unset sampling fields mean (the model's generation config); `grammars` compiles a
    structured output (None: such a request is refused)."""
    _check_request_id(request.request_id)
    request_id = request.request_id or uuid.uuid4().hex
    sampling = _sampling(request, limits, defaults)
    spec = _structured_outputs(request)
    prompt = _prompt_ids(request, tokenizer, limits, chat)
    stop = _stop(request, len(prompt), limits)
    _check_options(request, limits)
    grammar = compile_grammar(spec, grammars) if spec is not None else None
    skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
    detokenize = request.detokenize if request.HasField("detokenize") else True
    return ValidatedRequest(request_id, prompt, sampling, stop, request.n or 1, request.priority, skip, detokenize,
                            grammar)


def validate_tokenize(request: pb.TokenizeRequest, chat: ChatTemplate | None = None) -> tuple[str, bool]:
    """The text (chat messages rendered by the template `chat`) and whether to add the tokenizer's
    special tokens (default: yes for text, as Generate does; no for chat, whose template places them)."""
    if request.HasField("chat"):
        if request.text:
            raise InvalidRequest("text and chat: set one of them")
        text, default = chat_text(request.chat, chat), False
    else:
        text, default = request.text, True
    return text, request.add_special_tokens if request.HasField("add_special_tokens") else default


def validate_detokenize(request: pb.DetokenizeRequest, limits: Limits) -> tuple[list[int], bool]:
    """The ids (each below the vocabulary size) and whether to skip special tokens (default yes)."""
    ids = list(request.token_ids)
    _check_ids(ids, limits)
    return ids, request.skip_special_tokens if request.HasField("skip_special_tokens") else True


def validate_abort(request: pb.AbortRequest) -> str:
    """The id to abort. AbortRequest has one field, `request_id`: required, same rules as Generate's."""
    if not request.request_id:
        raise InvalidRequest("request_id: required")
    _check_request_id(request.request_id)
    return request.request_id


def validate_model_info(request: pb.GetModelInfoRequest) -> None:
    """GetModelInfoRequest has no fields; unknown fields sent by newer clients are ignored by protobuf."""
    del request


def validate_empty(request: pb.GetLoadRequest | pb.ResetPrefixCacheRequest) -> None:
    """Requests without fields; unknown fields sent by newer clients are ignored by protobuf."""
    del request
