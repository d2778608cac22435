"""The folded decode GEMMs (`dataplane/kernels/decode_gemm.py`) against torch: rmsnorm then a
projection, a projection added into the residual, SwiGLU then a projection added into the residual;
split and unsplit K, row counts that are not a tile; and the fused forward with them folded in against
the fused forward without. On a machine without CUDA they run in Triton's CPU interpreter."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dataplane.kernels.decode_gemm import (  # noqa: E402
    MAX_ROWS,
    GemmConfig,
    act_gemm_residual,
    config_for,
    gemm_residual,
    norm_gemm,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton's CPU interpreter rounds float32 to bf16 by truncation (Triton 3.9), a GPU to nearest: the
# folded kernels round their operands as the unfolded path does, so bf16 errors are larger there. The
# interpreter also takes the kernels' float32 dot (decode_gemm._dot_f32): the bf16 tensor-core dot is
# exercised on a GPU only, where these tests run compiled (40 of 40 within 1e-2 on an H100)
BF16_TOL = 1e-2 if torch.cuda.is_available() else 3e-2
CONFIGS = [GemmConfig(16, 32), GemmConfig(32, 16, 2), GemmConfig(16, 16, 4)]  # unsplit, split K in 2 and 4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _rms_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * g


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("m", [1, 5, 16, 24])
def test_norm_gemm_is_rmsnorm_then_the_projection(dtype: torch.dtype, tol: float, cfg: GemmConfig, m: int) -> None:
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 64, generator=g) * 3).to(DEVICE, dtype)
    w = (torch.randn(96, 64, generator=g) * 0.1).to(DEVICE, dtype)
    nw = (1 + 0.1 * torch.randn(64, generator=g)).to(DEVICE, dtype)
    x_before = x.clone()
    out = norm_gemm(x, nw, 1e-6, w, cfg)
    assert out.shape == (m, 96) and out.dtype == dtype
    assert _rel(out, F.linear(_rms_norm(x, nw, 1e-6), w)) < tol
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_gemm_residual_adds_the_projection_in_place(dtype: torch.dtype, tol: float, cfg: GemmConfig) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(13, 64, generator=g).to(DEVICE, dtype)
    w = (torch.randn(32, 64, generator=g) * 0.1).to(DEVICE, dtype)
    residual = torch.randn(13, 32, generator=g).to(DEVICE, dtype)
    want = (F.linear(x, w).float() + residual.float()).to(dtype)
    x_before = x.clone()
    out = gemm_residual(x, w, residual, cfg)
    assert out.data_ptr() == residual.data_ptr()
    assert _rel(residual, want) < tol and torch.equal(x, x_before)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_act_gemm_residual_is_swiglu_then_the_projection(dtype: torch.dtype, tol: float, cfg: GemmConfig) -> None:
    g = torch.Generator().manual_seed(11)
    gate_up = (torch.randn(6, 128, generator=g) * 2).to(DEVICE, dtype)
    w = (torch.randn(64, 64, generator=g) * 0.1).to(DEVICE, dtype)
    residual = torch.randn(6, 64, generator=g).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = (F.linear(F.silu(gate) * up, w).float() + residual.float()).to(dtype)
    act_gemm_residual(gate_up, w, residual, cfg)
    assert _rel(residual, want) < tol


def test_a_wrong_shape_is_refused() -> None:
    x = torch.randn(4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="does not tile"):
        gemm_residual(x, torch.randn(40, 64, device=DEVICE), torch.zeros(4, 40, device=DEVICE), GemmConfig(16, 32))
    with pytest.raises(ValueError, match="1 <= M <= 64"):
        norm_gemm(torch.randn(MAX_ROWS + 1, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-6,
                  torch.randn(32, 64, device=DEVICE), GemmConfig(16, 32))
    with pytest.raises(ValueError, match="residual"):
        gemm_residual(x, torch.randn(32, 64, device=DEVICE), torch.zeros(4, 16, device=DEVICE), GemmConfig(16, 32))
    with pytest.raises(ValueError, match="norm weight"):
        norm_gemm(x, torch.ones(32, device=DEVICE), 1e-6, torch.randn(32, 64, device=DEVICE), GemmConfig(16, 32))


def test_configs_tile_the_production_shapes_and_stay_within_the_row_limit() -> None:
    qwen3_8b = [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)]
    for m in (1, 16, 24, 64):
        for n, k in qwen3_8b:
            cfg = config_for(n, k, m, 132)
            assert cfg is not None and cfg.fits(n, k)
            assert n // cfg.block_n * cfg.split_k >= 64  # enough programs to pull the weight read
    assert config_for(4096, 4096, MAX_ROWS + 1, 132) is None
    assert config_for(4096, 4096, 0, 132) is None
    assert config_for(100, 4096, 16, 132) is None  # no tile width divides N
    small = config_for(128, 64, 4, 132)  # the tiny model's QKV
    assert small is not None and small.fits(128, 64)


@pytest.mark.parametrize("table", ["generic", "split"])
def test_the_folded_forward_computes_the_fused_forward(table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode rows and a short mixed step through the tiny model: hidden states and the KV cache of
    the folded path equal the fused path's (float32, so up to summation order)."""
    from dataplane.kernels import decode_gemm
    from dataplane.models.fused import enable_decode_gemms
    from tests.dataplane.test_piecewise import BLOCKS, TorchKernels, _batch, _caches, _step
    from dataplane.models.fused import fuse_projections
    from dataplane.models.loader import load_model

    if table == "split":  # every projection of the tiny model with K split across programs
        monkeypatch.setattr(decode_gemm, "_TABLE", {
            (128, 64): ((64, GemmConfig(32, 16, 2)),), (64, 64): ((64, GemmConfig(16, 16, 4)),),
            (256, 64): ((64, GemmConfig(64, 32, 2)),), (64, 128): ((64, GemmConfig(16, 32, 2)),),
        })
    model, _ = load_model("tiny", dtype=torch.float32, device=DEVICE, seed=5)
    gen = torch.Generator().manual_seed(6)
    for name, param in model.named_parameters():  # norm weights other than ones: each one counts
        if name.endswith("norm.weight"):
            param.data.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))
    fuse_projections(model)
    model.fused = TorchKernels(model)
    unfolded, folded = _caches(model, 4), _caches(model, 4)
    steps = [([1, 1, 1, 1, 1], [9, 3, 5, 17, 1]), ([1, 1, 6], [10, 4, 0])]  # decodes; decodes and a prompt
    for step, (queries, contexts) in enumerate(steps):
        batch = _batch(queries, contexts)
        enable_decode_gemms(model, 0, 132)
        assert model.fused.decode_gemms is None
        want = _step(model, batch, unfolded, None, seed=step)
        enable_decode_gemms(model, 64, 132)
        assert model.fused.decode_gemms is not None and model.fused.decode_gemms.configs(batch.num_tokens)
        got = _step(model, batch, folded, None, seed=step)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for ref, new in zip(unfolded, folded, strict=True):
            torch.testing.assert_close(new[:BLOCKS], ref[:BLOCKS], rtol=1e-5, atol=1e-5)
    enable_decode_gemms(model, 4, 132)  # passes of more rows than that keep the unfolded path
    assert model.fused.decode_gemms.configs(5) is None and model.fused.decode_gemms.configs(4) is not None


def test_float16_and_biased_projections_keep_the_unfolded_path() -> None:
    """The folded norm rounds x * g before it scales the row, which can pass float16's range where the
    unfolded norm stays within it; projections with a bias have no folded kernel."""
    from dataplane.models.fused import enable_decode_gemms, fuse_projections
    from dataplane.models.loader import load_model
    from tests.dataplane.test_piecewise import TorchKernels

    for dtype in (torch.float16, torch.float32):
        model, _ = load_model("tiny", dtype=dtype, device=DEVICE, seed=5)
        fuse_projections(model)
        model.fused = TorchKernels(model)
        enable_decode_gemms(model, 64, 132)
        assert (model.fused.decode_gemms is None) == (dtype == torch.float16)
    attn = model.model.layers[0].self_attn
    attn.qkv_proj.bias = torch.nn.Parameter(torch.zeros(attn.qkv_proj.weight.shape[0], device=DEVICE))
    enable_decode_gemms(model, 64, 132)
    assert model.fused.decode_gemms is None
