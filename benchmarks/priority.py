"""Priority scheduling under overload, through `duetserve serve` and the gRPC API.

A seeded fraction of the requests is urgent (priority -1). The same requests and arrival times run
twice: under `--scheduling-policy fcfs` (every request sent at priority 0, the urgent ones only
labelled) and under `--scheduling-policy priority`. The offered load exceeds what the server
completes, so a queue forms and its order decides the waiting. Prints TTFT and TPOT per class and
writes benchmarks/results/priority-<gpu>.json. On a GPU machine the server loads Qwen3-8B's shapes with
random weights; `--simulate h200` attaches it to the simulated data plane instead (a CPU run).

    python benchmarks/priority.py [--simulate h200] [--rate 40] [--num-prompts 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from benchmarks.serving import Server  # noqa: E402
from controlplane.bench_serve import arrivals, random_workload, run_load  # noqa: E402
from controlplane.protogen.duetserve.v1 import generation_pb2 as pb  # noqa: E402
from controlplane.protogen.duetserve.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402
from controlplane.replay import RequestRecord  # noqa: E402

URGENT = -1


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def class_stats(records: list[RequestRecord]) -> dict[str, float]:
    done = [r for r in records if r.finish_reason and not r.error and r.chunks]
    ttft = [(r.chunks[0][0] - r.sent) * 1e3 for r in done]
    tpot = [(r.chunks[-1][0] - r.chunks[0][0]) * 1e3 / (r.completion_tokens - 1) for r in done
            if r.completion_tokens > 1]
    return {"requests": len(records), "completed": len(done), "mean_ttft_ms": statistics.fmean(ttft) if ttft else 0.0,
            "median_ttft_ms": _percentile(ttft, 0.5), "p90_ttft_ms": _percentile(ttft, 0.9),
            "p99_ttft_ms": _percentile(ttft, 0.99), "mean_tpot_ms": statistics.fmean(tpot) if tpot else 0.0}


async def _load(port: int, args: argparse.Namespace, priorities: list[int]) -> list[RequestRecord]:
    workload = random_workload(args.num_prompts, args.input_len, args.output_len, 0.0, seed=0)
    send_times = arrivals(workload, "poisson", args.rate, 1.0, seed=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        records, _ = await run_load(stub, workload, send_times, vocab_size=info.vocab_size,
                                    max_model_len=info.max_model_len, seed=0, show_progress=False,
                                    priorities=priorities)
    return records


def run(args: argparse.Namespace, policy: str, urgent: list[bool]) -> dict[str, object]:
    server = Server(args, args.policy, ("--scheduling-policy", policy))
    try:
        sent = [URGENT if u and policy == "priority" else 0 for u in urgent]
        records = asyncio.run(_load(server.port, args, sent))
    finally:
        server.stop()
    row = {"scheduling_policy": policy,
           "urgent": class_stats([r for r, u in zip(records, urgent) if u]),
           "others": class_stats([r for r, u in zip(records, urgent) if not u])}
    for name in ("urgent", "others"):
        s = row[name]
        print(f"{policy:8} {name:6}: {s['completed']}/{s['requests']} done, TTFT mean {s['mean_ttft_ms']:.0f} / "
              f"p90 {s['p90_ttft_ms']:.0f} / p99 {s['p99_ttft_ms']:.0f} ms, TPOT mean {s['mean_tpot_ms']:.1f} ms",
              flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--policy", default="aggregated", help="the step policy (duetserve serve --policy)")
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--rate", type=float, default=40.0, help="requests/s, Poisson: above what the server completes")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--urgent-fraction", type=float, default=0.2)
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    p.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--max-num-seqs", type=int, default=32, help="few: the queue forms in front of the running batch")
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--decode-partition-sms", default="16,24,32,48,64")
    p.add_argument("--gpu", default="h200", help="the GPU's name in the results file")
    p.add_argument("--simulate", default=None, metavar="GPU", help="run against the simulated data plane of this GPU")
    p.add_argument("--sim-execution", default="flashinfer", choices=("roofline", "flashinfer"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    rng = random.Random(1)
    urgent = [rng.random() < args.urgent_fraction for _ in range(args.num_prompts)]
    rows = [run(args, policy, urgent) for policy in ("fcfs", "priority")]
    fcfs, prio = rows
    summary = {"gpu": f"sim-{args.simulate}" if args.simulate else args.gpu, "simulated": bool(args.simulate),
               "rate": args.rate, "urgent_fraction": args.urgent_fraction,
               "urgent_mean_ttft_ms": {"fcfs": fcfs["urgent"]["mean_ttft_ms"], "priority": prio["urgent"]["mean_ttft_ms"]},
               "others_mean_ttft_ms": {"fcfs": fcfs["others"]["mean_ttft_ms"], "priority": prio["others"]["mean_ttft_ms"]}}
    print(json.dumps(summary, indent=1))
    report = {"summary": summary, "model": args.model, "policy": args.policy, "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len, "max_num_seqs": args.max_num_seqs,
              "budget": args.budget, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"priority-{summary['gpu']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
