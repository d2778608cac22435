"""Serving with a shared system prompt, through the real stack: `duetserve serve` with automatic
prefix caching off, then on, each loaded by `duetserve bench serve --dataset random
--random-prefix-len` at one request rate (open loop, Poisson arrivals), goodput under TTFT/TPOT SLOs.

    python benchmarks/serving_prefix.py --gpu h200                      # Qwen3-8B random weights
    python benchmarks/serving_prefix.py --simulate h200 --num-prompts 20 # on a CPU, simulated data plane

Prints a table and writes benchmarks/results/serving-prefix-<gpu>.json (serving-prefix-sim-<gpu>.json
when simulated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import Server  # noqa: E402
from controlplane.bench_serve import add_bench_flags, bench  # noqa: E402

KEEP = ["completed", "failed", "duration", "request_throughput", "request_goodput", "slo_attainment",
        "output_throughput", "total_input_tokens", "total_cached_tokens", "mean_ttft_ms", "median_ttft_ms",
        "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms"]


def run(args: argparse.Namespace, caching: bool) -> dict[str, object]:
    server = Server(args, args.policy, () if caching else ("--no-enable-prefix-caching",))
    try:
        p = argparse.ArgumentParser()
        add_bench_flags(p)
        bargs = p.parse_args([
            "--address", f"127.0.0.1:{server.port}", "--dataset", "random", "--num-prompts", str(args.num_prompts),
            "--random-prefix-len", str(args.prefix_len), "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--request-rate", str(args.rate), "--seed", "0",
            "--goodput", f"ttft:{args.ttft_slo_ms}", f"tpot:{args.tpot_slo_ms}", "--no-progress"])
        result = asyncio.run(bench(bargs))
    finally:
        server.stop()
    row = {"prefix_caching": caching, **{k: result[k] for k in KEEP}}
    print(f"prefix caching {'on ' if caching else 'off'}: goodput {row['request_goodput']:.2f} req/s "
          f"({row['slo_attainment']:.0%}), TTFT mean {row['mean_ttft_ms']:.0f} / p99 {row['p99_ttft_ms']:.0f} ms, "
          f"TPOT p99 {row['p99_tpot_ms']:.1f} ms, output {row['output_throughput']:.0f} tok/s, "
          f"{row['total_cached_tokens']} of {row['total_input_tokens']} prompt tokens cached", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--policy", default="duet")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--prefix-len", type=int, default=2048, help="tokens of the shared system prompt")
    p.add_argument("--input-len", type=int, default=128, help="each request's own prompt tokens")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rate", type=float, default=8.0, help="requests/s, Poisson")
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    p.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--decode-partition-sms", default="16,24,32,48,64")
    p.add_argument("--gpu", default="h200", help="the GPU's name in the results file")
    p.add_argument("--simulate", default=None, metavar="GPU",
                   help="run against the simulated data plane of this GPU (a CPU smoke run)")
    p.add_argument("--sim-execution", default="flashinfer", choices=("roofline", "flashinfer"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    rows = [run(args, caching) for caching in (False, True)]
    off, on = rows
    summary = {"gpu": args.simulate or args.gpu, "simulated": bool(args.simulate), "rate": args.rate,
               "goodput_ratio": (on["request_goodput"] or 0) / max(off["request_goodput"] or 0, 1e-9),
               "mean_ttft_ratio": on["mean_ttft_ms"] / max(off["mean_ttft_ms"], 1e-9),
               "cached_fraction": on["total_cached_tokens"] / max(on["total_input_tokens"], 1)}
    print(json.dumps(summary, indent=1))
    report = {"summary": summary, "model": args.model, "policy": args.policy, "num_prompts": args.num_prompts,
              "prefix_len": args.prefix_len, "input_len": args.input_len, "output_len": args.output_len,
              "budget": args.budget, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"serving-prefix-sim-{args.simulate}" if args.simulate else f"serving-prefix-{args.gpu}"
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
