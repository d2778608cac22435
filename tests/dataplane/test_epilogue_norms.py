"""The layers' norms in the kernels after their projections (`epilogue_norm_rows`), on a CPU: with the
norm weights folded into QKV and gate/up, passes of at most that many tokens run no norm kernel but the
final one and compute what the fused forward computed before the fold (hidden states and KV cache);
longer passes keep their norm kernels, scaling by ones, and prefill pieces do as an eager pass of their
padded size does. The Triton
kernels run in Triton's CPU interpreter; flashinfer's norms are the torch stand-ins of test_piecewise."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dataplane.models.dense import DenseForCausalLM  # noqa: E402
from dataplane.models.fused import enable_decode_gemms, enable_epilogue_norms, fuse_projections  # noqa: E402
from dataplane.models.loader import load_model  # noqa: E402
from dataplane.piecewise import PiecewiseGraphs  # noqa: E402
from tests.dataplane.test_piecewise import BLOCKS, BS, DEVICE, TorchKernels, _batch, _caches, _step  # noqa: E402


class CountingKernels(TorchKernels):
    """TorchKernels that count the norm kernels a pass launches."""

    def __init__(self, model: DenseForCausalLM) -> None:
        super().__init__(model)
        self.norms = 0

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        self.norms += 1
        return super().rms_norm(x, weight, eps)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.norms += 1
        residual.add_(x)
        x.copy_(TorchKernels.rms_norm(self, residual, weight, eps))  # one kernel, counted once
        return x, residual


def _model(dtype: torch.dtype = torch.float32) -> DenseForCausalLM:
    """The tiny model fused, with norm weights other than ones (each one counts)."""
    model, _ = load_model("tiny", dtype=dtype, device=DEVICE, seed=5)
    gen = torch.Generator().manual_seed(6)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
    fuse_projections(model)
    model.fused = CountingKernels(model)
    return model


STEPS = [([1, 1, 1, 1, 1], [9, 3, 5, 17, 1]), ([1, 1, 6], [10, 4, 0]), ([1, 7, 4], [12, 3, 0])]  # 5, 8, 12 tokens


def test_short_passes_run_no_layer_norm_kernel_and_compute_the_fused_forward() -> None:
    plain, folded = _model(), _model()
    enable_epilogue_norms(folded, 8)
    assert folded.fused.unit_norm is not None and folded.fused.epilogue_norm_rows == 8
    layers = folded.cfg.num_layers
    want_caches, got_caches = _caches(plain, 4), _caches(folded, 4)
    for step, (queries, contexts) in enumerate(STEPS):
        batch = _batch(queries, contexts)
        plain.fused.norms = folded.fused.norms = 0
        want = _step(plain, batch, want_caches, None, seed=step)
        got = _step(folded, batch, got_caches, None, seed=step)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for ref, new in zip(want_caches, got_caches, strict=True):
            torch.testing.assert_close(new[:BLOCKS], ref[:BLOCKS], rtol=1e-5, atol=1e-5)
        assert plain.fused.norms == 2 * layers + 1
        # up to 8 tokens only the final norm runs; 12 tokens keep every norm kernel (scaling by ones)
        assert folded.fused.norms == (1 if batch.num_tokens <= 8 else 2 * layers + 1)


@pytest.mark.parametrize("rows", [4, 16])
def test_the_pieces_of_a_folded_model_compute_the_fused_forward(rows: int) -> None:
    """Pieces padded to 16 tokens: past `rows` with norm kernels scaling by ones, within it with the norms
    in the epilogues, as an eager pass of that many tokens runs them (graphs and eager passes agree)."""
    plain, folded = _model(), _model()
    enable_epilogue_norms(folded, rows)
    want_caches, got_caches = _caches(plain, 2), _caches(folded, 2)
    pieces = PiecewiseGraphs(folded, got_caches, DEVICE, block_size=BS, scratch_block=BLOCKS, buckets=[16],
                             use_graphs=False)
    pieces.capture()
    for step, (queries, contexts) in enumerate(STEPS):
        batch = _batch(queries, contexts)
        want = _step(plain, batch, want_caches, None, seed=step)
        folded.fused.norms = 0
        got = _step(folded, batch, got_caches, pieces, seed=step)
        assert folded.fused.norms == (1 if rows >= 16 else 2 * folded.cfg.num_layers + 1)
        torch.testing.assert_close(got[:batch.num_tokens], want, rtol=1e-4, atol=1e-4)
        for ref, new in zip(want_caches, got_caches, strict=True):
            torch.testing.assert_close(new[:BLOCKS], ref[:BLOCKS], rtol=1e-5, atol=1e-5)


def test_the_fold_is_refused_where_it_would_change_the_function_and_done_once() -> None:
    for dtype in (torch.float16, torch.float32):  # float16: the un-normalised projection may overflow
        model = _model(dtype)
        weight = model.model.layers[0].self_attn.qkv_proj.weight.clone()
        enable_epilogue_norms(model, 16)
        folded = dtype != torch.float16
        assert (model.fused.unit_norm is not None) == folded
        assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, weight) != folded
    with pytest.raises(RuntimeError, match="already folded"):
        enable_epilogue_norms(model, 16)
    with pytest.raises(RuntimeError, match="apply them twice"):  # the folded decode GEMMs fold g themselves
        enable_decode_gemms(model, 64, 132)
    for name in ("qkv_proj", "down_proj"):  # a bias comes after the norm's scale; addmm_ would drop O's and down's
        biased = _model()
        lin = getattr(biased.model.layers[-1].self_attn if name == "qkv_proj" else biased.model.layers[-1].mlp, name)
        lin.bias = torch.nn.Parameter(torch.zeros(lin.weight.shape[0], device=DEVICE))
        enable_epilogue_norms(biased, 16)
        assert biased.fused.unit_norm is None
    no_triton = _model()
    no_triton.fused.triton = None
    enable_epilogue_norms(no_triton, 16)
    assert no_triton.fused.unit_norm is None
    gemms = _model()
    enable_decode_gemms(gemms, 64, 132)
    enable_epilogue_norms(gemms, 16)  # the folded decode GEMMs fold the norms their own way
    assert gemms.fused.unit_norm is None
    off = _model()
    enable_epilogue_norms(off, 0)
    assert off.fused.unit_norm is None and off.fused.epilogue_norm_rows == 0
