"""A small gRPC client: `duetserve generate` streams one completion to the terminal.

It only speaks the public API (protos/), exactly as an outside client would.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import ParseDict
from google.protobuf.struct_pb2 import Struct

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
from controlplane.security import auth_metadata, client_credentials


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """Plain or TLS channel to `args.address`, per the client security flags."""
    if not (args.tls or args.tls_ca or args.tls_cert):
        return grpc.insecure_channel(args.address)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    try:
        credentials = client_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except OSError as exc:
        raise UsageError(f"cannot read a TLS file: {exc.strerror or exc}: {exc.filename}") from None
    return grpc.secure_channel(args.address, credentials, options=options)


class UsageError(ValueError):
    """A client flag's value that cannot be sent (the command says so in one line and exits 2)."""


def request_from_args(args: argparse.Namespace) -> pb.GenerateRequest:
    """The GenerateRequest of `duetserve generate`'s flags; UsageError for a value it cannot send."""
    request = pb.GenerateRequest(stop=args.stop, ignore_eos=args.ignore_eos,
                                 skip_special_tokens=args.skip_special_tokens,
                                 include_stop_str_in_output=args.include_stop_str_in_output)
    put_fields(request, {"--max-tokens": args.max_tokens, "--temperature": args.temperature, "--n": args.n,
                         "--priority": args.priority, "--presence-penalty": args.presence_penalty,
                         "--frequency-penalty": args.frequency_penalty, "--min-tokens": args.min_tokens,
                         "--top-p": args.top_p, "--top-k": args.top_k, "--min-p": args.min_p, "--seed": args.seed,
                         "--repetition-penalty": args.repetition_penalty, "--logprobs": args.logprobs,
                         "--prompt-logprobs": args.prompt_logprobs,
                         "--truncate-prompt-tokens": args.truncate_prompt_tokens})
    request.stop_token_ids.extend(_token_ids("--stop-token-ids", args.stop_token_ids))
    for item in args.logit_bias:
        token, sep, bias = item.partition("=")
        try:
            if not sep or not 0 <= int(token) <= _MAX_ID:
                raise ValueError
            request.logit_bias[int(token)] = float(bias)
        except ValueError:
            raise UsageError(f"--logit-bias takes ID=BIAS (a token id >= 0 and a number), got {item!r}") from None
    request.allowed_token_ids.extend(_token_ids("--allowed-token-ids", args.allowed_token_ids))
    structured = structured_outputs_from_args(args)
    if structured is not None:
        request.structured_outputs.CopyFrom(structured)
    if args.token_ids:
        request.token_ids.ids.extend(_token_ids("--token-ids", args.token_ids))
        if args.prompt is not None:
            raise UsageError("give either PROMPT or --token-ids, not both")
    elif args.prompt is None:
        raise UsageError("a prompt is needed: PROMPT (text, or with --chat a user message) or --token-ids")
    elif args.chat:
        request.chat.CopyFrom(chat_from_args(args))
    else:
        request.text = args.prompt
    return request


_MAX_ID = 2**32 - 1  # token ids travel as uint32


def _file_or_text(flag: str, value: str) -> str:
    """A flag's value: the file it names if there is one, else the value itself."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # e.g. a long inline schema: no such file name
        return value
    if not is_file:
        return value
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag}: cannot read {value!r} ({exc})") from None


def structured_outputs_from_args(args: argparse.Namespace) -> pb.StructuredOutputs | None:
    """The structured output `generate`'s flags ask for (None: none); the server checks there is one kind."""
    so = pb.StructuredOutputs(choice=args.choice, json_object=args.json_object,
                              disable_any_whitespace=args.disable_any_whitespace)
    if args.json_schema is not None:
        so.json = _file_or_text("--json-schema", args.json_schema)
    if args.regex is not None:
        so.regex = args.regex
    if args.grammar is not None:
        so.grammar = _file_or_text("--grammar", args.grammar)
    if args.structural_tag is not None:
        so.structural_tag = _file_or_text("--structural-tag", args.structural_tag)
    if args.whitespace_pattern is not None:
        so.whitespace_pattern = args.whitespace_pattern
    return so if so.ListFields() else None


def put_fields(request: pb.GenerateRequest, values: dict[str, object]) -> None:
    """Set each flag's request field (the flag's name in snake case), leaving those not given (None)
    unset; UsageError, naming the flag, for a value the field cannot hold (a negative count, an integer
    past its 32 or 64 bits). The server checks what the values mean."""
    for flag, value in values.items():
        if value is None:
            continue
        try:
            setattr(request, flag.removeprefix("--").replace("-", "_"), value)
        except (ValueError, TypeError):
            kind = "an unsigned integer" if isinstance(value, int) and value < 0 else "a smaller value"
            raise UsageError(f"{flag} {value!r} cannot be sent: it takes {kind}") from None


def _token_ids(flag: str, text: str | None) -> list[int]:
    """A comma-separated list of token ids (>= 0) from a flag; [] when not given."""
    if not text:
        return []
    try:
        ids = [int(t) for t in text.split(",")]
        if any(not 0 <= i <= _MAX_ID for i in ids):
            raise ValueError
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated token ids (integers from 0 to 2**32 - 1), "
                         f"got {text!r}") from None
    return ids


