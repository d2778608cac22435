"""Chat prompts through the gRPC API: a preset's ChatML, a checkpoint's template checked against
transformers' apply_chat_template, --chat-template, the refusals, and the CLI's --chat."""

from __future__ import annotations

import grpc
import pytest
from transformers import PreTrainedTokenizerFast

from controlplane.cli import build_parser, main
from controlplane.client import UsageError, request_from_args
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import generate, serve

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")


async def test_a_preset_chats_in_chatml() -> None:
    async with serve("tiny") as served:
        assert (await served.stub.GetModelInfo(pb.GetModelInfoRequest())).supports_chat
        rendered = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n"
                    "<|im_start|>assistant\n")
        ids = list(rendered.encode())  # the byte tokenizer, and no BOS: the template places special tokens
        tokens = await served.stub.Tokenize(pb.TokenizeRequest(chat={"messages": MESSAGES}))
        assert list(tokens.token_ids) == ids and tokens.count == len(ids)
        chat = await generate(served.stub, chat={"messages": MESSAGES}, max_tokens=6, temperature=0.0,
                              ignore_eos=True)
        plain = await generate(served.stub, token_ids={"ids": ids}, max_tokens=6, temperature=0.0, ignore_eos=True)
        assert chat.final is not None and chat.final.prompt_tokens == len(ids)
        assert chat.token_ids == plain.token_ids and len(chat.token_ids) == 6
        opened = await served.stub.Tokenize(pb.TokenizeRequest(chat={
            "messages": [*MESSAGES, {"role": "assistant", "content": "Hel"}], "add_generation_prompt": False,
            "continue_final_message": True}))
        assert bytes(opened.token_ids).decode().endswith("<|im_start|>assistant\nHel")


async def test_a_checkpoint_template_matches_transformers(checkpoints, tmp_path) -> None:  # noqa: ANN001
    folder = checkpoints["qwen3"]
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), chat_template=TEMPLATE,
                                        bos_token="<s>", eos_token="</s>")
    want = reference.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    async with serve(str(folder), chat_template=str(template)) as served:
        got = await served.stub.Tokenize(pb.TokenizeRequest(chat={"messages": MESSAGES}))
        assert list(got.token_ids) == list(want) and want[0] == 1  # <s> from the template, once
        completion = await generate(served.stub, chat={"messages": MESSAGES}, max_tokens=2, ignore_eos=True)
        assert completion.final is not None and completion.final.prompt_tokens == len(want)


async def test_kwargs_reach_the_template() -> None:
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ suffix | default('') }}{{ n * 2 if n is defined }}"
    async with serve("tiny", chat_template=inline) as served:
        request = pb.TokenizeRequest(chat={"messages": [{"role": "user", "content": "hi"}],
                                           "chat_template_kwargs": {"suffix": "!", "n": 3}})
        got = await served.stub.Tokenize(request)
        assert bytes(got.token_ids).decode() == "hi!6"  # JSON's 3 is an int, as vLLM's templates see it
    tools = "{% for t in tools %}{{ t.function.name }}:{{ t.function.parameters | tojson }};{% endfor %}" \
            "{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.arguments.n + 1 }}{% endfor %}" \
            "{{ m.tool_call_id }}{% endfor %}"
    async with serve("tiny", chat_template=tools) as served:
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        call = {"type": "function", "function": {"name": "f", "arguments": {"n": 41}}}
        got = await served.stub.Tokenize(pb.TokenizeRequest(chat={
            "messages": [{"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c7"}],
            "tools": [tool]}))
        assert bytes(got.token_ids).decode() == 'f:{"type": "object"};42c7'
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.stub.Tokenize(pb.TokenizeRequest(chat={"messages": [{"role": "u"}], "tools": [tool] * 129}))
        assert "chat.tools: at most 128 tools, got 129" in (err.value.details() or "")


