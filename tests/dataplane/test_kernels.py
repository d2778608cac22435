"""The Triton kernels of the CUDA fast path against the reference model's torch ops.

On a machine without CUDA they run in Triton's CPU interpreter (TRITON_INTERPRET=1), so the
maths and the KV-cache addressing are checked in CI; on a GPU they run compiled.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from dataplane.kernels.activation import silu_and_mul  # noqa: E402
from dataplane.kernels.qk_rope_cache import qk_rope_cache  # noqa: E402
from dataplane.models.config import ModelConfig  # noqa: E402
from dataplane.models.dense import RMSNorm, apply_rope, rope_inv_freq  # noqa: E402
from dataplane.models.presets import PRESETS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cos_sin_cache(cfg: ModelConfig) -> torch.Tensor:
    inv_freq = rope_inv_freq(cfg)
    freqs = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)


def reference(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, cfg: ModelConfig,
              q_norm: RMSNorm | None, k_norm: RMSNorm | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, d = qkv.shape[0], cfg.head_dim
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q, k, v = q.reshape(t, -1, d), k.reshape(t, -1, d), v.reshape(t, -1, d)
    if q_norm is not None and k_norm is not None:
        q, k = q_norm(q), k_norm(k)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    rot = (cos.to(qkv.dtype), sin.to(qkv.dtype)) if qkv.dtype != torch.float32 else (cos, sin)
    return apply_rope(q, rot), apply_rope(k, rot), v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,qk_norm", [((4, 2), True), ((4, 2), False), ((6, 3), True)])
def test_qk_rope_cache_matches_reference(heads: tuple[int, int], qk_norm: bool, dtype: torch.dtype,
                                         tol: float) -> None:
    cfg = dataclasses.replace(PRESETS["tiny"], num_q_heads=heads[0], num_kv_heads=heads[1])
    gen = torch.Generator().manual_seed(3)
    t, d, bs, num_blocks = 11, cfg.head_dim, 4, 9
    qkv = torch.randn(t, cfg.q_size + 2 * cfg.kv_size, generator=gen).to(DEVICE, dtype)
    positions = torch.randint(0, 200, (t,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:t].to(DEVICE)
    blocks, offsets = slots // bs, slots % bs
    norms = None, None
    if qk_norm:
        norms = tuple(RMSNorm(d, 1e-6).to(DEVICE, dtype) for _ in range(2))
        for n in norms:
            n.weight.data = torch.rand(d, generator=gen).to(DEVICE, dtype) + 0.5
    cache = torch.zeros(num_blocks, 2, bs, cfg.num_kv_heads, d, dtype=dtype, device=DEVICE)
    cos_sin = cos_sin_cache(cfg)
    q = qk_rope_cache(qkv, positions, cos_sin, norms[0].weight if qk_norm else None,
                      norms[1].weight if qk_norm else None, 1e-6, cache, blocks, offsets,
                      cfg.num_q_heads, cfg.num_kv_heads)
    with torch.no_grad():
        q_ref, k_ref, v_ref = reference(qkv, positions, cos_sin, cfg, *norms)
    assert q.shape == (t, cfg.num_q_heads, d) and q.is_contiguous()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert rel(q, q_ref) < tol
    out = torch.full((t, cfg.num_q_heads, d), float("nan"), dtype=dtype, device=DEVICE)
    again = qk_rope_cache(qkv, positions, cos_sin, norms[0].weight if qk_norm else None,
                          norms[1].weight if qk_norm else None, 1e-6, cache, blocks, offsets,
                          cfg.num_q_heads, cfg.num_kv_heads, out=out)
    assert again is out and torch.equal(out, q)  # q written into the caller's buffer
    assert rel(cache[blocks, 0, offsets], k_ref) < tol
    assert torch.equal(cache[blocks, 1, offsets], v_ref)
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert not cache.view(num_blocks, 2, bs * cfg.num_kv_heads * d).transpose(0, 1).reshape(2, -1, cfg.num_kv_heads * d)[
        :, untouched].any(), "the kernel wrote outside the given slots"


def test_qk_rope_cache_rejects_mismatched_shapes() -> None:
    cfg = PRESETS["tiny"]
    cache = torch.zeros(2, 2, 4, cfg.num_kv_heads, cfg.head_dim, device=DEVICE)
    bad = torch.zeros(3, cfg.q_size + cfg.kv_size, device=DEVICE)
    idx = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        qk_rope_cache(bad, idx, cos_sin_cache(cfg), None, None, 1e-6, cache, idx, idx, cfg.num_q_heads,
                      cfg.num_kv_heads)
    good = torch.zeros(3, cfg.q_size + 2 * cfg.kv_size, device=DEVICE)
    with pytest.raises(ValueError, match="is not a contiguous"):
        qk_rope_cache(good, idx, cos_sin_cache(cfg), None, None, 1e-6, cache, idx, idx, cfg.num_q_heads,
                      cfg.num_kv_heads, out=torch.zeros(4, cfg.num_q_heads, cfg.head_dim, device=DEVICE))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_silu_and_mul_matches_torch(dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 2 * 1500, generator=gen) * 3).to(DEVICE, dtype)  # 1500: not a multiple of the block
    ref = F.silu(x[:, :1500]) * x[:, 1500:]
    out = silu_and_mul(x)
    assert out.shape == (7, 1500)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < tol
    with pytest.raises(ValueError):
        silu_and_mul(x[:, :-1])


def _row_scale(residual: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row's RMSNorm scale, [T, 1] float32."""
    return torch.rsqrt(residual.float().pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("hidden", [48, 1500])  # one chunk; two chunks of 1024, the second masked
def test_qk_rope_cache_with_a_row_scale_is_the_kernel_on_the_scaled_projection(qk_norm: bool, hidden: int) -> None:
    """Given the residual rows, q, k and v are those of the projection times each row's norm scale:
    the input norm folded away (float32, so only summation order differs)."""
    cfg = PRESETS["tiny"]
    gen = torch.Generator().manual_seed(8)
    t, d, bs, num_blocks = 6, cfg.head_dim, 4, 5
    qkv = torch.randn(t, cfg.q_size + 2 * cfg.kv_size, generator=gen).to(DEVICE)
    residual = (torch.randn(t, hidden, generator=gen) * torch.linspace(0.1, 30, t)[:, None]).to(DEVICE)
    positions = torch.randint(0, 200, (t,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:t].to(DEVICE)
    blocks, offsets = slots // bs, slots % bs
    weights = [torch.rand(d, generator=gen).to(DEVICE) + 0.5 for _ in range(2)] if qk_norm else [None, None]
    caches = [torch.zeros(num_blocks, 2, bs, cfg.num_kv_heads, d, device=DEVICE) for _ in range(2)]
    cos_sin = cos_sin_cache(cfg)
    args = (positions, cos_sin, *weights, 1e-6)
    want = qk_rope_cache(qkv * _row_scale(residual, 1e-5), *args, caches[0], blocks, offsets, cfg.num_q_heads,
                         cfg.num_kv_heads)
    got = qk_rope_cache(qkv, *args, caches[1], blocks, offsets, cfg.num_q_heads, cfg.num_kv_heads,
                        row_scale=(residual, 1e-5))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1], caches[0], rtol=1e-5, atol=1e-5)
    assert caches[1][blocks, 1, offsets].abs().sum() > 0  # the values were written, scaled
    for bad in (residual[:-1], residual[:, ::2]):  # a row short; columns not contiguous
        with pytest.raises(ValueError, match="row scale"):
            qk_rope_cache(qkv, *args, caches[1], blocks, offsets, cfg.num_q_heads, cfg.num_kv_heads,
                          row_scale=(bad, 1e-5))


