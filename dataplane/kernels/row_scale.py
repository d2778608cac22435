"""The RMSNorm row scale, rsqrt(mean(x^2) + eps) of one row, as a Triton device function.

With the norm weights folded into the next projection's columns (`dataplane/models/fused.py`,
`epilogue_norm_rows`), a projection of the un-normalised residual times this scale is the projection
of the normalised one, so the kernel after the projection (q/k-norm + RoPE + KV write, SwiGLU) applies
the norm and no norm kernel runs. This module must not read more than the one row it is given.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def row_rsqrt(row_ptr, eps, HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
    """rsqrt(mean(row[:HIDDEN]^2) + eps) in float32, the row read in chunks of BLOCK."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.static_range(0, HIDDEN, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < HIDDEN, other=0.0).to(tl.float32)
        acc += x * x
    return tl.rsqrt(tl.sum(acc, axis=0) / HIDDEN + eps)


def row_block(hidden: int) -> int:
    """The chunk `row_rsqrt` reads a row in: the row itself up to 1024 columns."""
    return min(1024, triton.next_power_of_2(hidden))


def row_scale_args(row_scale: tuple[Tensor, float] | None, rows: int, unused: Tensor,
                   kernel: str) -> tuple[Tensor, float, int, int]:
    """A kernel's (residual, eps, HIDDEN, RES_BLOCK) arguments for `row_scale` (residual [rows, hidden], eps),
    checked; without one, `unused` stands in for the pointer the kernel then never reads."""
    if row_scale is None:
        return unused, 0.0, 1, 1
    residual, eps = row_scale
    if residual.dim() != 2 or residual.shape[0] != rows or residual.stride(1) != 1:
        raise ValueError(f"{kernel}: the row scale's residual {tuple(residual.shape)} is not [{rows}, hidden] "
                         "with unit column stride")
    return residual, eps, residual.shape[1], row_block(residual.shape[1])
