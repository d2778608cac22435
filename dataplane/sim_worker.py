"""`python -m dataplane.sim_worker`: a simulated GPU data plane that speaks the real protocol.

It binds the same ROUTER endpoint as `dataplane.worker`, answers Hello with a WorkerReady for a
named model shape on a named GPU (declared HardwareProfile, partition sizes, KV capacity from the
GPU's memory), and answers each StepPlan after the time the shared roofline gives for it (scaled
by `--time-scale`), with SimRunner's deterministic tokens and `simulated` timings. `--execution
roofline` times a step by the paper's roofline alone; `--execution flashinfer` by the declared
launch model of DuetServe's CUDA data plane (`shared.profiles.ExecutionProfile`: kernel tiles and
per-kernel costs, decode steps replayed as CUDA graphs, eager steps no faster than the host can
launch them), and then says it runs the flashinfer backend so the control plane predicts with the
same model. It does no math and decides nothing, and must not import torch: it lets the whole
control plane run on a CPU and backs `duetserve simulate`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections import deque
from itertools import accumulate
from pathlib import Path

import msgspec

from dataplane.lifeline import die_with_parent
from dataplane.models.config import ModelConfig, load_model_config
from dataplane.models.presets import PRESETS
from dataplane.serve_loop import serve_plans
from dataplane.sim import SimRunner
from shared.config import DEFAULT_BLOCK_SIZE, sm_counts
from shared.endpoints import claim_endpoint
from shared.messages import (
    PROTOCOL_VERSION, DeviceDescription, HardwareProfile, Hello, ModelDescription, SeqOutput, Shutdown, StepPlan,
    StepProgress, StepResult, StepTimings, ToControl, TokenMasks, WorkerFatal, WorkerReady, fold_progress,
)
from shared.profiles import (
    MAX_PIECEWISE_TOKENS, NEUTRAL_EXECUTION, ExecutionProfile, GpuSpec, execution_profile_for, gpu_spec,
)
from shared.roofline import BatchCost, ModelShape, Roofline, batch_cost

log = logging.getLogger(__name__)

ACTIVATION_RESERVE_BYTES = 1 << 30
DTYPE = "bfloat16"
EXECUTIONS = ("roofline", "flashinfer")
SIM_FLASHINFER = "flashinfer (simulated)"  # the attention backend a simulated flashinfer plane reports


def model_config(model: str) -> ModelConfig:
    if model in PRESETS:
        return PRESETS[model]
    if Path(model).is_dir():
        return load_model_config(model)
    raise ValueError(f"model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint folder")


def describe(cfg: ModelConfig) -> ModelDescription:
    return ModelDescription(
        name=cfg.name, architecture=cfg.architecture, vocab_size=cfg.vocab_size, num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_q_heads=cfg.num_q_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        dtype=DTYPE, eos_token_ids=list(cfg.eos_token_ids), bos_token_id=cfg.bos_token_id,
    )


def weight_bytes(cfg: ModelConfig, elem: int = 2) -> int:
    shape = ModelShape.from_description(describe(cfg))
    per_layer = sum(di * do for di, do in shape.linear_shapes()) + 2 * cfg.hidden_size
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return elem * (cfg.num_layers * per_layer + embeddings + cfg.hidden_size)


def kv_blocks_for(cfg: ModelConfig, gpu: GpuSpec, block_size: int, utilization: float) -> int:
    per_block = 2 * block_size * cfg.num_kv_heads * cfg.head_dim * 2 * cfg.num_layers
    budget = gpu.memory_bytes * utilization - weight_bytes(cfg) - ACTIVATION_RESERVE_BYTES
    blocks = int(budget // per_block)
    if blocks < 1:
        raise ValueError(f"{cfg.name} does not fit on {gpu.name} with room for a KV cache")
    return blocks


def sim_ready(model: str, gpu: str = "h100", *, block_size: int = DEFAULT_BLOCK_SIZE, num_kv_blocks: int | None = None,
              gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
              profile: HardwareProfile | None = None, execution: str = "roofline",
              decode_partition_sms: list[int] | None = None, piecewise_graphs: bool = True) -> WorkerReady:
    """The WorkerReady a simulated `gpu` running `model` answers with (decode partitions: every size
    the GPU allows, or the listed ones, like the real worker's `--decode-partition-sms`). A simulated
    flashinfer plane replays passes of up to MAX_PIECEWISE_TOKENS as piecewise graphs, as the real one
    does by default, unless `piecewise_graphs` is off."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, not {execution!r}")
    cfg, spec = model_config(model), gpu_spec(gpu)
    sizes = spec.partition_sizes()
    if decode_partition_sms is not None:
        missing = sorted(set(decode_partition_sms) - set(sizes))
        if missing:
            raise ValueError(f"decode partition sizes {missing} are not allowed on {spec.name}; choose from {sizes}")
        sizes = sorted(set(decode_partition_sms))
    blocks = num_kv_blocks or kv_blocks_for(cfg, spec, block_size, gpu_memory_utilization)
    max_len = min(cfg.max_position_embeddings, max_model_len or cfg.max_position_embeddings)
    return WorkerReady(
        protocol_version=PROTOCOL_VERSION, model=describe(cfg),
        device=DeviceDescription(kind="cuda", name=f"{spec.name} (simulated)", sm_count=spec.sm_count,
                                 memory_bytes=spec.memory_bytes),
        num_kv_blocks=blocks, block_size=block_size, max_model_len=max_len,
        attention_backend=SIM_FLASHINFER if execution == "flashinfer" else "sim",
        supports_multiplexing=True, partition_sm_counts=sizes, profile=profile or spec.profile,
        piecewise_max_tokens=MAX_PIECEWISE_TOKENS if execution == "flashinfer" and piecewise_graphs else 0,
    )


