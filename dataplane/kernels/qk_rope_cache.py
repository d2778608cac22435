"""One kernel per layer for everything between the QKV projection and attention.

From the fused QKV projection's output it applies the optional per-head RMSNorm to q and k
(Qwen3), rotates q and k by RoPE (neox / rotate-half, float32 cos/sin cache), writes q to a
contiguous buffer and k, v straight into their paged-KV-cache slots. In torch that was seven or
more kernels (two reshape copies, two norms, rope, two scatters) a layer. Given the residual rows the
projection read (`row_scale`), it first scales q, k and v by each row's RMSNorm scale: the layer's input
norm, its weight folded into the projection (`dataplane/kernels/row_scale.py`).

It must not decide where tokens go: the slots come from the step's plan.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dataplane.kernels.row_scale import row_rsqrt, row_scale_args


@triton.jit
def _rope_heads(x1, x2, cos, sin):
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _qk_rope_cache_kernel(
    qkv_ptr, qkv_stride, pos_ptr, cos_sin_ptr, qw_ptr, kw_ptr, q_out_ptr, cache_ptr, block_ptr, offset_ptr, eps,
    res_ptr, res_stride, res_eps,
    HQ: tl.constexpr, HKV: tl.constexpr, HQ_P2: tl.constexpr, HKV_P2: tl.constexpr, D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, QK_NORM: tl.constexpr, ROW_SCALE: tl.constexpr, HIDDEN: tl.constexpr,
    RES_BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    half: tl.constexpr = D // 2
    j = tl.arange(0, half)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_sin_ptr + pos * D + j)[None, :]
    sin = tl.load(cos_sin_ptr + pos * D + half + j)[None, :]
    block = tl.load(block_ptr + t)
    offset = tl.load(offset_ptr + t)
    row = qkv_ptr + t * qkv_stride
    # keys of slot s: cache[block, 0, offset]; values: cache[block, 1, offset]
    k_dst = cache_ptr + ((block * 2) * BLOCK_SIZE + offset) * (HKV * D)
    v_dst = cache_ptr + ((block * 2 + 1) * BLOCK_SIZE + offset) * (HKV * D)

    if ROW_SCALE:  # the row's norm scale first, before q, k and v are live
        r = row_rsqrt(res_ptr + t * res_stride, res_eps, HIDDEN, RES_BLOCK)
    hq = tl.arange(0, HQ_P2)[:, None]
    mq = hq < HQ
    q1 = tl.load(row + hq * D + j[None, :], mask=mq, other=0.0).to(tl.float32)
    q2 = tl.load(row + hq * D + half + j[None, :], mask=mq, other=0.0).to(tl.float32)
    hk = tl.arange(0, HKV_P2)[:, None]
    mk = hk < HKV
    k1 = tl.load(row + (HQ + hk) * D + j[None, :], mask=mk, other=0.0).to(tl.float32)
    k2 = tl.load(row + (HQ + hk) * D + half + j[None, :], mask=mk, other=0.0).to(tl.float32)
    d = tl.arange(0, D)[None, :]
    v = tl.load(row + (HQ + HKV + hk) * D + d, mask=mk, other=0.0)
    if ROW_SCALE:
        # the projection of the normalised row, rounded to the activation dtype as the projection's output is
        act = q_out_ptr.dtype.element_ty
        q1 = (q1 * r).to(act).to(tl.float32)
        q2 = (q2 * r).to(act).to(tl.float32)
        k1 = (k1 * r).to(act).to(tl.float32)
        k2 = (k2 * r).to(act).to(tl.float32)
        v = (v.to(tl.float32) * r).to(act)
    if QK_NORM:
        qr = tl.rsqrt((tl.sum(q1 * q1, axis=1) + tl.sum(q2 * q2, axis=1)) / D + eps)[:, None]
        kr = tl.rsqrt((tl.sum(k1 * k1, axis=1) + tl.sum(k2 * k2, axis=1)) / D + eps)[:, None]
        qw1 = tl.load(qw_ptr + j).to(tl.float32)[None, :]
        qw2 = tl.load(qw_ptr + half + j).to(tl.float32)[None, :]
        kw1 = tl.load(kw_ptr + j).to(tl.float32)[None, :]
        kw2 = tl.load(kw_ptr + half + j).to(tl.float32)[None, :]
        # like the reference: normalise in float32, round to the activation dtype, then scale
        q1 = (q1 * qr).to(q_out_ptr.dtype.element_ty).to(tl.float32) * qw1
        q2 = (q2 * qr).to(q_out_ptr.dtype.element_ty).to(tl.float32) * qw2
        k1 = (k1 * kr).to(q_out_ptr.dtype.element_ty).to(tl.float32) * kw1
        k2 = (k2 * kr).to(q_out_ptr.dtype.element_ty).to(tl.float32) * kw2
    q1, q2 = _rope_heads(q1, q2, cos, sin)
    k1, k2 = _rope_heads(k1, k2, cos, sin)
    q_dst = q_out_ptr + t * (HQ * D)
    tl.store(q_dst + hq * D + j[None, :], q1.to(q_out_ptr.dtype.element_ty), mask=mq)
    tl.store(q_dst + hq * D + half + j[None, :], q2.to(q_out_ptr.dtype.element_ty), mask=mq)
    tl.store(k_dst + hk * D + j[None, :], k1.to(cache_ptr.dtype.element_ty), mask=mk)
    tl.store(k_dst + hk * D + half + j[None, :], k2.to(cache_ptr.dtype.element_ty), mask=mk)
    tl.store(v_dst + hk * D + d, v.to(cache_ptr.dtype.element_ty), mask=mk)


def qk_rope_cache(qkv: Tensor, positions: Tensor, cos_sin: Tensor, q_norm: Tensor | None, k_norm: Tensor | None,
                  eps: float, kv_cache: Tensor, blocks: Tensor, offsets: Tensor, num_q_heads: int,
                  num_kv_heads: int, out: Tensor | None = None, row_scale: tuple[Tensor, float] | None = None) -> Tensor:
    """qkv [T, (hq + 2 hkv) d] -> q [T, hq, d] (normed, rotated; written to `out` when given, a
    contiguous [T, hq, d] tensor of qkv's dtype); k, v written to the cache.

    row_scale (residual [T, hidden], eps): q, k and v are first multiplied by rsqrt(mean(residual[i]^2)
    + eps), token i's RMSNorm scale (qkv is then the projection of the un-normalised residual by weights
    with the norm's weight folded in).

    Token i's keys go to kv_cache[blocks[i], 0, offsets[i]], its values to [blocks[i], 1, offsets[i]].
    kv_cache: [num_blocks, 2, block_size, hkv, d] contiguous; cos_sin: [max_pos, d] float32 with cos
    in the first half; positions, blocks, offsets: [T] integer tensors on the same device.
    """
    t, width = qkv.shape
    _, two, block_size, hkv, d = kv_cache.shape
    if two != 2 or hkv != num_kv_heads or width != (num_q_heads + 2 * num_kv_heads) * d or qkv.stride(1) != 1:
        raise ValueError(f"qk_rope_cache: qkv {tuple(qkv.shape)} does not match the cache {tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous() or cos_sin.shape[1] != d or cos_sin.dtype != torch.float32:
        raise ValueError("qk_rope_cache: kv_cache must be contiguous and cos_sin float32 [max_pos, head_dim]")
    if out is None:
        q = torch.empty(t, num_q_heads, d, dtype=qkv.dtype, device=qkv.device)
    elif out.shape != (t, num_q_heads, d) or out.dtype != qkv.dtype or not out.is_contiguous():
        raise ValueError(f"qk_rope_cache: out {tuple(out.shape)} {out.dtype} is not a contiguous "
                         f"[{t}, {num_q_heads}, {d}] {qkv.dtype} tensor")
    else:
        q = out
    residual, res_eps, hidden, res_block = row_scale_args(row_scale, t, qkv, "qk_rope_cache")
    if t == 0:
        return q
    norm = q_norm is not None and k_norm is not None
    _qk_rope_cache_kernel[(t,)](
        qkv, qkv.stride(0), positions, cos_sin, q_norm if norm else qkv, k_norm if norm else qkv, q, kv_cache,
        blocks, offsets, eps, residual, residual.stride(0), res_eps, HQ=num_q_heads, HKV=num_kv_heads,
        HQ_P2=triton.next_power_of_2(num_q_heads), HKV_P2=triton.next_power_of_2(num_kv_heads), D=d,
        BLOCK_SIZE=block_size, QK_NORM=norm, ROW_SCALE=row_scale is not None, HIDDEN=hidden,
        RES_BLOCK=res_block,
    )
    return q
