"""SwiGLU's activation in one pass: out = silu(gate) * up from the fused gate/up projection.

torch ran silu and the product as two non-vectorised kernels over strided halves; this reads the
[T, 2I] projection once and writes [T, I]. Given the residual rows the projection read (`row_scale`),
gate and up are first scaled by each row's RMSNorm scale: the post-attention norm, its weight folded into
the projection (`dataplane/kernels/row_scale.py`). It must not change the maths beyond bf16 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dataplane.kernels.row_scale import row_rsqrt, row_scale_args

BLOCK = 1024
# with a row scale each program reads its row's residual: past this many rows a program takes 4x the
# columns, so a step of 256 rows re-reads 3 residual rows a token from L2 (Qwen3-8B), not 12
SCALED_WIDE_ROWS = 64


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, inter, res_ptr, res_stride, eps, BLOCK: tl.constexpr,
                         ROW_SCALE: tl.constexpr, HIDDEN: tl.constexpr, RES_BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + t * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if ROW_SCALE:  # the projection of the normalised row, rounded as the projection's output is
        r = row_rsqrt(res_ptr + t * res_stride, eps, HIDDEN, RES_BLOCK)
        gate = (gate * r).to(out_ptr.dtype.element_ty).to(tl.float32)
        up = (up * r).to(out_ptr.dtype.element_ty).to(tl.float32)
    # like torch: silu in float32, rounded to the input dtype, then the product rounded again
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * inter + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: Tensor, row_scale: tuple[Tensor, float] | None = None) -> Tensor:
    """x [T, 2I] (gate then up) -> silu(gate) * up, [T, I].

    row_scale (residual [T, hidden], eps): gate and up are first multiplied by rsqrt(mean(residual[i]^2)
    + eps), token i's RMSNorm scale."""
    t, width = x.shape
    if width % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul: expected [T, 2I] with unit column stride, got {tuple(x.shape)}")
    residual, eps, hidden, res_block = row_scale_args(row_scale, t, x, "silu_and_mul")
    inter = width // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    block = 4 * BLOCK if row_scale is not None and t > SCALED_WIDE_ROWS else BLOCK
    if t:
        _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](
            x, out, x.stride(0), inter, residual, residual.stride(0), eps, BLOCK=block,
            ROW_SCALE=row_scale is not None, HIDDEN=hidden, RES_BLOCK=res_block)
    return out