async def test_a_model_without_a_template_refuses_chat(checkpoints) -> None:  # noqa: ANN001
    async with serve(str(checkpoints["qwen3"])) as served:
        assert not (await served.stub.GetModelInfo(pb.GetModelInfoRequest())).supports_chat
        for call in (generate(served.stub, chat={"messages": MESSAGES}),
                     served.stub.Tokenize(pb.TokenizeRequest(chat={"messages": MESSAGES}))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "this model has no chat template" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.stub.Tokenize(pb.TokenizeRequest(text="a", chat={"messages": MESSAGES}))
        assert "text and chat: set one of them" in (err.value.details() or "")
        text = await generate(served.stub, text="still serves", max_tokens=1)
        assert text.final is not None


def test_generate_cli_sends_chat() -> None:
    args = build_parser().parse_args(["generate", "Say hello.", "--chat", "--system", "You are terse.",
                                      "--chat-template-kwargs", '{"enable_thinking": false}'])
    request = request_from_args(args)
    assert request.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [(m["role"], m["content"]) for m in MESSAGES]
    assert request.chat.chat_template_kwargs["enable_thinking"] is False
    with pytest.raises(UsageError, match="takes a JSON object"):
        request_from_args(build_parser().parse_args(["generate", "x", "--chat", "--chat-template-kwargs", "[1]"]))
    assert request_from_args(build_parser().parse_args(["generate", "x"])).WhichOneof("prompt") == "text"


def test_serve_refuses_a_broken_template(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--chat-template", "{% for m in messages %}"]) == 2
    assert "duetserve serve: error: chat template --chat-template: line 1" in capsys.readouterr().err


async def _chat_cli(port: int, stdin: str, *flags: str) -> tuple[int, str, str]:
    import asyncio
    import os
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane.cli", "chat", "--address", f"127.0.0.1:{port}", "--temperature", "0",
        "--max-tokens", "5", *flags, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_chat_cli_keeps_the_conversation() -> None:
    import re

    async with serve("tiny") as served:
        code, out, err = await _chat_cli(served.plane.port, "Say hello.\n\nAnd again.\nexit\nnever sent\n",
                                         "--system", "You are terse.")
        assert code == 0, err
        usage = [tuple(map(int, m)) for m in re.findall(r"prompt_tokens=(\d+) completion_tokens=(\d+)", err)]
        assert len(usage) == 2  # the blank line is skipped, nothing after "exit" is sent
        first = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n"
                 "<|im_start|>assistant\n")
        assert usage[0] == (len(first.encode()), 5)
        quick_code, reply, quick_err = await _chat_cli(served.plane.port, "", "--quick", "Say hello.",
                                                       "--system", "You are terse.")
        assert quick_code == 0 and "prompt_tokens=" in quick_err
        assert out.startswith(reply)  # greedy: the conversation's first reply is the quick one
        # the second request holds the first exchange, the reply's text as the assistant's message
        second = first + reply + "<|im_end|>\n<|im_start|>user\nAnd again.<|im_end|>\n<|im_start|>assistant\n"
        assert usage[1][0] == len(second.encode())
        cached = [int(c) for c in re.findall(r"cached_tokens=(\d+)", err)]
        assert cached[0] == 0 and cached[1] >= 16 * (len(first.encode()) // 16)  # the first turn's blocks


async def test_an_unset_max_tokens_is_16_for_text_and_the_room_left_for_chat() -> None:
    """As vLLM's completions API (16) and chat API (max_model_len minus the prompt)."""
    async with serve("tiny", max_model_len=160) as served:
        chat = await generate(served.stub, chat={"messages": MESSAGES}, temperature=0.0, ignore_eos=True)
        assert chat.final is not None and chat.final.finish_reason == "length"
        assert chat.final.completion_tokens == 160 - chat.final.prompt_tokens > 16
        text = await generate(served.stub, text="hello", temperature=0.0, ignore_eos=True)
        assert text.final is not None and text.final.completion_tokens == 16
