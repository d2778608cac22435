"""Prefix-caching benchmark: requests that share a long system prompt, served offline by the real
scheduler driving the real runner in one process (no sockets), with automatic prefix caching on
and off on the same worker.

    python benchmarks/prefix_cache.py                                   # Qwen3-8B random weights on a GPU
    python benchmarks/prefix_cache.py --model tiny --device cpu --quick # smoke run anywhere

Each request is the shared prefix, a suffix of its own and a fixed number of output tokens (ignore
EOS); all arrive at once. Reports wall time, output tokens/s, mean and p90 time to first token,
the tokens the steps computed (prompt and decode) and the prompt tokens found in the cache. Prints a table and
writes benchmarks/results/prefix-cache-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
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
from dataplane.worker import load_worker  # noqa: E402
from shared.config import DataplaneConfig, SchedulerConfig  # noqa: E402
from shared.messages import SamplingParams  # noqa: E402


def workload(vocab: int, requests: int, prefix: int, suffix: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, vocab, (prefix,), generator=g).tolist()
    return [shared + torch.randint(3, vocab, (suffix,), generator=g).tolist() for _ in range(requests)]


def agree(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """How far two runs' greedy tokens agree, request by request: the share equal throughout, the
    share with the same first token, and the mean number of tokens before they part."""
    common = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), min(len(s), len(t))) for s, t in zip(a, b)]
    return {"equal_fraction": sum(s == t for s, t in zip(a, b)) / len(a),
            "first_token_equal_fraction": sum(c > 0 for c in common) / len(a),
            "mean_tokens_before_parting": statistics.fmean(common)}


def serve_offline(worker, prompts: list[list[int]], out_len: int, budget: int, max_seqs: int,  # noqa: ANN001
                  caching: bool) -> dict[str, object]:
    """All prompts at once through the scheduler and the runner, up to two steps in flight."""
    ready, runner = worker.ready, worker.runner
    runner.clear()
    config = SchedulerConfig(policy="aggregated", max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                             enable_prefix_caching=caching)  # the aggregated engine, as the figures before
    sched = Scheduler(config, make_allocator(ready.num_kv_blocks, ready.block_size, caching),
                      ready.max_model_len, frozenset())
    seqs = [Sequence(seq_id=i, request_id=str(i), prompt_token_ids=p, sampling=SamplingParams(temperature=0.0),
                     stop=StopParams(max_tokens=out_len, ignore_eos=True), arrival_time=0.0)
            for i, p in enumerate(prompts)]
    for seq in seqs:
        sched.add(seq)
    first_token: dict[int, float] = {}
    scheduled: list[int] = []  # tokens of each plan

    def first_tokens(updates: list) -> None:
        for update in updates:
            if update.new_token_ids and update.seq.seq_id not in first_token:
                first_token[update.seq.seq_id] = time.perf_counter() - start

    with Timer(runner.device) as t:
        start = time.perf_counter()
        steps = drive(sched, runner, lambda plan: scheduled.append(sum(s.num_tokens for s in plan.scheduled)),
                      first_tokens)
    computed = sum(scheduled)
    ttft = sorted(first_token.values())
    if len(ttft) != len(seqs) or any(len(s.output_token_ids) != out_len for s in seqs):
        raise RuntimeError("a request did not get all its tokens")
    return {
        "prefix_caching": caching, "seconds": t.seconds, "steps": steps,
        "output_tok_s": len(seqs) * out_len / t.seconds,
        "ttft_mean_s": statistics.fmean(ttft), "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "prompt_tokens": sum(len(p) for p in prompts), "tokens_scheduled": computed,
        "prompt_tokens_cached": sum(s.num_cached_tokens for s in seqs), "preemptions": sched.num_preemptions,
        "outputs": [s.output_token_ids for s in seqs],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke runs)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prefix", type=int, default=2048, help="tokens of the shared system prompt")
    p.add_argument("--suffix", type=int, default=128, help="tokens of each request's own part")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--budget", type=int, default=8192, help="token budget of one step")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.prefix, args.suffix, args.output_len, args.budget = 8, 48, 8, 4, 64
    max_seqs = min(args.requests, 256)
    worker = load_worker(DataplaneConfig(model=args.model, device=args.device, max_num_batched_tokens=args.budget,
                                         max_num_seqs=max_seqs, num_kv_blocks=512 if args.quick else None))
    prompts = workload(worker.ready.model.vocab_size, args.requests, args.prefix, args.suffix)
    serve_offline(worker, prompts[:2], args.output_len, args.budget, max_seqs, caching=True)  # warm-up
    rows = [serve_offline(worker, prompts, args.output_len, args.budget, max_seqs, caching)
            for caching in (False, True)]
    # the control: the cache off again with half the step budget, so prompts are chunked elsewhere
    control = serve_offline(worker, prompts, args.output_len, args.budget // 2, max_seqs, False)
    # bf16 prefills of a prompt in other chunks (whole, or after a cached prefix) round differently,
    # and greedy tokens of random weights part at near-ties; how far they agree is compared with
    # how far two chunkings without the cache agree
    off_out, on_out, control_out = rows[0].pop("outputs"), rows[1].pop("outputs"), control.pop("outputs")
    agreement = {"cache_on_vs_off": agree(off_out, on_out), "chunking_control": agree(off_out, control_out)}
    device = torch.device(args.device)
    print(f"{args.requests} requests x ({args.prefix} shared + {args.suffix} own prompt tokens, "
          f"{args.output_len} out) on {worker.ready.device.name}")
    print(f"{'prefix cache':<13}{'seconds':>9}{'out tok/s':>11}{'TTFT mean/p90 ms':>20}{'scheduled':>10}{'cached':>9}")
    for r in rows:
        print(f"{'on' if r['prefix_caching'] else 'off':<13}{r['seconds']:>9.2f}{r['output_tok_s']:>11.0f}"
              f"{1e3 * r['ttft_mean_s']:>11.0f}/{1e3 * r['ttft_p90_s']:<8.0f}{r['tokens_scheduled']:>10}"
              f"{r['prompt_tokens_cached']:>9}")
    off, on = rows
    summary = {"gpu": gpu_slug(device), "speedup_output_tok_s": on["output_tok_s"] / off["output_tok_s"],
               "ttft_mean_ratio": on["ttft_mean_s"] / off["ttft_mean_s"],
               "cached_fraction": on["prompt_tokens_cached"] / on["prompt_tokens"],
               "greedy_equal_fraction": agreement["cache_on_vs_off"]["equal_fraction"]}
    print(json.dumps(summary, indent=1))
    print(json.dumps(agreement, indent=1))
    report = {"summary": summary, "model": args.model, "device": worker.ready.device.name, "torch": torch.__version__,
              "requests": args.requests, "prefix": args.prefix, "suffix": args.suffix, "output_len": args.output_len,
              "budget": args.budget, "block_size": worker.ready.block_size, "rows": rows,
              "agreement": agreement, "control_budget": args.budget // 2}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefix-cache-{summary['gpu']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
