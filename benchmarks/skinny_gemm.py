"""Does a hand-tuned Triton GEMM beat cuBLAS on the few rows of a decode step? (It does not, enough.)

A decode projection at M <= 128 rows is bound by its weight read. cuBLAS reaches 73-74% of the copy
rate on the QKV and O projections of Qwen3-8B in a decode step (`results/decode-profile-h200.md`),
so this tries a bandwidth-shaped kernel: y[M, N] = x[M, K] @ w[N, K]^T with the tile width (16-64
output columns), the K step, a split of K across programs (float32 partials summed by a second
kernel: deterministic, no atomics), warps and pipeline stages chosen per shape. For each fused
projection (QKV, O, gate/up, down) and each M, every config that tiles the weight exactly with one
to 16 programs per SM is checked against `F.linear` and timed inside a CUDA graph (no launch
overhead; `gemm_lib.graph_ms`), next to cuBLAS and the weight-read floor. Prints a table and writes
`<out>/skinny-gemm-<gpu>.json`, with the layer's GEMM time per M under cuBLAS and under the faster
of the two per projection.

H200 result (results/skinny-gemm-h200.json; -stages-warps.json tries more pipeline depths and
warps at M = 16 and 64): Triton wins only the O projection at M <= 16 and the down projection at
M = 1 and 64, about 1.4% of a decode step's GEMM time at M = 16 and 64 (4.7% at M = 1), so the data
plane keeps cuBLAS. GPU only.

    python benchmarks/skinny_gemm.py --out /tmp/out [--rows 1,16,64] [--stages 3,4,6] [--warps 4,8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import gpu_slug  # noqa: E402
from benchmarks.gemm_lib import copy_bandwidth, graph_ms, shapes  # noqa: E402
from dataplane.kernels.decode_gemm import GemmConfig  # noqa: E402  (the data plane's tile config)
from dataplane.models.presets import PRESETS  # noqa: E402


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, stride_x, stride_w, K_SPLIT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PARTIAL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * K_SPLIT + tl.arange(0, BLOCK_K)
    row_ok = rm < M
    x_ptrs = x_ptr + rm[:, None] * stride_x + rk[None, :]
    w_ptrs = w_ptr + rn[:, None] * stride_w + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(K_SPLIT // BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        w = tl.load(w_ptrs)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if PARTIAL:  # float32 partial sums of this program's K range: [split, M, N]
        dst = out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
        tl.store(dst, acc, mask=row_ok[:, None])
    else:
        dst = out_ptr + rm[:, None] * N + rn[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, total, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


MAX_ROWS = 128  # rows one program holds
_SUM_BLOCK = 1024


def block_m_for(m: int) -> int:
    """The row tile for M rows: a power of two, at least 16 (the smallest tensor-core tile)."""
    return max(16, triton.next_power_of_2(m))


def skinny_gemm(x: Tensor, w: Tensor, config: GemmConfig) -> Tensor:
    """x [M, K] @ w[N, K]^T -> [M, N] in x's dtype, for 1 <= M <= MAX_ROWS and a config that fits."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or not 0 < m <= MAX_ROWS or x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"skinny_gemm: x {tuple(x.shape)} and w {tuple(w.shape)} (need 1 <= M <= {MAX_ROWS}, "
                         "unit column strides)")
    if not config.fits(n, k):
        raise ValueError(f"skinny_gemm: {config} does not tile N={n}, K={k}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = config.split_k
    grid = (n // config.block_n, split)
    dst = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    _skinny_gemm_kernel[grid](x, w, dst, m, n, x.stride(0), w.stride(0), K_SPLIT=k // split,
                              BLOCK_M=block_m_for(m), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                              PARTIAL=split > 1, num_warps=config.num_warps, num_stages=config.num_stages)
    if split > 1:
        total = m * n
        _split_sum_kernel[(triton.cdiv(total, _SUM_BLOCK),)](dst, out, total, SPLIT=split, BLOCK=_SUM_BLOCK)
    return out


DECODE_GEMMS = ("qkv", "o", "gate_up", "down")


def candidates(n: int, k: int, sms: int, stages: tuple[int, ...], warps: tuple[int, ...]) -> list[GemmConfig]:
    """Configs that tile (N, K) exactly with between one and ~16 programs per SM."""
    out = []
    for bn, bk, split, wp, st in itertools.product((16, 32, 64), (128, 256), (1, 2, 4), warps, stages):
        cfg = GemmConfig(bn, bk, split, wp, st)
        programs = n // bn * split if cfg.fits(n, k) else 0
        if sms <= programs <= 16 * sms:
            out.append(cfg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--rows", default="1,16,32,64,128", help="row counts M to tune (powers of two: tiles)")
    p.add_argument("--stages", default="4", help="Triton pipeline stages to try")
    p.add_argument("--warps", default="4", help="Triton warps per program to try")
    p.add_argument("--min-gain", type=float, default=0.03, help="keep Triton only when this much faster")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    device = torch.device("cuda")
    cfg = PRESETS[args.model]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    stages = tuple(int(s) for s in args.stages.split(","))
    warps = tuple(int(s) for s in args.warps.split(","))
    bw = copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, {sms} SMs", flush=True)
    rows: list[dict[str, object]] = []
    t0 = time.monotonic()
    for name in DECODE_GEMMS:
        n, k = shapes(cfg)[name]
        w = torch.randn(n, k, dtype=torch.bfloat16, device=device) * 0.02
        floor_ms = n * k * 2 / bw * 1000
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            ref = F.linear(x, w).float()
            cublas_ms = graph_ms(lambda x=x, w=w: F.linear(x, w), device)
            tried = []
            for c in candidates(n, k, sms, stages, warps):
                try:
                    err = float((skinny_gemm(x, w, c).float() - ref).abs().max() / ref.abs().max())
                except Exception as e:  # noqa: BLE001 - e.g. Triton's OutOfResources: too much shared memory
                    print(f"  {name} M={m} {c}: {type(e).__name__}", flush=True)
                    continue
                if err > 1e-2:
                    print(f"  {name} M={m} {c}: wrong (relative error {err:.2e})", flush=True)
                    continue
                tried.append((graph_ms(lambda x=x, w=w, c=c: skinny_gemm(x, w, c), device), c))
            best_ms, best = min(tried, key=lambda t: t[0]) if tried else (float("inf"), None)
            keep = best is not None and best_ms <= cublas_ms * (1 - args.min_gain)
            rows.append({"gemm": name, "n": n, "k": k, "m": m, "floor_ms": floor_ms, "cublas_ms": cublas_ms,
                         "cublas_ratio": cublas_ms / floor_ms, "triton_ms": best_ms, "triton_ratio": best_ms / floor_ms,
                         "triton_config": best._asdict() if best else None, "configs_tried": len(tried),
                         "chosen": "triton" if keep else "cublas"})
            print(f"{name:8s} M={m:<4d} floor {floor_ms * 1e3:6.1f} us  cublas {cublas_ms * 1e3:6.1f} "
                  f"({cublas_ms / floor_ms:.2f}x)  triton {best_ms * 1e3:6.1f} ({best_ms / floor_ms:.2f}x) {best}  "
                  f"-> {'triton' if keep else 'cublas'}  [{time.monotonic() - t0:.0f} s]", flush=True)
        del w
    totals = {}
    for m in sorted({int(r["m"]) for r in rows}):  # type: ignore[call-overload]
        sel = [r for r in rows if r["m"] == m]
        layer = {key: sum(float(r[key]) for r in sel) for key in ("floor_ms", "cublas_ms")}  # type: ignore[arg-type]
        layer["chosen_ms"] = sum(min(float(r["cublas_ms"]), float(r["triton_ms"])) if r["chosen"] == "triton"  # type: ignore[arg-type]
                                 else float(r["cublas_ms"]) for r in sel)  # type: ignore[arg-type]
        totals[f"m{m}"] = {key: v * cfg.num_layers for key, v in layer.items()}
        t = totals[f"m{m}"]
        print(f"layers' GEMMs M={m}: cublas {t['cublas_ms']:.2f} ms, chosen {t['chosen_ms']:.2f} ms, "
              f"floor {t['floor_ms']:.2f} ms ({t['cublas_ms'] / t['floor_ms']:.2f}x -> "
              f"{t['chosen_ms'] / t['floor_ms']:.2f}x)", flush=True)
    gpu = torch.cuda.get_device_name(device)
    meta = {"device": gpu, "torch": torch.__version__, "triton": triton.__version__, "model": args.model}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"skinny-gemm-{gpu_slug(device)}.json"
    path.write_text(json.dumps({**meta, "copy_bytes_per_s": bw, "rows": rows, "layer_totals": totals}, indent=1) + "\n")
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
