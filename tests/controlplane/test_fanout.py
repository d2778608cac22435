"""The servicer against a fake engine whose timing the test controls. Fan-out of a request for n
completions: an Abort that lands while completion 0's first message is queued but not yet read (or
after completion 0 already ended) ends the request, and completions 1..n-1 never start. An Abort
while a prompt is encoded on a worker thread ends it there; output merged with a failure still
reaches the client before the error status."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from controlplane.api import GenerationServicer
from controlplane.engine import EngineRequest, RequestHandle
from controlplane.observer import EngineObserver
from controlplane.output import RequestDelta
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.sequence import StopParams
from controlplane.tokenizer import ByteTokenizer
from controlplane.validation import ValidatedRequest
from shared.messages import SamplingParams


class FakeEngine:
    def __init__(self) -> None:
        self.observer = EngineObserver.disabled()
        self.worker = SimpleNamespace(block_size=4)
        self.scheduler_config = SimpleNamespace(enable_prefix_caching=True)
        self.handles: dict[str, RequestHandle] = {}
        self.added: list[str] = []

    def add_request(self, request: EngineRequest, admitted: bool = False) -> RequestHandle:
        processor = SimpleNamespace()  # the servicer never reads it
        handle = RequestHandle(request.request_id, len(self.added), processor, request.obs)  # type: ignore[arg-type]
        self.handles[request.request_id] = handle
        self.added.append(request.request_id)
        return handle

    def abort(self, request_id: str) -> bool:
        handle = self.handles.pop(request_id, None)
        if handle is None or handle.finished:
            return False
        handle.finished = True
        self.observer.request_finished(handle.obs, "abort", 0, 0)  # as the engine's: the record ends at once
        handle.queue.put_nowait(RequestDelta([], "", finish_reason="abort"))
        return True

    def has_request(self, request_id: str) -> bool:
        return request_id in self.handles

    def check_room(self, num_prompt_tokens: int, count: int) -> None:
        pass


class Context:
    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> None:
        return None  # no deadline

    async def abort(self, code: object, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")


def run(first: RequestDelta) -> tuple[bool, FakeEngine, list[tuple[int, list[int], str]]]:
    async def main() -> tuple[bool, FakeEngine, list[tuple[int, list[int], str]]]:
        engine = FakeEngine()
        servicer = GenerationServicer(engine, "m", "aggregated")  # type: ignore[arg-type]
        valid = ValidatedRequest("r", list(range(10)), SamplingParams(temperature=0.0), StopParams(max_tokens=100), n=3)
        messages: list[tuple[int, list[int], str]] = []

        async def consume() -> None:
            obs = engine.observer.start_request(())
            async for m in servicer._generate_many(valid, Context(), obs, None):  # type: ignore[arg-type]
                messages.append((m.index, list(m.token_ids), m.finish_reason))

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        zero = engine.handles["r\x1f0"]
        zero.queue.put_nowait(first)  # the engine hands completion 0's first message over
        if first.finish_reason:
            zero.finished = True
            del engine.handles["r\x1f0"]
        found = (await servicer.Abort(pb.AbortRequest(request_id="r"), Context())).found  # before it is read
        await asyncio.wait_for(task, 5)
        assert not servicer._fanouts
        return found, engine, messages

    return asyncio.run(main())


def test_an_abort_before_the_rest_started_ends_them_unstarted() -> None:
    found, engine, messages = run(RequestDelta([7], "x"))
    assert found and engine.added == ["r\x1f0"] and not engine.handles
    # completion 0's queued token and its abort reach the stream together (the collector merges what
    # the stream has not taken yet); the others end unstarted
    assert sorted(m for m in messages if m[2]) == [(0, [7], "abort"), (1, [], "abort"), (2, [], "abort")]
    assert [t for i, ids, _ in messages if i == 0 for t in ids] == [7]


def test_an_abort_after_completion_0_ended_still_stops_the_rest() -> None:
    found, engine, messages = run(RequestDelta([7], "x", finish_reason="length"))
    assert found and engine.added == ["r\x1f0"] and not engine.handles
    assert sorted(m for m in messages if m[2]) == [(0, [7], "length"), (1, [], "abort"), (2, [], "abort")]


class BlockingTokenizer:
    """Bytes as ids, whose encode waits until the test lets it go (a long prompt on a worker thread)."""

    def __init__(self) -> None:
        import threading

        self.entered, self.release = threading.Event(), threading.Event()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.entered.set()
        assert self.release.wait(10)
        return list(text.encode())


def _servicer(tokenizer: object = None) -> tuple[GenerationServicer, FakeEngine]:
    engine = FakeEngine()
    engine.healthy, engine.tokenizer, engine.max_model_len = True, tokenizer, 1000  # type: ignore[attr-defined]
    engine.worker = SimpleNamespace(block_size=4, model=SimpleNamespace(vocab_size=260, eos_token_ids=[257]))
    engine.scheduler_config = SimpleNamespace(enable_prefix_caching=True, scheduling_policy="fcfs")
    return GenerationServicer(engine, "m", "aggregated"), engine  # type: ignore[arg-type]


def test_an_abort_while_the_prompt_is_encoded_ends_the_request_there() -> None:
    async def main() -> tuple[list[str], bool, bool, FakeEngine]:
        tokenizer = BlockingTokenizer()
        servicer, engine = _servicer(tokenizer)
        request = pb.GenerateRequest(request_id="slow", text="a long prompt", max_tokens=4)
        obs = engine.observer.start_request(())
        reasons: list[str] = []

        async def consume() -> None:
            async for m in servicer._generate(request, Context(), obs):  # type: ignore[arg-type]
                reasons.append(m.finish_reason)

        task = asyncio.create_task(consume())
        while not tokenizer.entered.is_set():
            await asyncio.sleep(0.005)
        try:  # the same id again while the first is encoded: already running
            async for _ in servicer._generate(request, Context(), obs):  # type: ignore[arg-type]
                pass
            duplicate = False
        except RuntimeError as exc:
            duplicate = "ALREADY_EXISTS" in str(exc)
        found = (await servicer.Abort(pb.AbortRequest(request_id="slow"), Context())).found
        tokenizer.release.set()
        await asyncio.wait_for(task, 5)
        return reasons, found, duplicate, engine

    reasons, found, duplicate, engine = asyncio.run(main())
    assert found and duplicate and reasons == ["abort"] and engine.added == []  # never reached the engine


def test_output_merged_with_a_failure_still_reaches_the_client() -> None:
    async def main() -> tuple[list[list[int]], str]:
        servicer, engine = _servicer(ByteTokenizer())
        request = pb.GenerateRequest(request_id="r", token_ids=pb.TokenIds(ids=[5, 6]), max_tokens=8)
        obs = engine.observer.start_request(())
        got: list[list[int]] = []
        agen = servicer._generate(request, Context(), obs)  # type: ignore[arg-type]
        first = asyncio.create_task(agen.__anext__())
        while "r" not in engine.handles and not first.done():
            await asyncio.sleep(0.005)
        handle = engine.handles["r"]
        handle.queue.put_nowait(RequestDelta([7], "x"))  # the stream is busy: these two merge
        handle.queue.put_nowait(RequestDelta([], "", finish_reason="error", error="data plane lost", retryable=True))
        got.append(list((await first).token_ids))
        try:
            await agen.__anext__()
            status = "none"
        except RuntimeError as exc:
            status = str(exc)
        return got, status

    got, status = asyncio.run(main())
    assert got == [[7]] and "UNAVAILABLE" in status and "data plane lost" in status


def _end_an_n2_call(how: str) -> tuple[object, object, object]:
    """An n=2 call whose two completions both run, ended by `how`: completion 0 failing ("error"), the
    client cancelling ("cancel") or going away after a message ("gone": the stream is closed at its
    yield), or a bug in the servicer ("bug"). Returns the call's record, completion 1's, and completion
    1's exported span (the observer traces to memory)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def main() -> tuple[object, object]:
        engine = FakeEngine()
        engine.observer = EngineObserver(provider, None, "m")
        engine.scheduler_config.enable_prefix_caching = False  # both completions start together
        servicer = GenerationServicer(engine, "m", "aggregated")  # type: ignore[arg-type]
        valid = ValidatedRequest("r", list(range(10)), SamplingParams(temperature=0.0), StopParams(max_tokens=100), n=2)
        obs = engine.observer.start_request(())
        if how == "bug":
            def broken(*args: object) -> object:
                raise ValueError("a servicer bug")

            servicer.messages.responses = broken  # type: ignore[method-assign]
        stream = servicer._generate_many(valid, Context(), obs, None)  # type: ignore[arg-type]

        async def consume() -> None:
            async for _ in stream:
                if how == "gone":
                    return  # the client went away after the first message: the stream is closed below

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        zero, one = engine.handles["r\x1f0"], engine.handles["r\x1f1"]
        if how == "error":
            zero.finished = True
            del engine.handles["r\x1f0"]
            zero.queue.put_nowait(RequestDelta([], "", finish_reason="error", error="the step failed"))
        elif how == "cancel":
            task.cancel()
        else:  # a first message: "gone" returns after it, "bug" fails on it
            zero.queue.put_nowait(RequestDelta([7], "x"))
        await asyncio.gather(task, return_exceptions=True)
        await stream.aclose()  # what gRPC does with the stream of a client gone
        assert one.finished and not servicer._fanouts  # completion 1 was aborted
        assert zero.finished or how == "error"  # completion 0 too (the call's record: its span is the call's)
        engine.observer.close_request(obs)
        return obs, one.obs

    call, one = asyncio.run(main())
    (span,) = [s for s in exporter.get_finished_spans() if s.attributes.get("duetserve.choice_index") == 1]
    return call, one, span