def sim_execution(ready: WorkerReady) -> ExecutionProfile:
    """The launch model a simulated worker times its steps by: its declared backend's, or none."""
    if ready.attention_backend != SIM_FLASHINFER:
        return NEUTRAL_EXECUTION
    return execution_profile_for(ready.device.name, ready.attention_backend)


class SimGpu:
    """Executes plans with SimRunner and times them with the roofline of the declared profile (and,
    for a simulated flashinfer plane, its launch model)."""

    def __init__(self, ready: WorkerReady, time_scale: float = 1.0) -> None:
        assert ready.profile is not None
        self.ready = ready
        self.execution = sim_execution(ready)
        self.roofline = Roofline(ModelShape.from_description(ready.model), ready.profile, self.execution)
        self.runner = SimRunner(ready.num_kv_blocks, ready.block_size, ready.model.vocab_size)
        self.time_scale = time_scale
        self._free_at = 0.0  # when the simulated GPU finishes the steps launched so far

    def timings(self, plan: StepPlan) -> StepTimings:
        """Simulated GPU time of `plan`, from the worker's state before it runs."""
        return self._plan_times(plan)[0]

    def _plan_times(self, plan: StepPlan) -> tuple[StepTimings, list[float], set[int]]:
        """The step's timings, when (ms into the step) each decode pass's tokens are ready, and the
        decode items' sequence ids."""
        fresh = {n.seq_id: (n.num_computed_tokens, len(n.token_ids)) for n in plan.new_requests}
        decode: list[int] = []
        decode_ids: set[int] = set()
        chunks: list[tuple[int, int, bool]] = []
        for entry in plan.scheduled:
            known = self.runner.seqs.get(entry.seq_id)
            cached, total = fresh[entry.seq_id] if entry.seq_id in fresh else (
                (known.num_computed, len(known.token_ids)) if known else (0, entry.num_tokens))
            samples = cached + entry.num_tokens >= total
            if entry.num_tokens == 1 and samples:
                decode.append(cached)
                decode_ids.add(entry.seq_id)
            else:
                chunks.append((entry.num_tokens, cached, samples))
        shape, k = self.roofline.shape, plan.decode_steps
        later = [self._ms(batch_cost(shape, [c + j for c in decode], []), plan.decode_sms or None)
                 for j in range(1, k)] if decode else []
        if plan.mode == "multiplexed":
            prefill = self._ms(batch_cost(shape, [], chunks), plan.prefill_sms)
            first = self._ms(batch_cost(shape, decode, []), plan.decode_sms) if decode else 0.0
            decode_ms = first + sum(later)
            timings = StepTimings(total_ms=max(prefill, decode_ms), prefill_ms=prefill, decode_ms=decode_ms,
                                  source="simulated")
        else:
            first = self._ms(batch_cost(shape, decode, chunks), None)
            timings = StepTimings(total_ms=first + sum(later), source="simulated")
        ends = list(accumulate(later, initial=first)) if decode else []
        return timings, ends, decode_ids

    def _ms(self, cost: BatchCost, sms: int | None) -> float:
        """One pass: a decode-only pass replays a graph; any other runs no faster than the host
        launches it, as piecewise graphs (up to `piecewise_max_tokens` on the whole device) or
        eagerly (both only with a launch model; else the plain roofline)."""
        if self.execution is NEUTRAL_EXECUTION:
            return self.roofline.step_ms(cost, sms)
        if not cost.ragged:
            return self.roofline.device_ms(cost, sms, graph=True)
        pieces = self.roofline.replays_pieces(cost, sms, self.ready.piecewise_max_tokens)
        floor = self.roofline.piecewise_floor_ms if pieces else self.roofline.eager_floor_ms
        return max(self.roofline.device_ms(cost, sms), floor)

    def launch(self, plan: StepPlan) -> list[tuple[float, ToControl]]:
        """Run the plan's bookkeeping now; returns (due, message) in order: a StepProgress for each
        decode pass that ends before the step does, then the StepResult with the rest, due when the
        simulated GPU gets through them (after the steps queued before, like a CUDA stream)."""
        self._free_at, messages = self.run_at(plan, self.start_at(), self.time_scale / 1e3)
        return messages

    def start_at(self) -> float:
        """When a plan launched now starts on the simulated GPU (after the steps queued before it)."""
        return max(time.monotonic(), self._free_at)

    def launch_sampled(self, plan: StepPlan, masks: TokenMasks, start: float) -> list[tuple[float, ToControl]]:
        """`launch` for a plan whose sampling waited for its token masks: its pass started at `start` and
        ends no sooner than now (the GPU waits for the masks)."""
        end, messages = self.run_at(plan, start, self.time_scale / 1e3, masks)
        late = time.monotonic() - end
        if late > 0:
            end, messages = end + late, [(due + late, m) for due, m in messages]
        self._free_at = end
        return messages

    def run_at(self, plan: StepPlan, start: float, scale: float,
               masks: TokenMasks | None = None) -> tuple[float, list[tuple[float, ToControl]]]:
        """The plan's bookkeeping (with `masks` when they follow it), its GPU starting at `start` (seconds on
        any clock, `scale` of them per simulated ms): (when it ends, its (due, message) list as `launch`
        returns it)."""
        timings, ends, decode_ids = self._plan_times(plan)
        result = self.runner.execute(plan, masks)
        end_at = start + timings.total_ms * scale
        full = {o.seq_id: o for o in result.outputs}
        events: list[tuple[float, ToControl]] = []
        reported = 0
        for j, end in enumerate(ends):
            if end >= timings.total_ms:  # the step's end: its result carries this pass
                break
            outs = [_slice(full[s], j, j + 1) for s in sorted(decode_ids) if s in full and len(full[s].token_ids) > j]
            events.append((start + end * scale, StepProgress(step_id=plan.step_id, outputs=outs)))
            reported = j + 1
        rest = [_slice(o, reported, None) if o.seq_id in decode_ids else o for o in result.outputs]
        final = msgspec.structs.replace(result, outputs=[o for o in rest if o.token_ids or o.prompt_logprobs is not None],
                                        timings=timings)
        return end_at, [*events, (end_at, final)]

    def execute(self, plan: StepPlan, masks: TokenMasks | None = None) -> StepResult:
        """The whole step at once (with `masks` when they follow it): every token in the result (for
        callers without progress)."""
        *progress, (due, final) = self.launch(plan) if masks is None else self.launch_sampled(plan, masks,
                                                                                             self.start_at())
        while (left := due - time.monotonic()) > 0:
            time.sleep(left)
        return fold_progress([m for _, m in progress], final)  # type: ignore[misc]


