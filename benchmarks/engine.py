"""Engine benchmark on one GPU: decode step time next to its memory floor, prefill throughput next to
the measured GEMM rate, and offline throughput next to transformers' continuous batching.

    python benchmarks/engine.py --model qwen3-8b            # on a GPU; writes benchmarks/results/
    python benchmarks/engine.py --model tiny --device cpu --quick   # smoke run anywhere

Random weights of the real shapes; ceilings (copy bandwidth, bf16 GEMM rate) are measured in the same
run. Prints a table and writes benchmarks/results/engine-<gpu>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import Timer, drive, gpu_slug  # noqa: E402
from controlplane.prefix_cache import make_allocator  # noqa: E402
from controlplane.scheduler import Scheduler  # noqa: E402
from controlplane.sequence import Sequence, StopParams  # noqa: E402
from dataplane.kv_cache import kv_bytes_per_block  # noqa: E402
from dataplane.seq_state import SeqState  # noqa: E402
from dataplane.worker import load_worker  # noqa: E402
from shared.config import BLAS_LIBRARIES, DataplaneConfig, SchedulerConfig  # noqa: E402
from shared.messages import SamplingParams, ScheduledSeq, StepPlan  # noqa: E402


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, float]:
    n_bytes = (64 << 20) if quick else (2 << 30)
    src = torch.randn(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    with Timer(device) as t:
        for _ in range(10):
            dst.copy_(src)
    bandwidth = 2 * n_bytes * 10 / t.seconds
    n = 1024 if quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    with Timer(device) as t:
        for _ in range(10):
            a @ b
    return {"copy_bytes_per_s": bandwidth, "gemm_flops_per_s": 2 * n**3 * 10 / t.seconds}


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter but the embedding table (only B rows are read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == emb.data_ptr()
    return total if tied else total - emb.numel() * emb.element_size()


def run_steps(runner, plans: list[StepPlan], depth: int = 1, host: list[float] | None = None,  # noqa: ANN001
              launched: list | None = None) -> list:
    """Run plans with up to `depth` launched before the oldest is collected (2 = async scheduling:
    step i+1's host work overlaps step i on the GPU, as the server runs them). `host`, when given,
    gets the seconds each `launch` took on the host; `launched` the runner's pending steps (their CUDA
    events time each step on the device)."""
    pending, results = [], []
    for plan in plans:
        t0 = time.perf_counter()
        pending.append(runner.launch(plan))
        if host is not None:
            host.append(time.perf_counter() - t0)
        if launched is not None:
            launched.append(pending[-1])
        if len(pending) >= depth:
            results.append(pending.pop(0).wait())
    return results + [p.wait() for p in pending]


def device_timeline(launched: list) -> dict[str, float] | None:  # noqa: ANN001 (the runner's PendingStep)
    """From the CUDA events each launched step recorded at its start and end (read after the run has
    drained): the median step's device span, the mean idle gap between one step's end and the next
    one's start (0 when the GPU never waits on the host), and the steady-state period (first step's
    end to last step's end over the steps between: the pipeline's fill left out). None without events
    (CPU) or with fewer than two steps."""
    if len(launched) < 2 or any(p.start_event is None or p.done is None for p in launched):
        return None
    spans = [p.start_event.elapsed_time(p.done) for p in launched]
    gaps = [a.done.elapsed_time(b.start_event) for a, b in zip(launched, launched[1:])]
    period = launched[0].done.elapsed_time(launched[-1].done) / (len(launched) - 1)
    return {"gpu_span_ms": statistics.median(spans), "gpu_gap_ms": statistics.fmean(gaps),
            "steady_step_ms": period}


def blocks_per_seq(ctx: int, steps: int, bs: int) -> int:
    return -(-(ctx + steps + 4) // bs)


def decode_point(worker, batch: int, ctx: int, steps: int, device: torch.device,  # noqa: ANN001
                 repeats: int = 1) -> dict[str, float]:
    """B sequences at context `ctx`, each with its own KV pages (so every step reads all of them).

    The pipelined run of `steps` steps is timed `repeats` times, each from the same context; the step
    time is the median (the runs are kept in `step_ms_runs`). The pages hold whatever the cache held
    (timing does not depend on the values)."""
    runner, bs = worker.runner, worker.ready.block_size
    per_seq = blocks_per_seq(ctx, steps, bs)
    vocab = worker.ready.model.vocab_size
    runner.clear()
    g = torch.Generator().manual_seed(batch * 7 + ctx)
    for i in range(batch):
        tokens = torch.randint(0, vocab, (ctx + 1,), generator=g).tolist()
        runner.seqs[i] = SeqState(seq_id=i, token_ids=tokens, num_prompt_tokens=ctx + 1,
                                  block_table=list(range(i * per_seq, (i + 1) * per_seq)),
                                  sampling=SamplingParams(temperature=0.0), num_computed=ctx)
    plans = [StepPlan(step_id=s, scheduled=[ScheduledSeq(seq_id=i, num_tokens=1) for i in range(batch)])
             for s in range(steps + 3)]
    run_steps(runner, plans[:3])

    def rewind() -> None:  # back to the same context for the next timed run
        for seq in runner.seqs.values():
            seq.token_ids, seq.num_computed = seq.token_ids[: ctx + 1], ctx

    runs: list[float] = []
    host: list[float] = []
    timelines: list[dict[str, float]] = []
    for _ in range(repeats):
        rewind()
        launched: list = []
        with Timer(device) as t:
            run_steps(runner, plans[3:], depth=2, host=host, launched=launched)
        runs.append(t.seconds * 1000 / steps)
        timeline = device_timeline(launched)  # after the Timer drained the device: every event has run
        if timeline is not None:
            timelines.append(timeline)
    rewind()  # one step at a time
    with Timer(device) as sync:
        run_steps(runner, plans[3:], depth=1)
    runner.clear()
    point = {"batch": batch, "context": ctx, "step_ms": statistics.median(runs), "step_ms_runs": runs,
             "sync_step_ms": sync.seconds * 1000 / steps, "host_launch_ms": statistics.median(host) * 1000}
    for key in ("gpu_span_ms", "gpu_gap_ms", "steady_step_ms"):  # each the median over the runs (CUDA only)
        point[key] = statistics.median(t[key] for t in timelines) if timelines else None
    return point


def twin_replays(worker) -> int:  # noqa: ANN001
    """Replays of a decode bucket's unsplit twin so far (0 without decode graphs)."""
    graphs = worker.runner.graphs
    return graphs.unsplit_twin_replays if graphs is not None else 0


