"""The servicer's fan-out of a request for n completions, against a fake engine whose timing the
test controls: an Abort that lands while completion 0's first message is queued but not yet read
(or after completion 0 already ended) ends the request, and completions 1..n-1 never start."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from controlplane.api import GenerationServicer
from controlplane.engine import EngineRequest, RequestHandle
from controlplane.observer import EngineObserver
from controlplane.output import RequestDelta
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.sequence import StopParams
from controlplane.validation import ValidatedRequest
from shared.messages import SamplingParams


class FakeEngine:
    def __init__(self) -> None:
        self.observer = EngineObserver.disabled()
        self.worker = SimpleNamespace(block_size=4)
        self.scheduler_config = SimpleNamespace(enable_prefix_caching=True)
        self.handles: dict[str, RequestHandle] = {}
        self.added: list[str] = []

    def add_request(self, request: EngineRequest) -> RequestHandle:
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
        handle.queue.put_nowait(RequestDelta([], "", finish_reason="abort"))
        return True

    def has_request(self, request_id: str) -> bool:
        return request_id in self.handles

    def check_room(self, num_prompt_tokens: int, count: int) -> None:
        pass


class Context:
    def invocation_metadata(self) -> tuple:
        return ()

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
