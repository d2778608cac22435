"""Piecewise forward passes on a CPU: the pieces (called directly, `use_graphs=False`) around eager
attention compute what the fused forward computes, pad to their bucket without writing any KV block
but the scratch one, and leave nothing of one step in the next. The Triton kernels run in Triton's
CPU interpreter; flashinfer's norms (CUDA only) are replaced by the same maths in torch."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dataplane.attention.base import AttentionBatch  # noqa: E402
from dataplane.attention.torch_paged import TorchPagedAttention  # noqa: E402
from dataplane.kv_cache import allocate_kv_cache  # noqa: E402
from dataplane.models.dense import DenseForCausalLM, rope_inv_freq  # noqa: E402
from dataplane.models.fused import FusedKernels, _triton_kernels, fuse_projections  # noqa: E402
from dataplane.models.loader import load_model  # noqa: E402
from dataplane.piecewise import MAX_PIECEWISE_TOKENS, PiecewiseGraphs, default_token_buckets  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BS, BLOCKS = 4, 40  # block size, KV blocks (block BLOCKS is the scratch block)


class TorchKernels(FusedKernels):
    """FusedKernels with torch norms, so the fused forward runs without flashinfer."""

    def __init__(self, model: DenseForCausalLM) -> None:  # no super().__init__: it imports flashinfer
        cfg = model.cfg
        freqs = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)[:, None] * rope_inv_freq(cfg)[None, :]
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)
        self.head_dim = cfg.head_dim
        self.triton = _triton_kernels()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        residual.add_(x)
        x.copy_(self.rms_norm(residual, weight, eps))
        return x, residual


class SlotAttention(TorchPagedAttention):
    """The torch backend with `kv_slots` and `attend`: this step's K/V are already in the cache."""

    def kv_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._new_blocks is not None and self._new_offsets is not None
        return self._new_blocks, self._new_offsets

    def attend(self, layer_idx: int, q: torch.Tensor, kv_cache: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        blocks, offsets = self.kv_slots()
        o = self.forward(layer_idx, q, kv_cache[blocks, 0, offsets], kv_cache[blocks, 1, offsets], kv_cache)
        return o if out is None else out.copy_(o)


@pytest.fixture(scope="module")
def model() -> DenseForCausalLM:
    model, _ = load_model("tiny", dtype=torch.float32, device=DEVICE, seed=3)
    fuse_projections(model)
    model.fused = TorchKernels(model)
    assert model.fused.triton is not None
    return model


def _batch(query_lens: list[int], context_lens: list[int]) -> AttentionBatch:
    tables, next_block = [], 0
    for q, c in zip(query_lens, context_lens):
        n = -(-(q + c) // BS)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    assert next_block <= BLOCKS
    return AttentionBatch(query_lens, context_lens, tables, BS)


def _caches(model: DenseForCausalLM, seed: int) -> list[torch.Tensor]:
    caches = allocate_kv_cache(model.cfg, BLOCKS + 1, BS, torch.float32, DEVICE)
    gen = torch.Generator().manual_seed(seed)
    for c in caches:  # context K/V; the scratch block starts zeroed
        c[:BLOCKS].copy_(torch.randn(c[:BLOCKS].shape, generator=gen))
    return caches


def _step(model: DenseForCausalLM, batch: AttentionBatch, caches: list[torch.Tensor],
          pieces: PiecewiseGraphs | None, seed: int) -> torch.Tensor:
    ids = torch.randint(0, model.cfg.vocab_size, (batch.num_tokens,), generator=torch.Generator().manual_seed(seed))
    ids, positions, slots = ids.to(DEVICE), batch.positions(DEVICE), batch.slot_mapping(DEVICE)
    attention = SlotAttention()
    attention.begin_step(batch, DEVICE, slots)
    with torch.inference_mode():
        if pieces is None:
            return model(ids, positions, attention, caches).clone()
        return pieces.run(ids, positions, attention).clone()


def test_pieces_compute_the_fused_forward_and_pad_into_the_scratch_block(model: DenseForCausalLM) -> None:
    reference, piecewise = _caches(model, 1), _caches(model, 1)
    pieces = PiecewiseGraphs(model, piecewise, DEVICE, block_size=BS, scratch_block=BLOCKS, buckets=[16, 32],
                             use_graphs=False)
    pieces.capture()
    # a mixed step (decodes, a chunk with context, a fresh prompt) of 13 tokens padded to 16, one of 29
    # padded to 32, then one of 21 through the same buffers: rows the 29 left behind are padding now
    steps = [([1, 1, 4, 7], [9, 3, 5, 0]), ([1, 6, 1, 13, 8], [14, 2, 7, 0, 3]), ([1, 6, 1, 13], [14, 2, 7, 0])]
    for step, (queries, contexts) in enumerate(steps):
        batch = _batch(queries, contexts)
        want = _step(model, batch, reference, None, seed=step)
        got = _step(model, batch, piecewise, pieces, seed=step)
        assert got.shape == want.shape == (batch.num_tokens, model.cfg.hidden_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for ref, pw in zip(reference, piecewise, strict=True):
            torch.testing.assert_close(pw[:BLOCKS], ref[:BLOCKS], rtol=1e-5, atol=1e-5)
    assert all(bool(c[BLOCKS].any()) for c in piecewise), "padding rows write their K/V to the scratch block"
    assert not any(bool(c[BLOCKS].any()) for c in reference)


def test_buckets_and_their_limits(model: DenseForCausalLM) -> None:
    buckets = default_token_buckets(2048)
    assert buckets[:3] == [16, 32, 48] and buckets[-1] == MAX_PIECEWISE_TOKENS and len(buckets) == 32
    assert default_token_buckets(100) == [16, 32, 48, 64, 80, 96, 100]
    pieces = PiecewiseGraphs(model, _caches(model, 2), DEVICE, block_size=BS, scratch_block=BLOCKS,
                             buckets=[16], use_graphs=False)
    assert pieces.bucket_for(0) is None and pieces.bucket_for(1) == 16 and pieces.bucket_for(17) is None
    with pytest.raises(ValueError, match="no piecewise graphs for 13 tokens"):  # not captured yet
        _step(model, _batch([13], [0]), pieces.kv_caches, pieces, seed=0)
    pieces.capture()
    with pytest.raises(ValueError, match="no piecewise graphs for 17 tokens"):
        _step(model, _batch([17], [0]), pieces.kv_caches, pieces, seed=0)


def test_pieces_need_the_fused_path_with_triton() -> None:
    plain, _ = load_model("tiny", dtype=torch.float32, device=DEVICE, seed=3)
    with pytest.raises(ValueError, match="fused path"):
        PiecewiseGraphs(plain, [], DEVICE, block_size=BS, scratch_block=BLOCKS, buckets=[16], use_graphs=False)


def test_a_cpu_worker_asked_for_pieces_runs_eager(model: DenseForCausalLM) -> None:
    from dataplane.piecewise import piecewise_possible
    from dataplane.worker import load_worker
    from shared.config import DataplaneConfig

    assert not piecewise_possible(model, torch.device("cpu"), "torch", True)
    assert not piecewise_possible(model, torch.device("cuda"), "flashinfer", False)  # no CUDA graphs
    loaded = load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=64, piecewise_graphs=True))
    assert loaded.runner.pieces is None