def decode_grid(worker, batches: list[int], contexts: list[int], steps: int, device: torch.device,  # noqa: ANN001
                ceilings: dict[str, float], repeats: int = 1) -> list[dict[str, float]]:
    model_bytes = weight_bytes(worker.runner.model)
    cfg = worker.runner.config
    dtype = next(worker.runner.model.parameters()).dtype
    kv_per_token = kv_bytes_per_block(cfg, 1, dtype)
    rows = []
    for ctx in contexts:
        for batch in batches:
            if batch * blocks_per_seq(ctx, steps, worker.ready.block_size) > worker.ready.num_kv_blocks:
                rows.append({"batch": batch, "context": ctx, "skipped": "KV cache too small on this GPU"})
                print(f"decode B={batch:4d} ctx={ctx:5d}: skipped, {batch * ctx} tokens of KV do not fit")
                continue
            twins_before = twin_replays(worker)
            point = decode_point(worker, batch, ctx, steps, device, repeats)
            # how many of the point's replays ran a bucket's unsplit twin (equal lengths: balanced)
            point["unsplit_twin_replays"] = twin_replays(worker) - twins_before
            kv_read = batch * (ctx + steps / 2) * kv_per_token
            point["floor_ms"] = (model_bytes + kv_read) / ceilings["copy_bytes_per_s"] * 1000
            point["ratio"] = point["step_ms"] / point["floor_ms"]
            rows.append(point)
            spread = f" [{min(point['step_ms_runs']):.2f}-{max(point['step_ms_runs']):.2f}]" if repeats > 1 else ""
            device_line = "" if point["gpu_span_ms"] is None else (
                f", on the GPU {point['gpu_span_ms']:.2f} a step + {point['gpu_gap_ms']:.3f} idle, "
                f"steady {point['steady_step_ms']:.2f}")
            print(f"decode B={batch:4d} ctx={ctx:5d}: {point['step_ms']:7.2f} ms/step{spread} "
                  f"(one at a time {point['sync_step_ms']:.2f}, host launch {point['host_launch_ms']:.2f}"
                  f"{device_line}), floor {point['floor_ms']:.2f} ms, x{point['ratio']:.2f}"
                  f"{', unsplit twin' if point['unsplit_twin_replays'] else ''}", flush=True)
    return rows


