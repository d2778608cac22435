"""Host cost of launching each kind of op an eager step launches (microseconds per call).

    python benchmarks/host_overhead.py      # on a GPU

An eager step launches ~10 ops per layer; when the host takes longer to launch them than the GPU
takes to run them, the GPU idles. This prints the host time per call of each op the fused path
uses, with Qwen3-8B's shapes at 128 tokens, so the expensive ones stand out.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def host_us(fn: Callable[[], object], n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    import flashinfer

    from dataplane.kernels.activation import silu_and_mul
    from dataplane.kernels.qk_rope_cache import qk_rope_cache

    dev, bf = torch.device("cuda"), torch.bfloat16
    t, h, hq, hkv, d, inter = 128, 4096, 32, 8, 128, 12288
    x = torch.randn(t, h, device=dev, dtype=bf)
    w_qkv = torch.randn((hq + 2 * hkv) * d, h, device=dev, dtype=bf)
    w_gu = torch.randn(2 * inter, h, device=dev, dtype=bf)
    norm_w = torch.ones(h, device=dev, dtype=bf)
    res = torch.randn(t, h, device=dev, dtype=bf)
    qkv = F.linear(x, w_qkv)
    gu = F.linear(x, w_gu)
    pos = torch.arange(t, device=dev)
    cos_sin = torch.randn(40960, d, device=dev)
    cache = torch.zeros(64, 2, 16, hkv, d, device=dev, dtype=bf)
    blocks, offsets = pos // 16, pos % 16
    hd_w = torch.ones(d, device=dev, dtype=bf)
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
    pre = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend="fa3")
    i32 = torch.int32
    pre.plan(torch.tensor([0, t], dtype=i32), torch.tensor([0, 8], dtype=i32), torch.arange(8, dtype=i32),
             torch.tensor([16], dtype=i32), hq, hkv, d, 16, causal=True, q_data_type=bf, kv_data_type=bf)
    q = torch.randn(t, hq, d, device=dev, dtype=bf)
    out = torch.empty_like(q)
    rows: dict[str, float] = {}
    rows["empty_like (baseline torch op)"] = host_us(lambda: torch.empty_like(x))
    rows["x + x"] = host_us(lambda: x + x)
    rows["F.linear 128x4096 -> 6144"] = host_us(lambda: F.linear(x, w_qkv))
    rows["torch.mm out= 128x4096 -> 6144"] = host_us(lambda: torch.mm(x, w_qkv.t(), out=qkv))
    rows["flashinfer fused_add_rmsnorm"] = host_us(lambda: flashinfer.norm.fused_add_rmsnorm(x, res, norm_w, 1e-6))
    rows["flashinfer rmsnorm"] = host_us(lambda: flashinfer.norm.rmsnorm(x, norm_w, 1e-6))
    rows["triton qk_rope_cache"] = host_us(lambda: qk_rope_cache(qkv, pos, cos_sin, hd_w, hd_w, 1e-6, cache, blocks,
                                                                 offsets, hq, hkv))
    rows["triton silu_and_mul"] = host_us(lambda: silu_and_mul(gu))
    rows["flashinfer prefill run"] = host_us(lambda: pre.run(q, cache))
    rows["flashinfer prefill run out="] = host_us(lambda: pre.run(q, cache, out=out))
    torch.backends.cuda.preferred_blas_library("cublaslt")
    rows["F.linear (cublaslt) 128x4096 -> 6144"] = host_us(lambda: F.linear(x, w_qkv))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        F.linear(x, w_qkv)
    rows["CUDAGraph.replay (1 kernel)"] = host_us(g.replay)
    for name, us in rows.items():
        print(f"{name:40s} {us:8.1f} us")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
