"""TorchPagedAttention against a dense causal reference; AttentionBatch layout; backend factory."""

from __future__ import annotations

import math

import pytest
import torch

from dataplane.attention import AttentionBatch, TorchPagedAttention, make_backend

CPU = torch.device("cpu")
HQ, HKV, D = 4, 2, 8


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal GQA attention over a whole sequence: q [L, hq, d], k/v [L, hkv, d]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    n = q.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _random_tables(lengths: list[int], block_size: int, num_blocks: int,
                   gen: torch.Generator) -> list[list[int]]:
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:
        need = -(-n // block_size)
        tables.append(free[:need])
        free = free[need:]
    return tables


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_matches_dense_over_chunked_steps(block_size: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, 30, (4,), generator=gen)]
    full = [(torch.randn(n, HQ, D, generator=gen), torch.randn(n, HKV, D, generator=gen),
             torch.randn(n, HKV, D, generator=gen)) for n in lengths]
    expected = [_reference(*t) for t in full]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 5
    tables = _random_tables(lengths, block_size, num_blocks, gen)
    cache = torch.zeros(num_blocks, 2, block_size, HKV, D)
    backend = TorchPagedAttention()
    done = [0] * len(lengths)
    got: list[list[torch.Tensor]] = [[] for _ in lengths]
    while any(d < n for d, n in zip(done, lengths)):
        rows = [i for i in range(len(lengths)) if done[i] < lengths[i]]
        # random chunk per sequence: sometimes 1 token (decode path), sometimes several
        qlens = [min(lengths[i] - done[i], int(torch.randint(1, 9, (1,), generator=gen))) for i in rows]
        batch = AttentionBatch(query_lens=qlens, context_lens=[done[i] for i in rows],
                               block_tables=[tables[i] for i in rows], block_size=block_size)
        sl = [slice(done[i], done[i] + n) for i, n in zip(rows, qlens)]
        q = torch.cat([full[i][0][s] for i, s in zip(rows, sl)])
        k = torch.cat([full[i][1][s] for i, s in zip(rows, sl)])
        v = torch.cat([full[i][2][s] for i, s in zip(rows, sl)])
        backend.begin_step(batch, CPU)
        out = backend.forward(0, q, k, v, cache)
        for i, o in zip(rows, out.split(qlens)):
            got[i].append(o)
        for i, n in zip(rows, qlens):
            done[i] += n
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.cat(g), e, atol=1e-5, rtol=1e-5)


def test_cache_holds_keys_and_values_at_slots() -> None:
    batch = AttentionBatch(query_lens=[3, 2], context_lens=[2, 0], block_tables=[[5, 1], [3]],
                           block_size=4)
    cache = torch.zeros(6, 2, 4, HKV, D)
    k, v = torch.randn(5, HKV, D), torch.randn(5, HKV, D)
    backend = TorchPagedAttention()
    backend.begin_step(batch, CPU)
    backend.forward(0, torch.randn(5, HQ, D), k, v, cache)
    # seq 0 positions 2,3 -> block 5 offsets 2,3; position 4 -> block 1 offset 0
    torch.testing.assert_close(cache[5, 0, 2:4], k[0:2])
    torch.testing.assert_close(cache[1, 0, 0], k[2])
    torch.testing.assert_close(cache[3, 1, 0:2], v[3:5])


def test_batch_layout_tensors() -> None:
    batch = AttentionBatch(query_lens=[3, 1, 2], context_lens=[0, 5, 4],
                           block_tables=[[7], [2, 9], [4, 0]], block_size=4)
    assert batch.num_tokens == 6 and batch.num_seqs == 3
    assert batch.seq_lens == [3, 6, 6]
    assert batch.query_start_loc == [0, 3, 4, 6]
    assert batch.positions().tolist() == [0, 1, 2, 5, 4, 5]
    assert batch.slot_mapping().tolist() == [28, 29, 30, 37, 0, 1]
    assert batch.token_slots().tolist() == [28, 29, 30, 8, 9, 10, 11, 36, 37,
                                            16, 17, 18, 19, 0, 1]
    assert batch.block_table_tensor(pad=-1).tolist() == [[7, -1], [2, 9], [4, 0]]


