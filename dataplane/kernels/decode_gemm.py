"""Decode-step projections with their neighbours folded in: a GEMM for a few rows (M <= 64) that also
does the RMSNorm before it, SwiGLU's activation before it, or the residual add after it.

A decode step's projections are bound by their weight reads, and at M = 16 the small kernels between
them (two add+RMSNorms and the activation, ~3 us each, a third of a layer's non-GEMM time on an
H200: `benchmarks/results/decode-profile-h200.md`) cost as much as the GEMMs lose to the floor.
Here each is folded into a GEMM whose loop reads the operand anyway:

- `norm_gemm`: rmsnorm(x; g) @ W^T as ((x * g) @ W^T) * rsqrt(mean(x^2) + eps); the row scale
  factors out of the dot product, so the sum of squares accumulates in the same loop over K.
- `act_gemm`: (silu(gate) * up) @ W^T with the activation computed as the A tiles load.
- the `residual` argument of both plain and activation GEMMs: residual += x @ W^T, in place (the
  layer's residual stream), rounded as the unfused path rounds (the GEMM's output to the
  activation dtype first).

K may be split across programs (a weight read spread over more SMs); the float32 partials are
summed by a second kernel, in a fixed order (deterministic, no atomics), which also applies the
norm's row scale or the residual add. Configs (tile width, K step, split) come from `config_for`.

Measured on an H100 (results/decode-gemm-h100.json, engine-decode-h100-default-fold64.json): correct
(relative error 3e-3 against the unfolded layer, bf16) but slower. With the configs of an earlier
table (from an H200 search of a plain GEMM) a layer's projections at M = 16 took 208 us folded against
155 us unfolded (floor 127); the fastest config of the H100 search for each projection, the table
below, adds up to ~182 us, still slower (not yet timed as a layer). Triton's GEMM with a norm or
SwiGLU prologue reaches 57-60% of the copy rate on QKV and down, where cuBLAS and the small kernels
together reach 82%. So `decode_gemm_rows` stays 0 (off); the folding pays only with a GEMM core that
keeps its weight stream at cuBLAS's rate while the prologue runs. Not for float16 (see
`models.fused.enable_decode_gemms`).

It must not change the maths beyond the rounding of bf16 operands, and must not synchronise the
host: every launch is graph-capturable. Triton is imported here only (CUDA, or its interpreter).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from shared.config import MAX_DECODE_GEMM_ROWS

MAX_ROWS = MAX_DECODE_GEMM_ROWS  # rows one program holds (a decode graph bucket of at most this many sequences)
_SUM_BLOCK = 1024
PLAIN, NORM, ACT = 0, 1, 2  # what the A operand's tiles go through as they load


class GemmConfig(NamedTuple):
    """Output columns per program, K per loop step, programs along K, Triton warps and stages."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4

    def fits(self, n: int, k: int) -> bool:
        return n % self.block_n == 0 and k % (self.block_k * self.split_k) == 0


