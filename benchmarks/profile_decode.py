"""Where a decode step's time goes: kernel table of one eager decode step (torch.profiler), and the
decode attention kernel alone with and without tensor cores.

    python benchmarks/profile_decode.py --batch 64 --context 2048
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


def attention_only(batch: int, ctx: int, tensor_cores: bool) -> float:
    import flashinfer

    dev, bs, pages = torch.device("cuda"), 16, -(-ctx // 16)
    cache = torch.randn(batch * pages, 2, bs, 8, 128, device=dev, dtype=torch.bfloat16)
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)
    indptr = torch.arange(0, batch + 1, dtype=torch.int32) * pages
    w.plan(indptr, torch.arange(batch * pages, dtype=torch.int32), torch.full((batch,), 16, dtype=torch.int32),
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
    print(f"attention B={batch} ctx={ctx} tensor_cores={tensor_cores}: {ms * 1000:.0f} us/layer, "
          f"{gbytes / ms:.2f} TB/s of KV", flush=True)
    return ms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    args = p.parse_args()
    for tc in (True, False):
        attention_only(args.batch, args.context, tc)
    worker = load_worker(DataplaneConfig(model="qwen3-8b", device="cuda", max_num_batched_tokens=2048,
                                         max_num_seqs=args.batch, cuda_graphs=False, multiplexing=False))
    b = Bench(worker, args.batch, args.context, 512)
    for _ in range(3):
        b.step(decode=True, prefill=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            b.step(decode=True, prefill=False)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


if __name__ == "__main__":
    main()
