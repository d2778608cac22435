"""Decode attention as the data plane's CUDA graphs run it, by kernel option, against its KV-read floor.

flashinfer's CUDA-graph decode wrapper (`use_cuda_graph=True`, what `GraphDecodeAttention` builds)
timed inside a CUDA graph of `REPS` calls (no launch overhead; the split-KV merge kernel counted) for
each batch size and context, with tensor cores on or off and split-KV as planned, disabled, or at
a fixed split size (tensor cores only). One layer of Qwen3-8B's shapes (32 q heads, 8 KV heads,
head dim 128), page size 16. The floor is the layer's KV bytes at the measured copy rate. Prints a
table and writes `<out>/decode-attention-<gpu>.json`. GPU only.

    python benchmarks/decode_attention.py --batches 8,16,32,64,128,256 --contexts 1024,4096 --out /tmp/out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine import gpu_slug  # noqa: E402
from benchmarks.gemm_lib import copy_bandwidth, graph_ms  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
VARIANTS: dict[str, dict[str, object]] = {
    "tc": {"tensor_cores": True},
    "tc-nosplit": {"tensor_cores": True, "disable_split_kv": True},
    "tc-split8": {"tensor_cores": True, "fixed_split_size": 8},
    "tc-split32": {"tensor_cores": True, "fixed_split_size": 32},
    "cuda-cores": {"tensor_cores": False},
    "cuda-cores-nosplit": {"tensor_cores": False, "disable_split_kv": True},
}


def time_variant(batch: int, ctx: int, variant: dict[str, object], device: torch.device) -> float:
    import flashinfer

    pages = -(-ctx // PAGE)
    i32 = dict(dtype=torch.int32, device=device)
    cache = torch.randn(batch * pages, 2, PAGE, HKV, D, device=device, dtype=torch.bfloat16)
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=bool(variant["tensor_cores"]),
        paged_kv_indptr_buffer=torch.zeros(batch + 1, **i32),
        paged_kv_indices_buffer=torch.zeros(batch * pages, **i32),
        paged_kv_last_page_len_buffer=torch.ones(batch, **i32))
    extra = {k: v for k, v in variant.items() if k != "tensor_cores"}
    wrapper.plan(torch.arange(0, batch + 1, dtype=torch.int32) * pages, torch.arange(batch * pages, **i32),
                 torch.full((batch,), ctx - (pages - 1) * PAGE, dtype=torch.int32), HQ, HKV, D, PAGE,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, **extra)
    q = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    return graph_ms(lambda: wrapper.run(q, cache, out=out), device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,16,32,64,128,256")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            floor_ms = batch * ctx * HKV * D * 2 * 2 / bw * 1e3
            row: dict[str, object] = {"batch": batch, "context": ctx, "floor_ms": floor_ms}
            for name in args.variants.split(","):
                try:
                    row[f"{name}_ms"] = time_variant(batch, ctx, VARIANTS[name], device)
                except Exception as e:  # noqa: BLE001 - an option this flashinfer build rejects
                    row[f"{name}_ms"] = None
                    print(f"  B={batch} ctx={ctx} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            rows.append(row)
            cells = "  ".join(f"{n} {row[f'{n}_ms'] * 1e3:6.1f}" if row[f"{n}_ms"] is not None else f"{n} -"
                              for n in args.variants.split(","))
            print(f"B={batch:<4d} ctx={ctx:<5d} floor {floor_ms * 1e3:6.1f} us  {cells}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-attention-{gpu_slug(device)}.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                "copy_bytes_per_s": bw, "page_size": PAGE, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
