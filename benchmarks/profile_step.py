"""Where a step's time goes, host and device: for eager prefill steps and decode steps (eager and
graph), the host time of `launch()` (Python + kernel launches), the device time (CUDA events), a
cProfile of the host side and a torch.profiler kernel table; a mixed step also with its decode rows
left in the ragged kernel (`_unsplit`), to show what the split attention saves.

    python benchmarks/profile_step.py --out /tmp/profile      # on a GPU; writes profile-piecewise.txt there
    python benchmarks/profile_step.py --no-piecewise-graphs --out /tmp/profile   # eager passes: profile.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.multiplex import Bench  # noqa: E402
from dataplane.worker import load_worker  # noqa: E402
from shared.config import DataplaneConfig  # noqa: E402
from shared.messages import ScheduledSeq, StepPlan  # noqa: E402


def plan_for(b: Bench, decode: bool, prefill_tokens: int) -> StepPlan:
    items = [ScheduledSeq(seq_id=i, num_tokens=1) for i in range(b.batch)] if decode else []
    if prefill_tokens:
        b.prefill_tokens = prefill_tokens
        b.add_prefill()
        items.append(ScheduledSeq(seq_id=-1, num_tokens=prefill_tokens))
    b.step_id += 1
    return StepPlan(step_id=b.step_id, scheduled=items)


def timed(b: Bench, decode: bool, prefill_tokens: int) -> dict[str, float]:
    if max(s.num_computed for i, s in b.runner.seqs.items() if i >= 0) > b.ctx + 400:
        b.reset_decoders()
    plan = plan_for(b, decode, prefill_tokens)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pending = b.runner.launch(plan)
    host = time.perf_counter() - t0
    result = pending.wait()
    wall = time.perf_counter() - t0
    b.runner.seqs.pop(-1, None)
    return {"host_launch_ms": host * 1000, "wall_ms": wall * 1000, "device_ms": result.timings.total_ms}


def median_of(b: Bench, decode: bool, prefill_tokens: int, reps: int = 5) -> dict[str, float]:
    timed(b, decode, prefill_tokens)
    runs = sorted((timed(b, decode, prefill_tokens) for _ in range(reps)), key=lambda r: r["wall_ms"])
    return runs[len(runs) // 2]


def host_profile(b: Bench, decode: bool, prefill_tokens: int) -> str:
    plan = plan_for(b, decode, prefill_tokens)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    pending = b.runner.launch(plan)
    prof.disable()
    pending.wait()
    b.runner.seqs.pop(-1, None)
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    return s.getvalue()


def kernel_table(b: Bench, decode: bool, prefill_tokens: int) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            timed(b, decode, prefill_tokens)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill and mixed steps of up to 1024 tokens as piecewise graphs, as served (files "
                        "profile-piecewise.*; --no-piecewise-graphs: eager, files profile.*)")
    args = p.parse_args()
    worker = load_worker(DataplaneConfig(model="qwen3-8b", device="cuda", max_num_batched_tokens=8192,
                                         max_num_seqs=256, multiplexing=False, piecewise_graphs=args.piecewise_graphs))
    b = Bench(worker, args.batch, args.context, 512)
    report: dict[str, object] = {}
    text: list[str] = []
    cases = [("prefill128", False, 128), ("prefill512", False, 512), ("prefill2048", False, 2048),
             ("prefill8192", False, 8192), ("decode_graph", True, 0), ("mixed_64+512", True, 512)]
    for name, decode, tokens in cases:
        report[name] = median_of(b, decode, tokens)
        print(name, json.dumps(report[name]), flush=True)
    backend = b.runner.backend
    if hasattr(backend, "split_min_decodes"):  # the same mixed step with every row in the ragged kernel
        split, backend.split_min_decodes = backend.split_min_decodes, 1 << 30
        report["mixed_64+512_unsplit"] = median_of(b, True, 512)
        backend.split_min_decodes = split
        print("mixed_64+512_unsplit", json.dumps(report["mixed_64+512_unsplit"]), flush=True)
    text.append(json.dumps(report, indent=1))
    for name, decode, tokens in [("prefill128", False, 128), ("mixed_64+512", True, 512), ("decode_graph", True, 0)]:
        text.append(f"\n===== host cProfile: {name}\n" + host_profile(b, decode, tokens))
    for name, decode, tokens in [("decode_graph", True, 0), ("prefill2048", False, 2048)]:
        text.append(f"\n===== kernels: {name}\n" + kernel_table(b, decode, tokens))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "profile-piecewise" if b.runner.pieces is not None else "profile"  # what was built, not asked
    (args.out / f"{stem}.txt").write_text("\n".join(text))
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    print("\n".join(text[1:]))


if __name__ == "__main__":
    main()
