"""Data-plane faults: a killed (kill -9), hung (step timeout) or externally restarted data plane
ends in-flight requests with UNAVAILABLE within 2 s, health goes NOT_SERVING, the worker is
restarted (by the supervisor, or from outside with --attach) and the same control plane serves again."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.launcher import spawn_dataplane, stop_process
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from shared.config import TelemetryConfig
from tests.e2e.conftest import Served, generate, serve
from tests.e2e.test_limits import LONG, slow_steps, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DETECT_S = 2.0  # the bound: in-flight requests end, health flips


async def health_status(served: Served) -> int:
    stub = health_pb2_grpc.HealthStub(served.channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service="duetserve.v1.Generation"))).status


async def wait_health(served: Served, status: int, timeout_s: float) -> float:
    """Seconds until health reports `status`."""
    start = time.monotonic()
    while await health_status(served) != status:
        assert time.monotonic() - start < timeout_s, f"health did not become {status} within {timeout_s} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def end_of(call: grpc.aio.UnaryStreamCall) -> tuple[grpc.StatusCode, float]:
    """Read a stream to its end; its status code and when it ended."""
    try:
        while await call.read() != grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), time.monotonic()
    return grpc.StatusCode.OK, time.monotonic()


async def serves_again(served: Served) -> None:
    await wait_health(served, SERVING, 120)
    done = await generate(served.stub, token_ids={"ids": [5, 6, 7]}, max_tokens=4, ignore_eos=True)
    assert done.final is not None and done.final.completion_tokens == 4
    served.scheduler.check_invariants()


async def two_running_one_queued(served: Served, prefix: str) -> list[grpc.aio.UnaryStreamCall]:
    """Three long calls on a server with max_num_seqs=2: two decoding, the third queued."""
    slow_steps(served)
    assert served.plane.supervisor is not None and served.plane.supervisor.child is not None
    calls = [served.stub.Generate(pb.GenerateRequest(request_id=f"{prefix}{i}", **LONG)) for i in range(3)]
    await wait_for(lambda: served.scheduler.num_running == 2 and served.scheduler.num_waiting == 1)
    await wait_for(lambda: all(s.output_token_ids for s in served.scheduler.running))
    return calls


async def test_kill_9_mid_stream_then_supervisor_restarts() -> None:
    async with serve("tiny", supervised=True, max_num_seqs=2) as served:
        calls = await two_running_one_queued(served, "k")  # all three fail
        supervisor = served.plane.supervisor
        assert supervisor is not None and supervisor.child is not None
        killed_at = time.monotonic()
        os.kill(supervisor.child.pid, signal.SIGKILL)
        ends = await asyncio.gather(*(end_of(call) for call in calls))
        assert [code for code, _ in ends] == [grpc.StatusCode.UNAVAILABLE] * 3
        assert max(at for _, at in ends) - killed_at < DETECT_S
        assert await health_status(served) == NOT_SERVING
        await serves_again(served)
        assert supervisor.restarts == 1 and served.plane.engine.num_reconnects == 1


async def test_gauges_are_zero_while_the_data_plane_is_down() -> None:
    """Every request ended with the data plane: running, waiting and KV use read 0, not the last step's."""
    from tests.e2e.test_metrics import free_port, scrape, value  # that module imports this one

    port = free_port()
    async with serve("tiny", supervised=True, max_num_seqs=2, telemetry=TelemetryConfig(metrics_port=port)) as served:
        calls = await two_running_one_queued(served, "g")
        supervisor = served.plane.supervisor
        assert supervisor is not None and supervisor.child is not None
        busy = await asyncio.to_thread(scrape, port)
        os.kill(supervisor.child.pid, signal.SIGKILL)
        await asyncio.gather(*(end_of(call) for call in calls))
        await wait_health(served, NOT_SERVING, 10)
        down = await asyncio.to_thread(scrape, port)
    assert value(busy, "duetserve:num_requests_running") == 2 and value(busy, "duetserve:num_requests_waiting") == 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert value(down, f"duetserve:{gauge}") == 0, gauge


async def test_kill_9_while_idle_is_noticed() -> None:
    async with serve("tiny", supervised=True) as served:
        supervisor = served.plane.supervisor
        assert supervisor is not None and supervisor.child is not None
        os.kill(supervisor.child.pid, signal.SIGKILL)
        assert await wait_health(served, NOT_SERVING, 10) < DETECT_S
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(served.stub, token_ids={"ids": [5]}, max_tokens=1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as err:  # no load to report, not the last step's
            await served.stub.GetLoad(pb.GetLoadRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "data plane" in (err.value.details() or "")
        await serves_again(served)
        assert (await served.stub.GetLoad(pb.GetLoadRequest())).num_kv_blocks > 0


async def test_the_slo_clock_survives_a_restart() -> None:
    """The scheduler built at each handshake runs its SLO bookkeeping on the engine's clock."""

    def clock() -> float:
        return time.monotonic() / 2

    async with serve("tiny", supervised=True, slo_clock=clock) as served:
        supervisor = served.plane.supervisor
        assert supervisor is not None and supervisor.child is not None
        first = served.scheduler
        assert first.slo_clock is clock
        os.kill(supervisor.child.pid, signal.SIGKILL)
        await wait_health(served, NOT_SERVING, 10)
        await serves_again(served)
        assert served.scheduler is not first and served.scheduler.slo_clock is clock


async def test_hung_dataplane_times_out_and_is_replaced() -> None:
    async with serve("tiny", supervised=True, step_timeout_s=1.0) as served:
        supervisor = served.plane.supervisor
        assert supervisor is not None and supervisor.child is not None
        call = served.stub.Generate(pb.GenerateRequest(request_id="hung", **LONG))
        await call.read()
        hung = supervisor.child
        os.kill(hung.pid, signal.SIGSTOP)  # alive, connected, silent
        code, _ = await end_of(call)
        assert code == grpc.StatusCode.UNAVAILABLE
        await serves_again(served)
        assert hung.poll() is not None, "the hung worker should have been killed"


async def test_attached_dataplane_restarted_from_outside() -> None:
    async with serve("tiny") as served:  # the fixture's own worker: nobody supervises it
        endpoint = served.plane.config.dataplane_endpoint
        from shared.config import DataplaneConfig

        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        mine = [p for p in pids if _cmdline(p).count(endpoint)]
        assert len(mine) == 1
        os.kill(mine[0], signal.SIGKILL)
        await wait_health(served, NOT_SERVING, 10)
        replacement = spawn_dataplane(DataplaneConfig(model="tiny", endpoint=endpoint, device="cpu",
                                                      num_kv_blocks=256), log_level="WARNING")
        try:
            await serves_again(served)
            info = await served.stub.GetModelInfo(pb.GetModelInfoRequest())
            assert info.num_kv_blocks == 256  # the new worker's capacity
            assert served.scheduler.allocator.num_blocks == 256
        finally:
            await served.plane.stop()
            stop_process(replacement)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
