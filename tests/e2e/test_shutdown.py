"""Graceful shutdown: stop admitting (NOT_SERVING, new calls UNAVAILABLE), let running requests
finish within the grace period, end the rest with UNAVAILABLE, then stop the data plane; bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import generate, serve
from tests.e2e.test_limits import LONG, slow_steps

GRACE_S = 2.0


async def test_graceful_shutdown_drains_then_ends_the_rest() -> None:
    async with serve("tiny", supervised=True) as served:
        slow_steps(served)
        pid = served.plane.supervisor.child.pid  # type: ignore[union-attr]
        long_call = served.stub.Generate(pb.GenerateRequest(request_id="long", **LONG))
        await long_call.read()
        short_call = asyncio.create_task(generate(served.stub, token_ids={"ids": [5, 6, 7]}, max_tokens=12,
                                                  ignore_eos=True))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        stopping = asyncio.create_task(served.plane.stop(GRACE_S))
        await asyncio.sleep(0.1)
        health = health_pb2_grpc.HealthStub(served.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="duetserve.v1.Generation"))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, token_ids={"ids": [5]}, max_tokens=1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in (err.value.details() or "")
        short = await short_call  # finished normally within the grace period
        assert short.final is not None and short.final.finish_reason == "length"
        assert short.final.completion_tokens == 12
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await long_call.read() != grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "grace period" in (err.value.details() or "")
        await asyncio.wait_for(stopping, GRACE_S + 30)
        assert time.monotonic() - started >= GRACE_S * 0.9  # it waited for the long request
        assert served.plane.engine.num_live_requests == 0
        served.scheduler.check_invariants()
        assert served.scheduler.allocator.num_free == served.scheduler.allocator.num_blocks
        assert not Path(f"/proc/{pid}").exists(), "the data plane outlived the control plane"


async def test_a_drain_cut_before_it_starts_does_not_wait() -> None:
    """Two quick Ctrl-Cs: the second's cut may come before stop() reaches the drain; it still counts."""
    async with serve("tiny") as served:
        slow_steps(served)
        long_call = served.stub.Generate(pb.GenerateRequest(request_id="long", **LONG))
        await long_call.read()
        served.plane.engine.cut_drain()
        started = time.monotonic()
        await asyncio.wait_for(served.plane.stop(60.0), 30)
        assert time.monotonic() - started < 10.0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await long_call.read() != grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
