"""The CUDA fast path of the dense model: fused QKV and gate/up projections, flashinfer's fused
RMSNorm and add+RMSNorm, and (with Triton) one kernel for q/k-norm + RoPE + the KV-cache write and one
for SwiGLU's activation: about 9 kernels a layer instead of ~50. Without Triton, flashinfer's
in-place RoPE and torch ops stand in. Passes of at most `decode_gemm_rows` tokens (decode graphs)
may instead fold the norms, the activation and the residual adds into the projections
(`dataplane/kernels/decode_gemm.py`): 6 kernels a layer plus a reduce per projection whose K is split,
where the unfolded path runs 9 plus cuBLAS's split-K reduces. Slower on an H100: off by default.
With `epilogue_norm_rows` the input and post-attention norms' weights are folded into the QKV and
gate/up projections' columns at load (`enable_epilogue_norms`); passes of at most that many tokens then
run no norm kernel in a layer: the projections read the residual itself, the q/k-norm + RoPE + KV-write
kernel and SwiGLU's kernel apply each row's norm scale, and the O and down projections add into the
residual inside cuBLAS (beta=1): 7 kernels a layer instead of 9. Longer passes keep their norm kernels,
scaling by ones, and so do the prefill pieces of more tokens (a piece of at most that many runs them as
an eager pass of as many tokens does). 0.9-2% faster a decode step on an H100; on by default (256 rows)
since the whole GPU suite passed with it.
While `FusedKernels.prefetch` is set (whole-GPU decode graph capture with `decode_l2_prefetch_kib`), the
unfolded path forks an L2 prefetch of the next projection's weights around three small kernels a layer
(`dataplane/kernels/l2_prefetch.py`; one, before down, on passes with their norms in the epilogues):
timing only.

`enable_fused_path(model)` rewires a loaded model in place; the reference path in `dense` stays the
definition the fast path is tested against. flashinfer is imported here only, on CUDA only. This
module must not change what the model computes beyond bf16 rounding.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dataplane.attention.base import AttentionBackend
from dataplane.kernels.l2_prefetch import L2Prefetch, prefetching
from dataplane.models.dense import DenseForCausalLM, DecoderLayer, RMSNorm, rope_inv_freq

log = logging.getLogger(__name__)


class FusedKernels:
    decode_gemms: DecodeGemms | None = None  # the folded projections of short passes (enable_decode_gemms)
    # set only while a whole-GPU decode graph is captured (`DecodeGraphs`): the norm before QKV, the norm
    # before gate/up and SwiGLU before down run beside a prefetch of that projection's first weights into
    # L2 (timing only; the folded decode GEMMs' passes do not prefetch, passes with their norms in the
    # epilogues prefetch before down only)
    prefetch: L2Prefetch | None = None
    # set by `enable_epilogue_norms`: the input and post-attention norms' weights live in the QKV and gate/up
    # projections' columns, so the fused path's norm kernels for them scale by these ones; passes of at most
    # `epilogue_norm_rows` tokens run those norms inside the kernels after the projections instead
    unit_norm: Tensor | None = None
    epilogue_norm_rows: int = 0

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


def enable_fused_path(model: DenseForCausalLM, device: torch.device, decode_gemm_rows: int = 0,
                      epilogue_norm_rows: int = 0) -> None:
    """Fuse the projections and switch forward to fused kernels (passes of at most
    `decode_gemm_rows` tokens through the folded decode GEMMs, where their shapes allow; passes of at
    most `epilogue_norm_rows` tokens with their norms in the kernels after the projections)."""
    fuse_projections(model)
    torch.cuda.empty_cache()
    model.fused = FusedKernels(model, device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    enable_decode_gemms(model, decode_gemm_rows, sms)
    enable_epilogue_norms(model, epilogue_norm_rows)


def enable_epilogue_norms(model: DenseForCausalLM, max_rows: int) -> None:
    """Fold each layer's input and post-attention norm weights into its QKV and gate/up projections (in
    place: the model's reference forward no longer computes the same function) and let passes of at most
    `max_rows` tokens run those norms in the kernels after the projections (0: neither). Needs the fused
    path with Triton, projections without bias (a bias is added after the norm's scale), bf16 or float32
    weights (the projection of the un-normalised residual can pass float16's range where the normalised
    one stays within it) and the folded decode GEMMs off (they fold the norms their own way)."""
    kernels: FusedKernels = model.fused
    if max_rows <= 0:
        return
    if kernels.decode_gemms is not None:  # they fold the norms their own way
        log.info("epilogue_norm_rows=%d: the folded decode GEMMs (decode_gemm_rows) take precedence", max_rows)
        return
    if kernels.unit_norm is not None:
        raise RuntimeError("the norm weights are already folded into the projections")
    layers = model.model.layers
    biased = any(lin.bias is not None for layer in layers for lin in (
        layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))
    attn = layers[0].self_attn
    if kernels.triton is None or biased or attn.qkv_proj.weight.dtype == torch.float16:
        log.info("epilogue_norm_rows=%d: the norms in the projections' epilogues need Triton, projections "
                    "without bias and bf16 or float32 weights; the norms stay kernels of their own", max_rows)
        return
    for layer in layers:
        layer.self_attn.qkv_proj.weight.mul_(layer.input_layernorm.weight)
        layer.mlp.gate_up_proj.weight.mul_(layer.post_attention_layernorm.weight)
    kernels.unit_norm = torch.ones_like(layers[0].input_layernorm.weight)
    kernels.epilogue_norm_rows = max_rows


def layer_norm_weight(kernels: FusedKernels, norm: RMSNorm) -> Tensor:
    """The weight a layer's input or post-attention norm kernel scales by: ones once the norm weights
    are folded into the projections (`enable_epilogue_norms`)."""
    return norm.weight if kernels.unit_norm is None else kernels.unit_norm


class DecodeGemms:
    """The folded projections' configs per row count (`decode_gemm.config_for`), for passes of at
    most `max_rows` tokens. A row count with no config for one of the four projections keeps the
    unfolded path."""

    def __init__(self, model: DenseForCausalLM, max_rows: int, sms: int) -> None:
        from dataplane.kernels import decode_gemm

        self.kernels = decode_gemm
        self.max_rows = min(max_rows, decode_gemm.MAX_ROWS)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        self._shapes = [tuple(lin.weight.shape) for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj)]
        self._shapes.append(tuple(mlp.down_proj.weight.shape))
        self._sms = sms
        self._configs: dict[int, tuple | None] = {}

    def configs(self, rows: int) -> tuple | None:
        """(qkv, o, gate_up, down) configs for a pass of `rows` tokens, or None: the unfolded path."""
        if rows not in self._configs:
            cfgs = tuple(self.kernels.config_for(n, k, rows, self._sms) for n, k in self._shapes)
            self._configs[rows] = cfgs if rows <= self.max_rows and all(c is not None for c in cfgs) else None
        return self._configs[rows]


def enable_decode_gemms(model: DenseForCausalLM, max_rows: int, sms: int) -> None:
    """Fold norms, activation and residual adds into the projections of passes of at most `max_rows`
    tokens (0: never). Needs the fused path with Triton, projections without bias, and bf16 or float32
    weights: the folded norm rounds x * g before it scales the row, which can pass float16's range
    where the unfolded norm stays within it."""
    kernels: FusedKernels = model.fused
    if max_rows > 0 and kernels.unit_norm is not None:
        raise RuntimeError("the norm weights are folded into the projections (epilogue_norm_rows); the folded "
                           "decode GEMMs would apply them twice")
    attn = model.model.layers[0].self_attn
    unsupported = attn.qkv_proj.bias is not None or attn.o_proj.bias is not None
    if max_rows <= 0 or kernels.triton is None or unsupported or attn.qkv_proj.weight.dtype == torch.float16:
        if max_rows > 0:
            log.warning("decode_gemm_rows=%d: the folded decode GEMMs need Triton, projections without bias "
                        "and bf16 weights; decode keeps the unfolded path", max_rows)
        kernels.decode_gemms = None
        return
    kernels.decode_gemms = DecodeGemms(model, max_rows, sms)


def project_q(layer: DecoderLayer, h: Tensor, positions: Tensor, kernels: FusedKernels, kv_cache: Tensor,
              blocks: Tensor, offsets: Tensor, out: Tensor | None = None) -> Tensor:  # h: normalised
    """The fused QKV projection, then one Triton kernel: q/k-norm, RoPE, this step's K/V into the cache
    at (blocks, offsets). Returns q [T, hq, d] (in `out` when given). Needs `kernels.triton`."""
    return _rope_cache(layer, layer.self_attn.qkv_proj(h), positions, kernels, kv_cache, blocks, offsets, out)


def _rope_cache(layer: DecoderLayer, qkv: Tensor, positions: Tensor, kernels: FusedKernels, kv_cache: Tensor,
                blocks: Tensor, offsets: Tensor, out: Tensor | None = None,
                row_scale: tuple[Tensor, float] | None = None) -> Tensor:
    attn = layer.self_attn
    norm = attn.q_norm is not None and attn.k_norm is not None
    return kernels.triton[0](qkv, positions, kernels.cos_sin, attn.q_norm.weight if norm else None,
                             attn.k_norm.weight if norm else None, attn.q_norm.eps if norm else 0.0, kv_cache,
                             blocks, offsets, attn.num_q_heads, attn.num_kv_heads, out=out, row_scale=row_scale)


def after_attention(layer: DecoderLayer, o: Tensor, residual: Tensor, kernels: FusedKernels) -> Tensor:
    """The rest of the layer from its attention output o [T, hq, d]: the O projection, the residual add
    with the post-attention norm (residual updated in place), the MLP. Returns the layer's output."""
    attn = layer.self_attn
    h = attn.o_proj(o.reshape(o.shape[0], attn.num_q_heads * attn.head_dim))
    post = layer.post_attention_layernorm
    with prefetching(kernels.prefetch, layer.mlp.gate_up_proj.weight):
        h, _ = kernels.add_rms_norm(h, residual, layer_norm_weight(kernels, post), post.eps)
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
    with prefetching(kernels.prefetch, layer.mlp.down_proj.weight):
        if kernels.triton is not None:
            act = kernels.triton[1](gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
    return layer.mlp.down_proj(act)


def fused_forward(model: DenseForCausalLM, input_ids: Tensor, positions: Tensor, attention: AttentionBackend,
                  kv_caches: list[Tensor]) -> Tensor:
    """Same function as DenseForCausalLM's reference forward, with fused kernels and residual stream."""
    kernels: FusedKernels = model.fused
    folded = kernels.decode_gemms
    slots = attention.kv_slots() if folded is not None else None
    configs = folded.configs(input_ids.shape[0]) if slots is not None else None  # type: ignore[union-attr]
    if configs is not None:
        return _folded_forward(model, input_ids, positions, attention, kv_caches, configs, slots)
    if epilogue_norms_for(kernels, input_ids.shape[0]):
        slots = attention.kv_slots()
        if slots is not None:
            return _epilogue_forward(model, input_ids, positions, attention, kv_caches, slots)
    layers = model.model.layers
    residual = model.model.embed_tokens(input_ids)
    first = layers[0].input_layernorm
    with prefetching(kernels.prefetch, layers[0].self_attn.qkv_proj.weight):
        h = kernels.rms_norm(residual, layer_norm_weight(kernels, first), first.eps)
    for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True)):
        if i > 0:
            norm = layer.input_layernorm
            with prefetching(kernels.prefetch, layer.self_attn.qkv_proj.weight):
                h, residual = kernels.add_rms_norm(h, residual, layer_norm_weight(kernels, norm), norm.eps)
        h = after_attention(layer, _attention(layer, h, positions, kernels, attention, kv_cache), residual, kernels)
    norm = model.model.norm
    h, _ = kernels.add_rms_norm(h, residual, norm.weight, norm.eps)
    return h


