"""End-to-end fixtures: a real data-plane process, the control plane in-process, a gRPC client."""

from __future__ import annotations

import shutil
import tempfile
from functools import partial
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from controlplane.launcher import spawn_dataplane, stop_process
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
from controlplane.server import ControlPlane
from shared.config import DataplaneConfig, SchedulerConfig, ServerConfig, TelemetryConfig
from tests.dataplane.checkpoints import TINY_VOCAB, write_tiny_checkpoint
from tests.factories import write_tokenizer


@dataclass
class Served:
    plane: ControlPlane
    stub: pb_grpc.GenerationStub
    channel: grpc.aio.Channel

    @property
    def scheduler(self):  # noqa: ANN201
        assert self.plane.engine.scheduler is not None
        return self.plane.engine.scheduler


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    final: pb.GenerateResponse | None = None
    messages: int = 0


async def generate(stub: pb_grpc.GenerationStub, **fields: object) -> Completion:
    """Run one Generate call to the end and collect its stream."""
    out = Completion()
    async for response in stub.Generate(pb.GenerateRequest(**fields)):
        out.token_ids.extend(response.token_ids)
        out.text += response.text
        out.messages += 1
        if response.finish_reason:
            out.final = response
    return out


@asynccontextmanager
async def serve(
    model: str,
    *,
    num_kv_blocks: int | None = 512,
    block_size: int = 16,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int | None = None,  # None: 256, or the token budget when that is smaller (vLLM's rule)
    max_model_len: int | None = None,
    telemetry: TelemetryConfig = TelemetryConfig(),
    policy: str = "aggregated",
    supervised: bool = False,
    step_timeout_s: float = 60.0,
    async_scheduling: bool = True,
    enable_prefix_caching: bool = True,
    scheduling_policy: str = "fcfs",
    defer_token_masks: bool = True,
    slo_clock: Callable[[], float] | None = None,
    **server: object,
) -> AsyncIterator[Served]:
    """Both planes. `supervised`: the control plane spawns the data plane and restarts it when it
    dies (as `duetserve serve` does); otherwise the fixture starts it once. `server`: more ServerConfig."""
    workdir = tempfile.mkdtemp(prefix="ds-")  # short: ipc paths are limited to ~100 bytes
    endpoint = f"ipc://{workdir}/dp.sock"
    dataplane = DataplaneConfig(model=model, endpoint=endpoint, device="cpu", num_kv_blocks=num_kv_blocks,
                                block_size=block_size, max_model_len=max_model_len, telemetry=telemetry)
    spawn = partial(spawn_dataplane, dataplane, log_level="WARNING")
    child = None if supervised else spawn()
    config = ServerConfig(
        port=0, dataplane_endpoint=endpoint, handshake_timeout_s=120.0, step_timeout_s=step_timeout_s,
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs or min(256, max_num_batched_tokens),
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  policy=policy, async_scheduling=async_scheduling,  # type: ignore[arg-type]
                                  enable_prefix_caching=enable_prefix_caching,
                                  scheduling_policy=scheduling_policy,  # type: ignore[arg-type]
                                  defer_token_masks=defer_token_masks),
        telemetry=telemetry, **{"shutdown_grace_s": 2.0, "restart_backoff_s": 0.1, **server},  # type: ignore[arg-type]
    )
    plane = ControlPlane(config, model, spawn=spawn if supervised else None, slo_clock=slo_clock)
    channel = None
    try:
        await plane.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}")
        yield Served(plane, pb_grpc.GenerationStub(channel), channel)
    finally:
        if channel is not None:
            await channel.close()
        await plane.stop()
        if child is not None:
            stop_process(child)
        shutil.rmtree(workdir, ignore_errors=True)


def make_checkpoint(root: Path, arch: str, seed: int = 0) -> Path:
    folder = write_tiny_checkpoint(root / arch, arch, seed=seed)  # type: ignore[arg-type]
    write_tokenizer(folder, TINY_VOCAB)
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_checkpoint(root, arch) for arch in ("qwen3", "llama")}
