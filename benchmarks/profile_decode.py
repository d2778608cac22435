"""Where a decode step's time goes: kernel table of decode steps (torch.profiler; eager, or replayed
CUDA graphs with --graphs), and the decode attention kernel alone with and without tensor cores for
each KV page size.

    python benchmarks/profile_decode.py --batch 64 --context 2048 [--graphs] [--page-sizes 16,32,64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.multiplex import Bench  # noqa: E402
from dataplane.worker import load_worker  # noqa: E402
from shared.config import DataplaneConfig  # noqa: E402


def attention_only(batch: int, ctx: int, tensor_cores: bool, bs: int = 16) -> float:
    import flashinfer

    dev, pages = torch.device("cuda"), -(-ctx // bs)
    cache = torch.randn(batch * pages, 2, bs, 8, 128, device=dev, dtype=torch.bfloat16)
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)
    indptr = torch.arange(0, batch + 1, dtype=torch.int32) * pages
    w.plan(indptr, torch.arange(batch * pages, dtype=torch.int32), torch.full((batch,), ctx - (pages - 1) * bs, dtype=torch.int32),
           32, 8, 128, bs, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    q = torch.randn(batch, 32, 128, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        w.run(q, cache)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        w.run(q, cache)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 20
    gbytes = batch * ctx * 8 * 128 * 2 * 2 / 1e9
    print(f"attention B={batch} ctx={ctx} page={bs} tensor_cores={tensor_cores}: {ms * 1000:.0f} us/layer, "
          f"{gbytes / ms:.2f} TB/s of KV", flush=True)
    return ms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--graphs", action="store_true", help="profile replayed CUDA graphs instead of eager steps")
    p.add_argument("--page-sizes", default="16", help="KV page sizes for the attention-only timing (\"\": none)")
    p.add_argument("--epilogue-norm-rows", type=int, default=DataplaneConfig().epilogue_norm_rows,
                   help="the data plane's epilogue_norm_rows (norms in the kernels after the projections)")
    args = p.parse_args()
    for bs in (int(x) for x in args.page_sizes.split(",") if x):
        for tc in (True, False):
            attention_only(args.batch, args.context, tc, bs)
    worker = load_worker(DataplaneConfig(model="qwen3-8b", device="cuda", max_num_batched_tokens=2048,
                                         max_num_seqs=args.batch, cuda_graphs=args.graphs, multiplexing=False,
                                         epilogue_norm_rows=args.epilogue_norm_rows))
    print(f"epilogue_norm_rows={args.epilogue_norm_rows}", flush=True)
    b = Bench(worker, args.batch, args.context, 512)
    for _ in range(3):
        b.step(decode=True, prefill=False)
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        walls = [b.step(decode=True, prefill=False)[0] for _ in range(steps)]
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.device_time_total for e in events) / 1000 / steps
    count = sum(e.count for e in events) / steps
    print(f"B={args.batch} ctx={args.context} graphs={args.graphs}: step wall {sorted(walls)[steps // 2]:.2f} ms "
          f"(median, synchronised), kernels {kernel_ms:.2f} ms busy over {count:.0f} launches a step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


if __name__ == "__main__":
    main()