@triton.jit
def _decode_gemm_kernel(x_ptr, w_ptr, g_ptr, out_ptr, ss_ptr, res_ptr, M, N, K, stride_x, eps,
                        K_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PROLOGUE: tl.constexpr, PARTIAL: tl.constexpr,
                        RESIDUAL: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * K_SPLIT + tl.arange(0, BLOCK_K)
    row_ok = (rm < M)[:, None]
    x_ptrs = x_ptr + rm[:, None] * stride_x + rk[None, :]
    w_ptrs = w_ptr + rn[:, None] * K + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for i in range(K_SPLIT // BLOCK_K):
        if PROLOGUE == 2:  # silu(gate) * up, rounded as silu_and_mul rounds
            gate = tl.load(x_ptrs, mask=row_ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptrs + K, mask=row_ok, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(w_ptr.dtype.element_ty).to(tl.float32)
            a = (act * up).to(w_ptr.dtype.element_ty)
        elif PROLOGUE == 1:  # x * g now, the row's rsqrt once the sum of squares is complete
            x = tl.load(x_ptrs, mask=row_ok, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
            g = tl.load(g_ptr + pid_k * K_SPLIT + i * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.float32)
            a = (x * g[None, :]).to(w_ptr.dtype.element_ty)
        else:
            a = tl.load(x_ptrs, mask=row_ok, other=0.0)
        w = tl.load(w_ptrs)
        if DOT_F32:  # float32 weights (exact, not tf32), or Triton's interpreter (see _dot_f32)
            acc = tl.dot(a.to(tl.float32), tl.trans(w).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if PARTIAL:  # float32 partials [split, M, N] (and the norm's [split, M] sums of squares)
        tl.store(out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=row_ok)
        if PROLOGUE == 1:
            if pid_n == 0:  # every column tile has the same sums: one writes them
                tl.store(ss_ptr + pid_k * M + rm, ss, mask=rm < M)
    else:
        if PROLOGUE == 1:
            acc = acc * tl.rsqrt(ss / K + eps)[:, None]
        y = acc.to(w_ptr.dtype.element_ty)
        if RESIDUAL:
            dst = res_ptr + rm[:, None] * N + rn[None, :]
            r = tl.load(dst, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(dst, (y.to(tl.float32) + r).to(res_ptr.dtype.element_ty), mask=row_ok)
        else:
            tl.store(out_ptr + rm[:, None] * N + rn[None, :], y, mask=row_ok)


@triton.jit
def _split_sum_kernel(part_ptr, ss_ptr, out_ptr, M, N, K, eps, SPLIT: tl.constexpr, NORM: tl.constexpr,
                      RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    total = M * N
    ok = offs < total
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(part_ptr + s * total + offs, mask=ok, other=0.0)
    if NORM:
        row = offs // N
        ss = tl.load(ss_ptr + row, mask=ok, other=0.0)
        for s in tl.static_range(1, SPLIT):
            ss += tl.load(ss_ptr + s * M + row, mask=ok, other=0.0)
        acc = acc * tl.rsqrt(ss / K + eps)
    y = acc.to(out_ptr.dtype.element_ty)
    if RESIDUAL:  # out is the residual stream: out += y
        r = tl.load(out_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = (y.to(tl.float32) + r).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, y, mask=ok)


# Configs for Qwen3-8B / Llama-3-8B shapes, by (N, K) and the largest M they serve: the fastest of
# `benchmarks/decode_gemm.py --tune-rows 16,64` on an H100 (Triton 3.6; results/decode-gemm-h100.json),
# the Llama shapes by analogy. Other shapes take `_generic`.
_TABLE: dict[tuple[int, int], tuple[tuple[int, GemmConfig], ...]] = {
    (6144, 4096): ((16, GemmConfig(64, 128, 4)), (64, GemmConfig(64, 128, 2))),  # QKV
    (4096, 4096): ((64, GemmConfig(32, 256)),),  # O
    (24576, 4096): ((16, GemmConfig(64, 128)), (64, GemmConfig(64, 128, 2))),  # gate/up
    (28672, 4096): ((16, GemmConfig(64, 128)), (64, GemmConfig(64, 128, 2))),  # Llama-3-8B gate/up
    (4096, 12288): ((16, GemmConfig(64, 128, 4)), (64, GemmConfig(32, 128))),  # down
    (4096, 14336): ((16, GemmConfig(64, 128, 4)), (64, GemmConfig(32, 128))),  # Llama-3-8B down
}


def _generic(n: int, k: int, m: int, sms: int) -> GemmConfig | None:
    """The widest tile that gives ~1.4 programs per SM unsplit, else the least split that does."""
    for bk in (128, 64, 32, 16):
        if k % bk:
            continue
        for bn in (64, 32, 16):
            if n % bn == 0 and n // bn >= 1.4 * sms:
                return GemmConfig(bn, bk)
        bn = next((b for b in ((64, 32, 16) if m <= 16 else (32, 64, 16)) if n % b == 0), None)
        if bn is None:
            return None
        for split in (2, 4, 8):
            if k % (bk * split) == 0 and n // bn * split >= 1.4 * sms:
                return GemmConfig(bn, bk, split)
        return GemmConfig(bn, bk)
    return None


def config_for(n: int, k: int, m: int, sms: int) -> GemmConfig | None:
    """The config for an [M, K] x [N, K]^T product, or None where these kernels do not apply."""
    if not 0 < m <= MAX_ROWS:
        return None
    for rows, cfg in _TABLE.get((n, k), ()):
        if m <= rows and cfg.fits(n, k):
            return cfg
    return _generic(n, k, m, sms)


# Triton reads TRITON_INTERPRET once, when it is imported (above): so does this module
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _dot_f32(dtype: torch.dtype) -> bool:
    """Whether the dot runs on float32 operands: for float32 weights, and in Triton's CPU interpreter,
    whose tl.dot multiplies bf16 operands' raw bits (seen with Triton 3.9); products of bf16 values are
    exact in float32, so only the accumulation order differs from a GPU's."""
    return dtype == torch.float32 or _INTERPRETED


def _block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def _launch(x: Tensor, w: Tensor, k: int, cfg: GemmConfig, *, prologue: int, g: Tensor | None = None,
            eps: float = 0.0, residual: Tensor | None = None) -> Tensor:
    m, n = x.shape[0], w.shape[0]
    if w.shape[1] != k or not w.is_contiguous() or x.stride(1) != 1 or not 0 < m <= MAX_ROWS:
        raise ValueError(f"decode_gemm: x {tuple(x.shape)}, w {tuple(w.shape)} (need 1 <= M <= {MAX_ROWS}, "
                         "a contiguous weight, unit column strides)")
    if not cfg.fits(n, k):
        raise ValueError(f"decode_gemm: {cfg} does not tile N={n}, K={k}")
    if residual is not None and (residual.shape != (m, n) or not residual.is_contiguous()):
        raise ValueError(f"decode_gemm: residual {tuple(residual.shape)} is not a contiguous [{m}, {n}] tensor")
    split = cfg.split_k
    out = residual if residual is not None else torch.empty(m, n, dtype=w.dtype, device=x.device)
    part, ss = out, out  # unsplit: the kernel writes `out` (or `residual`) itself
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        ss = torch.empty(split, m, dtype=torch.float32, device=x.device) if prologue == NORM else part
    _decode_gemm_kernel[(n // cfg.block_n, split)](
        x, w, g if g is not None else w, part, ss, out, m, n, k, x.stride(0), eps,
        K_SPLIT=k // split, BLOCK_M=_block_m(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PROLOGUE=prologue,
        PARTIAL=split > 1, RESIDUAL=residual is not None, DOT_F32=_dot_f32(w.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        _split_sum_kernel[(triton.cdiv(m * n, _SUM_BLOCK),)](
            part, ss, out, m, n, k, eps, SPLIT=split, NORM=prologue == NORM, RESIDUAL=residual is not None,
            BLOCK=_SUM_BLOCK,
        )
    return out


def norm_gemm(x: Tensor, g: Tensor, eps: float, w: Tensor, cfg: GemmConfig) -> Tensor:
    """rmsnorm(x; g, eps) @ w^T: x [M, K], g [K], w [N, K] -> [M, N] in w's dtype."""
    if g.shape != (x.shape[1],):
        raise ValueError(f"norm_gemm: norm weight {tuple(g.shape)} for rows of {x.shape[1]}")
    return _launch(x, w, x.shape[1], cfg, prologue=NORM, g=g, eps=eps)


def gemm_residual(x: Tensor, w: Tensor, residual: Tensor, cfg: GemmConfig) -> Tensor:
    """residual += x @ w^T in place (x [M, K], w [N, K], residual [M, N]); returns residual."""
    return _launch(x, w, x.shape[1], cfg, prologue=PLAIN, residual=residual)


def act_gemm_residual(gate_up: Tensor, w: Tensor, residual: Tensor, cfg: GemmConfig) -> Tensor:
    """residual += (silu(gate) * up) @ w^T in place, gate_up [M, 2K] (gate then up), w [N, K]."""
    if gate_up.shape[1] % 2:
        raise ValueError(f"act_gemm_residual: gate_up {tuple(gate_up.shape)} is not [M, 2K]")
    return _launch(gate_up, w, gate_up.shape[1] // 2, cfg, prologue=ACT, residual=residual)
