"""logit_bias and allowed_token_ids through the gRPC API on the CPU data plane (the real sampler):
a +100 bias forces its token, a -100 bias bans the greedy choice, and allowed ids bound what a
sampled completion can hold -- each against the same request without the rule."""

from __future__ import annotations

import asyncio
import re

import pytest

from controlplane.cli import build_parser, main
from controlplane.client import UsageError, request_from_args, run_generate
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.tokenizer import ByteTokenizer
from tests.e2e.conftest import generate, serve

PROMPT = {"token_ids": {"ids": [5, 9, 13, 17, 21, 25]}, "ignore_eos": True, "max_tokens": 10}


async def test_logit_bias_and_allowed_token_ids_steer_the_tokens() -> None:
    async with serve("tiny") as served:
        plain = await generate(served.stub, **PROMPT, temperature=0.0)
        forced = await generate(served.stub, **PROMPT, temperature=0.0, logit_bias={77: 100.0})
        assert forced.token_ids == [77] * 10 and plain.token_ids != forced.token_ids
        first = plain.token_ids[0]
        banned = await generate(served.stub, **{**PROMPT, "max_tokens": 1}, temperature=0.0,
                                logit_bias={first: -100.0})
        assert banned.token_ids[0] != first
        allowed = [40, 41, 42, 200]
        sampled = await generate(served.stub, **PROMPT, temperature=1.5, seed=3, allowed_token_ids=allowed)
        assert len(sampled.token_ids) == 10 and set(sampled.token_ids) <= set(allowed)
        free = await generate(served.stub, **PROMPT, temperature=1.5, seed=3)
        assert not set(free.token_ids) <= set(allowed)  # the rule, not the seed, bounds them
        many = [m async for m in served.stub.Generate(pb.GenerateRequest(**PROMPT, temperature=1.0, n=3,
                                                                          allowed_token_ids=[7, 8]))]
        assert sum(len(m.token_ids) for m in many) == 30 and {t for m in many for t in m.token_ids} <= {7, 8}


def test_generate_cli_sends_the_stopping_penalty_and_logprob_flags() -> None:
    args = build_parser().parse_args(["generate", "hi", "--min-tokens", "3", "--stop-token-ids", "7,9",
                                      "--repetition-penalty", "1.2", "--presence-penalty", "0.5",
                                      "--frequency-penalty", "-0.25", "--logprobs", "2"])
    request = request_from_args(args)
    assert (request.min_tokens, list(request.stop_token_ids)) == (3, [7, 9])
    assert request.repetition_penalty == pytest.approx(1.2) and request.presence_penalty == 0.5
    assert request.frequency_penalty == -0.25 and request.logprobs == 2
    plain = request_from_args(build_parser().parse_args(["generate", "hi"]))
    assert not plain.HasField("repetition_penalty") and not plain.HasField("logprobs") and plain.min_tokens == 0
    for flags, says in ((["--stop-token-ids", "1,-2"], "--stop-token-ids takes"), (["--min-tokens", "-1"], "unsigned"),
                        (["--logprobs", "-1"], "unsigned"), (["--token-ids", "4,x"], "--token-ids takes")):
        with pytest.raises(UsageError, match=says):
            request_from_args(build_parser().parse_args(["generate", *([] if "--token-ids" in flags else ["hi"]),
                                                         *flags]))


def test_a_bad_generate_flag_or_no_prompt_is_one_error_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before any call (no server here): one `duetserve generate: error:` line, as argparse's."""
    for argv, says in ((["generate", "--max-tokens", "2"], "a prompt is needed"),
                       (["generate", "hi", "--logit-bias", "x"], "--logit-bias takes ID=BIAS"),
                       (["generate", "hi", "--token-ids", "1,2"], "give either PROMPT or --token-ids"),
                       (["generate", "--token-ids", str(2**32)], "--token-ids takes"),
                       (["generate", "hi", "--seed", "-1"], "--seed -1 cannot be sent"),  # protobuf's range
                       (["generate", "hi", "--max-tokens", str(2**31)], "--max-tokens 2147483648 cannot be sent"),
                       (["chat", "--quick", "hi", "--seed", "-5"], "--seed -5 cannot be sent"),
                       (["health", "--tls-ca", "/nonexistent/ca.pem"], "cannot read a TLS file")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"duetserve {argv[0]}: error: {says}") and err.count("\n") == 1, err


async def test_generate_cli_stops_on_a_stop_token_and_prints_logprobs(capsys: pytest.CaptureFixture[str]) -> None:
    async with serve("tiny") as served:
        plain = await generate(served.stub, **PROMPT, temperature=0.0)
        first, second = plain.token_ids[:2]
        ids = ",".join(map(str, PROMPT["token_ids"]["ids"]))  # type: ignore[index]
        cli = ["generate", "--address", f"127.0.0.1:{served.plane.port}", "--token-ids", ids, "--max-tokens", "10"]
        args = build_parser().parse_args([*cli, "--stop-token-ids", str(second), "--logprobs", "2"])
        assert await asyncio.to_thread(run_generate, args) == 0
        err = capsys.readouterr().err
        assert f"finish_reason=stop stop_reason='{second}'" in err and "completion_tokens=2" in err
        rows = err.split("[logprobs]\n", 1)[1].splitlines()
        assert [int(r.split()[2]) for r in rows] == [first, second]
        assert [r.split()[5:7] for r in rows] == [["rank", "1"], ["rank", "1"]]  # greedy: the most likely
        texts = [repr(ByteTokenizer().token_text(t)) for t in (first, second)]  # the tiny model's tokenizer
        assert [r.split("  top ")[0].endswith(" " + text) for r, text in zip(rows, texts)] == [True, True], rows
        assert [r.split("  top ")[1].count(" | ") for r in rows] == [1, 1]  # two alternatives each
        # before --min-tokens the stop token is not sampled, so the completion runs on past it
        args = build_parser().parse_args([*cli, "--stop-token-ids", str(first), "--min-tokens", "4"])
        assert await asyncio.to_thread(run_generate, args) == 0
        err = capsys.readouterr().err
        assert int(re.search(r"completion_tokens=(\d+)", err).group(1)) >= 4  # type: ignore[union-attr]


async def test_the_stop_token_that_ends_a_completion_is_not_in_its_text() -> None:
    """As vLLM: a stop token id (or EOS) ending the completion counts as a token but adds no text, unless
    include_stop_str_in_output; a stop token before min_tokens is not sampled at all."""
    async with serve("tiny") as served:
        plain = await generate(served.stub, **PROMPT, temperature=0.0)
        first = plain.token_ids[0]
        forced = {**PROMPT, "temperature": 0.0, "logit_bias": {65: 100.0}, "stop_token_ids": [65]}  # 65 is "A"
        cut = await generate(served.stub, **forced)
        assert cut.token_ids == [65] and cut.text == "" and cut.final is not None
        assert (cut.final.finish_reason, cut.final.stop_reason, cut.final.completion_tokens) == ("stop", "65", 1)
        kept = await generate(served.stub, **forced, include_stop_str_in_output=True)
        assert kept.token_ids == [65] and kept.text == "A"
        second = plain.token_ids[1]
        assume = second != first  # else the stop would come at the first token
        later = await generate(served.stub, **{**PROMPT, "temperature": 0.0, "stop_token_ids": [second]})
        one = await generate(served.stub, **{**PROMPT, "temperature": 0.0, "max_tokens": 1})
        assert assume and later.token_ids == plain.token_ids[:2] and later.text == one.text
