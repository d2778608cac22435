"""How well the roofline predictor matches measured step times of the real data plane.

Loads a model with random weights through `dataplane.worker.load_worker` (the real ModelRunner,
attention backend and start-up calibration), times decode-only, prefill-only and mixed batches on a
grid of shapes (CUDA events on a GPU; a host clock on the CPU), and compares each with the predictor
given the calibrated HardwareProfile. Sequences are planted in the runner with their context
already "cached" (KV contents are irrelevant to timing), so no prefill is needed to reach a shape.

Reported: the raw roofline's MAPE; the online-corrected MAPE (samples replayed in a shuffled order,
each scored before the per-regime correction learns from it, as in serving: this is "mape"); and
the MAPE of an in-sample affine fit per regime (the best such a correction could do).

    python benchmarks/predictor.py --device cuda --model qwen3-8b            # H100: full device only
    python benchmarks/predictor.py --device cuda --sm-counts 16,32,64,132 --partition-provider MOD:ATTR
    python benchmarks/predictor.py --device cpu --model tiny --quick          # smoke test

SM-count sweeps need a partition provider (`dataplane.calibration.PartitionProvider`: S -> context
manager that runs the enclosed work on S SMs, e.g. green contexts); without one only the whole
device is measured. Writes benchmarks/results/predictor-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from controlplane.predictor import Predictor, PredictorReport, regime_of  # noqa: E402
from dataplane.calibration import calibrate, load_partition_provider  # noqa: E402
from dataplane.runner import ModelRunner, SeqState  # noqa: E402
from dataplane.worker import load_worker  # noqa: E402
from shared.config import DataplaneConfig  # noqa: E402
from shared.messages import SamplingParams, ScheduledSeq, StepPlan  # noqa: E402

Shape = tuple[list[int], list[tuple[int, int]]]  # decode contexts, prefill chunks (q, c)


def grid(quick: bool, max_kv_tokens: int) -> list[Shape]:
    if quick:
        decode = [([c] * b, []) for b in (1, 4, 16) for c in (16, 64)]
        prefill = [([], [(q, c)]) for q in (8, 32, 96) for c in (0, 32)]
        mixed = [([64] * b, [(q, 0)]) for b in (2, 8) for q in (16, 64)]
    else:
        decode = [([c] * b, []) for b in (1, 8, 32, 64, 128, 256) for c in (256, 1024, 2048)]
        decode += [([4096] * b, []) for b in (1, 16, 64)]
        prefill = [([], [(q, c)]) for q in (128, 512, 1024, 2048, 4096) for c in (0, 2048)]
        prefill += [([], [(512, 0)] * 4), ([], [(256, 1024)] * 8)]
        mixed = [([1024] * b, [(q, 0)]) for b in (16, 64, 128, 256) for q in (256, 1024, 2048)]
    shapes = decode + prefill + mixed
    return [s for s in shapes if sum(c + 1 for c in s[0]) + sum(q + c for q, c in s[1]) <= max_kv_tokens]


def plant(runner: ModelRunner, shape: Shape, rng: random.Random) -> StepPlan:
    """Register the shape's sequences with their contexts already computed; return the step's plan."""
    runner.seqs.clear()
    vocab, size = runner.config.vocab_size, runner.block_size
    next_block, scheduled = 0, []
    items = [(c, 1) for c in shape[0]] + [(c, q) for q, c in shape[1]]
    for seq_id, (cached, q) in enumerate(items):
        total = cached + q
        blocks = -(-total // size)
        runner.seqs[seq_id] = SeqState(
            seq_id=seq_id, token_ids=torch.randint(0, vocab, (total,)).tolist(), num_prompt_tokens=total,
            block_table=list(range(next_block, next_block + blocks)), sampling=SamplingParams(temperature=0.0),
            num_computed=cached,
        )
        next_block += blocks
        scheduled.append(ScheduledSeq(seq_id=seq_id, num_tokens=q))
    if next_block > runner.num_blocks:
        raise ValueError(f"shape needs {next_block} KV blocks, the runner has {runner.num_blocks}")
    return StepPlan(step_id=0, scheduled=scheduled)


def time_step(runner: ModelRunner, shape: Shape, reps: int, rng: random.Random) -> float:
    """Median ms of one step of `shape` (after one warm-up run)."""
    cuda = runner.device.type == "cuda"
    times = []
    for rep in range(reps + 1):
        plan = plant(runner, shape, rng)
        if cuda:
            torch.cuda.synchronize(runner.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.execute(plan)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            runner.execute(plan)
            ms = (time.perf_counter() - t0) * 1e3
        if rep:
            times.append(ms)
    runner.seqs.clear()
    return statistics.median(times)


def score_online(predictor: Predictor, samples: list[dict], seed: int) -> PredictorReport:
    """Replay the samples in a shuffled order: predict (corrected), then let the correction learn."""
    for s in random.Random(seed + 1).sample(samples, len(samples)):
        s["corrected_ms"] = predictor.correct(s["regime"], s["raw_ms"])
        predictor.observe(s["regime"], s["raw_ms"], s["measured_ms"])
    return predictor.report()


def fitted_mape(samples: list[dict]) -> dict[str, float]:
    """In-sample least-squares fit measured ~ a + b * raw per regime, and its MAPE."""
    out = {}
    for regime in sorted({s["regime"] for s in samples}):
        xs = [s["raw_ms"] for s in samples if s["regime"] == regime]
        ys = [s["measured_ms"] for s in samples if s["regime"] == regime]
        if len(xs) > 1 and statistics.pvariance(xs) > 0:
            b = statistics.covariance(xs, ys) / statistics.variance(xs)
            a = statistics.fmean(ys) - b * statistics.fmean(xs)
        else:
            a, b = 0.0, statistics.fmean(ys) / statistics.fmean(xs)
        out[regime] = statistics.fmean(abs(a + b * x - y) / y for x, y in zip(xs, ys))
    return out


def gpu_key(name: str) -> str:
    for key in ("h100", "h200", "a100", "l40s", "l4"):
        if key in name.lower():
            return key
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def measure(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    config = DataplaneConfig(model=args.model, device=args.device, dtype=args.dtype, num_kv_blocks=args.kv_blocks,
                             block_size=16, attention_backend=args.attention_backend, seed=args.seed,
                             calibration_cache_dir=args.calibration_cache_dir, max_num_batched_tokens=8192,
                             decode_partition_sms=tuple(int(x) for x in args.decode_sizes.split(","))
                             if args.partitions else None)
    loaded = load_worker(config)
    runner, ready = loaded.runner, loaded.ready
    provider = load_partition_provider(args.partition_provider) if args.partition_provider else None
    if args.partitions and runner.multiplexer is not None:  # the worker's own green-context streams
        streams = runner.multiplexer.partitions.streams_by_size()
        provider = lambda sms: torch.cuda.stream(streams[sms])  # noqa: E731
    full = ready.device.sm_count or 1
    sm_counts = [int(s) for s in args.sm_counts.split(",")] if args.sm_counts else [full]
    if provider is None and sm_counts != [full]:
        raise SystemExit("--sm-counts other than the whole device need --partition-provider")
    profile = ready.profile
    if provider is not None:
        profile = calibrate(runner.device, runner.kv_caches[0].dtype, args.calibration_cache_dir,
                            sm_counts=sm_counts, partition=provider)
    assert profile is not None
    predictor = Predictor(ready.model, profile)
    shapes = grid(args.quick, runner.num_blocks * runner.block_size)
    samples = []
    graphs = runner.graphs
    for sms in sm_counts:
        context = provider(sms) if provider is not None and sms != full else nullcontext()
        # a graph keeps the SMs it was captured on: on a partition, decode runs eagerly instead
        runner.graphs = graphs if sms == full else None
        with context:
            for decode, chunks in shapes:
                measured = time_step(runner, (decode, chunks), args.reps, rng)
                cost = predictor.cost(decode, [(q, c, True) for q, c in chunks])
                raw = predictor.raw_ms(cost, None if sms == full else sms)
                samples.append({"sms": sms, "regime": regime_of(len(decode), len(chunks)), "batch": len(decode),
                                "decode_context": decode[0] if decode else 0, "chunks": chunks,
                                "tokens": cost.num_tokens, "measured_ms": measured, "raw_ms": raw})
                print(f"  S={sms:<4}{samples[-1]['regime']:<8} decode {len(decode):>3} x c{samples[-1]['decode_context']:<5}"
                      f" chunks {chunks!s:<22} measured {measured:8.3f} ms  roofline {raw:8.3f} ms", flush=True)
    report = score_online(predictor, samples, args.seed)
    by = {r: m for r, (_, m, _) in report.by_regime.items()}
    return {
        "gpu": gpu_key(ready.device.name), "device": ready.device.name, "model": ready.model.name,
        "attention_backend": ready.attention_backend, "dtype": ready.model.dtype, "sm_counts": sm_counts,
        "mape": report.mape, "n_samples": report.count,
        "mape_by_regime": {r: by.get(r) for r in ("decode", "prefill", "mixed")},
        "mape_definition": "online: per-regime correction (affine, forgetting) learnt in a shuffled replay of the "
                           "samples, each scored before it is learnt from",
        "mape_raw_roofline": report.raw_mape,
        "mape_raw_by_regime": {r: raw for r, (_, _, raw) in report.by_regime.items()},
        "mape_fitted_affine_in_sample": fitted_mape(samples),
        "profile": {"source": profile.source, "detail": profile.detail, "sm_counts": profile.sm_counts,
                    "gemm_flops_per_s": profile.gemm_flops_per_s, "hbm_bytes_per_s": profile.hbm_bytes_per_s},
        "reps": args.reps, "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--kv-blocks", type=int, default=None, help="default: 20000 on CUDA (320k tokens), 256 on CPU")
    p.add_argument("--sm-counts", default=None, help="comma-separated SM counts (needs --partition-provider)")
    p.add_argument("--partition-provider", default=None, help="module:attr of a PartitionProvider")
    p.add_argument("--partitions", action="store_true",
                   help="measure on the worker's own green-context partitions (decode sizes from --decode-sizes)")
    p.add_argument("--decode-sizes", default="16,32,64", help="decode partition sizes the worker builds")
    p.add_argument("--calibration-cache-dir", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a small grid (CPU smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default benchmarks/results/predictor-<gpu>.json")
    args = p.parse_args(argv)
    if args.kv_blocks is None:
        args.kv_blocks = 20_000 if args.device.startswith("cuda") else 256
    result = measure(args)
    out = Path(args.out or ROOT / f"benchmarks/results/predictor-{result['gpu']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    fitted = result["mape_fitted_affine_in_sample"]
    print(f"{result['device']} {result['model']}: MAPE {100 * result['mape']:.1f}% online-corrected, "  # type: ignore[operator]
          f"{100 * result['mape_raw_roofline']:.1f}% raw roofline over {result['n_samples']} samples; "  # type: ignore[operator]
          f"by regime {result['mape_by_regime']}; in-sample affine fit {fitted}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
