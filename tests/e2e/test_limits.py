"""Limits: oversized messages, Abort's field checks, queue backpressure (RESOURCE_EXHAUSTED) and
gRPC deadlines (the request is aborted, its blocks freed, the call ends DEADLINE_EXCEEDED)."""

from __future__ import annotations

import asyncio
import time

import grpc
import msgspec
import pytest

from controlplane.engine import EngineUnavailable
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.server import MAX_MESSAGE_BYTES
from tests.e2e.conftest import Served, generate, serve

LONG = {"token_ids": {"ids": list(range(3, 40))}, "max_tokens": 3000, "ignore_eos": True, "temperature": 0.0}


def slow_steps(served: Served, delay_s: float = 0.01) -> None:
    """Make every step take at least `delay_s`, so long requests stay long on a fast CPU."""
    client = served.plane.engine.client
    original = client.send_plan

    async def send_plan(plan):  # noqa: ANN001, ANN202
        await asyncio.sleep(delay_s)
        return await original(plan)

    client.send_plan = send_plan  # type: ignore[method-assign]


async def wait_for(predicate, timeout_s: float = 20.0, msg=lambda: "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"condition not reached in time {msg()}"
        await asyncio.sleep(0.01)


def all_blocks_free(served: Served) -> bool:
    allocator = served.scheduler.allocator
    return not served.scheduler.seqs and allocator.num_free == allocator.num_blocks


async def test_oversized_message_and_abort_fields() -> None:
    async with serve("tiny") as served:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, text="x" * (MAX_MESSAGE_BYTES + 1024), max_tokens=1)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for request_id, message in (("", "request_id: required"), ("x" * 300, "request_id longer than"),
                                    ("a\tb", "only printable")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await served.stub.Abort(pb.AbortRequest(request_id=request_id))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (err.value.details() or "")
        assert len((await generate(served.stub, token_ids={"ids": [5, 6]}, max_tokens=2)).token_ids) == 2


async def test_queue_limits_refuse_at_once() -> None:
    async with serve("tiny", max_num_seqs=1, max_queued_requests=2, max_queued_tokens=80) as served:
        slow_steps(served)
        calls = [served.stub.Generate(pb.GenerateRequest(request_id="run", **LONG))]
        await calls[0].read()  # running: it holds the only sequence slot
        calls += [served.stub.Generate(pb.GenerateRequest(request_id=f"wait{i}", **LONG)) for i in range(2)]
        await wait_for(lambda: served.scheduler.num_waiting == 2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, token_ids={"ids": [5, 6]}, max_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_requests 2" in (err.value.details() or "")
        encoded = []
        encode = served.plane.engine.tokenizer.encode
        served.plane.engine.tokenizer.encode = lambda *a, **k: encoded.append(a) or encode(*a, **k)  # type: ignore
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a text prompt is refused before it is encoded
            await generate(served.stub, text="a text prompt", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not encoded
        served.plane.engine.tokenizer.encode = encode  # type: ignore[method-assign]
        calls.pop().cancel()
        await wait_for(lambda: served.scheduler.num_waiting == 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # one queued + 2 completions > 2 requests: none starts
            await generate(served.stub, token_ids={"ids": [5, 6]}, max_tokens=2, n=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "asks for 2 completions" in (err.value.details() or "") and served.scheduler.num_waiting == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:  # 37 queued + 50 new > 80 tokens
            await generate(served.stub, token_ids={"ids": list(range(3, 53))}, max_tokens=2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_tokens 80" in (err.value.details() or "")
        for call in calls:
            call.cancel()
        await wait_for(lambda: all_blocks_free(served))
        done = await generate(served.stub, token_ids={"ids": list(range(3, 53))}, max_tokens=2)
        assert done.final is not None and done.final.completion_tokens == 2
        # on an empty queue, a request over a limit on its own can never be admitted: not "retry later"
        for n, limit in ((3, "max_queued_requests 2"), (2, "max_queued_tokens 80")):  # 2 x 50 tokens > 80
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(served.stub, token_ids={"ids": list(range(3, 53))}, max_tokens=2, n=n)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert limit in (err.value.details() or "") and "ever queues" in (err.value.details() or "")
        assert all_blocks_free(served)


async def test_deadline_aborts_running_and_queued_requests() -> None:
    async with serve("tiny", max_num_seqs=1) as served:
        slow_steps(served)
        aborted: list[str] = []
        original = served.plane.engine.abort

        def abort(request_id: str) -> bool:
            aborted.append(request_id)
            return original(request_id)

        served.plane.engine.abort = abort  # type: ignore[method-assign]
        running = served.stub.Generate(pb.GenerateRequest(request_id="d-run", **LONG), timeout=1.5)
        await running.read()
        queued = served.stub.Generate(pb.GenerateRequest(request_id="d-queued", **LONG), timeout=0.5)
        for call in (queued, running):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() != grpc.aio.EOF:
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for(lambda: all_blocks_free(served))
        assert {"d-run", "d-queued"} <= set(aborted)  # the server aborted both, not only the client
        assert served.plane.engine.num_live_requests == 0
        served.scheduler.check_invariants()


async def test_a_token_queue_limit_below_max_model_len_is_warned_about_once(caplog) -> None:  # noqa: ANN001
    with caplog.at_level("WARNING", logger="controlplane.engine"):
        async with serve("tiny", max_queued_tokens=10) as served:
            engine = served.plane.engine
            assert engine.worker is not None
            engine._install(engine.worker)  # what a reconnect to the same data plane does
    assert caplog.text.count("max_queued_tokens 10 is below max_model_len") == 1


async def test_a_step_limit_above_the_data_planes_is_refused() -> None:
    """An attached data plane started with a smaller max_num_seqs or token budget than the control plane's
    would be asked for steps its memory plan and decode graphs were not sized for: the handshake refuses."""
    async with serve("tiny", max_num_seqs=8, max_num_batched_tokens=64) as served:
        engine = served.plane.engine
        assert engine.worker is not None
        for field, value, says in (("max_num_seqs", 4, "max_num_seqs 8 exceeds"),
                                   ("max_num_batched_tokens", 32, "max_num_batched_tokens 64 exceeds")):
            with pytest.raises(EngineUnavailable, match=says):
                engine._install(msgspec.structs.replace(engine.worker, **{field: value}))
        engine._install(msgspec.structs.replace(engine.worker, max_num_seqs=8, max_num_batched_tokens=64))


async def test_a_data_plane_that_comes_back_with_another_model_is_refused() -> None:
    """The tokenizer, chat template and limits were made for the first model: a reconnect to a data plane
    serving another one is refused (the engine keeps retrying, not serving) instead of mixing the two."""
    async with serve("tiny") as served:
        engine = served.plane.engine
        assert engine.worker is not None
        model = engine.worker.model
        other = msgspec.structs.replace(model, name="other", vocab_size=model.vocab_size + 1)
        with pytest.raises(EngineUnavailable, match=r"another model \(name 'tiny' -> 'other', vocab_size"):
            engine._install(msgspec.structs.replace(engine.worker, model=other))
        engine._install(engine.worker)  # the same model again: fine


async def test_a_refused_data_plane_is_not_held_while_the_engine_backs_off() -> None:
    """One control plane a data plane: after refusing a data plane (another model), the engine closes its
    socket before waiting to retry, so the control plane meant for that model can attach meanwhile."""
    async with serve("tiny") as served:
        engine = served.plane.engine
        assert engine.worker is not None
        other = msgspec.structs.replace(engine.worker, model=msgspec.structs.replace(engine.worker.model, name="x"))
        calls: list[str] = []

        class Client:
            def reset(self) -> None:
                calls.append("connect")

            async def handshake(self, timeout_s: float) -> object:
                calls.append("hello")
                return other

            def disconnect(self) -> None:
                calls.append("close")

        real, engine.client = engine.client, Client()  # type: ignore[assignment]
        try:
            retrying = asyncio.create_task(engine._reconnect())
            await asyncio.sleep(0.5)  # a few back-offs (0.1 s, doubling)
            retrying.cancel()
            assert len(calls) >= 6 and calls == ["connect", "hello", "close"] * (len(calls) // 3)
        finally:
            engine.client = real
