"""GPU tests (marker `gpu`): flashinfer vs torch attention, graph replay vs eager, greedy tokens vs the
CPU path, and a hot loop with no host synchronisation. Skipped without CUDA. The decode-kernel options
(unsplit twins, L2 prefetch, folded GEMMs, norms in epilogues) are tested in test_gpu_kernel_options.py;
the shared workers, prompts and driver, and the environment settings that vouch for another default, are
in gpu_support.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dataplane.attention.base import AttentionShape
from dataplane.attention.torch_paged import TorchPagedAttention
from dataplane.worker import load_worker
from shared.config import DataplaneConfig
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan
from tests.dataplane.gpu_support import BS, gpu_worker, greedy_run, random_batch, random_prompts, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("kind", ["mixed", "decode", "split"])
def test_flashinfer_matches_torch_attention(kind: str) -> None:
    from dataplane.attention.flashinfer_backend import FlashInferAttention

    dev, dtype = torch.device("cuda"), torch.bfloat16
    shape = AttentionShape(num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    if kind == "mixed":
        batch = random_batch([37, 1, 1, 200, 5], [0, 300, 17, 64, 1000], 400, gen)
    elif kind == "split":  # 40 leading decodes: the decode kernel takes them, FA3 the chunks after
        contexts = torch.randint(1, 200, (40,), generator=gen).tolist()
        batch = random_batch([1] * 40 + [150, 1, 3], contexts + [0, 40, 200], 700, gen)
    else:
        batch = random_batch([1] * 9, [1, 15, 16, 17, 100, 511, 512, 1500, 3000], 700, gen)
    t = batch.num_tokens
    q = torch.randn(t, 32, 128, device=dev, dtype=dtype)
    k = torch.randn(t, 8, 128, device=dev, dtype=dtype)
    v = torch.randn(t, 8, 128, device=dev, dtype=dtype)
    cache = torch.randn(400 if kind == "mixed" else 700, 2, BS, 8, 128, device=dev, dtype=dtype)
    cache_ref = cache.clone()
    fi = FlashInferAttention(shape, dev)
    fi.begin_step(batch, dev)
    assert fi._split == (40 if kind == "split" else 0)
    out = fi.forward(0, q, k, v, cache)
    ref_backend = TorchPagedAttention()
    ref_backend.begin_step(batch, dev)
    ref_cache = cache_ref.float()
    ref = ref_backend.forward(0, q.float(), k.float(), v.float(), ref_cache)
    assert rel_err(out, ref) < 1e-2
    assert rel_err(cache, ref_cache) < 1e-2  # both wrote this step's keys and values to the same slots


def test_graph_replay_equals_eager(gpu_checkpoint: Path) -> None:
    prompts = random_prompts(5, 512, seed=1)
    graphed = gpu_worker(str(gpu_checkpoint)).runner
    eager = gpu_worker(str(gpu_checkpoint), cuda_graphs=False).runner
    assert graphed.graphs is not None and eager.graphs is None
    assert greedy_run(graphed, prompts, 24) == greedy_run(eager, prompts, 24)


@pytest.mark.parametrize("n", [20, 40])
def test_graph_replay_equals_eager_on_a_large_mixed_bucket(gpu_checkpoint: Path, n: int) -> None:
    """n requests of 5-60 prompt tokens: buckets of 24 and 40 with the decode kernel and KV split the
    defaults give them (40: past `UNSPLIT_KV_MIN_BATCH`, so its graph reads KV unsplit), each graph
    re-planned for new lengths every step."""
    import dataplane.attention.flashinfer_backend as fib

    assert n < 40 or (fib.UNSPLIT_KV_MIN_BATCH is not None and fib.UNSPLIT_KV_MIN_BATCH <= 40)
    prompts = random_prompts(n, 512, seed=1)
    sizes = {"max_num_seqs": 48, "max_num_batched_tokens": 4096}  # every prompt prefills in one step
    graphed = gpu_worker(str(gpu_checkpoint), **sizes).runner
    eager = gpu_worker(str(gpu_checkpoint), cuda_graphs=False, **sizes).runner
    assert greedy_run(graphed, prompts, 24) == greedy_run(eager, prompts, 24)
    assert graphed.graphs is not None and graphed.graphs.unsplit_twin_replays == 0  # lengths 5-60: skewed


def test_greedy_tokens_equal_the_cpu_path(gpu_checkpoint: Path) -> None:
    prompts = random_prompts(4, 512, seed=2)
    gpu = greedy_run(gpu_worker(str(gpu_checkpoint), dtype="float32", attention_backend="torch",
                             cuda_graphs=False).runner, prompts, 16)
    cpu_worker = load_worker(DataplaneConfig(model=str(gpu_checkpoint), device="cpu", num_kv_blocks=512,
                                             block_size=BS))
    assert greedy_run(cpu_worker.runner, prompts, 16) == gpu
    bf16 = greedy_run(gpu_worker(str(gpu_checkpoint)).runner, prompts, 16)
    # bf16 rounding may flip a near-tie, after which a sequence diverges: require the first tokens to
    # agree, and most of the rest (measured: 88% of all tokens on this model).
    assert [t[:2] for t in bf16] == [t[:2] for t in gpu]
    agree = sum(a == b for x, y in zip(bf16, gpu) for a, b in zip(x, y)) / sum(map(len, gpu))
    assert agree > 0.6, f"bf16 flashinfer path agrees with fp32 on only {agree:.0%} of greedy tokens"


def test_async_launches_equal_one_at_a_time(gpu_checkpoint: Path) -> None:
    """Step i+1 launched before step i is collected: decode inputs come from the device, graphs replay,
    nothing syncs, and the tokens equal the one-at-a-time run's."""
    prompts = random_prompts(6, 512, seed=4)
    runner = gpu_worker(str(gpu_checkpoint)).runner
    expected = greedy_run(runner, prompts, 16)
    runner.clear()
    assert greedy_run(runner, prompts, 16, sync_debug=True, depth=2) == expected
    assert all(s.num_inflight == 0 for s in runner.seqs.values())


