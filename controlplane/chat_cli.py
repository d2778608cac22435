"""`duetserve chat`: a conversation with a running server in the terminal (as `vllm chat`).

Each line read is a user message; the reply streams as it comes and joins the history, which every
request sends whole (the server renders it with the model's chat template). `--quick MESSAGE` asks
once and exits. It only speaks the public gRPC API, like any outside client.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import grpc

from controlplane.client import chat_prompt, open_channel, put_fields
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
from controlplane.robust_flags import add_client_security_flags
from controlplane.security import auth_metadata

EXIT_WORDS = ("exit", "quit")


def add_chat_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="server address host:port")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--quick", default=None, metavar="MESSAGE", help="send one message, print the reply, exit")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens a reply may have (default 256)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help='extra template variables, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each reply, in seconds")
    add_client_security_flags(p)


def _request(args: argparse.Namespace, history: list[tuple[str, str]]) -> pb.GenerateRequest:
    request = pb.GenerateRequest(chat=chat_prompt(history, args.chat_template_kwargs))
    put_fields(request, {"--max-tokens": args.max_tokens, "--temperature": args.temperature, "--seed": args.seed})
    return request


def _reply(stub: pb_grpc.GenerationStub, args: argparse.Namespace, history: list[tuple[str, str]],
           out: TextIO, err: TextIO) -> str:
    """Stream one reply to `out`; the usage line goes to `err`. Raises grpc.RpcError."""
    text = []
    for response in stub.Generate(_request(args, history), timeout=args.timeout,
                                  metadata=auth_metadata(args.auth_token)):
        out.write(response.text)
        out.flush()
        text.append(response.text)
        if response.finish_reason:
            print(f"\n[finish_reason={response.finish_reason} prompt_tokens={response.prompt_tokens} "
                  f"completion_tokens={response.completion_tokens} cached_tokens={response.cached_tokens}]", file=err)
    return "".join(text)


def run_chat(args: argparse.Namespace, lines: TextIO = sys.stdin, out: TextIO = sys.stdout,
             err: TextIO = sys.stderr) -> int:
    history: list[tuple[str, str]] = [("system", args.system)] if args.system is not None else []
    interactive = args.quick is None and lines.isatty()
    if interactive:
        out.write(f"duetserve chat on {args.address} ('exit' or Ctrl-D ends it)\n> ")
        out.flush()
    with open_channel(args) as channel:
        stub = pb_grpc.GenerationStub(channel)
        messages = [args.quick] if args.quick is not None else lines
        for line in messages:
            message = line.rstrip("\n")
            if message.strip().lower() in EXIT_WORDS:
                break
            if not message.strip():
                continue
            history.append(("user", message))
            try:
                history.append(("assistant", _reply(stub, args, history, out, err)))
            except grpc.RpcError as exc:
                print(f"\nerror: {exc.code().name}: {exc.details()}", file=err)
                return 1
            if interactive:
                out.write("> ")
                out.flush()
    return 0
