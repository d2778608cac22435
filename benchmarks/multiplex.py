"""Multiplexing benchmark: a decode batch alone, then alongside a long prefill (a) in one aggregated
mixed batch, (b) time-sliced, (c) on green-context partitions for several splits and look-ahead k.

    python benchmarks/multiplex.py            # on a GPU (Qwen3-8B shapes, random weights)

Prints a table and writes benchmarks/results/multiplex-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import gpu_slug  # noqa: E402
from controlplane.optimizer import best_k  # noqa: E402
from dataplane.seq_state import SeqState  # noqa: E402
from dataplane.worker import load_worker  # noqa: E402
from shared.config import BLAS_LIBRARIES, PARTITION_KERNELS, DataplaneConfig, SchedulerConfig  # noqa: E402
from shared.messages import SamplingParams, ScheduledSeq, StepPlan  # noqa: E402


class Bench:
    def __init__(self, worker, batch: int, ctx: int, prefill_tokens: int) -> None:  # noqa: ANN001
        self.w, self.runner = worker, worker.runner
        self.batch, self.ctx, self.prefill_tokens = batch, ctx, prefill_tokens
        self.bs = worker.ready.block_size
        self.per_seq = -(-(ctx + 512) // self.bs)
        self.prefill_first_block = batch * self.per_seq
        needed = self.prefill_first_block + -(-prefill_tokens // self.bs)
        if needed > worker.ready.num_kv_blocks:  # block ids past the cache would read out of bounds on the GPU
            raise SystemExit(f"{batch} decoders at {ctx} (+512) and a {prefill_tokens}-token prefill need {needed} "
                             f"KV blocks; the cache has {worker.ready.num_kv_blocks}")
        self.step_id = 0
        self.reset_decoders()

    def reset_decoders(self) -> None:
        vocab = self.w.ready.model.vocab_size
        self.runner.seqs.clear()
        for i in range(self.batch):
            tokens = torch.randint(0, vocab, (self.ctx + 1,)).tolist()
            self.runner.seqs[i] = SeqState(seq_id=i, token_ids=tokens, num_prompt_tokens=self.ctx + 1,
                                           block_table=list(range(i * self.per_seq, (i + 1) * self.per_seq)),
                                           sampling=SamplingParams(temperature=0.0), num_computed=self.ctx)

    def add_prefill(self) -> None:
        vocab = self.w.ready.model.vocab_size
        n = -(-self.prefill_tokens // self.bs)
        self.runner.seqs[-1] = SeqState(seq_id=-1, token_ids=torch.randint(0, vocab, (self.prefill_tokens,)).tolist(),
                                        num_prompt_tokens=self.prefill_tokens, sampling=SamplingParams(temperature=0.0),
                                        block_table=list(range(self.prefill_first_block, self.prefill_first_block + n)))

    def step(self, decode: bool, prefill: bool, mode: str = "aggregated", decode_sms: int = 0, k: int = 1,  # noqa: ANN201
             chunk: int | None = None):
        if max(s.num_computed for i, s in self.runner.seqs.items() if i >= 0) > self.ctx + 400:
            self.reset_decoders()
        items = [ScheduledSeq(seq_id=i, num_tokens=1) for i in range(self.batch)] if decode else []
        if prefill:
            self.add_prefill()
            items.append(ScheduledSeq(seq_id=-1, num_tokens=chunk or self.prefill_tokens))
        plan = StepPlan(step_id=self.step_id, mode=mode, decode_sms=decode_sms, decode_steps=k, scheduled=items)
        self.step_id += 1
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = self.runner.launch(plan).wait()
        wall = (time.perf_counter() - t0) * 1000
        self.runner.seqs.pop(-1, None)
        return wall, result.timings

    def median(self, reps: int, **kw):  # noqa: ANN003, ANN201
        self.reset_decoders()  # every measurement from the same context (look-aheads move it k a step)
        self.step(**kw)  # warm-up (and graph capture)
        runs = [self.step(**kw) for _ in range(reps)]
        runs.sort(key=lambda r: r[0])
        return runs[len(runs) // 2]


def ideal_tok_s(prefill_tokens: int, decode_tokens: int, prefill_alone_ms: float, decode_alone_ms: float) -> float:
    """Tokens/s of a multiplexed step whose phases run as fast as each alone on its partition (perfect
    isolation): the most a split can give at this k, whatever the contention. Below the aggregated mixed
    batch at every split, no isolation fix makes multiplexing win on raw tokens/s for this workload."""
    return (prefill_tokens + decode_tokens) / max(prefill_alone_ms, decode_alone_ms, 1e-9) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--prefill", type=int, default=8192)
    p.add_argument("--splits", default="8,16,24,32,48,64", help="decode partition sizes (SMs)")
    p.add_argument("--ks", default="1,2,4,8,opt",
                   help="look-aheads; opt: the optimizer's tokens-per-ms pick (optimizer.best_k, without the duet "
                        "policy's TBT floor) from the split's prefill alone on its partition and one decode step "
                        "alone on its own: the k whose decode steps would fill the prefill with perfect isolation")
    p.add_argument("--max-k", type=int, default=SchedulerConfig().max_lookahead,
                   help="largest k opt may pick (default: the duet policy's max_lookahead)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tbt-slo-ms", type=float, default=50.0, help="TBT bound of the fair comparison")
    p.add_argument("--partition-kernels", choices=PARTITION_KERNELS, default="device",
                   help="kernels of a multiplexed step sized for the whole GPU, their partition, or their "
                        "partition's GEMMs only (dataplane/partition_kernels.py; the results file gets a suffix)")
    p.add_argument("--blas-library", choices=BLAS_LIBRARIES, default="default")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    splits = [int(x) for x in args.splits.split(",")]
    ks = [x if x == "opt" else int(x) for x in args.ks.split(",")]
    if args.max_k < 1:
        p.error("--max-k must be at least 1")
    worker = load_worker(DataplaneConfig(model=args.model, device="cuda", max_num_batched_tokens=args.prefill + args.batch,
                                         max_num_seqs=args.batch, decode_partition_sms=tuple(splits),
                                         partition_kernels=args.partition_kernels, blas_library=args.blas_library))
    print(f"{args.model}: {worker.ready.num_kv_blocks} KV blocks, decode partitions {worker.ready.partition_sm_counts}", flush=True)
    b = Bench(worker, args.batch, args.context, args.prefill)
    B, P = args.batch, args.prefill
    # every time below is the step's own on the device (CUDA events), as the multiplexed rows' are
    alone = b.median(args.reps, decode=True, prefill=False)[1].total_ms
    prefill_alone = b.median(args.reps, decode=False, prefill=True)[1].total_ms
    mixed = b.median(args.reps, decode=True, prefill=True)[1].total_ms
    rows = {"decode_alone_ms": alone, "prefill_alone_ms": prefill_alone,
            "aggregated": {"step_ms": mixed, "tbt_ms": mixed, "tok_s": (B + P) / mixed * 1000},
            "time_sliced": {"tbt_ms": prefill_alone + alone, "tok_s": (B + P) / (prefill_alone + alone) * 1000}}
    print(f"decode alone {alone:.2f} ms | prefill alone {prefill_alone:.1f} ms | aggregated mixed {mixed:.1f} ms "
          f"({rows['aggregated']['tok_s']:.0f} tok/s) | time-sliced TBT {prefill_alone + alone:.1f} ms", flush=True)
    chunked = []  # aggregated mixed steps with smaller prefill chunks: the TBT-bounded baseline
    for chunk in (512, 1024, 2048, 4096):
        t = b.median(args.reps, decode=True, prefill=True, chunk=chunk)[1].total_ms
        chunked.append({"chunk": chunk, "tbt_ms": t, "tok_s": (B + chunk) / t * 1000})
        print(f"aggregated chunk {chunk:5d}: TBT {t:6.1f} ms, {(B + chunk) / t * 1000:6.0f} tok/s", flush=True)
    rows["aggregated_chunked"] = chunked
    multiplexed = []
    for d in splits:
        # the prefill alone on its partition: how prefill time scales with SMs, apart from contention
        _, t_pre = b.median(args.reps, decode=False, prefill=True, mode="multiplexed", decode_sms=d)
        print(f"split {d}d: prefill alone on the rest {t_pre.prefill_ms:6.1f} ms", flush=True)
        k_opt = None
        if "opt" in ks:
            _, t_one = b.median(args.reps, decode=True, prefill=False, mode="multiplexed", decode_sms=d)
            k_opt, _ = best_k(t_pre.prefill_ms, t_one.decode_ms, P, [float(k * B) for k in range(args.max_k + 1)])
        for k in dict.fromkeys(k_opt if k == "opt" else k for k in ks):  # in order, each once
            _, t_alone = b.median(args.reps, decode=True, prefill=False, mode="multiplexed", decode_sms=d, k=k)
            wall, t = b.median(args.reps, decode=True, prefill=True, mode="multiplexed", decode_sms=d, k=k)
            row = {"decode_sms": d, "prefill_sms": worker.runner.multiplexer.partitions.get(d).actual_prefill_sms,
                   "k": k, "step_ms": t.total_ms, "wall_ms": wall, "prefill_ms": t.prefill_ms,
                   # decoders get k tokens per step, delivered when the step ends: TPOT = step / k
                   "decode_ms": t.decode_ms, "tbt_ms": t.total_ms / k, "decode_step_ms": t.decode_ms / k,
                   "tbt_alone_ms": t_alone.decode_ms / k, "prefill_alone_on_partition_ms": t_pre.prefill_ms,
                   "isolation_ratio": t.decode_ms / max(t_alone.decode_ms, 1e-6), "optimizer_k": k == k_opt,
                   "tok_s": (k * B + P) / t.total_ms * 1000,
                   # the same k with perfect isolation: each phase as fast as alone on its partition
                   "ideal_tok_s": ideal_tok_s(P, k * B, t_pre.prefill_ms, t_alone.decode_ms)}
            multiplexed.append(row)
            print(f"split {row['prefill_sms']}p/{d}d k={k}: step {t.total_ms:6.1f} ms, prefill {t.prefill_ms:6.1f}, "
                  f"decode {t.decode_ms:6.1f} (step {row['decode_step_ms']:.2f} vs alone {row['tbt_alone_ms']:.2f}, "
                  f"x{row['isolation_ratio']:.2f}), {row['tok_s']:.0f} tok/s", flush=True)
    best = max(multiplexed, key=lambda r: r["tok_s"])
    slo = args.tbt_slo_ms
    mux_ok = [r for r in multiplexed if r["tbt_ms"] <= slo]
    agg_ok = [r for r in chunked if r["tbt_ms"] <= slo]
    under_slo = {
        "tbt_slo_ms": slo,
        "best_multiplexed": max(mux_ok, key=lambda r: r["tok_s"]) if mux_ok else None,
        "best_aggregated": max(agg_ok, key=lambda r: r["tok_s"]) if agg_ok else None,
    }
    if under_slo["best_multiplexed"] and under_slo["best_aggregated"]:
        under_slo["speedup"] = under_slo["best_multiplexed"]["tok_s"] / under_slo["best_aggregated"]["tok_s"]
        print(f"under a {slo:.0f} ms TBT SLO: multiplexed {under_slo['best_multiplexed']['tok_s']:.0f} tok/s vs "
              f"aggregated {under_slo['best_aggregated']['tok_s']:.0f} tok/s (x{under_slo['speedup']:.2f})")
    summary = {"gpu": gpu_slug(torch.device("cuda")), "isolation_ratio": best["isolation_ratio"],
               "best_multiplexed_tok_s": best["tok_s"], "aggregated_tok_s": rows["aggregated"]["tok_s"],
               "best_split": [best["prefill_sms"], best["decode_sms"]], "k": best["k"],
               "best_ideal_tok_s": max(r["ideal_tok_s"] for r in multiplexed)}
    print(f"best multiplexed {best['tok_s']:.0f} tok/s (with perfect isolation at best "
          f"{summary['best_ideal_tok_s']:.0f}) against aggregated {summary['aggregated_tok_s']:.0f}", flush=True)
    report = {"summary": summary, "model": args.model, "partition_kernels": args.partition_kernels,
              "blas_library": args.blas_library, "batch": B, "context": args.context, "prefill_tokens": P,
              "baselines": rows, "multiplexed": multiplexed, "under_tbt_slo": under_slo, "graphs": worker.runner.graphs.num_graphs,
              "graph_capture_mib": worker.runner.graphs.capture_bytes / 2**20,
              "piecewise_max_tokens": worker.ready.piecewise_max_tokens}  # the aggregated chunks up to it replay pieces
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if (args.partition_kernels, args.blas_library) == ("device", "default") else \
        f"-{args.partition_kernels}-{args.blas_library}"
    if (B, args.context, P) != (64, 2048, 8192):  # another workload than the issue's
        suffix += f"-b{B}-ctx{args.context}-p{P}"
    path = args.out / f"multiplex-{summary['gpu']}{suffix}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
