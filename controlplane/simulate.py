"""`duetserve simulate`: what-if capacity planning on a CPU.

Starts the simulated data plane (`python -m dataplane.sim_worker`: a named GPU's declared roofline,
no math), the real control plane with the chosen policy, and a replay client that sends a trace
through the real gRPC API; then reports TTFT / TPOT / inter-token latency, throughput, goodput
under the SLOs, and what the scheduler ran (steps per mode, splits, look-ahead, mode switches, trims,
predictor error). It wires existing parts together and holds no policy of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from controlplane.flag_types import checked
from controlplane.launcher import spawn_sim_dataplane, stop_process
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc
from controlplane.replay import RequestRecord, TraceRequest, load_trace, replay, summarise
from controlplane.server import ControlPlane
from shared.config import DEFAULT_BLOCK_SIZE, LOG_LEVELS, SchedulerConfig, ServerConfig
from shared.profiles import GPUS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationSpec:
    trace: str
    scheduler: SchedulerConfig = SchedulerConfig()
    gpu: str = "h100"
    execution: str = "flashinfer"  # the declared launch model of the CUDA data plane, or "roofline"
    model: str = "qwen3-8b"
    rate_scale: float = 1.0
    num_requests: int | None = None
    time_scale: float = 1.0
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    seed: int = 0
    piecewise_graphs: bool = True  # short prefill and mixed passes launch as piecewise graphs (flashinfer)


@dataclass
class SimulationResult:
    report: dict[str, object]
    records: list[RequestRecord] = field(default_factory=list)
    kv_blocks_in_use: int = 0  # after every request finished: should be 0


async def run_simulation(spec: SimulationSpec, trace: list[TraceRequest] | None = None) -> SimulationResult:
    """`trace`: spec.trace already read (None: read it here)."""
    trace = trace if trace is not None else load_trace(spec.trace, spec.num_requests)
    workdir = tempfile.mkdtemp(prefix="ds-sim-")  # short: ipc paths are limited to ~100 bytes
    endpoint = f"ipc://{workdir}/dp.sock"
    scale = spec.time_scale
    child = plane = channel = None
    try:  # from here on, every failure removes the workdir and stops what started
        plane = ControlPlane(ServerConfig(port=0, dataplane_endpoint=endpoint, handshake_timeout_s=60.0,
                                          step_timeout_s=600.0, scheduler=spec.scheduler), spec.model,
                             slo_clock=lambda: time.monotonic() / scale)  # SLOs hold on the simulated timeline
        child = spawn_sim_dataplane(endpoint, model=spec.model, gpu=spec.gpu, time_scale=spec.time_scale,
                                    block_size=spec.block_size, num_kv_blocks=spec.num_kv_blocks,
                                    max_model_len=spec.max_model_len, execution=spec.execution,
                                    piecewise_graphs=spec.piecewise_graphs)
        await plane.start()
        engine = plane.engine
        assert engine.worker is not None and engine.scheduler is not None
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}")
        records = await replay(pb_grpc.GenerationStub(channel), trace, vocab_size=engine.worker.model.vocab_size,
                               max_model_len=engine.max_model_len, rate_scale=spec.rate_scale,
                               time_scale=spec.time_scale, seed=spec.seed)
        sched = engine.scheduler
        report = _report(spec, records, sched, engine.worker.device.name)
        return SimulationResult(report, records, sched.allocator.num_used)
    finally:
        if channel is not None:
            await channel.close()
        if plane is not None:
            await plane.stop()
        if child is not None:
            stop_process(child)
        shutil.rmtree(workdir, ignore_errors=True)


def _report(spec: SimulationSpec, records: list[RequestRecord], sched, device: str) -> dict[str, object]:  # noqa: ANN001
    cfg = spec.scheduler
    metrics = summarise(records, time_scale=spec.time_scale, ttft_slo_ms=cfg.ttft_slo_ms, tbt_slo_ms=cfg.tbt_slo_ms)
    return {
        "config": {"trace": Path(spec.trace).name, "gpu": spec.gpu, "execution": spec.execution, "device": device,
                   "model": spec.model,
                   "policy": cfg.policy, "tbt_slo_ms": cfg.tbt_slo_ms, "ttft_slo_ms": cfg.ttft_slo_ms,
                   "rate_scale": spec.rate_scale, "time_scale": spec.time_scale,
                   "max_num_batched_tokens": cfg.max_num_batched_tokens, "max_num_seqs": cfg.max_num_seqs},
        "metrics": metrics,
        "scheduler": {**sched.stats.summary(), "preemptions": sched.num_preemptions},
        "predictor": sched.predictor.report().as_dict() if sched.predictor is not None else None,
    }


def format_report(report: dict[str, object]) -> str:
    c, m, s = report["config"], report["metrics"], report["scheduler"]  # type: ignore[index]
    lines = [
        f"duetserve simulate: {c['model']} on {c['device']}, policy {c['policy']}, trace {c['trace']} "
        f"x{c['rate_scale']} rate (TBT SLO {c['tbt_slo_ms']} ms, TTFT SLO {c['ttft_slo_ms']} ms)",
        f"  requests      {m['completed']}/{m['requests']} completed in {m['duration_s']:.1f} s (simulated)",
        f"  throughput    {m['request_throughput']:.2f} req/s, {m['output_throughput_tok_s']:.0f} output tok/s, "
        f"{m['total_throughput_tok_s']:.0f} total tok/s",
        f"  goodput       {m['goodput_req_s']:.2f} req/s ({100 * m['slo_attainment']:.0f}% of requests meet both SLOs)",
    ]
    for name in ("ttft_ms", "tpot_ms", "itl_ms"):
        p = m[name]
        lines.append(f"  {name[:-3].upper():<13} mean {p['mean']:8.1f}  p50 {p['p50']:8.1f}  p90 {p['p90']:8.1f}  "
                     f"p99 {p['p99']:8.1f} ms")
    lines.append(f"  steps         {s['steps']}  busy ms {s['busy_ms']}  mode switches {s['mode_switches']}  "
                 f"trimmed {s.get('trimmed_steps', 0)}  preemptions {s['preemptions']}")
    gap = s["control_plane_ms_per_step"]
    lines.append(f"  control plane {gap:.2f} ms wall per step between result and next plan "
                 f"(= {gap / c['time_scale']:.1f} simulated ms; keep it small against step times)")
    if s["splits"]:
        lines.append(f"  splits (prefill+decode SMs: steps) {s['splits']}  look-ahead k: steps {s['lookahead']}")
    pred = report.get("predictor")
    if pred:
        lines.append(f"  predictor     MAPE {100 * pred['mape']:.1f}% over {pred['n_samples']} measurements")  # type: ignore[index]
    return "\n".join(lines)


def add_simulate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Azure LLM trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)")
    p.add_argument("--gpu", default="h100", type=str.lower, choices=sorted(GPUS),
                   help="simulated GPU (declared profile), default h100")
    p.add_argument("--execution", default="flashinfer", choices=("roofline", "flashinfer"),
                   help="time steps by the declared launch model of DuetServe's flashinfer data plane "
                        "(CUDA-graph decode, host-launch floor of eager steps; the default) or by the paper's "
                        "roofline alone")
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --execution flashinfer: prefill and mixed passes of up to 1024 tokens launch as "
                        "piecewise graphs, as the real data plane's do by default")
    p.add_argument("--model", default="qwen3-8b", help="model shape: a preset name or checkpoint folder")
    p.add_argument("--rate-scale", type=checked(float, "--rate-scale", 0.0, inclusive=False), default=1.0,
                   help="multiply the trace's request rate by this")
    p.add_argument("--num-requests", type=checked(int, "--num-requests", 1), default=None,
                   help="replay only the first N requests")
    p.add_argument("--time-scale", type=checked(float, "--time-scale", 0.0, inclusive=False), default=1.0,
                   help="wall seconds per simulated second (<1 runs faster than real time; keep steps well "
                        "above the control plane's own ~1 ms per step)")
    p.add_argument("--block-size", type=checked(int, "--block-size", 1), default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--num-kv-blocks", type=checked(int, "--num-kv-blocks", 1), default=None,
                   help="default: what the GPU's memory holds")
    p.add_argument("--max-model-len", type=checked(int, "--max-model-len", 1), default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts' token ids")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS)


async def run_simulate(args: argparse.Namespace, scheduler: SchedulerConfig,
                       trace: list[TraceRequest] | None = None) -> int:
    spec = SimulationSpec(
        trace=args.trace, scheduler=scheduler, gpu=args.gpu, execution=args.execution, model=args.model,
        rate_scale=args.rate_scale,
        num_requests=args.num_requests, time_scale=args.time_scale, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, max_model_len=args.max_model_len, seed=args.seed,
        piecewise_graphs=args.piecewise_graphs,
    )
    result = await run_simulation(spec, trace)
    print(format_report(result.report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result.report, indent=1) + "\n")
    return 0 if result.report["metrics"]["failed"] == 0 else 1  # type: ignore[index]
