"""Traces end to end: a real OTLP/gRPC receiver in-process, the real server (both planes) exporting
to it, and the spans checked: one trace per request holding control- and data-plane spans with the
GenAI attributes, parent links intact, an incoming W3C traceparent honoured, and step spans linked."""

from __future__ import annotations

import grpc

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from shared.config import TelemetryConfig
from tests.e2e.conftest import generate, serve
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

INCOMING_TRACE = "0af7651916cd43dd8448eb211c80319c"
INCOMING_PARENT = "b7ad6b7169203331"
LONG_PROMPT = "The quick brown fox jumps over the lazy dog!"  # 44 byte tokens: 3 chunks of <= 16


async def _run(stub, request_id: str, text: str, max_tokens: int, metadata=None) -> pb.GenerateResponse:  # noqa: ANN001
    final = None
    request = pb.GenerateRequest(request_id=request_id, text=text, max_tokens=max_tokens, temperature=0.0,
                                 ignore_eos=True, top_k=5, seed=7)
    async for response in stub.Generate(request, metadata=metadata):
        if response.finish_reason:
            final = response
    assert final is not None
    return final


def _request_span(spans: list[ReceivedSpan], request_id: str) -> ReceivedSpan:
    found = [s for s in spans if s.attributes.get("gen_ai.request.id") == request_id and s.kind == 2]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def _check_tree(trace: list[ReceivedSpan], root: ReceivedSpan) -> None:
    ids = {s.span_id for s in trace}
    for span in trace:
        if span is not root:
            assert span.parent_id in ids, f"{span.name} has a parent outside its trace"
        assert span.end_ns >= span.start_ns


def _check_request_trace(spans: list[ReceivedSpan], request_id: str, chunks: int, out_tokens: int) -> ReceivedSpan:
    root = _request_span(spans, request_id)
    assert root.service == "duetserve-controlplane" and root.name == "text_completion tiny"
    a = root.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.request.model"] == "tiny"
    assert a["gen_ai.usage.output_tokens"] == a["gen_ai.usage.completion_tokens"] == out_tokens
    assert a["gen_ai.usage.input_tokens"] == a["gen_ai.usage.prompt_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.request.temperature"] == 0.0 and a["gen_ai.request.top_k"] == 5
    assert a["gen_ai.request.seed"] == 7 and a["gen_ai.request.max_tokens"] == out_tokens
    assert 0 < a["gen_ai.latency.time_to_first_token"] <= a["gen_ai.latency.e2e"]
    trace = [s for s in spans if s.trace_id == root.trace_id]
    _check_tree(trace, root)
    by_name: dict[str, list[ReceivedSpan]] = {}
    for s in trace:
        by_name.setdefault(s.name, []).append(s)
    assert len(by_name["queue"]) == 1 and by_name["queue"][0].parent_id == root.span_id
    prefill = by_name["prefill_chunk"]
    assert len(prefill) == chunks and all(s.parent_id == root.span_id for s in prefill)
    assert sorted(s.attributes["duetserve.chunk.index"] for s in prefill) == list(range(chunks))
    (decode,) = by_name["decode"]
    assert decode.parent_id == root.span_id and decode.attributes["duetserve.decode.steps"] == out_tokens - 1
    data = by_name["dataplane.seq"]
    assert {s.service for s in data} == {"duetserve-dataplane"}
    assert sorted(s.parent_id for s in data) == sorted([p.span_id for p in prefill] + [decode.span_id])
    return root