def _epilogue_forward(model: DenseForCausalLM, input_ids: Tensor, positions: Tensor, attention: AttentionBackend,
                      kv_caches: list[Tensor], slots: tuple[Tensor, Tensor]) -> Tensor:
    """fused_forward with the layers' norms in the kernels after their projections (the weights folded by
    `enable_epilogue_norms`): per layer QKV projects the residual itself and the q/k-norm + RoPE + KV-write
    kernel scales by each row's input-norm scale; the O projection adds into the residual (cuBLAS beta=1);
    gate/up projects the residual and SwiGLU's kernel scales by the post-attention norm's; down adds into
    the residual. The final norm stays a kernel of its own. Whole-GPU decode graphs prefetch only before
    down here (the QKV and gate/up projections have no small kernel before them to hide a prefetch)."""
    kernels: FusedKernels = model.fused
    residual = model.model.embed_tokens(input_ids)
    for layer, kv_cache in zip(model.model.layers, kv_caches, strict=True):
        q = epilogue_project_q(layer, residual, positions, kernels, kv_cache, *slots)
        epilogue_after_attention(layer, attention.attend(layer.self_attn.layer_idx, q, kv_cache), residual, kernels)
    norm = model.model.norm
    return kernels.rms_norm(residual, norm.weight, norm.eps)


