"""How well the roofline predictor matches measured step times of the real data plane.

Loads a model with random weights through `dataplane.worker.load_worker` (the real ModelRunner,
attention backend and start-up calibration), times decode-only, prefill-only and mixed batches on a
grid of shapes (CUDA events on a GPU; a host clock on the CPU), and compares each with the predictor
given the calibrated HardwareProfile. Sequences are planted in the runner with their context
already "cached" (KV contents are irrelevant to timing), so no prefill is needed to reach a shape.

Reported: the online-corrected MAPE of the serving predictor (`controlplane.predictor`: launch-aware
roofline, host floors, corrections per regime and SM count; samples replayed in a shuffled order,
each scored before the predictor learns from it, as in serving: this is "mape"), the plain
roofline's, the uncorrected model's, and the MAPE of an in-sample affine fit of the plain roofline
per regime. With `--partitions`, decode batches on a decode partition run as the multiplexed step
runs them (CUDA graphs captured on that partition's stream); prefill and mixed batches run eagerly.

    python benchmarks/predictor.py --device cuda --model qwen3-8b            # H100: full device only
    python benchmarks/predictor.py --device cuda --sm-counts 16,32,64,132 --partition-provider MOD:ATTR
    python benchmarks/predictor.py --device cpu --model tiny --quick          # smoke test

SM-count sweeps need a partition provider (`dataplane.calibration.PartitionProvider`: S -> context
manager that runs the enclosed work on S SMs, e.g. green contexts); without one only the whole
device is measured. Writes benchmarks/results/predictor-<gpu>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.predictor_scoring import (  # noqa: E402
    by_kind, by_kind_and_sms, fitted_mape, runs_in_serving, score_online, serving_mape,
)
from controlplane.predictor import Predictor, regime_of  # noqa: E402
from dataplane.calibration import calibrate, load_partition_provider  # noqa: E402
from dataplane.runner import ModelRunner, SeqState  # noqa: E402
from dataplane.worker import load_worker  # noqa: E402
from shared.config import DataplaneConfig  # noqa: E402
from shared.messages import SamplingParams, ScheduledSeq, StepPlan  # noqa: E402
from shared.profiles import execution_profile_for  # noqa: E402

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


def plant(runner: ModelRunner, shape: Shape, decode_sms: int | None = None, full_sms: int = 0) -> StepPlan:
    """Register the shape's sequences with their contexts already computed; return the step's plan
    (multiplexed on the `decode_sms` partition when given)."""
    runner.clear()
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
    if decode_sms is not None:
        return StepPlan(step_id=0, scheduled=scheduled, mode="multiplexed", decode_sms=decode_sms,
                        prefill_sms=full_sms - decode_sms)
    return StepPlan(step_id=0, scheduled=scheduled)


def time_step(runner: ModelRunner, shape: Shape, reps: int, decode_sms: int | None = None, full_sms: int = 0) -> float:
    """Median ms of one step of `shape` (after one warm-up run)."""
    cuda = runner.device.type == "cuda"
    times = []
    for rep in range(reps + 1):
        plan = plant(runner, shape, decode_sms, full_sms)
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
    runner.clear()
    return statistics.median(times)


def gpu_key(name: str) -> str:
    for key in ("h100", "h200", "a100", "l40s", "l4"):
        if key in name.lower():
            return key
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _profile(args: argparse.Namespace, runner, ready, sm_counts: list[int], provider):  # noqa: ANN001, ANN202
    """The hardware profile the predictor runs on: the worker's, or one calibrated per SM count."""
    profile = ready.profile
    if provider is not None:
        profile = calibrate(runner.device, runner.kv_caches[0].dtype, args.calibration_cache_dir,
                            sm_counts=sm_counts, partition=provider)
    assert profile is not None
    return profile


def _samples(args: argparse.Namespace, runner, predictor: Predictor, provider, sm_counts: list[int],  # noqa: ANN001
             full: int, decode_parts: set[int]) -> list[dict[str, object]]:
    """Every shape of the grid on every SM count, measured and predicted raw."""
    shapes = grid(args.quick, runner.num_blocks * runner.block_size)
    samples: list[dict[str, object]] = []
    graphs, pieces = runner.graphs, runner.pieces
    for sms in sm_counts:
        runner.pieces = pieces if sms == full else None  # serving runs a partition's prefill eagerly
        context = provider(sms) if provider is not None and sms != full else nullcontext()
        for decode, chunks in shapes:
            regime = regime_of(len(decode), len(chunks))
            # a decode batch on a decode partition runs as a multiplexed step's decode phase: graphs
            # captured on that partition's stream; anything else on a partition runs eagerly there
            mux_decode = sms != full and regime == "decode" and sms in decode_parts
            if args.grid == "serving" and not runs_in_serving(
                    {"sms": sms, "regime": regime, "graph": mux_decode or sms == full}, full, decode_parts):
                continue
            runner.graphs = graphs if sms == full or mux_decode else None
            with nullcontext() if mux_decode else context:
                measured = time_step(runner, (decode, chunks), args.reps, sms if mux_decode else None, full)
            cost = predictor.cost(decode, [(q, c, True) for q, c in chunks])
            raw = predictor.raw_ms(cost, None if sms == full else sms)
            graph = graphs is not None and regime == "decode" and (sms == full or mux_decode)
            samples.append({"sms": sms, "regime": regime, "batch": len(decode), "graph": graph,
                            "mode": "multiplexed" if sms != full and regime != "mixed" else "aggregated",
                            "decode_context": decode[0] if decode else 0, "chunks": chunks,
                            "tokens": cost.num_tokens, "measured_ms": measured, "raw_ms": raw})
            print(f"  S={sms:<4}{regime:<8} decode {len(decode):>3} x c{samples[-1]['decode_context']:<5}"
                  f" chunks {chunks!s:<22} measured {measured:8.3f} ms  roofline {raw:8.3f} ms"
                  f"{'  graph' if graph else ''}", flush=True)
    runner.graphs = graphs
    return samples


