"""Tokenize and Detokenize through the gRPC API, and Generate's text options (skip_special_tokens,
include_stop_str_in_output), on a checkpoint with a real tokenizer.json, checked against the
`tokenizers` library directly."""

from __future__ import annotations

import grpc
import pytest
from tokenizers import Tokenizer

from controlplane.cli import build_parser
from controlplane.client import request_from_args
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import generate, serve

TEXT = "The quick brown fox jumps over the lazy dog."


async def test_tokenize_and_detokenize_match_the_tokenizer(checkpoints) -> None:  # noqa: ANN001
    folder = checkpoints["qwen3"]
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    async with serve(str(folder)) as served:
        got = await served.stub.Tokenize(pb.TokenizeRequest(text=TEXT))
        want = reference.encode(TEXT).ids
        assert list(got.token_ids) == want and got.count == len(want) and want[0] == 1  # BOS
        assert got.max_model_len == served.plane.engine.max_model_len
        bare = await served.stub.Tokenize(pb.TokenizeRequest(text=TEXT, add_special_tokens=False))
        assert list(bare.token_ids) == want[1:]
        empty = await served.stub.Tokenize(pb.TokenizeRequest(text=""))
        assert list(empty.token_ids) == reference.encode("").ids
        text = await served.stub.Detokenize(pb.DetokenizeRequest(token_ids=want))
        assert text.text == reference.decode(want) == TEXT
        raw = await served.stub.Detokenize(pb.DetokenizeRequest(token_ids=want, skip_special_tokens=False))
        assert raw.text == reference.decode(want, skip_special_tokens=False) and raw.text.startswith("<s>")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.stub.Detokenize(pb.DetokenizeRequest(token_ids=[5, 100_000]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "token_ids[1] = 100000 is not a token of this model" in (err.value.details() or "")
        # a Generate prompt of text is the same ids Tokenize gives
        completion = await generate(served.stub, text=TEXT, max_tokens=1)
        assert completion.final is not None and completion.final.prompt_tokens == len(want)


async def test_special_tokens_and_stop_strings_in_the_text(checkpoints) -> None:  # noqa: ANN001
    folder = checkpoints["qwen3"]
    eos = {"token_ids": {"ids": [5, 6, 7, 8]}, "max_tokens": 3, "ignore_eos": True, "temperature": 0.0,
           "logit_bias": {2: 100.0}}  # EOS (</s>) three times
    async with serve(str(folder)) as served:
        skipped = await generate(served.stub, **eos)
        assert skipped.token_ids == [2, 2, 2] and skipped.text == ""
        kept = await generate(served.stub, **eos, skip_special_tokens=False)
        assert kept.token_ids == [2, 2, 2] and kept.text == "</s></s></s>"
        plain = await generate(served.stub, token_ids={"ids": [5, 6, 7, 8]}, max_tokens=24, ignore_eos=True,
                               temperature=0.0)
        assert len(plain.text) >= 4, plain.text
        stop = plain.text[2:4]
        cut = await generate(served.stub, token_ids={"ids": [5, 6, 7, 8]}, max_tokens=24, ignore_eos=True,
                             temperature=0.0, stop=[stop])
        with_stop = await generate(served.stub, token_ids={"ids": [5, 6, 7, 8]}, max_tokens=24, ignore_eos=True,
                                   temperature=0.0, stop=[stop], include_stop_str_in_output=True)
        at = plain.text.index(stop)
        assert cut.text == plain.text[:at] and with_stop.text == plain.text[: at + len(stop)]
        assert cut.final is not None and cut.final.stop_reason == stop and cut.final.finish_reason == "stop"


def test_generate_cli_sends_the_text_options() -> None:
    request = request_from_args(build_parser().parse_args(["generate", "hi", "--no-skip-special-tokens",
                                                           "--include-stop-str-in-output"]))
    assert request.HasField("skip_special_tokens") and not request.skip_special_tokens
    assert request.include_stop_str_in_output
    assert request_from_args(build_parser().parse_args(["generate", "hi"])).skip_special_tokens


async def test_prompts_are_encoded_off_the_event_loop(checkpoints, monkeypatch) -> None:  # noqa: ANN001
    """The event loop runs the step loop and every stream: a long text must not be encoded on it."""
    import threading

    from controlplane.tokenizer import HFTokenizer

    threads: list[threading.Thread] = []
    encode = HFTokenizer.encode

    def spy(self, text: str, add_special_tokens: bool = True) -> list[int]:  # noqa: ANN001
        threads.append(threading.current_thread())
        return encode(self, text, add_special_tokens)

    monkeypatch.setattr(HFTokenizer, "encode", spy)
    async with serve(str(checkpoints["qwen3"]), chat_template="{{ messages[0]['content'] }}") as served:
        await generate(served.stub, text=TEXT, max_tokens=1)
        await generate(served.stub, chat={"messages": [{"role": "user", "content": TEXT}]}, max_tokens=1)
        await served.stub.Tokenize(pb.TokenizeRequest(text=TEXT))
    loop_thread = threading.current_thread()
    assert len(threads) == 3 and all(t is not loop_thread for t in threads)


async def test_detokenize_false_streams_token_ids_only(checkpoints) -> None:  # noqa: ANN001
    ask = {"token_ids": {"ids": [5, 6, 7, 8]}, "max_tokens": 12, "ignore_eos": True, "temperature": 0.0}
    async with serve(str(checkpoints["qwen3"])) as served:
        text = await generate(served.stub, **ask)
        ids = await generate(served.stub, **ask, detokenize=False)
        many = await generate(served.stub, **ask, detokenize=False, n=2)
    assert ids.token_ids == text.token_ids and text.text and ids.text == ""
    assert ids.final is not None and ids.final.completion_tokens == len(text.token_ids)
    assert many.text == "" and len(many.token_ids) == 2 * len(text.token_ids)  # n > 1 too
