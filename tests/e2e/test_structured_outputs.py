"""Structured outputs through the gRPC API on the CPU data plane (the real sampler applies the masks):
regex, choice, JSON schema, JSON object and grammar completions follow what they asked for, greedy
and sampled, one completion or several; a bad grammar is INVALID_ARGUMENT saying why; nothing leaks.
Once with the byte-level tiny model, once with a checkpoint whose tokenizer.json is a real BPE."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import grpc
import pytest

from controlplane.cli import build_parser
from controlplane.client import request_from_args
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.tracing import STEP_SPAN
from tests.e2e.conftest import Served, generate, serve

PROMPT = {"token_ids": {"ids": [5, 9, 13, 17, 21, 25]}, "max_tokens": 64}
SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "tag": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
          "required": ["id", "tag", "ok"], "additionalProperties": False}


def so(**fields: object) -> pb.StructuredOutputs:
    return pb.StructuredOutputs(**fields)


async def no_leaks(served: Served) -> None:
    load = await served.stub.GetLoad(pb.GetLoadRequest())
    assert load.num_requests_running == load.num_requests_waiting == load.num_kv_blocks_used == 0


@pytest.mark.parametrize("defer", [False, True])
async def test_completions_follow_their_structured_outputs(defer: bool) -> None:
    async with serve("tiny", defer_token_masks=defer) as served:
        for temperature in (0.0, 1.2):
            sampling = {"temperature": temperature, "seed": 7}
            digits = await generate(served.stub, **PROMPT, **sampling, structured_outputs=so(regex=r"[0-9]{3}-[a-c]+"))
            assert re.fullmatch(r"[0-9]{3}-[a-c]+", digits.text) or digits.final.finish_reason == "length"
            assert digits.final.finish_reason in ("stop", "length")
            pick = await generate(served.stub, **PROMPT, **sampling,
                                  structured_outputs=so(choice=["north", "south", "east"]))
            assert pick.text in ("north", "south", "east") and pick.final.finish_reason == "stop"
            record = await generate(served.stub, **{**PROMPT, "max_tokens": 200}, **sampling,
                                    structured_outputs=so(json=json.dumps(SCHEMA), disable_any_whitespace=True))
            parsed = json.loads(record.text)
            assert set(parsed) == {"id", "tag", "ok"} and 0 <= parsed["id"] <= 999 and parsed["tag"] in ("red", "green")
            assert record.final.finish_reason == "stop"
            lark = await generate(served.stub, **PROMPT, **sampling,
                                  structured_outputs=so(grammar='start: ("ab" | "c")~2'))
            assert lark.text in ("abab", "abc", "cab", "cc") and lark.final.finish_reason == "stop"
        followed = served.scheduler.stats.masks_followed
        assert followed > 20 if defer else followed == 0  # each token but a request's first, with deferral
        await no_leaks(served)


@pytest.mark.parametrize("defer", [False, True])
async def test_every_completion_of_several_and_the_options_around_it(defer: bool) -> None:
    async with serve("tiny", defer_token_masks=defer) as served:
        request = pb.GenerateRequest(**PROMPT, temperature=1.0, seed=3, n=3, logprobs=1, min_tokens=4,
                                     ignore_eos=True, structured_outputs=so(choice=["yes", "no"]))
        texts, logprobs = ["", "", ""], [[], [], []]
        async for message in served.stub.Generate(request):
            texts[message.index] += message.text
            logprobs[message.index] += [lp.logprob for lp in message.logprobs]
            if message.finish_reason:  # the grammar ends it: min_tokens and ignore_eos do not hold it
                assert message.finish_reason == "stop"
        assert all(t in ("yes", "no") for t in texts)
        assert all(lps and all(v > float("-inf") for v in lps) for lps in logprobs)
        short = await generate(served.stub, **{**PROMPT, "max_tokens": 3}, structured_outputs=so(regex="[a-z]{10}"))
        assert short.final.finish_reason == "length" and re.fullmatch("[a-z]{3}", short.text)
        anything = await generate(served.stub, **{**PROMPT, "max_tokens": 8}, structured_outputs=so(json_object=True))
        assert anything.text.startswith("{")
        await no_leaks(served)


@pytest.mark.parametrize("fields, says", [
    ({"regex": "(unclosed"}, "structured_outputs.regex: "),
    ({"json": "{not json"}, "structured_outputs.json: not a JSON schema"),
    ({"json": '{"type": "integer", "minimum": "x"}'}, "structured_outputs.json: "),
    ({"grammar": "start: missing"}, "structured_outputs.grammar: "),
    ({"regex": "a", "choice": ["a"]},
     "set exactly one of json, regex, choice, grammar, json_object and structural_tag, got regex, choice"),
    ({"disable_any_whitespace": True}, "set exactly one"),
    ({"structural_tag": "<fn>"}, "structured_outputs.structural_tag: not JSON"),
    ({"structural_tag": json.dumps({"structures": [{"begin": "<f>", "schema": {}, "end": ""}], "triggers": ["<g"]})},
     "structured_outputs.structural_tag.structures[0].begin '<f>' starts with none of the triggers"),
    ({"json_object": True, "whitespace_pattern": "[ "}, "structured_outputs.whitespace_pattern: "),
])
async def test_a_bad_structured_output_is_invalid_argument(fields: dict, says: str) -> None:
    async with serve("tiny") as served:
        for prompt in (PROMPT, {"text": "hello", "max_tokens": 4}):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(served.stub, **prompt, structured_outputs=so(**fields))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert says in (err.value.details() or "")
        await no_leaks(served)


TAG = {"structures": [{"begin": "x(", "schema": {"type": "integer", "minimum": 0, "maximum": 99}, "end": ")"}],
       "triggers": ["x"]}


async def test_structural_tags_and_a_whitespace_pattern() -> None:
    async with serve("tiny") as served:
        tagged = 0
        for seed in range(6):
            out = await generate(served.stub, **{**PROMPT, "max_tokens": 128}, temperature=1.0, seed=seed,
                                 ignore_eos=True, structured_outputs=so(structural_tag=json.dumps(TAG)))
            # every "x" the text reaches starts a tag: "x(", an integer in [0, 99], ")" -- the text may end inside one
            for piece in out.text.split("x")[1:]:
                done = re.match(r"\((\d+)\)", piece)
                assert done and 0 <= int(done.group(1)) <= 99 or (
                    len(out.token_ids) == 128 and re.fullmatch(r"(\(\d{0,2})?", piece)), (seed, piece)
                tagged += bool(done)
        assert tagged  # some text reached the trigger (else the test would check nothing)
        spaced = await generate(served.stub, **{**PROMPT, "max_tokens": 200}, temperature=1.0, seed=1,
                                structured_outputs=so(json=json.dumps(SCHEMA), whitespace_pattern="[ ]{0,2}"))
        assert json.loads(spaced.text) and not re.search(r"[\n\r\t]", spaced.text.replace("\\n", ""))
        await no_leaks(served)


async def test_a_bpe_checkpoint_follows_a_regex_and_a_schema(checkpoints) -> None:  # noqa: ANN001
    async with serve(str(checkpoints["qwen3"])) as served:
        words = await generate(served.stub, text="The quick brown fox", max_tokens=40, temperature=0.8, seed=1,
                               structured_outputs=so(regex=r"(fox|dog)( (fox|dog)){2}\."))
        assert re.fullmatch(r"(fox|dog)( (fox|dog)){2}\.", words.text) and words.final.finish_reason == "stop"
        record = await generate(served.stub, text="JSON:", max_tokens=120, temperature=0.0,
                                structured_outputs=so(json=json.dumps(SCHEMA), disable_any_whitespace=True))
        parsed = json.loads(record.text)
        assert set(parsed) == {"id", "tag", "ok"} and record.final.finish_reason == "stop"
        await no_leaks(served)


def test_generate_flags_build_the_structured_output(tmp_path: Path) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    parse = build_parser().parse_args
    assert request_from_args(parse(["generate", "hi", "--json-schema", str(schema_file),
                                    "--disable-any-whitespace"])).structured_outputs == so(
        json=json.dumps(SCHEMA), disable_any_whitespace=True)
    assert request_from_args(parse(["generate", "hi", "--json-schema", '{"type": "object"}'])).structured_outputs == so(
        json='{"type": "object"}')
    choices = request_from_args(parse(["generate", "hi", "--choice", "a", "--choice", "b"])).structured_outputs
    assert list(choices.choice) == ["a", "b"]
    assert request_from_args(parse(["generate", "hi", "--regex", "x+"])).structured_outputs.regex == "x+"
    assert request_from_args(parse(["generate", "hi", "--json-object"])).structured_outputs.json_object
    grammar = request_from_args(parse(["generate", "hi", "--grammar", 'start: "a"'])).structured_outputs
    assert grammar.grammar == 'start: "a"'
    assert not request_from_args(parse(["generate", "hi"])).HasField("structured_outputs")
    folder = request_from_args(parse(["generate", "hi", "--grammar", str(tmp_path)]))  # not a file: sent as text
    assert folder.structured_outputs.grammar == str(tmp_path)
    inline = json.dumps({"type": "object", "description": "x" * 400})  # too long for a file name
    assert request_from_args(parse(["generate", "hi", "--json-schema", inline])).structured_outputs.json == inline
    tag_file = tmp_path / "tag.json"
    tag_file.write_text(json.dumps(TAG))
    assert request_from_args(parse(["generate", "hi", "--structural-tag", str(tag_file)])).structured_outputs == so(
        structural_tag=json.dumps(TAG))
    spaced = request_from_args(parse(["generate", "hi", "--json-object", "--whitespace-pattern", "[ ]?"]))
    assert spaced.structured_outputs == so(json_object=True, whitespace_pattern="[ ]?")


async def test_a_server_without_llguidance_says_so_and_serves_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve("tiny") as served:
        monkeypatch.setitem(sys.modules, "llguidance", None)  # the import fails (the planes share this process)
        assert not (await served.stub.GetModelInfo(pb.GetModelInfoRequest())).supports_structured_outputs
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, **PROMPT, structured_outputs=so(regex="a+"))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "structured outputs need the llguidance package" in (err.value.details() or "")
        plain = await generate(served.stub, **{**PROMPT, "max_tokens": 4})
        assert plain.final.finish_reason == "length"
        await no_leaks(served)


async def test_model_info_and_the_request_span_say_so() -> None:
    from shared.config import TelemetryConfig
    from tests.otlp_receiver import OtlpReceiver

    with OtlpReceiver() as receiver:
        telemetry = TelemetryConfig(exporter="otlp", otlp_endpoint=receiver.endpoint)
        async with serve("tiny", telemetry=telemetry) as served:
            assert (await served.stub.GetModelInfo(pb.GetModelInfoRequest())).supports_structured_outputs
            await generate(served.stub, **PROMPT, request_id="r-json", structured_outputs=so(json_object=True))
            await generate(served.stub, **PROMPT, request_id="r-choice", structured_outputs=so(choice=["x"]))
            await generate(served.stub, **{**PROMPT, "max_tokens": 2}, request_id="r-free")
        spans = receiver.receiver.wait_for(lambda got: {"r-json", "r-choice", "r-free"} <= {
            s.attributes.get("gen_ai.request.id") for s in got if s.kind == 2})
    calls = {s.attributes["gen_ai.request.id"]: s.attributes for s in spans if s.kind == 2}
    assert (calls["r-json"]["duetserve.request.structured_output"], calls["r-json"]["gen_ai.output.type"]) == (
        "json_object", "json")
    assert (calls["r-choice"]["duetserve.request.structured_output"], calls["r-choice"]["gen_ai.output.type"]) == (
        "choice", "text")
    assert "duetserve.request.structured_output" not in calls["r-free"] and "gen_ai.output.type" not in calls["r-free"]
    steps = [s.attributes for s in spans if s.name == STEP_SPAN]
    assert sum(1 for a in steps if a.get("duetserve.step.masks_follow")) >= 5  # the structured outputs' later tokens
    assert all(a.get("duetserve.step.masks_follow") in (None, True) for a in steps)
