"""Bad input gets INVALID_ARGUMENT with a message naming the problem; info, health, reflection work."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import generate, serve

OK = {"token_ids": {"ids": [5, 6, 7]}, "max_tokens": 2}
BAD_REQUESTS: list[tuple[dict[str, object], str]] = [
    ({"max_tokens": 2}, "prompt: set text, token_ids or chat"),
    ({"text": "", "max_tokens": 2}, "prompt is empty"),
    ({"token_ids": {"ids": []}, "max_tokens": 2}, "no tokens"),
    ({"token_ids": {"ids": list(range(3, 70))}}, "at most 63 prompt tokens"),
    ({**OK, "max_tokens": 0}, "max_tokens must be >= 1"),
    ({**OK, "max_tokens": -5}, "max_tokens must be >= 1"),
    ({**OK, "temperature": -0.5}, "temperature must be >= 0"),
    ({**OK, "temperature": float("nan")}, "temperature must be a finite number"),
    ({**OK, "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({**OK, "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"token_ids": {"ids": [5, 260, 7]}}, "token_ids[1] = 260 is not a token of this model"),
    ({**OK, "top_k": -3}, "top_k must be"),
    ({**OK, "min_p": 1.5}, "min_p must be in [0, 1]"),
    ({**OK, "logprobs": 50}, "logprobs must be at most 20"),
    ({**OK, "min_tokens": 1, "allowed_token_ids": [257]}, "every token allowed_token_ids allows is a stop token"),
    ({**OK, "min_tokens": 1, "allowed_token_ids": [9], "stop_token_ids": [9]}, "is a stop token (EOS or"),
    ({**OK, "logit_bias": {5: 100.00001}}, "got 100.000008"),
    ({"token_ids": {"ids": [5] * 60}, "max_tokens": 10, "min_tokens": 5},
     "min_tokens (5) exceeds the 4 tokens a prompt of 60 leaves under max_model_len 64"),
    ({**OK, "repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({**OK, "presence_penalty": 3.0}, "presence_penalty must be in [-2, 2]"),
    ({**OK, "stop": ["ok", ""]}, "stop[1] is an empty string"),
    ({**OK, "stop_token_ids": [9999]}, "stop_token_ids[0] = 9999"),
    ({**OK, "min_tokens": 5}, "min_tokens (5) exceeds max_tokens (2)"),
    ({**OK, "request_id": "x" * 300}, "request_id longer than"),
    ({**OK, "request_id": "a\nb"}, "request_id: only printable characters"),
    ({**OK, "stop": ["s" * 300]}, "stop[0] is longer than 256 characters"),
    ({**OK, "stop": ["x"] * 40}, "stop: at most 32 stop strings"),
    ({**OK, "stop_token_ids": [5] * 300}, "stop_token_ids: at most 256 token ids"),
    ({**OK, "frequency_penalty": -2.5}, "frequency_penalty must be in [-2, 2]"),
    ({**OK, "min_p": float("inf")}, "min_p must be a finite number"),
    ({**OK, "n": 17}, "n must be at most 16 completions"),
    ({**OK, "logit_bias": {300: 1.0}}, "logit_bias: token id 300 is outside the vocabulary (size 260)"),
    ({**OK, "logit_bias": {5: 150.0}}, "logit_bias[5] must be in [-100, 100], got 150"),
    ({**OK, "logit_bias": {5: float("nan")}}, "logit_bias[5] must be a finite number"),
    ({**OK, "logit_bias": {i: 1.0 for i in range(1100)}}, "logit_bias: at most 1024 entries, got 1100"),
    ({**OK, "allowed_token_ids": [5, 9999]}, "allowed_token_ids: token id 9999 is outside the vocabulary"),
    ({**OK, "priority": 2}, "priority: 2 needs a server started with --scheduling-policy priority"),
    ({**OK, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be in [1, 63]"),
    ({**OK, "truncate_prompt_tokens": 64}, "truncate_prompt_tokens must be in [1, 63] (below max_model_len 64)"),
    ({**OK, "prompt_logprobs": 21}, "prompt_logprobs must be at most 20"),
    ({**OK, "detokenize": False, "stop": ["x"]}, "stop: stop strings are matched in the text, which detokenize=false"),
    ({"chat": {}}, "chat.messages: at least one message is needed"),
    ({"chat": {"messages": [{"content": "hi"}]}}, "chat.messages[0].role: required"),
    ({"chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "a\tb"}]}}, "chat.messages[1].role"),
    ({"chat": {"messages": [{"role": "u"}] * 1025}}, "chat.messages: at most 1024 messages, got 1025"),
    ({"chat": {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}},
     "continue_final_message and add_generation_prompt exclude each other"),
    ({"chat": {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": 1}}},
     "chat.chat_template_kwargs: messages may not be set there"),
    ({"chat": {"messages": [{"role": "user", "content": "x" * 80}]}}, "at most 63 prompt tokens"),
    ({"chat": {"messages": [{"role": "user"}], "chat_template_kwargs": {"x": float("nan")}}},
     "chat.chat_template_kwargs: not a JSON value"),
    ({"chat": {"messages": [{"role": "user"}], "tools": [{"f": float("inf")}]}}, "chat.tools[0]: not a JSON value"),
    ({"chat": {"messages": [{"role": "assistant", "tool_calls": [{"a": {"b": [float("-inf")]}}]}]}},
     "chat.messages[0].tool_calls[0]: not a JSON value"),
]


async def test_bad_requests_are_invalid_argument() -> None:
    async with serve("tiny", max_model_len=64) as served:
        for fields, message in BAD_REQUESTS:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(served.stub, **fields)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
            assert message in (err.value.details() or ""), (fields, err.value.details())
        ok = await generate(served.stub, **OK)  # the server still serves
        assert len(ok.token_ids) == 2
        long = list(range(3, 103))  # 100 tokens: too long for max_model_len 64 unless truncated
        kept = await generate(served.stub, token_ids={"ids": long}, truncate_prompt_tokens=10, max_tokens=3,
                              temperature=0.0, ignore_eos=True)
        tail = await generate(served.stub, token_ids={"ids": long[-10:]}, max_tokens=3, temperature=0.0,
                              ignore_eos=True)
        assert kept.final is not None and kept.final.prompt_tokens == 10 and kept.token_ids == tail.token_ids
        short = await generate(served.stub, token_ids={"ids": [5, 6]}, truncate_prompt_tokens=10, max_tokens=1)
        assert short.final is not None and short.final.prompt_tokens == 2  # shorter prompts stay whole
        clamped = await generate(served.stub, token_ids={"ids": list(range(3, 63))}, max_tokens=50, ignore_eos=True)
        assert clamped.final is not None and clamped.final.completion_tokens == 4  # 60 + 4 = max_model_len
        assert clamped.final.finish_reason == "length"


async def test_duplicate_request_id_is_already_exists() -> None:
    async with serve("tiny") as served:
        first = served.stub.Generate(pb.GenerateRequest(request_id="dup", max_tokens=500, ignore_eos=True,
                                                        token_ids=pb.TokenIds(ids=[5, 6])))
        await first.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, request_id="dup", **OK)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        first.cancel()


async def test_a_duplicate_of_a_running_id_is_refused_before_its_prompt_is_encoded() -> None:
    """A text prompt reusing a running request's id gets ALREADY_EXISTS before tokenization, so an
    Abort of that id reaches the running request (it used to mark the duplicate, report found, and
    leave the original running)."""
    async with serve("tiny") as served:
        first = served.stub.Generate(pb.GenerateRequest(request_id="dup", max_tokens=3000, ignore_eos=True,
                                                        token_ids=pb.TokenIds(ids=[5, 6])))
        await first.read()
        encoded: list[object] = []
        encode = served.plane.engine.tokenizer.encode
        served.plane.engine.tokenizer.encode = lambda *a, **k: encoded.append(a) or encode(*a, **k)  # type: ignore
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, request_id="dup", text="a text prompt", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and not encoded
        assert (await served.stub.Abort(pb.AbortRequest(request_id="dup"))).found
        last = None
        while (message := await first.read()) != grpc.aio.EOF:
            last = message
        assert last is not None and last.finish_reason == "abort"


async def test_unparsable_request_bodies_are_invalid_argument() -> None:
    """Bytes protobuf cannot parse (invalid UTF-8 in a string field, a corrupt wire format) get
    INVALID_ARGUMENT naming the message type, on the streaming and the unary methods alike."""
    async with serve("tiny") as served:
        channel = served.channel
        generate_raw = channel.unary_stream("/duetserve.v1.Generation/Generate", request_serializer=None,
                                            response_deserializer=pb.GenerateResponse.FromString)
        bad_utf8_text = bytes([0x12, 2, 0xFF, 0xFE])  # field 2 (text), 2 bytes that are not UTF-8
        for body in (bad_utf8_text, b"\xff\xff\xff\xff"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in generate_raw(body):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed GenerateRequest" in (err.value.details() or "")
        for method, reply, name in (("Tokenize", pb.TokenizeResponse, "TokenizeRequest"),
                                    ("Abort", pb.AbortResponse, "AbortRequest")):
            call = channel.unary_unary(f"/duetserve.v1.Generation/{method}", request_serializer=None,
                                       response_deserializer=reply.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(bytes([0x0A, 2, 0xFF, 0xFE]))  # field 1, a string, not UTF-8
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"malformed {name}" in (err.value.details() or "")
        assert len((await generate(served.stub, **OK)).token_ids) == 2


async def test_stop_strings_wait_for_min_tokens() -> None:
    """Before min_tokens, a stop string does not end the completion, as EOS and stop tokens do not."""
    async with serve("tiny") as served:
        prompt = {"token_ids": {"ids": [72, 101, 108]}, "temperature": 0.0, "ignore_eos": True}
        free = await generate(served.stub, **prompt, max_tokens=40)
        stop = free.text[2:4]  # text of the first few tokens (the tiny model's tokenizer: a byte each)
        assert stop and free.text.find(stop) < 10
        early = await generate(served.stub, **prompt, max_tokens=40, stop=[stop])
        assert early.final is not None and early.final.finish_reason == "stop" and early.final.completion_tokens < 10
        held = await generate(served.stub, **prompt, max_tokens=40, min_tokens=30, stop=[stop])
        assert held.final is not None and held.final.completion_tokens >= 30
        assert held.text.startswith(free.text[: free.text.find(stop) + len(stop)])


async def test_min_tokens_keep_eos_and_stop_tokens_from_being_sampled() -> None:
    """As in vLLM: before min_tokens tokens, EOS and the stop tokens are masked in the sampler, so
    they are neither generated nor counted (a later stop check alone would keep the EOS and go on)."""
    async with serve("tiny") as served:
        prompt = {"token_ids": {"ids": [72, 101, 108]}, "temperature": 0.0, "max_tokens": 8}
        eos_first = await generate(served.stub, **prompt, logit_bias={257: 100.0})
        assert list(eos_first.token_ids) == [257]
        held = await generate(served.stub, **prompt, min_tokens=4, logit_bias={257: 100.0})
        assert 257 not in held.token_ids[:4] and list(held.token_ids[4:]) == [257]
        assert held.final is not None and held.final.finish_reason == "stop" and held.final.completion_tokens == 5
        free = await generate(served.stub, **prompt, ignore_eos=True)
        first = free.token_ids[0]
        kept = await generate(served.stub, **prompt, ignore_eos=True, min_tokens=3, stop_token_ids=[first])
        assert kept.token_ids[0] != first and len(kept.token_ids) >= 3


async def test_model_info_health_and_reflection() -> None:
    async with serve("tiny", num_kv_blocks=100) as served:
        info = await served.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.model, info.vocab_size, info.num_kv_blocks, info.block_size) == ("tiny", 260, 100, 16)
        assert info.max_model_len == 1600 and list(info.eos_token_ids) == [257]
        assert info.policy == "aggregated" and not info.supports_multiplexing
        assert info.supports_chat  # a preset's ChatML
        assert info.piecewise_max_tokens == 0  # a CPU runs every prefill and mixed step eagerly
        health = health_pb2_grpc.HealthStub(served.channel)
        for service in ("", "duetserve.v1.Generation"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(served.channel)
        call = reflect.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await asyncio.wait_for(call.read(), 5)
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {"duetserve.v1.Generation", "grpc.health.v1.Health"} <= names


async def test_stop_strings_and_stop_tokens() -> None:
    """A stop string ends the text before it; a stop token id ends the stream with finish 'stop'."""
    async with serve("tiny") as served:
        base = await generate(served.stub, token_ids={"ids": [72, 101, 108]}, max_tokens=40,
                              temperature=0.0, ignore_eos=True)
        assert len(base.token_ids) == 40
        visible = base.text.strip("\ufffd")
        assert len(visible) > 8, "the tiny model's greedy text is too short to cut"
        stop = visible[5:7]
        cut = await generate(served.stub, token_ids={"ids": [72, 101, 108]}, max_tokens=40,
                             temperature=0.0, ignore_eos=True, stop=[stop])
        assert cut.final is not None and cut.final.finish_reason == "stop"
        assert cut.final.stop_reason == stop
        assert cut.text == base.text[: base.text.find(stop)]
        token = base.token_ids[10]
        first = base.token_ids.index(token)
        by_id = await generate(served.stub, token_ids={"ids": [72, 101, 108]}, max_tokens=40,
                               temperature=0.0, ignore_eos=True, stop_token_ids=[token])
        assert by_id.token_ids == base.token_ids[: first + 1]
        assert by_id.final is not None and by_id.final.finish_reason == "stop"
