"""Structured outputs under load: one `duetserve serve` (the real data plane on `--gpu cuda`/`cpu`, else the
simulated one playing that GPU), then `duetserve bench serve` replaying an Azure trace at `--request-rate`
once per `--ratios` share of structured requests (`--structured-output`, each text checked), the prefix
cache emptied before each. Reports goodput under TTFT <= 2 s and TPOT <= 50 ms, output throughput, TPOT
with and without a structured output, and the correct rate; prints a table and writes
benchmarks/results/structured-serving-<gpu>.json.

    python benchmarks/structured_serving.py [--gpu h100|cuda] [--trace PATH] [--request-rate 4]
        [--num-prompts 200] [--ratios 0,0.5,1] [--structured-output regex] [--policy duet]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.stream_throughput import SERVER, _tail, start_server  # noqa: E402
from controlplane.launcher import stop_process  # noqa: E402

KEYS = ("completed", "failed", "request_goodput", "slo_attainment", "output_throughput", "mean_ttft_ms",
        "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_tpot_ms_structured", "mean_tpot_ms_unstructured",
        "structured_requests", "structured_correct", "structured_correct_rate", "structured_truncated")


def run_ratio(port: int, ratio: float, args: argparse.Namespace) -> dict[str, object]:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        argv = [sys.executable, "-m", "controlplane.cli", "bench", "serve", "--address", f"127.0.0.1:{port}",
                "--trace", str(args.trace), "--arrival", "trace", "--request-rate", str(args.request_rate),
                "--num-prompts", str(args.num_prompts), "--goodput", "ttft:2000", "tpot:50", "--reset-prefix-cache",
                "--structured-output-ratio", str(ratio), "--structured-output", args.structured_output,
                "--seed", str(args.seed), "--no-progress", "--result-file", result.name]
        done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"bench serve exited {done.returncode}")
        bench = json.loads(Path(result.name).read_text())
    return {"structured_ratio": ratio, **{k: bench.get(k) for k in KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h100", help="cuda or cpu: the real data plane; h100/h200: the simulated one")
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--trace", type=Path, default=ROOT.parent / "shared" / "traces" / "azure_llm_2023_conv.csv")
    parser.add_argument("--request-rate", type=float, default=4.0)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--ratios", default="0,0.5,1", help="comma-separated shares of structured requests")
    parser.add_argument("--structured-output", default="regex", choices=["regex", "json", "choice"])
    parser.add_argument("--policy", default="duet", choices=["aggregated", "prefill-first", "static", "duet"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/structured-serving-<gpu>.json")
    args = parser.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / f"structured-serving-{args.gpu}.json"
    rows = []
    with tempfile.TemporaryFile(mode="w+", errors="replace") as errors:
        server, port = start_server(ROOT, SERVER, ["0", "1.0", args.gpu, "1", args.model,
                                                   json.dumps({"policy": args.policy})], errors)
        try:
            for ratio in (float(r) for r in args.ratios.split(",")):
                try:
                    row = run_ratio(port, ratio, args)
                except RuntimeError as exc:
                    raise RuntimeError(f"{exc} (the server's stderr: {_tail(errors)})") from None
                rows.append(row)
                print(f"structured {ratio:4.2f}: goodput {row['request_goodput']:.2f} req/s "
                      f"(SLO attainment {row['slo_attainment']:.3f}), {row['output_throughput']:.0f} output tok/s, "
                      f"TPOT mean {row['mean_tpot_ms']:.1f} ms p99 {row['p99_tpot_ms']:.1f}"
                      + (f"; structured {row['mean_tpot_ms_structured']:.1f} ms / free "
                         f"{row['mean_tpot_ms_unstructured'] or float('nan'):.1f} ms; correct "
                         f"{row['structured_correct']}/{row['structured_requests']}"
                         if row["structured_requests"] else ""), flush=True)
        finally:
            stop_process(server, 30.0, "the control plane")
    result = {"machine": platform.node(), "cpus": os.cpu_count(), "gpu": args.gpu, "model": args.model,
              "policy": args.policy, "trace": args.trace.name, "request_rate": args.request_rate,
              "num_prompts": args.num_prompts, "structured_output": args.structured_output,
              "when": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