def prefill_flops(cfg, tokens: int) -> float:  # noqa: ANN001
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qkv = h * (cfg.q_size + 2 * cfg.kv_size)
    per_token = 2 * layers * (qkv + cfg.q_size * h + 3 * h * inter)
    attention = 2 * layers * cfg.num_q_heads * cfg.head_dim * tokens * tokens  # causal QK^T + PV
    return per_token * tokens + attention + 2 * h * cfg.vocab_size


def prefill_grid(worker, chunks: list[int], device: torch.device, ceilings: dict[str, float]) -> list[dict]:  # noqa: ANN001
    runner, bs = worker.runner, worker.ready.block_size
    vocab = worker.ready.model.vocab_size
    rows = []
    for tokens in chunks:
        if -(-tokens // bs) > worker.ready.num_kv_blocks:
            continue
        times = []
        for rep in range(4):
            runner.clear()
            prompt = torch.randint(0, vocab, (tokens,)).tolist()
            runner.seqs[0] = SeqState(seq_id=0, token_ids=prompt, num_prompt_tokens=tokens,
                                      block_table=list(range(-(-tokens // bs))),
                                      sampling=SamplingParams(temperature=0.0))
            plan = StepPlan(step_id=rep, scheduled=[ScheduledSeq(seq_id=0, num_tokens=tokens)])
            with Timer(device) as t:
                run_steps(runner, [plan])
            times.append(t.seconds)
        seconds = sorted(times[1:])[len(times[1:]) // 2]
        flops = prefill_flops(runner.config, tokens)
        row = {"tokens": tokens, "ms": seconds * 1000, "tokens_per_s": tokens / seconds,
               "flops_per_s": flops / seconds, "gemm_fraction": flops / seconds / ceilings["gemm_flops_per_s"]}
        rows.append(row)
        print(f"prefill {tokens:5d} tokens: {row['ms']:8.2f} ms, {row['tokens_per_s']:9.0f} tok/s, "
              f"{row['flops_per_s'] / 1e12:6.1f} TFLOP/s = {row['gemm_fraction']:.0%} of GEMM", flush=True)
    runner.clear()
    return rows


def offline(worker, requests: int, in_len: int, out_len: int, budget: int, max_seqs: int) -> dict:  # noqa: ANN001
    """The real scheduler driving the real runner in one process (no sockets)."""
    ready, runner = worker.ready, worker.runner
    runner.clear()
    config = SchedulerConfig(policy="aggregated", max_num_seqs=max_seqs, max_num_batched_tokens=budget)  # as before
    allocator = make_allocator(ready.num_kv_blocks, ready.block_size, config.enable_prefix_caching)
    sched = Scheduler(config, allocator, ready.max_model_len, frozenset())
    g = torch.Generator().manual_seed(0)
    for i in range(requests):
        prompt = torch.randint(0, ready.model.vocab_size, (in_len,), generator=g).tolist()
        sched.add(Sequence(seq_id=i, request_id=str(i), prompt_token_ids=prompt,
                           sampling=SamplingParams(temperature=0.0),
                           stop=StopParams(max_tokens=out_len, ignore_eos=True), arrival_time=0.0))
    with Timer(runner.device) as t:
        steps = drive(sched, runner)
    produced = requests * out_len
    result = {"requests": requests, "input_len": in_len, "output_len": out_len, "seconds": t.seconds,
              "steps": steps, "output_tok_s": produced / t.seconds, "preemptions": sched.num_preemptions}
    print(f"offline {requests} x ({in_len} in, {out_len} out): {t.seconds:.1f} s, {steps} steps, "
          f"{result['output_tok_s']:.0f} output tok/s", flush=True)
    return result


def peer(model_name: str, requests: int, in_len: int, out_len: int, device: torch.device) -> dict:
    """transformers' continuous batching (generate_batch, paged|sdpa) on the same shapes."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from dataplane.models.presets import PRESETS

    cfg = PRESETS[model_name]
    hf_cfg = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_q_heads, num_key_value_heads=cfg.num_kv_heads,
                         head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                         tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device(device):
        model = Qwen3ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    model.config._attn_implementation = "paged|sdpa"
    gen = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=None, pad_token_id=0,
                           max_batch_tokens=2048)
    prompts = [torch.randint(0, cfg.vocab_size, (in_len,)).tolist() for _ in range(requests)]
    with Timer(device) as t:
        out = model.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
    produced = sum(len(r.generated_tokens) for r in out.values())
    result = {"requests": requests, "input_len": in_len, "output_len": out_len, "seconds": t.seconds,
              "output_tok_s": produced / t.seconds, "implementation": "transformers generate_batch paged|sdpa"}
    print(f"peer (transformers) {requests} x ({in_len}, {out_len}): {t.seconds:.1f} s, "
          f"{result['output_tok_s']:.0f} output tok/s", flush=True)
    return result


def _variant(args: argparse.Namespace, built_pieces: bool, kernel_defaults: dict[str, float]) -> str:
    """The results file's suffix for settings other than the data plane's defaults (decode-only runs:
    also piecewise graphs built, or the heap frozen)."""
    default = DataplaneConfig()
    page = "" if args.block_size == default.block_size else f"-page{args.block_size}"
    fold = "" if args.decode_gemm_rows == default.decode_gemm_rows else f"-fold{args.decode_gemm_rows}"
    if args.epilogue_norm_rows != default.epilogue_norm_rows:
        fold += f"-epi{args.epilogue_norm_rows}"
    extra = ("-pieces" if args.decode_only and built_pieces else "") + ("-gcfreeze" if args.gc_freeze else "")
    for name, tag in (("cuda_core_max_batch", "cc"), ("balanced_max_skew", "skew")):  # set and not the default
        value = getattr(args, name)
        extra += "" if value is None or value == kernel_defaults[name] else f"-{tag}{value:g}"
    if args.decode_blas_library != default.decode_blas_library:
        extra += f"-dblas{args.decode_blas_library}"
    if args.cublas_workspace_config is not None:  # ":0:0" -> -ws0, ":4096:8" -> -ws4096-8
        extra += "-ws" + ("0" if args.cublas_workspace_config == ":0:0"
                          else args.cublas_workspace_config.strip(":").replace(":", "-"))
    if args.decode_l2_prefetch_kib != default.decode_l2_prefetch_kib:
        extra += f"-pf{args.decode_l2_prefetch_kib}"
    return page + fold + extra


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small grid (CPU smoke runs)")
    p.add_argument("--offline-requests", type=int, default=256)
    p.add_argument("--peer-requests", type=int, default=0, help="transformers peer requests (0: skip)")
    p.add_argument("--peer-output-len", type=int, default=256)
    p.add_argument("--blas-library", default="default", choices=BLAS_LIBRARIES)
    p.add_argument("--decode-blas-library", default=DataplaneConfig().decode_blas_library, choices=BLAS_LIBRARIES,
                   help="library the decode graphs' GEMMs are captured with (cuBLASLt's own workspace: "
                        "TORCH_CUBLASLT_UNIFIED_WORKSPACE=0 CUBLASLT_WORKSPACE_SIZE=<KiB>; files of another value "
                        "get -dblas<lib>)")
    p.add_argument("--decode-only", action="store_true", help="the decode grid only (an A/B of kernels)")
    p.add_argument("--block-size", type=int, default=DataplaneConfig().block_size,
                   help="KV page size in tokens (an A/B of decode attention; decode-only files get -page<N>)")
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="prefill passes of up to 1024 tokens as piecewise CUDA graphs, as served (results file "
                        "engine-<gpu>-piecewise; --no-piecewise-graphs: eager, engine-<gpu>); default on, "
                        "off with --decode-only (which builds them only when asked: file -pieces)")
    p.add_argument("--decode-batches", type=_ints, default=None, help="decode grid batches (default 1,16,64,256)")
    p.add_argument("--decode-contexts", type=_ints, default=None, help="decode grid contexts (default 1024,4096)")
    p.add_argument("--gc-freeze", action="store_true",
                   help="gc.freeze() the loaded worker's heap before timing (an A/B of host pauses; file -gcfreeze)")
    p.add_argument("--unsplit-kv-min-batch", type=int, default=None,
                   help="decode graphs of at least this batch read KV unsplit (default: the data plane's "
                        "flashinfer_backend.UNSPLIT_KV_MIN_BATCH, 32; 100000 keeps flashinfer's split everywhere)")
    p.add_argument("--cuda-core-max-batch", type=int, default=None,
                   help="decode batches (graph buckets) of at most this many rows use flashinfer's CUDA-core decode, "
                        "larger ones its tensor-core kernel; keep it a bucket size (default: flashinfer_backend."
                        "CUDA_CORE_MAX_BATCH, 8; 0: tensor cores everywhere; files of another value get -cc<N>)")
    p.add_argument("--balanced-max-skew", type=float, default=None,
                   help="whole-GPU decode buckets that split KV on tensor cores replay an unsplit twin for batches "
                        "whose longest KV is at most this many times the mean (default: flashinfer_backend."
                        "BALANCED_MAX_SKEW, 1.1; 0: no twins; files of another value get -skew<X>)")
    p.add_argument("--decode-repeats", type=int, default=5,
                   help="timed runs of each decode point (the median is reported; one lease moved B=64 by 8%%)")
    p.add_argument("--decode-gemm-rows", type=int, default=DataplaneConfig().decode_gemm_rows,
                   help="decode passes of at most this many rows fold norms, SwiGLU and residual adds into their "
                        "projections (0: never; files of another value than the default get -fold<N>)")
    p.add_argument("--cublas-workspace-config", default=None,
                   help="CUBLAS_WORKSPACE_CONFIG for the run, set before its first GEMM (':0:0': no workspace, no "
                        "split-K; files get -ws0, other values -ws<SIZE>-<COUNT>)")
    p.add_argument("--epilogue-norm-rows", type=int, default=DataplaneConfig().epilogue_norm_rows,
                   help="passes of at most this many rows run the layers' norms inside the kernels after QKV and "
                        "gate/up and the residual adds inside O and down (0: never; files of another value than "
                        "the default get -epi<N>)")
    p.add_argument("--decode-l2-prefetch-kib", type=int, default=DataplaneConfig().decode_l2_prefetch_kib,
                   help="whole-GPU decode graphs prefetch the first this-many KiB of QKV, gate/up and down into L2 "
                        "while the small kernel before each runs (0: never; files of another value than the default "
                        "get -pf<N>)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    if args.decode_repeats < 1:
        p.error("--decode-repeats must be at least 1")
    try:  # the data plane's own check of the value, as an argparse error
        DataplaneConfig(cublas_workspace_config=args.cublas_workspace_config)
    except ValueError as e:
        p.error(str(e))
    if args.piecewise_graphs is None:
        args.piecewise_graphs = not args.decode_only
    device = torch.device(args.device)
    quick = args.quick
    import dataplane.attention.flashinfer_backend as fib  # A/Bs of the decode kernels, set before any capture

    if args.unsplit_kv_min_batch is not None:  # the decode attention's KV split
        fib.UNSPLIT_KV_MIN_BATCH = args.unsplit_kv_min_batch
    kernel_defaults = {"cuda_core_max_batch": fib.CUDA_CORE_MAX_BATCH, "balanced_max_skew": fib.BALANCED_MAX_SKEW}
    if args.balanced_max_skew is not None:  # unsplit twins of the small tensor-core buckets (0: none)
        fib.BALANCED_MAX_SKEW = args.balanced_max_skew or None
    if args.cuda_core_max_batch is not None:  # the decode kernel of small buckets
        fib.CUDA_CORE_MAX_BATCH = args.cuda_core_max_batch
    budget, max_seqs = (512, 16) if quick else (8192, 256)
    worker = load_worker(DataplaneConfig(model=args.model, device=args.device, max_num_batched_tokens=budget,
                                         max_num_seqs=max_seqs, num_kv_blocks=2048 if quick else None,
                                         blas_library=args.blas_library, block_size=args.block_size,
                                         cublas_workspace_config=args.cublas_workspace_config,
                                         decode_blas_library=args.decode_blas_library,
                                         decode_gemm_rows=args.decode_gemm_rows,
                                         epilogue_norm_rows=args.epilogue_norm_rows,
                                         decode_l2_prefetch_kib=args.decode_l2_prefetch_kib,
                                         piecewise_graphs=args.piecewise_graphs))
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    built_pieces = worker.runner.pieces is not None  # what the worker built (none on a CPU), not what was asked
    print(f"{args.model} on {worker.ready.device.name}: {worker.ready.num_kv_blocks} KV blocks", flush=True)
    ceilings = measure_ceilings(device, quick)
    print(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
          f"GEMM {ceilings['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    batches, contexts = ([1, 4], [64]) if quick else ([1, 16, 64, 256], [1024, 4096])
    batches, contexts = args.decode_batches or batches, args.decode_contexts or contexts
    decode = decode_grid(worker, batches, contexts, 4 if quick else 16, device, ceilings,
                         args.decode_repeats)
    settings = {"blas_library": args.blas_library, "unsplit_kv_min_batch": fib.UNSPLIT_KV_MIN_BATCH,
                "cuda_core_max_batch": fib.CUDA_CORE_MAX_BATCH, "balanced_max_skew": fib.BALANCED_MAX_SKEW,
                "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                "decode_blas_library": args.decode_blas_library,
                "cublaslt_workspace_size": os.environ.get("CUBLASLT_WORKSPACE_SIZE"),
                "cublaslt_unified_workspace": os.environ.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE"),
                "piecewise_graphs": built_pieces, "block_size": args.block_size,
                "decode_gemm_rows": args.decode_gemm_rows, "epilogue_norm_rows": args.epilogue_norm_rows,
                "gc_freeze": args.gc_freeze,
                "decode_l2_prefetch_kib": args.decode_l2_prefetch_kib}  # both reports'
    variant = _variant(args, built_pieces, kernel_defaults)
    if args.decode_only:
        args.out.mkdir(parents=True, exist_ok=True)
        split = "" if args.unsplit_kv_min_batch is None else f"-unsplit{args.unsplit_kv_min_batch}"
        path = args.out / f"engine-decode-{gpu_slug(device)}-{args.blas_library}{split}{variant}.json"
        path.write_text(json.dumps({**settings, "ceilings": ceilings, "decode": decode}, indent=1) + "\n")
        print(f"wrote {path}")
        return
    prefill = prefill_grid(worker, [64, 256] if quick else [128, 512, 2048, 8192], device, ceilings)
    in_len, out_len = (32, 8) if quick else (1024, 256)
    n = min(args.offline_requests, 8) if quick else args.offline_requests
    off = offline(worker, n, in_len, out_len, budget, max_seqs)
    del worker
    peer_result = None
    if args.peer_requests:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        peer_result = peer(args.model, args.peer_requests, in_len, args.peer_output_len, device)
    ge16 = [r["ratio"] for r in decode if r["batch"] >= 16 and "ratio" in r]
    big = [r for r in prefill if r["tokens"] == max(x["tokens"] for x in prefill)]
    summary = {
        "gpu": gpu_slug(device),
        "decode_worst_ratio_batch_ge_16": max(ge16) if ge16 else math.nan,
        "prefill_8192_gemm_fraction": big[0]["gemm_fraction"] if big else math.nan,
        "offline_output_tok_s": off["output_tok_s"],
        "peer_output_tok_s": peer_result["output_tok_s"] if peer_result else math.nan,
    }
    report = {"summary": summary, "model": args.model, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else platform.processor(), "torch": torch.__version__,
              **settings, "ceilings": ceilings, "decode": decode, "prefill": prefill, "offline": off,
              "peer": peer_result}
    args.out.mkdir(parents=True, exist_ok=True)
    pieces = "-piecewise" if built_pieces else ""
    path = args.out / f"engine-{summary['gpu']}{pieces}{variant}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