def _slice(output: SeqOutput, start: int, stop: int | None) -> SeqOutput:
    """Tokens start..stop of `output`; the first slice carries its prompt logprobs, if any."""
    logprobs = output.logprobs[start:stop] if output.logprobs is not None else None
    first = start == 0
    return SeqOutput(seq_id=output.seq_id, token_ids=output.token_ids[start:stop], logprobs=logprobs,
                     prompt_logprobs=output.prompt_logprobs if first else None,
                     prompt_logprobs_start=output.prompt_logprobs_start if first else 0)


class SimWorker:
    """Serves one control plane at a time on a bound ROUTER socket (like dataplane.worker.Worker)."""

    def __init__(self, endpoint: str, gpu: SimGpu) -> None:
        self.endpoint = endpoint
        self.gpu = SimGpu(msgspec.structs.replace(gpu.ready, pid=os.getpid()), gpu.time_scale)
        self._running = True
        self._pending: deque[tuple[float, ToControl]] = deque()  # (due, progress or result), in order
        self._awaiting: tuple[StepPlan, float] | None = None  # a plan whose masks follow, and when it started

    def request_stop(self, *_: object) -> None:
        self._running = False

    def serve(self) -> int:
        return serve_plans(self.endpoint, self._dispatch, lambda: self._running, name="simulated data plane",
                           collect=self._collect, busy=self.busy)

    def busy(self) -> bool:
        """Steps are running (one waiting for its token masks is not: it waits on the control plane, and a
        silent control plane must not hold the data plane)."""
        return bool(self._pending)

    def _dispatch(self, message: Hello | StepPlan | TokenMasks | Shutdown) -> ToControl | None:
        if isinstance(message, Shutdown):
            return None
        if isinstance(message, Hello):
            if message.protocol_version != PROTOCOL_VERSION:
                return WorkerFatal(reason=f"protocol version mismatch: data plane speaks {PROTOCOL_VERSION}, "
                                          f"control plane speaks {message.protocol_version}")
            self._pending.clear()
            self._awaiting = None
            self.gpu = SimGpu(self.gpu.ready, self.gpu.time_scale)  # a new control plane starts from scratch
            return self.gpu.ready
        if isinstance(message, TokenMasks):
            if self._awaiting is None or self._awaiting[0].step_id != message.step_id:
                log.error("dropping token masks for step %d, which awaits none", message.step_id)
                return None
            plan, start = self._awaiting
            self._awaiting = None
            try:
                self._pending.extend(self.gpu.launch_sampled(plan, message, start))
            except Exception as exc:  # noqa: BLE001 - the error boundary of the process
                log.exception("step %d failed", plan.step_id)
                return WorkerFatal(reason=f"step {plan.step_id} failed: {exc!r}")
            return None
        if self._awaiting is not None:
            return WorkerFatal(reason=f"step {message.step_id}'s plan came before the token masks of step "
                                      f"{self._awaiting[0].step_id}")
        if message.masks_follow:
            self._awaiting = (message, self.gpu.start_at())
            return None
        try:
            self._pending.extend(self.gpu.launch(message))
        except Exception as exc:  # noqa: BLE001 - the error boundary of the process
            log.exception("step %d failed", message.step_id)
            return WorkerFatal(reason=f"step {message.step_id} failed: {exc!r}")
        return None

    def _collect(self) -> list[ToControl]:
        now, out = time.monotonic(), []
        while self._pending and self._pending[0][0] <= now:
            out.append(self._pending.popleft()[1])
        return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dataplane.sim_worker", description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", required=True, help="ZeroMQ endpoint to bind")
    p.add_argument("--model", default="qwen3-8b", help="preset name or checkpoint folder (shapes only)")
    p.add_argument("--gpu", default="h100", help="named GPU whose declared profile times the steps")
    p.add_argument("--profile", default=None, help="JSON HardwareProfile to use instead of the declared one")
    p.add_argument("--execution", default="roofline", choices=EXECUTIONS,
                   help="time steps by the plain roofline, or by the declared launch model of the flashinfer "
                        "data plane (CUDA-graph decode, host-launch floor of eager steps)")
    p.add_argument("--decode-partition-sms", type=sm_counts, default=None,
                   help="comma-separated decode partition sizes (default: every split the GPU allows)")
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="with --execution flashinfer: prefill and mixed passes of up to 1024 tokens launch as "
                        "piecewise graphs, as the real data plane's do by default")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="default: what the GPU's memory holds")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per simulated second")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    try:
        claim_endpoint(args.endpoint)  # as the real data plane: its descriptor stays open until the process exits
    except ValueError as exc:
        print(f"python -m dataplane.sim_worker: error: {exc}", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s sim-dataplane: %(message)s")
    profile = None
    if args.profile:
        profile = msgspec.json.decode(Path(args.profile).read_bytes(), type=HardwareProfile)
    ready = sim_ready(args.model, args.gpu, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                      gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                      profile=profile, execution=args.execution, piecewise_graphs=args.piecewise_graphs,
                      decode_partition_sms=list(args.decode_partition_sms) if args.decode_partition_sms else None)
    worker = SimWorker(args.endpoint, SimGpu(ready, args.time_scale))
    signal.signal(signal.SIGTERM, worker.request_stop)
    # a spawned one leaves Ctrl-C to its control plane, as the real data plane does
    signal.signal(signal.SIGINT, signal.SIG_IGN if args.parent_pid is not None else worker.request_stop)
    return worker.serve()


if __name__ == "__main__":
    sys.exit(main())