def epilogue_norms_for(kernels: FusedKernels, num_tokens: int) -> bool:
    """Whether a pass of `num_tokens` (padded, when a graph's) runs its norms in the projections' epilogues."""
    return kernels.unit_norm is not None and num_tokens <= kernels.epilogue_norm_rows


def epilogue_project_q(layer: DecoderLayer, residual: Tensor, positions: Tensor, kernels: FusedKernels,
                       kv_cache: Tensor, blocks: Tensor, offsets: Tensor, out: Tensor | None = None) -> Tensor:
    """project_q from the un-normalised residual: the input norm's row scale applied by the RoPE kernel."""
    qkv = layer.self_attn.qkv_proj(residual)
    return _rope_cache(layer, qkv, positions, kernels, kv_cache, blocks, offsets, out,
                       row_scale=(residual, layer.input_layernorm.eps))


def epilogue_after_attention(layer: DecoderLayer, o: Tensor, residual: Tensor, kernels: FusedKernels) -> None:
    """after_attention with the norms in the epilogues: O and down add into `residual` in place (cuBLAS
    beta=1), SwiGLU's kernel applies the post-attention norm's row scale. The layer's output is `residual`."""
    attn, mlp = layer.self_attn, layer.mlp
    residual.addmm_(o.reshape(o.shape[0], attn.num_q_heads * attn.head_dim), attn.o_proj.weight.t())
    gate_up = mlp.gate_up_proj(residual)
    with prefetching(kernels.prefetch, mlp.down_proj.weight):
        act = kernels.triton[1](gate_up, row_scale=(residual, layer.post_attention_layernorm.eps))
    residual.addmm_(act, mlp.down_proj.weight.t())