def _report(args: argparse.Namespace, ready, predictor: Predictor, profile, execution,  # noqa: ANN001
            samples: list[dict[str, object]], sm_counts: list[int]) -> dict[str, object]:
    report = score_online(predictor, samples, args.seed)
    kinds = by_kind(samples)
    n_serving, mape_serving = serving_mape(samples)
    gpu = gpu_key(ready.device.name)
    return {
        "summary": {"gpu": gpu, "mape": report.mape, "n_samples": report.count, "mape_by_regime": kinds},
        "gpu": gpu, "device": ready.device.name, "model": ready.model.name,
        "attention_backend": ready.attention_backend, "dtype": ready.model.dtype, "sm_counts": sm_counts,
        "piecewise_max_tokens": ready.piecewise_max_tokens,
        "mape_definition": "online: the serving predictor (launch-aware roofline, host floors, corrections per "
                           "(regime, SM count)) in a shuffled replay of the samples, each scored before it is "
                           "learnt from",
        "mape_raw_roofline": report.raw_mape, "mape_uncorrected_model": report.prior_mape,
        "mape_serving_shapes": {"n": n_serving, "mape": mape_serving,
                                "definition": "the same replay, scored on the shapes serving runs (whole GPU; "
                                              "prefill on a prefill partition; decode graphs on a decode partition)"},
        "mape_raw_by_regime": {r: raw for r, (_, _, raw) in report.by_regime.items()},
        "mape_by_kind_and_sms": by_kind_and_sms(samples),
        "mape_fitted_affine_in_sample": fitted_mape(samples),
        "profile": {"source": profile.source, "detail": profile.detail, "sm_counts": profile.sm_counts,
                    "gemm_flops_per_s": profile.gemm_flops_per_s, "hbm_bytes_per_s": profile.hbm_bytes_per_s,
                    "step_overhead_ms": profile.step_overhead_ms},
        "model_shape": as_json(predictor.shape), "execution_profile": as_json(execution),
        "reps": args.reps, "grid": args.grid, "samples": samples,
    }


def measure(args: argparse.Namespace) -> dict[str, object]:
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
    profile = _profile(args, runner, ready, sm_counts, provider)
    execution = execution_profile_for(ready.device.name, ready.attention_backend)
    predictor = Predictor(ready.model, profile, execution, decode_graphs=ready.attention_backend == "flashinfer",
                          piecewise_max_tokens=ready.piecewise_max_tokens)
    decode_parts = set(ready.partition_sm_counts) if runner.multiplexer is not None else set()
    samples = _samples(args, runner, predictor, provider, sm_counts, full, decode_parts)
    return _report(args, ready, predictor, profile, execution, samples, sm_counts)


def as_json(obj: object) -> dict[str, object]:
    """A frozen dataclass as a JSON-ready dict (re-built by predictor_scoring.shape_of / execution_of)."""
    return dataclasses.asdict(obj)  # type: ignore[call-overload]


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
    p.add_argument("--grid", default="all", choices=("all", "serving"),
                   help="all: every shape on every SM count; serving: only what the policies run (anything "
                        "on the whole GPU, prefill on a prefill partition, decode graphs on a decode partition)")
    p.add_argument("--quick", action="store_true", help="a small grid (CPU smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default benchmarks/results/predictor-<gpu>.json")
    args = p.parse_args(argv)
    if args.kv_blocks is None:
        args.kv_blocks = 20_000 if args.device.startswith("cuda") else 256
    result = measure(args)
    out = Path(args.out or ROOT / "benchmarks/results")
    if out.is_dir() or not out.suffix:  # a folder: the usual file name inside it
        out = out / f"predictor-{result['gpu']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = result["summary"]
    print(f"{result['device']} {result['model']}: MAPE {100 * summary['mape']:.1f}% online-corrected, "  # type: ignore[index]
          f"{100 * result['mape_raw_roofline']:.1f}% raw roofline, "  # type: ignore[operator]
          f"{100 * result['mape_uncorrected_model']:.1f}% uncorrected model over {summary['n_samples']} samples; "  # type: ignore[index,operator]
          f"by regime {summary['mape_by_regime']}; by kind@SMs {result['mape_by_kind_and_sms']}")  # type: ignore[index]
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
