"""GPU tests (marker `gpu`) of the decode-kernel options: unsplit twins of balanced batches, the L2
prefetch, the folded decode GEMMs and the layers' norms in the projections' epilogues, each against eager
passes or the path without it. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dataplane.gpu_support import gpu_worker, greedy_run, random_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("n", [16, 22])
def test_a_balanced_batch_replays_the_unsplit_twin_equal_to_eager(gpu_checkpoint: Path, n: int) -> None:
    """n prompts of one length (22: bucket 24 with two padding rows): every decode step is balanced, so
    the bucket's unsplit twin replays (flashinfer_backend.BALANCED_MAX_SKEW), and its tokens equal eager's."""
    import dataplane.attention.flashinfer_backend as fib

    bucket = 16 if n == 16 else 24
    if not fib.has_unsplit_twin(bucket):
        pytest.skip(f"bucket {bucket} has no unsplit twin with these settings "
                    "(a bucket on CUDA cores, DUETSERVE_TEST_CUDA_CORE_MAX_BATCH >= bucket, has none)")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (40,), generator=g).tolist() for _ in range(n)]
    sizes = {"max_num_seqs": 32, "max_num_batched_tokens": 4096}
    graphed = gpu_worker(str(gpu_checkpoint), **sizes).runner
    eager = gpu_worker(str(gpu_checkpoint), cuda_graphs=False, **sizes).runner
    got = greedy_run(graphed, prompts, 24)
    assert graphed.graphs is not None and graphed.graphs.unsplit_twin_replays >= 20  # 23 decode steps
    assert got == greedy_run(eager, prompts, 24)


def test_decode_graphs_with_l2_prefetch_equal_eager(gpu_checkpoint: Path) -> None:
    """Whole-GPU decode graphs captured with the L2 prefetch's side stream (forked and joined around the
    small kernels) replay with no host sync and give eager's greedy tokens."""
    prompts = random_prompts(6, 512, seed=8)
    graphed = gpu_worker(str(gpu_checkpoint), decode_l2_prefetch_kib=256, epilogue_norm_rows=0).runner  # norm kernels
    assert graphed.graphs is not None and graphed.graphs.l2_prefetch is not None
    # three forks a layer in each captured graph (warm-ups too), and none left handed to the fused path
    assert graphed.graphs.l2_prefetch.forks >= 3 * graphed.model.cfg.num_layers * graphed.graphs.num_graphs
    assert graphed.model.fused.prefetch is None
    got = greedy_run(graphed, prompts, 16, sync_debug=True, depth=2)
    assert got == greedy_run(gpu_worker(str(gpu_checkpoint), cuda_graphs=False).runner, prompts, 16)


@pytest.mark.experimental
def test_folded_decode_gemms_keep_the_tokens_and_never_sync(gpu_checkpoint: Path) -> None:
    """Decode graphs with the norms, SwiGLU and residual adds folded into their projections
    (`decode_gemm_rows`, off by default: slower on an H100) against the unfolded graphs: async launches
    under sync-debug "error"; every first token equal (it comes from the prefill, which is not folded)
    and most of the rest (two bf16 roundings of one function part at near-ties: on an H100 one of 12
    sequences parted at its second token)."""
    prompts = random_prompts(12, 512, seed=6)
    unfolded = greedy_run(gpu_worker(str(gpu_checkpoint), decode_gemm_rows=0).runner, prompts, 16)
    runner = gpu_worker(str(gpu_checkpoint), decode_gemm_rows=64).runner
    assert runner.model.fused.decode_gemms is not None and runner.model.fused.decode_gemms.configs(12)
    greedy_run(runner, prompts, 2)  # warm up the Triton kernels outside the check
    runner.seqs.clear()
    folded = greedy_run(runner, prompts, 16, sync_debug=True, depth=2)
    assert [t[:1] for t in folded] == [t[:1] for t in unfolded]
    agree = sum(a == b for x, y in zip(folded, unfolded) for a, b in zip(x, y)) / sum(map(len, unfolded))
    assert agree > 0.6, f"folded decode GEMMs agree with the unfolded path on only {agree:.0%} of greedy tokens"


@pytest.mark.parametrize("rows", [32, 1024])
def test_epilogue_norm_decode_graphs_equal_eager_and_never_sync(gpu_checkpoint_norms: Path, rows: int) -> None:
    """Decode graphs with the layers' norms in the kernels after their projections (`epilogue_norm_rows`)
    replay with no host sync and give the eager passes' greedy tokens (the same kernels outside
    graphs); against norm kernels (`epilogue_norm_rows=0`) most tokens agree: the folded weights and the row scale round
    in other places, which flips near-ties. The prefill of the 12 prompts (376 tokens, one step) keeps its norm
    kernels at 32 rows and runs in the epilogues at 1024, in the prefill pieces and the eager pass alike.
    Norm weights other than ones, so the fold changes the weights."""
    gpu_checkpoint = gpu_checkpoint_norms
    prompts = random_prompts(12, 512, seed=9)
    graphed = gpu_worker(str(gpu_checkpoint), epilogue_norm_rows=rows).runner
    assert graphed.graphs is not None and graphed.model.fused.unit_norm is not None
    assert graphed.pieces is not None  # the prefill replays the pieces, against the eager worker's pass
    greedy_run(graphed, prompts, 2)  # warm up the Triton kernels outside the check
    graphed.seqs.clear()
    got = greedy_run(graphed, prompts, 16, sync_debug=True, depth=2)
    assert got == greedy_run(gpu_worker(str(gpu_checkpoint), epilogue_norm_rows=rows, cuda_graphs=False).runner,
                             prompts, 16)
    default = greedy_run(gpu_worker(str(gpu_checkpoint), epilogue_norm_rows=0).runner, prompts, 16)
    agree = sum(a == b for x, y in zip(got, default) for a, b in zip(x, y)) / sum(map(len, default))
    assert agree > 0.6, f"epilogue norms agree with the norm kernels on only {agree:.0%} of greedy tokens"