def _folded_forward(model: DenseForCausalLM, input_ids: Tensor, positions: Tensor, attention: AttentionBackend,
                    kv_caches: list[Tensor], configs: tuple, slots: tuple[Tensor, Tensor]) -> Tensor:
    """fused_forward for a few rows with the folded decode GEMMs: per layer the input norm inside the
    QKV projection, the residual add inside the O projection, the post-attention norm inside gate/up,
    SwiGLU and the residual add inside down; the final norm stays a kernel of its own."""
    kernels: FusedKernels = model.fused
    gemm = kernels.decode_gemms.kernels  # type: ignore[union-attr]
    qkv_cfg, o_cfg, gate_up_cfg, down_cfg = configs
    residual = model.model.embed_tokens(input_ids)
    t = residual.shape[0]
    for layer, kv_cache in zip(model.model.layers, kv_caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        pre, post = layer.input_layernorm, layer.post_attention_layernorm
        qkv = gemm.norm_gemm(residual, pre.weight, pre.eps, attn.qkv_proj.weight, qkv_cfg)
        o = attention.attend(attn.layer_idx, _rope_cache(layer, qkv, positions, kernels, kv_cache, *slots), kv_cache)
        gemm.gemm_residual(o.reshape(t, attn.num_q_heads * attn.head_dim), attn.o_proj.weight, residual, o_cfg)
        gate_up = gemm.norm_gemm(residual, post.weight, post.eps, mlp.gate_up_proj.weight, gate_up_cfg)
        gemm.act_gemm_residual(gate_up, mlp.down_proj.weight, residual, down_cfg)
    norm = model.model.norm
    return kernels.rms_norm(residual, norm.weight, norm.eps)