def test_batch_validation() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionBatch(query_lens=[5], context_lens=[0], block_tables=[[1]], block_size=4)
    with pytest.raises(ValueError, match="one entry per sequence"):
        AttentionBatch(query_lens=[1, 1], context_lens=[0], block_tables=[[1]], block_size=4)
    with pytest.raises(ValueError):
        AttentionBatch(query_lens=[0], context_lens=[0], block_tables=[[1]], block_size=4)


def test_auto_backend_on_cuda_without_flashinfer_falls_back_to_torch(monkeypatch, caplog) -> None:  # noqa: ANN001
    """A CUDA data plane whose image lacks flashinfer serves on the torch backend, and says so."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flashinfer" else real(name, *a))
    with caplog.at_level("WARNING"):
        assert make_backend("auto", "cuda").name == "torch"  # builds nothing on the device
    assert "flashinfer is not installed" in caplog.text


def test_make_backend() -> None:
    assert make_backend("torch", CPU).name == "torch"
    assert make_backend("auto", "cpu").name == "torch"
    with pytest.raises(ValueError, match="flashinfer"):
        make_backend("flashinfer", CPU)
    with pytest.raises(ValueError, match="unknown"):
        make_backend("nope", CPU)


def test_forward_before_begin_step_raises() -> None:
    with pytest.raises(RuntimeError):
        TorchPagedAttention().forward(0, torch.zeros(1, HQ, D), torch.zeros(1, HKV, D),
                                      torch.zeros(1, HKV, D), torch.zeros(1, 2, 4, HKV, D))


def test_flashinfer_host_plan_of_a_slice_equals_the_plan_of_that_sub_batch() -> None:
    """A split mixed step plans its leading decodes and the rest as two batches (no flashinfer needed)."""
    from dataplane.attention.flashinfer_backend import host_plan, leading_decodes

    q, c = [1, 1, 1, 37, 1, 5], [10, 33, 16, 0, 7, 100]
    tables = _random_tables([a + b for a, b in zip(q, c)], 16, 64, torch.Generator().manual_seed(1))
    batch = AttentionBatch(q, c, tables, 16)
    assert leading_decodes(batch) == 3
    for start, stop in ((0, 3), (3, 6), (0, 6)):
        part = AttentionBatch(q[start:stop], c[start:stop], tables[start:stop], 16)
        got, want = host_plan(batch, start, stop), host_plan(part)
        for name in ("qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_len"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (start, stop, name)
    assert host_plan(batch, 3).qo_indptr.tolist() == [0, 37, 38, 43]
    assert leading_decodes(AttentionBatch([4, 1], [0, 3], tables[:2], 16)) == 0


@pytest.mark.parametrize("max_batch", [1, 8, 20, 24, 28, 32, 64, 256, 512])
def test_a_decode_graph_and_the_eager_steps_it_stands_for_pick_one_kernel(max_batch: int) -> None:
    """Every batch a graph bucket pads runs the bucket's decode kernel when run eagerly (no flashinfer needed)."""
    from dataplane.attention import flashinfer_backend as fib
    from dataplane.graphs import default_buckets

    buckets = default_buckets(max_batch)
    assert fib.CUDA_CORE_MAX_BATCH == 0 or fib.CUDA_CORE_MAX_BATCH in default_buckets(512)
    for n in range(1, max_batch + 1):
        bucket = min(b for b in buckets if b >= n)
        assert fib.uses_cuda_cores(n) == fib.uses_cuda_cores(bucket), (n, bucket)
    assert fib.uses_cuda_cores(1) == (fib.CUDA_CORE_MAX_BATCH > 0)
    assert not fib.uses_cuda_cores(fib.CUDA_CORE_MAX_BATCH + 1)
