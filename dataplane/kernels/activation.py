"""SwiGLU's activation in one pass: out = silu(gate) * up from the fused gate/up projection.

torch ran silu and the product as two non-vectorised kernels over strided halves; this reads the
[T, 2I] projection once and writes [T, I]. It must not change the maths beyond bf16 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + t * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # like torch: silu in float32, rounded to the input dtype, then the product rounded again
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + t * inter + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2I] (gate then up) -> silu(gate) * up, [T, I]."""
    t, width = x.shape
    if width % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul: expected [T, 2I] with unit column stride, got {tuple(x.shape)}")
    inter = width // 2
    out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    if t:
        _silu_and_mul_kernel[(t, triton.cdiv(inter, BLOCK))](x, out, x.stride(0), inter, BLOCK=BLOCK)
    return out
