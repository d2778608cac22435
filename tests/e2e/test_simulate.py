"""CPU end to end: gRPC -> control plane -> simulated H100 data plane, replaying a real trace slice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.simulate import SimulationSpec, run_simulation
from shared.config import SchedulerConfig

ROOT = Path(__file__).resolve().parents[2]
CODE_TRACE = ROOT / "tests/data/traces/azure_llm_2023_code_300.csv"


async def test_duet_switches_modes_under_a_replayed_trace_and_completes_everything() -> None:
    spec = SimulationSpec(trace=str(CODE_TRACE), num_requests=40, rate_scale=4.0, time_scale=0.05,
                          scheduler=SchedulerConfig(policy="duet", tbt_slo_ms=30.0))
    result = await run_simulation(spec)
    steps = result.report["scheduler"]["steps"]  # type: ignore[index]
    assert steps.get("aggregated", 0) > 0 and steps.get("multiplexed", 0) > 0, steps
    assert result.report["scheduler"]["mode_switches"] >= 2  # type: ignore[index]
    assert len(result.records) == 40
    for record in result.records:
        assert not record.error and record.finish_reason == "length"
        assert record.completion_tokens == record.max_tokens == sum(n for _, n in record.chunks)
    assert result.kv_blocks_in_use == 0
    metrics = result.report["metrics"]
    assert metrics["completed"] == 40 and metrics["output_throughput_tok_s"] > 0  # type: ignore[index]


def test_simulate_command_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", "simulate", "--trace", str(CODE_TRACE), "--num-requests", "6",
         "--rate-scale", "4", "--time-scale", "0.05", "--policy", "static", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "goodput" in proc.stdout and "TTFT" in proc.stdout
    report = json.loads(out.read_text())
    assert report["config"]["policy"] == "static" and report["metrics"]["completed"] == 6


@pytest.mark.parametrize(("pieces", "want"), [(True, 1024), (False, 0)])
async def test_model_info_says_which_steps_replay_piecewise_graphs(pieces: bool, want: int) -> None:
    import shutil
    import tempfile

    import grpc

    from controlplane.launcher import spawn_sim_dataplane, stop_process
    from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
    from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
    from controlplane.server import ControlPlane
    from shared.config import ServerConfig

    workdir = tempfile.mkdtemp(prefix="ds-mi-")
    endpoint = f"ipc://{workdir}/dp.sock"
    child = spawn_sim_dataplane(endpoint, model="qwen3-8b", gpu="h200", time_scale=0.05, execution="flashinfer",
                                piecewise_graphs=pieces)
    plane = ControlPlane(ServerConfig(port=0, dataplane_endpoint=endpoint, handshake_timeout_s=60.0), "qwen3-8b")
    try:
        await plane.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
            info = await pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    finally:
        await plane.stop()
        stop_process(child)
        shutil.rmtree(workdir, ignore_errors=True)
    assert info.piecewise_max_tokens == want and info.attention_backend.startswith("flashinfer")


@pytest.mark.parametrize(("flags", "says"), [
    (["--gpu", "a100"], "invalid choice: 'a100'"),
    (["--time-scale", "0"], "--time-scale must be > 0.0"),
    (["--rate-scale", "-1"], "--rate-scale must be > 0.0"),
    (["--num-requests", "0"], "--num-requests must be >= 1"),
    (["--model", "nosuch"], "neither a preset"),
])
def test_simulate_refuses_bad_inputs_at_once(flags: list[str], says: str) -> None:
    """Each of these crashed mid-run with a traceback, waited out the 60 s handshake, or replayed
    something else than asked; now it is a usage error naming the flag, before anything starts."""
    proc = subprocess.run([sys.executable, "-m", "controlplane.cli", "simulate", "--trace", str(CODE_TRACE), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


async def test_a_simulation_that_cannot_start_leaves_no_workdir(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A model folder whose generation_config.json is not JSON: the control plane refuses it, and the
    run's temporary folder (and any data plane) goes with it."""
    import tempfile

    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text("{not json")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    spec = SimulationSpec(trace=str(CODE_TRACE), num_requests=2, model=str(model))
    with pytest.raises(ValueError, match="generation_config"):
        await run_simulation(spec)
    assert list(scratch.iterdir()) == []
