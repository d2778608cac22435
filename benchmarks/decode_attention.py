"""Decode attention as the data plane's CUDA graphs run it, by kernel option, against its KV-read floor.

flashinfer's CUDA-graph decode wrapper (`use_cuda_graph=True`, what `GraphDecodeAttention` builds)
timed inside a CUDA graph of `REPS` calls (no launch overhead; the split-KV merge kernel counted) for
each batch size and context, with tensor cores on or off, split-KV as planned, disabled, or at a fixed
split size (tensor cores only), the tensor-core path on flashinfer's FA3 (Hopper) prefill kernel instead
of FA2, and the KV cache in each layout asked for (`NHD`: a page is [tokens, heads, dim], what the data
plane allocates; `HND`: [heads, tokens, dim], each head's page contiguous). One layer of Qwen3-8B's
shapes (32 q heads, 8 KV heads, head dim 128) at the data plane's page size unless `--page-size`; the
calls alternate between two caches so the 50 MB L2 holds none of the next call's KV. The floor is the
layer's KV bytes at the measured copy rate. Prints a table and writes
`<out>/decode-attention-<gpu>[-page<N>].json`. GPU only.

    python benchmarks/decode_attention.py --batches 8,16,32,64,128,256 --contexts 1024,4096 --out /tmp/out
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import gpu_slug  # noqa: E402
from benchmarks.gemm_lib import copy_bandwidth, graph_ms  # noqa: E402
from shared.config import DEFAULT_BLOCK_SIZE  # noqa: E402

HQ, HKV, D = 32, 8, 128
LAYOUTS = ("NHD", "HND")
VARIANTS: dict[str, dict[str, object]] = {
    "tc": {"tensor_cores": True},
    "tc-nosplit": {"tensor_cores": True, "disable_split_kv": True},
    "tc-split8": {"tensor_cores": True, "fixed_split_size": 8},
    "tc-split32": {"tensor_cores": True, "fixed_split_size": 32},
    "cuda-cores": {"tensor_cores": False},
    "cuda-cores-nosplit": {"tensor_cores": False, "disable_split_kv": True},
    "fa3": {"tensor_cores": True, "backend": "fa3"},  # the Hopper prefill kernel for decode rows
}


def column(name: str, layout: str) -> str:
    """A variant's column in the table and the JSON rows: its name, with the layout unless NHD."""
    return name if layout == "NHD" else f"{name}-{layout}"


def context_lengths(batch: int, ctx: int, spread: float, seed: int = 0) -> list[int]:
    """Each sequence's context: all `ctx`, or drawn uniformly from ctx * [1 - spread, 1 + spread] (seeded)
    when `spread` > 0 -- a serving batch's mixed lengths, where one long sequence can hold up an unsplit
    KV read."""
    if spread <= 0:
        return [ctx] * batch
    g = torch.Generator().manual_seed(seed + batch * 7919 + ctx)
    low, high = max(1, round(ctx * (1 - spread))), round(ctx * (1 + spread))
    return torch.randint(low, high + 1, (batch,), generator=g).tolist()


def time_variant(lens: list[int], variant: dict[str, object], device: torch.device, page: int,
                 layout: str = "NHD") -> float:
    import flashinfer

    batch = len(lens)
    pages = [-(-n // page) for n in lens]
    total = sum(pages)
    i32 = dict(dtype=torch.int32, device=device)
    shape = (total, 2, page, HKV, D) if layout == "NHD" else (total, 2, HKV, page, D)
    caches = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(2)]
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, layout, use_cuda_graph=True, use_tensor_cores=bool(variant["tensor_cores"]),
        paged_kv_indptr_buffer=torch.zeros(batch + 1, **i32),
        paged_kv_indices_buffer=torch.zeros(total, **i32),
        paged_kv_last_page_len_buffer=torch.ones(batch, **i32), backend=str(variant.get("backend", "auto")))
    extra = {k: v for k, v in variant.items() if k not in ("tensor_cores", "backend")}
    indptr = torch.tensor([0, *itertools.accumulate(pages)], dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * page for n, p in zip(lens, pages)], dtype=torch.int32)
    wrapper.plan(indptr, torch.arange(total, **i32), last, HQ, HKV, D, page,
                 q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, **extra)
    q = torch.randn(batch, HQ, D, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    turn = itertools.cycle(caches)
    return graph_ms(lambda: wrapper.run(q, next(turn), out=out), device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,16,32,64,128,256")
    p.add_argument("--contexts", default="1024,4096")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--page-size", type=int, default=DEFAULT_BLOCK_SIZE, help="KV page size in tokens")
    p.add_argument("--length-spread", type=float, default=0.0,
                   help="contexts drawn from ctx * [1 - s, 1 + s] per sequence (0: every sequence at ctx; "
                        "files of another value get -spread<s>)")
    p.add_argument("--layouts", default="NHD", help=f"KV cache layouts, comma-separated ({', '.join(LAYOUTS)})")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    names = args.variants.split(",")
    layouts = args.layouts.split(",")
    if unknown := [n for n in names if n not in VARIANTS] + [lay for lay in layouts if lay not in LAYOUTS]:
        p.error(f"unknown variant or layout: {', '.join(unknown)}")
    cols = [column(n, lay) for lay in layouts for n in names]
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            lens = context_lengths(batch, ctx, args.length_spread)
            floor_ms = sum(lens) * HKV * D * 2 * 2 / bw * 1e3
            skew = max(lens) * len(lens) / sum(lens)  # longest over mean: flashinfer_backend.is_balanced's measure
            row: dict[str, object] = {"batch": batch, "context": ctx, "max_context": max(lens), "skew": skew,
                                      "floor_ms": floor_ms}
            for layout in layouts:
                for name in names:
                    col = column(name, layout)
                    try:
                        row[f"{col}_ms"] = time_variant(lens, VARIANTS[name], device, args.page_size, layout)
                    except Exception as e:  # noqa: BLE001 - an option this flashinfer build rejects
                        row[f"{col}_ms"] = None
                        print(f"  B={batch} ctx={ctx} {col}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            rows.append(row)
            cells = "  ".join(f"{n} {row[f'{n}_ms'] * 1e3:6.1f}" if row[f"{n}_ms"] is not None else f"{n} -"
                              for n in cols)
            print(f"B={batch:<4d} ctx={ctx:<5d} skew {skew:.2f} floor {floor_ms * 1e3:6.1f} us  {cells}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    page = "" if args.page_size == 16 else f"-page{args.page_size}"  # pages of 16: the first runs' file name
    spread = f"-spread{args.length_spread:g}" if args.length_spread > 0 else ""
    path = args.out / f"decode-attention-{gpu_slug(device)}{page}{spread}.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                                "copy_bytes_per_s": bw, "page_size": args.page_size, "layouts": layouts,
                                "length_spread": args.length_spread,
                                "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
