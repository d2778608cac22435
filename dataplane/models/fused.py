"""The CUDA fast path of the dense model: fused QKV and gate/up projections, flashinfer's fused
RMSNorm and add+RMSNorm, and (with Triton) one kernel for q/k-norm + RoPE + the KV-cache write and one
for SwiGLU's activation: about 9 kernels a layer instead of ~50. Without Triton, flashinfer's
in-place RoPE and torch ops stand in.

`enable_fused_path(model)` rewires a loaded model in place; the reference path in `dense` stays the
definition the fast path is tested against. flashinfer is imported here only, on CUDA only. This
module must not change what the model computes beyond bf16 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataplane.attention.base import AttentionBackend
from dataplane.models.dense import DenseForCausalLM, DecoderLayer, rope_inv_freq


class FusedKernels:
    def __init__(self, model: DenseForCausalLM, device: torch.device) -> None:
        import flashinfer  # lazy: CUDA only

        self.fi = flashinfer
        cfg = model.cfg
        inv_freq = rope_inv_freq(cfg).to(device)
        pos = torch.arange(cfg.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()  # float32, as flashinfer wants
        self.head_dim = cfg.head_dim
        self.triton = _triton_kernels()

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return self.fi.norm.rmsnorm(x, weight, eps)

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """residual += x; x = rmsnorm(residual) — both in place; returns (x, residual)."""
        self.fi.norm.fused_add_rmsnorm(x, residual, weight, eps)
        return x, residual

    def forward(self, model: DenseForCausalLM, input_ids: Tensor, positions: Tensor, attention: AttentionBackend,
                kv_caches: list[Tensor]) -> Tensor:
        return fused_forward(model, input_ids, positions, attention, kv_caches)

    def rope(self, positions: Tensor, q: Tensor, k: Tensor) -> None:
        self.fi.rope.apply_rope_with_cos_sin_cache_inplace(
            positions, q.view(q.shape[0], -1), k.view(k.shape[0], -1), self.head_dim, self.cos_sin, is_neox=True
        )


def _triton_kernels() -> tuple | None:
    """(qk_rope_cache, silu_and_mul) when Triton is importable, else None (flashinfer/torch path)."""
    try:
        from dataplane.kernels.activation import silu_and_mul
        from dataplane.kernels.qk_rope_cache import qk_rope_cache
    except ImportError:
        return None
    return qk_rope_cache, silu_and_mul


def _fuse_linear(parts: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([p.weight.data for p in parts], dim=0)
    bias = torch.cat([p.bias.data for p in parts]) if parts[0].bias is not None else None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


def fuse_projections(model: DenseForCausalLM) -> None:
    """Concatenate q/k/v and gate/up weights into one projection each, freeing the parts."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = _fuse_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp.gate_up_proj = _fuse_linear([mlp.gate_proj, mlp.up_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj


def enable_fused_path(model: DenseForCausalLM, device: torch.device) -> None:
    """Fuse the projections and switch forward to fused kernels."""
    fuse_projections(model)
    torch.cuda.empty_cache()
    model.fused = FusedKernels(model, device)


def project_q(layer: DecoderLayer, h: Tensor, positions: Tensor, kernels: FusedKernels, kv_cache: Tensor,
              blocks: Tensor, offsets: Tensor, out: Tensor | None = None) -> Tensor:
    """The fused QKV projection, then one Triton kernel: q/k-norm, RoPE, this step's K/V into the cache
    at (blocks, offsets). Returns q [T, hq, d] (in `out` when given). Needs `kernels.triton`."""
    attn = layer.self_attn
    norm = attn.q_norm is not None and attn.k_norm is not None
    return kernels.triton[0](attn.qkv_proj(h), positions, kernels.cos_sin, attn.q_norm.weight if norm else None,
                             attn.k_norm.weight if norm else None, attn.q_norm.eps if norm else 0.0, kv_cache,
                             blocks, offsets, attn.num_q_heads, attn.num_kv_heads, out=out)


def after_attention(layer: DecoderLayer, o: Tensor, residual: Tensor, kernels: FusedKernels) -> Tensor:
    """The rest of the layer from its attention output o [T, hq, d]: the O projection, the residual add
    with the post-attention norm (residual updated in place), the MLP. Returns the layer's output."""
    attn = layer.self_attn
    h = attn.o_proj(o.reshape(o.shape[0], attn.num_q_heads * attn.head_dim))
    post = layer.post_attention_layernorm
    h, _ = kernels.add_rms_norm(h, residual, post.weight, post.eps)
    return _mlp(layer, h, kernels)


def _attention(layer: DecoderLayer, h: Tensor, positions: Tensor, kernels: FusedKernels,
               attention: AttentionBackend, kv_cache: Tensor) -> Tensor:
    """The attention output [T, hq, d]."""
    attn = layer.self_attn
    t, d = h.shape[0], attn.head_dim
    slots = attention.kv_slots() if kernels.triton is not None else None
    if slots is not None:
        return attention.attend(attn.layer_idx, project_q(layer, h, positions, kernels, kv_cache, *slots), kv_cache)
    q_size, kv_size = attn.num_q_heads * d, attn.num_kv_heads * d
    q, k, v = attn.qkv_proj(h).split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(t, attn.num_q_heads, d)
    k = k.reshape(t, attn.num_kv_heads, d)
    if attn.q_norm is not None and attn.k_norm is not None:
        q = kernels.rms_norm(q.reshape(-1, d), attn.q_norm.weight, attn.q_norm.eps).view(t, -1, d)
        k = kernels.rms_norm(k.reshape(-1, d), attn.k_norm.weight, attn.k_norm.eps).view(t, -1, d)
    kernels.rope(positions, q, k)
    return attention.forward(attn.layer_idx, q, k, v.reshape(t, attn.num_kv_heads, d), kv_cache)


def _mlp(layer: DecoderLayer, h: Tensor, kernels: FusedKernels) -> Tensor:
    gate_up = layer.mlp.gate_up_proj(h)
    if kernels.triton is not None:
        return layer.mlp.down_proj(kernels.triton[1](gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    return layer.mlp.down_proj(F.silu(gate) * up)


def fused_forward(model: DenseForCausalLM, input_ids: Tensor, positions: Tensor, attention: AttentionBackend,
                  kv_caches: list[Tensor]) -> Tensor:
    """Same function as DenseForCausalLM's reference forward, with fused kernels and residual stream."""
    kernels: FusedKernels = model.fused
    layers = model.model.layers
    residual = model.model.embed_tokens(input_ids)
    first = layers[0].input_layernorm
    h = kernels.rms_norm(residual, first.weight, first.eps)
    for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True)):
        if i > 0:
            h, residual = kernels.add_rms_norm(h, residual, layer.input_layernorm.weight, layer.input_layernorm.eps)
        h = after_attention(layer, _attention(layer, h, positions, kernels, attention, kv_cache), residual, kernels)
    norm = model.model.norm
    h, _ = kernels.add_rms_norm(h, residual, norm.weight, norm.eps)
    return h
