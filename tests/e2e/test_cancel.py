"""Client cancellation and the Abort RPC stop a request within one step and free its blocks."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import Served, serve

LONG = {"token_ids": {"ids": list(range(3, 40))}, "max_tokens": 3000, "ignore_eos": True, "temperature": 0.0}


def record_plans(served: Served) -> list[tuple[float, set[int]]]:
    """Wrap the data-plane client so each sent plan's sequence ids are logged with a timestamp."""
    sent: list[tuple[float, set[int]]] = []
    client = served.plane.engine.client
    original = client.send_plan

    async def send_plan(plan):  # noqa: ANN001, ANN202
        sent.append((time.monotonic(), {s.seq_id for s in plan.scheduled}))
        return await original(plan)

    client.send_plan = send_plan  # type: ignore[method-assign]
    return sent


async def wait_idle(served: Served, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while served.scheduler.seqs and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def record_aborts(served: Served) -> dict[str, float]:
    """When the engine processed each abort (the event loop that also builds plans)."""
    at: dict[str, float] = {}
    engine = served.plane.engine
    original = engine.abort

    def abort(request_id: str) -> bool:
        at.setdefault(request_id, time.monotonic())
        return original(request_id)

    engine.abort = abort  # type: ignore[method-assign]
    return at


def plans_after(sent: list[tuple[float, set[int]]], when: float, seq_id: int) -> int:
    assert any(t <= when and seq_id in ids for t, ids in sent), "no plan of the request was recorded"
    return sum(1 for t, ids in sent if t > when and seq_id in ids)


async def test_client_cancel_frees_blocks_within_one_step() -> None:
    async with serve("tiny") as served:
        sent = record_plans(served)
        aborts = record_aborts(served)
        call = served.stub.Generate(pb.GenerateRequest(request_id="c1", **LONG))
        seen = 0
        async for response in call:
            seen += len(response.token_ids)
            if seen >= 5:
                break
        seq_id = next(iter(served.scheduler.seqs))
        call.cancel()
        await wait_idle(served)
        assert not served.scheduler.seqs, "the cancelled request is still scheduled"
        assert plans_after(sent, aborts["c1"], seq_id) == 0  # no step after the server learned of it
        assert served.scheduler.allocator.num_free == served.scheduler.allocator.num_blocks
        assert served.plane.engine.num_live_requests == 0


async def test_abort_rpc_ends_stream_and_frees_blocks() -> None:
    async with serve("tiny") as served:
        sent = record_plans(served)
        aborts = record_aborts(served)
        call = served.stub.Generate(pb.GenerateRequest(request_id="a1", **LONG))
        tokens = 0
        final = None
        aborted = False
        async for response in call:
            tokens += len(response.token_ids)
            if tokens >= 5 and not aborted:
                aborted = True
                seq_id = next(iter(served.scheduler.seqs))
                reply = await served.stub.Abort(pb.AbortRequest(request_id="a1"))
                assert reply.found
            if response.finish_reason:
                final = response
        assert final is not None and final.finish_reason == "abort"
        assert final.completion_tokens == tokens < 3000
        assert plans_after(sent, aborts["a1"], seq_id) == 0
        await wait_idle(served)
        assert served.scheduler.allocator.num_free == served.scheduler.allocator.num_blocks
        assert not (await served.stub.Abort(pb.AbortRequest(request_id="a1"))).found
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.stub.Abort(pb.AbortRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("n", [1, 3])
async def test_a_cancelled_stream_aborts_its_requests_before_their_spans_end(n: int) -> None:
    """A client that stops reading, then cancels: each engine request is aborted (request_finished,
    which writes the finish reason and usage onto the span) before the call's span is closed, not later
    when asyncio finalises the servicer's inner generators."""
    events: list[tuple[str, str | None]] = []
    async with serve("tiny") as served:
        observer = served.plane.engine.observer
        close, finished = observer.close_request, observer.request_finished

        def close_request(obs):  # noqa: ANN001, ANN202
            events.append(("close", obs.request_id))
            return close(obs)

        def request_finished(obs, reason, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            events.append((f"finished {reason}", obs.request_id))
            return finished(obs, reason, *args, **kwargs)

        observer.close_request, observer.request_finished = close_request, request_finished  # type: ignore
        call = served.stub.Generate(pb.GenerateRequest(request_id="stalled", n=n, **{
            **LONG, "max_tokens": 30000, "temperature": 1.0}))
        await call.read()
        await asyncio.sleep(2.0)  # not reading: the server's writes wait on flow control
        call.cancel()
        await wait_idle(served)
    finishes = [i for i, (what, _) in enumerate(events) if what == "finished abort"]
    closes = [i for i, (what, _) in enumerate(events) if what == "close"]
    assert len(finishes) == n and closes, events
    assert max(finishes) < min(closes), events  # every abort recorded before the call's span ended