# bf16: Triton's CPU interpreter rounds the scaled gate and up toward zero where torch rounds to nearest
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("wide", [False, True])  # more rows than SCALED_WIDE_ROWS: programs 4x as wide
def test_silu_and_mul_with_a_row_scale_is_the_kernel_on_the_scaled_projection(dtype: torch.dtype, tol: float,
                                                                             wide: bool,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from dataplane.kernels import activation

    monkeypatch.setattr(activation, "SCALED_WIDE_ROWS", 3 if wide else 64)
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(7, 2 * 1500, generator=gen) * 3).to(DEVICE, dtype)
    residual = (torch.randn(7, 1100, generator=gen) * torch.linspace(0.2, 40, 7)[:, None]).to(DEVICE, dtype)
    scaled = (x.float() * _row_scale(residual, 1e-6)).to(dtype)
    ref = (F.silu(scaled[:, :1500]) * scaled[:, 1500:]).float()  # rounded as the kernel rounds
    out = silu_and_mul(x, row_scale=(residual, 1e-6))
    assert out.shape == (7, 1500)
    assert float((out.float() - ref).norm() / ref.norm()) < tol
    assert float((silu_and_mul(x).float() - ref).norm() / ref.norm()) > 0.1  # the scale matters here
    for bad in (residual[:-1], residual[:, ::2]):  # a row short; columns not contiguous
        with pytest.raises(ValueError, match="row scale"):
            silu_and_mul(x, row_scale=(bad, 1e-6))