def test_a_completion_a_failed_call_ended_carries_the_calls_error() -> None:
    """A server fault: the completion's span is ERROR with the call's message, as the call's span is."""
    from opentelemetry.trace import StatusCode

    call, one, span = _end_an_n2_call("error")
    assert call.error == "INTERNAL: the step failed"
    assert (one.error, one.error_type) == (call.error, "INTERNAL") and one.finish_reason == "abort"
    assert span.attributes["error.type"] == "INTERNAL" and span.status.status_code == StatusCode.ERROR
    assert span.status.description == call.error


def test_a_completion_a_servicer_bug_ended_says_unknown() -> None:
    from opentelemetry.trace import StatusCode

    call, one, span = _end_an_n2_call("bug")
    assert call.error_type == "UNKNOWN" and "ValueError: a servicer bug" in call.error
    assert (one.error, one.error_type) == (call.error, "UNKNOWN")
    assert span.attributes["error.type"] == "UNKNOWN" and span.status.status_code == StatusCode.ERROR


@pytest.mark.parametrize("how", ["cancel", "gone"])
def test_a_completion_a_cancelled_call_ended_says_cancelled(how: str) -> None:
    """The client cancelled, or went away after a message: not a server fault, so the status stays unset."""
    from opentelemetry.trace import StatusCode

    call, one, span = _end_an_n2_call(how)
    assert call.error_type == one.error_type == "CANCELLED" and one.error == call.error
    assert span.attributes["error.type"] == "CANCELLED" and span.status.status_code == StatusCode.UNSET
    assert "rpc.grpc.status_code" not in span.attributes  # a completion's span is not the call's