def chat_kwargs(text: str | None) -> Struct | None:
    """--chat-template-kwargs: a JSON object as a Struct (None when not given)."""
    if not text:
        return None
    try:
        kwargs = json.loads(text)
        if not isinstance(kwargs, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise UsageError(f"--chat-template-kwargs takes a JSON object, got {text!r}: {exc}") from None
    return ParseDict(kwargs, Struct())


def chat_prompt(messages: list[tuple[str, str]], kwargs_json: str | None) -> pb.ChatPrompt:
    """(role, content) messages and --chat-template-kwargs as a ChatPrompt."""
    chat = pb.ChatPrompt(messages=[pb.ChatMessage(role=role, content=content) for role, content in messages])
    kwargs = chat_kwargs(kwargs_json)
    if kwargs is not None:
        chat.chat_template_kwargs.CopyFrom(kwargs)
    return chat


def chat_from_args(args: argparse.Namespace) -> pb.ChatPrompt:
    """--system (optional) and the prompt as chat messages, with --chat-template-kwargs."""
    system = [("system", args.system)] if args.system is not None else []
    return chat_prompt([*system, ("user", args.prompt)], args.chat_template_kwargs)


def prompt_score(entries: list[pb.TokenLogprob]) -> str:
    """The prompt's log-likelihood (sum of its tokens' logprobs after the first) and perplexity."""
    if not entries:
        return "[prompt_logprobs: no token after the first]"
    total = sum(e.logprob for e in entries)
    return f"[prompt_logprobs: {len(entries)} tokens, sum {total:.4f}, perplexity {math.exp(-total / len(entries)):.4f}]"


def token_logprob_lines(entries: list[pb.TokenLogprob]) -> list[str]:
    """One line a generated token: its id, logprob, rank and text (quoted), then its top alternatives
    (id text logprob, separated by |)."""
    lines = []
    for i, entry in enumerate(entries):
        top = " | ".join(f"{t.token_id} {t.text!r} {t.logprob:.4f}" for t in entry.top)
        lines.append(f"  {i:4d} id {entry.token_id:>7d} logprob {entry.logprob:9.4f} rank {entry.rank:>6d} "
                     f"{entry.text!r}" + (f"  top {top}" if top else ""))
    return lines


def run_generate(args: argparse.Namespace) -> int:
    """Stream one completion as it comes; with --n > 1, print each completion when all are done."""
    texts: dict[int, str] = {}
    finals: dict[int, pb.GenerateResponse] = {}
    scores: dict[int, str] = {}
    logprobs: dict[int, list[pb.TokenLogprob]] = {}
    with open_channel(args) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            for response in stub.Generate(request_from_args(args), timeout=args.timeout,
                                          metadata=auth_metadata(args.auth_token)):
                texts[response.index] = texts.get(response.index, "") + response.text
                logprobs.setdefault(response.index, []).extend(response.logprobs)
                if response.prompt_logprobs:
                    scores[response.index] = prompt_score(list(response.prompt_logprobs))
                if args.n <= 1:
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
                if response.finish_reason:
                    finals[response.index] = response
        except grpc.RpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for index in sorted(finals):
        last = finals[index]
        if args.n > 1:
            print(f"--- completion {index}\n{texts[index]}")
        stop = f" stop_reason={last.stop_reason!r}" if last.stop_reason else ""
        usage = (f"[finish_reason={last.finish_reason}{stop} prompt_tokens={last.prompt_tokens} "
                 f"completion_tokens={last.completion_tokens} cached_tokens={last.cached_tokens}]")
        print(usage if args.n > 1 else "\n" + usage, file=sys.stderr)
        if args.logprobs is not None:
            print("\n".join(["[logprobs]", *token_logprob_lines(logprobs.get(index, []))]), file=sys.stderr)
        if args.prompt_logprobs is not None:
            print(scores.get(index, prompt_score([])), file=sys.stderr)
    return 0


def run_admin(args: argparse.Namespace) -> int:
    """`duetserve load` (GetLoad, printed as JSON with every field a number: protobuf's JSON mapping would
    print the 64-bit num_waiting_tokens as a string) and `duetserve reset-prefix-cache`."""
    with open_channel(args) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            if args.command == "load":
                reply = stub.GetLoad(pb.GetLoadRequest(), timeout=args.timeout, metadata=auth_metadata(args.auth_token))
                print(json.dumps({field.name: getattr(reply, field.name) for field in reply.DESCRIPTOR.fields},
                                 indent=1))
            else:
                reply = stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(), timeout=args.timeout,
                                              metadata=auth_metadata(args.auth_token))
                print(f"{args.address}: prefix cache reset, {reply.blocks_dropped} blocks dropped")
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def run_health(args: argparse.Namespace) -> int:
    """`duetserve health`: exit 0 when the server's gRPC health service says SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open_channel(args) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}", file=sys.stdout if status == "SERVING" else sys.stderr)
    return 0 if status == "SERVING" else 1