def test_hot_loop_has_no_host_sync(gpu_checkpoint: Path) -> None:
    runner = gpu_worker(str(gpu_checkpoint)).runner
    prompts = random_prompts(6, 512, seed=3)
    greedy_run(runner, prompts, 4)  # warm up allocators and kernels outside the check
    runner.seqs.clear()
    tokens = greedy_run(runner, prompts, 12, sync_debug=True)
    assert all(len(t) == 12 for t in tokens)


@pytest.mark.parametrize("epilogue_rows", [0, 64])
def test_fused_path_matches_reference(gpu_checkpoint_norms: Path, epilogue_rows: int) -> None:
    """flashinfer norm/rope + fused projections compute the reference model's function (bf16, norm weights
    other than ones); also with the norms in the projections' epilogues (the batch's 48 tokens are within
    64 rows)."""
    gpu_checkpoint = gpu_checkpoint_norms
    from dataplane.attention.flashinfer_backend import FlashInferAttention
    from dataplane.kv_cache import allocate_kv_cache
    from dataplane.models.fused import enable_fused_path
    from dataplane.models.loader import load_model

    dev = torch.device("cuda")
    ref, cfg = load_model(str(gpu_checkpoint), dtype=torch.bfloat16, device=dev)
    fused, _ = load_model(str(gpu_checkpoint), dtype=torch.bfloat16, device=dev)
    enable_fused_path(fused, dev, epilogue_norm_rows=epilogue_rows)
    assert (fused.fused.unit_norm is not None) == (epilogue_rows > 0)
    batch = random_batch([40, 1, 7], [0, 30, 12], 64, torch.Generator().manual_seed(4))
    ids = torch.randint(0, cfg.vocab_size, (batch.num_tokens,), device=dev)
    shape = AttentionShape(cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
    outs = []
    for model in (ref, fused):
        kv = allocate_kv_cache(cfg, 64, BS, torch.bfloat16, dev)
        for cache in kv:
            cache.normal_(generator=torch.Generator(dev).manual_seed(5))
        backend = FlashInferAttention(shape, dev)
        backend.begin_step(batch, dev)
        with torch.inference_mode():
            outs.append(model.compute_logits(model(ids, batch.positions(dev), backend, kv)))
    assert rel_err(outs[1], outs[0]) < 2e-2


def _schedule(runner, prompts_a, prompts_b, k: int, decode_sms: int, sync_debug: bool) -> dict[int, list[int]]:  # noqa: ANN001
    """Prefill A; then one step that prefills B while A decodes k look-ahead steps (multiplexed when
    decode_sms > 0, aggregated otherwise); then aggregated decode of everyone to 12 new tokens.
    Finished passes are taken as the worker takes them (`progress()` while the step runs)."""
    def news(prompts, first_id):  # noqa: ANN001, ANN202
        return [NewRequest(seq_id=first_id + i, token_ids=p, num_prompt_tokens=len(p),
                           block_ids=list(range((first_id + i) * 8, (first_id + i + 1) * 8)),
                           sampling=SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]

    def step(plan: StepPlan) -> None:  # polls progress as the worker does: passes reported early
        pending = runner.launch(plan)
        while not pending.ready():
            pending.progress()
        pending.result()

    a_ids, b_ids = range(len(prompts_a)), range(10, 10 + len(prompts_b))
    step(StepPlan(step_id=0, new_requests=news(prompts_a, 0),
                  scheduled=[ScheduledSeq(seq_id=i, num_tokens=len(p)) for i, p in zip(a_ids, prompts_a)]))
    mixed = [ScheduledSeq(seq_id=i, num_tokens=1) for i in a_ids]
    mixed += [ScheduledSeq(seq_id=i, num_tokens=len(p)) for i, p in zip(b_ids, prompts_b)]
    mode = "multiplexed" if decode_sms else "aggregated"
    plan = StepPlan(step_id=1, mode=mode, decode_sms=decode_sms, prefill_sms=0, decode_steps=k,
                    new_requests=news(prompts_b, 10), scheduled=mixed)
    if sync_debug:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        step(plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for s in range(2, 14):
        live = [i for i in [*a_ids, *b_ids] if runner.seqs[i].num_generated < 12]
        step(StepPlan(step_id=s, scheduled=[ScheduledSeq(seq_id=i, num_tokens=1) for i in live]))
    return {i: st.token_ids[st.num_prompt_tokens:][:12] for i, st in runner.seqs.items()}


def test_multiplexed_schedule_equals_aggregated(gpu_checkpoint: Path) -> None:
    loaded = gpu_worker(str(gpu_checkpoint), multiplexing=True, decode_partition_sms=(8, 16, 120))
    assert loaded.ready.supports_multiplexing
    assert loaded.ready.partition_sm_counts == [8, 16, 120]
    parts = loaded.runner.multiplexer.partitions.partitions
    assert [(p.actual_prefill_sms, p.actual_decode_sms) for p in parts.values()] == [(124, 8), (116, 16), (12, 120)]
    assert loaded.ready.profile is not None and {8, 16, 116, 124} <= set(loaded.ready.profile.sm_counts)
    a, b = random_prompts(5, 512, seed=6), random_prompts(2, 512, seed=7)
    reference = _schedule(gpu_worker(str(gpu_checkpoint)).runner, a, b, k=1, decode_sms=0, sync_debug=False)
    lookahead = _schedule(gpu_worker(str(gpu_checkpoint)).runner, a, b, k=4, decode_sms=0, sync_debug=False)
    _schedule(loaded.runner, a, b, k=4, decode_sms=16, sync_debug=False)  # captures the partition's graphs
    loaded.runner.seqs.clear()
    multiplexed = _schedule(loaded.runner, a, b, k=4, decode_sms=16, sync_debug=True)
    assert lookahead == reference
    assert multiplexed == reference


@pytest.mark.experimental
@pytest.mark.parametrize("mode", ["partition", "gemm"])
def test_partition_sized_kernels_keep_the_multiplexed_tokens(gpu_checkpoint: Path, mode: str) -> None:
    """`partition_kernels="partition"` (cuBLASLt SM target, FA2 prefill on the partition) and "gemm"
    (the SM target alone): greedy tokens of the multiplexed schedule equal the aggregated one's, with
    no host sync; an open question whether FA2's rounding keeps every near-tie of the tiny random
    model, hence experimental ("partition" passed on the H200 at 5a47025)."""
    blas = torch.backends.cuda.preferred_blas_library()  # the worker sets it process-wide
    try:
        sized = gpu_worker(str(gpu_checkpoint), multiplexing=True, decode_partition_sms=(16,),
                        partition_kernels=mode, blas_library="cublaslt")
        assert sized.runner.multiplexer.partition_kernels
        assert sized.runner.multiplexer.fa2_prefill == (mode == "partition")
        a, b = random_prompts(5, 512, seed=6), random_prompts(2, 512, seed=7)
        reference = _schedule(gpu_worker(str(gpu_checkpoint)).runner, a, b, k=1, decode_sms=0, sync_debug=False)
        _schedule(sized.runner, a, b, k=4, decode_sms=16, sync_debug=False)  # captures the partition's graphs
        sized.runner.seqs.clear()
        assert _schedule(sized.runner, a, b, k=4, decode_sms=16, sync_debug=True) == reference
        assert torch._C._get_sm_carveout_experimental() is None
    finally:
        torch.backends.cuda.preferred_blas_library(blas)


def test_piecewise_graphs_keep_the_tokens(gpu_checkpoint: Path) -> None:
    """Prefill and mixed passes replayed as piecewise graphs around eager attention (the default) give
    the eager passes' greedy tokens, with no host sync."""
    sizes = {"max_num_seqs": 48}
    pieces = gpu_worker(str(gpu_checkpoint), **sizes).runner
    assert pieces.pieces is not None and pieces.pieces.num_graphs > 0
    eager = gpu_worker(str(gpu_checkpoint), piecewise_graphs=False, **sizes).runner
    assert eager.pieces is None
    prompts = random_prompts(6, 512, seed=8)
    want = greedy_run(eager, prompts, 12)
    assert greedy_run(pieces, prompts, 12, sync_debug=True) == want
    pieces.clear()
    assert greedy_run(pieces, prompts, 12, depth=2) == want  # async: step i+1 launched before i is collected
    pieces.clear()
    eager.clear()
    a, b = random_prompts(5, 512, seed=6), random_prompts(2, 512, seed=7)  # a mixed step: A decodes while B prefills
    assert (_schedule(pieces, a, b, k=1, decode_sms=0, sync_debug=True)
            == _schedule(eager, a, b, k=1, decode_sms=0, sync_debug=False))
    pieces.clear()
    eager.clear()
    # 36 decodes ahead of a prefill: past FLASHINFER_SPLIT_MIN_DECODES, so attention splits the rows
    assert _many_decodes_and_a_prefill(pieces) == _many_decodes_and_a_prefill(eager)


def _many_decodes_and_a_prefill(runner, decodes: int = 36) -> dict[int, list[int]]:  # noqa: ANN001
    prompts = [*random_prompts(decodes, 512, seed=9), *random_prompts(1, 512, seed=10)]
    news = [NewRequest(seq_id=i, token_ids=p, num_prompt_tokens=len(p), block_ids=list(range(i * 8, (i + 1) * 8)),
                       sampling=SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
    last = decodes  # the prompt that prefills beside the decodes
    plans = [StepPlan(step_id=0, new_requests=news[:last],
                      scheduled=[ScheduledSeq(seq_id=i, num_tokens=len(prompts[i])) for i in range(last)]),
             StepPlan(step_id=1, new_requests=news[last:],
                      scheduled=[*(ScheduledSeq(seq_id=i, num_tokens=1) for i in range(last)),
                                 ScheduledSeq(seq_id=last, num_tokens=len(prompts[last]))])]
    plans += [StepPlan(step_id=s, scheduled=[ScheduledSeq(seq_id=i, num_tokens=1) for i in range(last + 1)])
              for s in range(2, 8)]
    out: dict[int, list[int]] = {}
    for plan in plans:
        for o in runner.execute(plan).outputs:
            out.setdefault(o.seq_id, []).extend(o.token_ids)
    return out


def test_a_cached_prefix_gives_the_tokens_of_the_whole_prompt(gpu_checkpoint: Path) -> None:
    """A request admitted with a prefix-cache hit (its first blocks hold another request's KV; it
    computes only the rest) samples what computing its whole prompt samples: flashinfer reading
    shared pages, piecewise graphs with context, no host sync."""
    runner = gpu_worker(str(gpu_checkpoint)).runner
    shared = 2 * BS  # two whole blocks shared, then its own tokens
    prefix = (random_prompts(1, 512, seed=11)[0] * (shared + 8))[:shared + 8]
    prompt = prefix[:shared] + [7, 8, 9, 10, 11]

    def new(seq_id: int, tokens: list[int], blocks: list[int], cached: int = 0) -> NewRequest:
        return NewRequest(seq_id=seq_id, token_ids=tokens, num_prompt_tokens=len(tokens), block_ids=blocks,
                          sampling=SamplingParams(temperature=0.0), num_computed_tokens=cached)

    def step(step_id: int, *items: tuple[int, int], **fields: object) -> StepPlan:
        return StepPlan(step_id=step_id, scheduled=[ScheduledSeq(seq_id=i, num_tokens=n) for i, n in items],
                        **fields)  # type: ignore[arg-type]

    plans = [step(0, (0, len(prefix)), (2, len(prompt)),
                  new_requests=[new(0, prefix, [0, 1, 2]), new(2, prompt, [20, 21, 22])]),
             step(1, (1, 5), (2, 1), new_requests=[new(1, prompt, [0, 1, 10], cached=shared)], finished_seq_ids=[0])]
    plans += [step(s, (1, 1), (2, 1)) for s in range(2, 10)]
    out: dict[int, list[int]] = {0: [], 1: [], 2: []}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for plan in plans:
            pending = runner.launch(plan)
            while not pending.ready():
                pass
            result = pending.result()
            assert not result.failures, result.failures
            for o in result.outputs:
                out[o.seq_id].extend(o.token_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(out[1]) == 9 and out[1] == out[2][:9]


def _prompt_logprobs_run(runner, prompt: list[int], chunk: int, sync_debug: bool) -> list[float]:  # noqa: ANN001
    """Prefill `prompt` in chunks of `chunk` tokens asking for its prompt logprobs; the chosen logprobs."""
    asked = SamplingParams(temperature=0.0, prompt_logprobs=2)
    plans, done = [], 0
    while done < len(prompt):
        n = min(chunk, len(prompt) - done)
        news = [NewRequest(seq_id=0, token_ids=prompt, num_prompt_tokens=len(prompt),
                           block_ids=list(range(-(-len(prompt) // BS) + 1)), sampling=asked)] if not done else []
        plans.append(StepPlan(step_id=len(plans), new_requests=news, scheduled=[ScheduledSeq(seq_id=0, num_tokens=n)]))
        done += n
    got: list[float] = []
    if sync_debug:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for plan in plans:
            pending = runner.launch(plan)
            while not pending.ready():
                pass
            for out in pending.result().outputs:
                if out.prompt_logprobs is not None:  # a last chunk of one token predicts no prompt token
                    assert out.prompt_logprobs_start == len(got) + 1
                    got.extend(e.logprob for e in out.prompt_logprobs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return got


def test_prompt_logprobs_on_the_gpu_match_the_cpu_path(gpu_checkpoint: Path) -> None:
    """Chunked prefill through flashinfer and piecewise graphs (bf16), without a host sync, gives the
    prompt logprobs of the float32 CPU path to bf16 accuracy: its error no more than twice (max) and 1.5x
    (mean) the CPU path's own error in bf16. On an H100 (lease of 2026-12-07, 143 tokens of logprobs
    around -6 to -12) every path's mean error was 0.018-0.025 and its max 0.067-0.111 (the CPU in bf16:
    0.082, 0.091 with norms drawn around 1), so a fixed 0.1 on the max failed by chance. The bound
    catches what adds more than bf16's own rounding again (benchmarks/prompt_logprob_error.py measures
    each path)."""
    prompt = random_prompts(1, 512, seed=8)[0] * 3  # 3x a prompt of 5-60 tokens

    def cpu_run(dtype: str) -> list[float]:
        cpu = load_worker(DataplaneConfig(model=str(gpu_checkpoint), device="cpu", num_kv_blocks=64,
                                         block_size=BS, dtype=dtype)).runner
        return _prompt_logprobs_run(cpu, prompt, chunk=len(prompt), sync_debug=False)

    want, bf16 = cpu_run("float32"), cpu_run("bfloat16")
    got = _prompt_logprobs_run(gpu_worker(str(gpu_checkpoint)).runner, prompt, chunk=16, sync_debug=True)
    assert len(got) == len(want) == len(bf16) == len(prompt) - 1
    err = [abs(a - b) for a, b in zip(got, want)]
    ref = [abs(a - b) for a, b in zip(bf16, want)]
    assert max(err) <= 2 * max(ref), (max(err), max(ref))
    assert sum(err) / len(err) <= 1.5 * sum(ref) / len(ref), (sum(err) / len(err), sum(ref) / len(ref))