async def test_spans_reach_an_otlp_receiver() -> None:
    with OtlpReceiver() as receiver:
        telemetry = TelemetryConfig(exporter="otlp", otlp_endpoint=receiver.endpoint)
        async with serve("tiny", max_num_batched_tokens=16, telemetry=telemetry) as served:
            long = await _run(served.stub, "r-long", LONG_PROMPT, 4)
            traceparent = f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"
            short = await _run(served.stub, "r-parent", "Hi", 3, metadata=(("traceparent", traceparent),))
            chat = await generate(served.stub, request_id="r-chat", max_tokens=2, ignore_eos=True,
                                  chat={"messages": [{"role": "user", "content": "Hi"}]})
            many = await generate(served.stub, request_id="r-many", text="Hi", max_tokens=2, n=2, ignore_eos=True,
                                  seed=7, temperature=1.0)
            try:
                await _run(served.stub, "r-bad", "", 3)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            add = served.plane.engine.add_request

            def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - a bug in the server
                raise RuntimeError("a bug")

            served.plane.engine.add_request = broken  # type: ignore[method-assign]
            try:
                await _run(served.stub, "r-bug", "Hi", 3)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNKNOWN
            served.plane.engine.add_request = add  # type: ignore[method-assign]
        assert long.completion_tokens == 4 and short.completion_tokens == 3 and chat.final is not None
        # leaving `serve` stopped both planes, and each flushed its batch on the way out
        spans = receiver.receiver.wait_for(lambda got: any(s.name == "dataplane.execute" for s in got))

    root = _check_request_trace(spans, "r-long", chunks=3, out_tokens=4)
    assert root.parent_id == ""
    incoming = _check_request_trace(spans, "r-parent", chunks=1, out_tokens=3)
    assert incoming.trace_id == INCOMING_TRACE and incoming.parent_id == INCOMING_PARENT
    chatted = _request_span(spans, "r-chat")  # a chat prompt is the GenAI "chat" operation
    assert chatted.name == "chat tiny" and chatted.attributes["gen_ai.operation.name"] == "chat"

    steps = {s.span_id: s for s in spans if s.name == "scheduler.step"}
    assert steps and all(s.parent_id == "" for s in steps.values())
    for step in steps.values():
        assert step.attributes["duetserve.step.mode"] == "aggregated"
        assert {"duetserve.step.prefill_sms", "duetserve.step.decode_sms", "duetserve.step.decode_steps"} <= set(
            step.attributes)
        if step.attributes["duetserve.step.num_tokens"]:  # not a step that only drops finished requests
            assert step.attributes["duetserve.step.predicted_ms"] > 0  # the predictor's estimate of it
        if step.status_code != 2:  # a step cut short by the server's stop has no measured time
            assert "duetserve.step.measured_ms" in step.attributes
            assert "duetserve.step.predictor_abs_pct_error" in step.attributes or not step.attributes[
                "duetserve.step.num_tokens"]
    executes = [s for s in spans if s.name == "dataplane.execute"]
    assert all(e.parent_id in steps and e.trace_id == steps[e.parent_id].trace_id for e in executes)
    answered = {s.span_id for s in steps.values() if s.status_code != 2}  # not cut short by the stop
    assert answered <= {e.parent_id for e in executes}
    for chunk in (s for s in spans if s.name == "prefill_chunk"):
        assert len(chunk.links) == 1 and chunk.links[0][1] in steps

    # n=2: completion 1's span is a child of the call's (completion 0's), in its trace, with its attributes
    assert many.final is not None
    server = _request_span(spans, "r-many")
    (child,) = [s for s in spans if s.attributes.get("gen_ai.request.id") == "r-many" and s.kind == 1]
    assert child.parent_id == server.span_id and child.trace_id == server.trace_id
    assert child.attributes["duetserve.choice_index"] == 1 and child.name == server.name
    assert server.attributes["gen_ai.request.seed"] == 7 and child.attributes["gen_ai.request.seed"] == 8  # seed + i
    assert child.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert child.attributes["gen_ai.usage.output_tokens"] == 2
    # the call's span is the whole response's, as the GenAI conventions say: one reason per choice
    assert server.attributes["gen_ai.response.finish_reasons"] == ["length", "length"]
    assert server.attributes["gen_ai.usage.output_tokens"] == 4

    bad = _request_span(spans, "r-bad")  # the rejected call: an error span of its own, found by its id
    # OTel's error.type; a client's error leaves the server span's status unset (the RPC conventions)
    assert bad.status_code == 0 and bad.attributes["error.type"] == "INVALID_ARGUMENT"
    assert bad.attributes["rpc.grpc.status_code"] == 3 and "INVALID_ARGUMENT" in bad.attributes["duetserve.error.message"]
    bug = _request_span(spans, "r-bug")  # a server's bug: gRPC ends the call UNKNOWN, a server fault
    assert bug.status_code == 2 and bug.attributes["error.type"] == "UNKNOWN" and "a bug" in bug.status_message
    assert bug.attributes["rpc.grpc.status_code"] == 2
    assert all("error.type" not in s.attributes for s in spans if s not in (bad, bug))
    assert server.attributes["rpc.grpc.status_code"] == 0 and "rpc.grpc.status_code" not in child.attributes


async def test_a_call_the_client_cancels_ends_as_cancelled() -> None:
    """The client cancels an n=2 call when completion 0 has finished and completion 1 still runs, and an
    n=1 call mid-stream: each call's span says CANCELLED (they read OK, status code 0, as their requests
    had ended as aborts, or completion 0 had finished); the requests were aborted, and the completion the
    cancel aborted says so too (error.type CANCELLED, its status unset: not a server fault)."""
    from tests.e2e.test_limits import slow_steps

    with OtlpReceiver() as receiver:
        telemetry = TelemetryConfig(exporter="otlp", otlp_endpoint=receiver.endpoint)
        async with serve("tiny", telemetry=telemetry) as served:
            slow_steps(served, 0.05)
            # a prompt past one block: completion 0 runs alone and completion 1 joins after its first message,
            # which (max_tokens 1) is also its last
            call = served.stub.Generate(pb.GenerateRequest(request_id="r-half", token_ids={"ids": list(range(3, 40))},
                                                           max_tokens=1, n=2, ignore_eos=True))
            first = await call.read()
            assert first.finish_reason == "length" and first.index == 0
            call.cancel()
            cut = served.stub.Generate(pb.GenerateRequest(request_id="r-cut", token_ids={"ids": [5, 6]},
                                                          max_tokens=500, ignore_eos=True))
            await cut.read()
            cut.cancel()  # an n=1 call cancelled mid-stream: its request is aborted
        spans = receiver.receiver.wait_for(lambda got: {"r-half", "r-cut"} <= {
            s.attributes.get("gen_ai.request.id") for s in got if s.kind == 2})
    server = _request_span(spans, "r-half")
    (child,) = [s for s in spans if s.attributes.get("gen_ai.request.id") == "r-half" and s.kind == 1]
    assert server.attributes["error.type"] == "CANCELLED" and server.attributes["rpc.grpc.status_code"] == 1
    assert server.status_code == 0  # a client's cancel: unset, as OTel's RPC conventions say
    assert child.attributes["gen_ai.response.finish_reasons"] == ["abort"]
    assert child.attributes["error.type"] == "CANCELLED" and child.status_code == 0
    assert "rpc.grpc.status_code" not in child.attributes  # a completion's span is not the call's
    cut = _request_span(spans, "r-cut")
    assert cut.attributes["error.type"] == "CANCELLED" and cut.attributes["rpc.grpc.status_code"] == 1
    assert cut.attributes["gen_ai.response.finish_reasons"] == ["abort"] and cut.status_code == 0
