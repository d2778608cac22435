"""Dense decoder-only transformer covering Qwen3 and Llama-3: GQA, RoPE (incl. llama3 scaling),
RMSNorm, SwiGLU, optional per-head q/k RMSNorm, optional attention bias, optional tied embeddings.

Parameter names equal Hugging Face's so a checkpoint's state dict loads directly. The model runs
over a flattened varlen batch; where each token's keys live is the attention backend's business.
This module must not import transformers, must not read files (see `loader`), and must stay
friendly to CUDA graphs: no Python branching on tensor values, no `.item()`, no host syncs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataplane.attention.base import AttentionBackend
from dataplane.models.config import ModelConfig


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32 like Hugging Face."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with llama3 or linear scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds a `[max_position_embeddings, head_dim]` cache: cos in the first half, sin in the second."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        half = cfg.head_dim // 2
        self.register_buffer("cos_sin_cache", torch.empty(cfg.max_position_embeddings, 2 * half),
                             persistent=False)
        if self.cos_sin_cache.device.type != "meta":
            self.reset_cache()

    @torch.no_grad()
    def reset_cache(self) -> None:
        """(Re)compute the cache in float32 on its device, then store it in the buffer's dtype."""
        device = self.cos_sin_cache.device
        inv_freq = rope_inv_freq(self.cfg).to(device)
        pos = torch.arange(self.cfg.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        self.cos_sin_cache.copy_(torch.cat([freqs.cos(), freqs.sin()], dim=-1))

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for `positions` [T], each [T, 1, head_dim / 2] in `dtype` (gathered once per step)."""
        cos, sin = self.cos_sin_cache[positions].to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rope(x: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate x [T, heads, d] by per-token angles (rotate-half convention, as in Hugging Face)."""
    cos, sin = cos_sin
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SelfAttention(nn.Module):
    """GQA attention block: q/k/v projections, optional q/k norm, RoPE, backend, o_proj."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_q_heads, self.num_kv_heads, self.head_dim = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.q_size, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=bias)
        self.q_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos_sin: tuple[Tensor, Tensor], attention: AttentionBackend,
                kv_cache: Tensor) -> Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_q_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)
        o = attention.forward(self.layer_idx, q, k, v, kv_cache)
        return self.o_proj(o.reshape(t, self.num_q_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos_sin: tuple[Tensor, Tensor], attention: AttentionBackend,
                kv_cache: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, attention, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DenseModel(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)


class DenseForCausalLM(nn.Module):
    """Qwen3 / Llama-3 causal LM over a flattened varlen batch with a paged KV cache.

    The caller runs `attention.begin_step(batch, device)` before `forward`, then picks the rows
    that need logits and calls `compute_logits` on them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DenseModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.fused: Any = None  # set by dataplane.models.fused.enable_fused_path on CUDA

    def tie_weights(self) -> None:
        """Share `lm_head.weight` with the embeddings when the config ties them."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend,
                kv_caches: list[Tensor]) -> Tensor:
        """input_ids, positions: [T] long. Returns the final-normed hidden states [T, hidden]."""
        if self.fused is not None:
            return self.fused.forward(self, input_ids, positions, attention, kv_caches)
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.model.rotary_emb(positions, x.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, cos_sin, attention, kv_cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, hidden] (from `forward`) -> logits [N, vocab] in float32."""
        return self.lm_head(hidden).float()
