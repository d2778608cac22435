"""Structured-output token masks on the data plane: the sampler keeps a masked row to its allowed tokens
(greedy, sampled, with penalties and rules), its logprobs are those of the allowed tokens (as vLLM's), and
both data planes check a plan's masks (size, on an item that samples, no look-ahead) and honour them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dataplane.sampler import Sampler, apply_token_masks
from dataplane.seq_state import mask_bytes
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan
from tests.dataplane.test_plan_checks import make_runner

V = 70  # not a multiple of 32: the last word's spare bits must not matter


def mask_of(allowed: list[int], vocab: int = V) -> bytes:
    """The bitmask llguidance and xgrammar write: bit t % 32 of little-endian 32-bit word t // 32."""
    bits = np.zeros(mask_bytes(vocab) * 8, dtype=np.uint8)
    bits[allowed] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def test_masks_are_applied_as_llguidance_applies_its_bitmasks() -> None:
    llg_numpy = pytest.importorskip("llguidance.numpy")
    assert llg_numpy.get_bitmask_shape(1, V)[1] * 4 == mask_bytes(V)
    words = np.frombuffer(mask_of([0, 31, 32, 69]), dtype="<i4")
    assert words.tolist() == [-2147483647, 1, 1 << 5]  # bits 0 and 31, 32, 69
    rng = np.random.default_rng(0)
    masks = [mask_of([int(t) for t in np.flatnonzero(rng.random(V) < p)]) for p in (0.05, 0.5, 0.95)]
    logits = _logits(3, seed=1)
    reference = logits.numpy().copy()
    llg_numpy.apply_token_bitmask_inplace(reference, np.frombuffer(b"".join(masks), dtype=np.int32).reshape(3, -1))
    assert np.array_equal(apply_token_masks(logits, masks).numpy(), reference)


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_apply_token_masks_leaves_unmasked_rows_and_the_input_alone() -> None:
    logits = _logits(3)
    raw = logits.clone()
    out = apply_token_masks(logits, [b"", mask_of([4, 33, 69]), b""])
    assert torch.equal(logits, raw)  # out of place
    assert torch.equal(out[0], raw[0]) and torch.equal(out[2], raw[2])
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [4, 33, 69]
    assert torch.equal(out[1, [4, 33, 69]], raw[1, [4, 33, 69]])
    with pytest.raises(ValueError, match="bits for a vocabulary"):
        apply_token_masks(logits, [b"", b"\xff" * 4, b""])


@pytest.mark.parametrize("seed", range(5))
def test_a_masked_row_samples_only_allowed_tokens(seed: int) -> None:
    logits = _logits(4, seed)
    allowed = [int(i) for i in torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:3]]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=40, seed=seed),
              SamplingParams(temperature=0.0, presence_penalty=2.0, logit_bias=((allowed[0], -50.0),)),
              SamplingParams(temperature=0.0)]
    masks = [mask_of(allowed), mask_of(allowed), mask_of(allowed), b""]
    out = Sampler(seed=seed).sample(logits, params, [0, 0, 1, 0], prompt_token_ids=[torch.tensor([1])] * 4,
                                    output_token_ids=[torch.tensor([allowed[1]], dtype=torch.long)] * 4,
                                    token_masks=masks).token_ids.tolist()
    assert out[0] == max(allowed, key=lambda t: float(logits[0, t]))  # greedy among the allowed
    assert out[1] in allowed and out[2] in allowed
    assert out[3] == int(logits[3].argmax())  # an unmasked row is as without masks


def test_a_masked_rows_logprobs_are_over_its_allowed_tokens() -> None:
    logits = _logits(1, seed=7)
    allowed = [2, 40, 65]
    out = Sampler().sample(logits, [SamplingParams(temperature=0.0, logprobs=5)], [0], token_masks=[mask_of(allowed)])
    lp = out.logprobs[0]
    assert lp is not None and int(out.token_ids[0]) in allowed
    assert sorted(lp.top_token_ids[:3]) == allowed and all(v == -math.inf for v in lp.top_logprobs[3:])
    assert math.isclose(sum(math.exp(v) for v in lp.top_logprobs[:3]), 1.0, rel_tol=1e-5)
    assert lp.rank == 1


def test_min_tokens_does_not_hold_back_a_stop_token_the_grammar_requires() -> None:
    logits = _logits(2, seed=3)
    params = [SamplingParams(temperature=0.0, min_tokens=5, stop_token_ids=(9,))] * 2
    out = Sampler().sample(logits, params, [0, 0], token_masks=[mask_of([9]), b""]).token_ids.tolist()
    assert out[0] == 9  # the grammar allows only the stop token: it wins over min_tokens
    assert out[1] != 9


def _runner(which: str):  # noqa: ANN202 - a ModelRunner or a SimRunner
    return make_runner(which, sim_vocab=260)  # the tiny model's vocabulary, so one mask size fits both


def _new(seq_id: int, prompt: list[int], blocks: list[int]) -> NewRequest:
    return NewRequest(seq_id=seq_id, token_ids=prompt, num_prompt_tokens=len(prompt), block_ids=blocks,
                      sampling=SamplingParams(temperature=1.0, seed=seq_id))


@pytest.mark.parametrize("which", ["runner", "sim"])
def test_both_data_planes_sample_within_the_mask(which: str) -> None:
    runner = _runner(which)
    digits = list(range(48, 58))
    tokens: dict[int, list[int]] = {0: [], 1: []}
    result = runner.execute(StepPlan(step_id=0,
                                     new_requests=[_new(0, [1, 2, 3, 4, 5], [0, 1]), _new(1, [6, 7], [2, 3])],
                                     scheduled=[ScheduledSeq(seq_id=0, num_tokens=5, token_mask=mask_of(digits, 260)),
                                                ScheduledSeq(seq_id=1, num_tokens=2)]))
    assert not result.failures
    for o in result.outputs:
        tokens[o.seq_id] += o.token_ids
    for step in range(1, 4):
        result = runner.execute(StepPlan(step_id=step, scheduled=[
            ScheduledSeq(seq_id=0, num_tokens=1, token_mask=mask_of([step], 260)),
            ScheduledSeq(seq_id=1, num_tokens=1)]))
        assert not result.failures
        for o in result.outputs:
            tokens[o.seq_id] += o.token_ids
    assert tokens[0][0] in digits and tokens[0][1:] == [1, 2, 3]
    assert len(tokens[1]) == 4


@pytest.mark.parametrize("which", ["runner", "sim"])
def test_a_bad_mask_fails_its_sequence_alone(which: str) -> None:
    runner = _runner(which)
    good = mask_of([65], 260)
    result = runner.execute(StepPlan(step_id=0, new_requests=[_new(0, [1, 2, 3, 4, 5], [0, 1]), _new(1, [6, 7], [2]),
                                                              _new(2, [8, 9, 10], [3]), _new(3, [11], [4])],
                                     scheduled=[ScheduledSeq(seq_id=0, num_tokens=3, token_mask=good),  # samples not
                                                ScheduledSeq(seq_id=1, num_tokens=2, token_mask=good[:-4]),
                                                ScheduledSeq(seq_id=2, num_tokens=3, token_mask=good),
                                                ScheduledSeq(seq_id=3, num_tokens=1)]))
    failed = {f.seq_id: f.message for f in result.failures}
    assert set(failed) == {0, 1}
    assert "samples no token" in failed[0] and "needs 36" in failed[1]
    assert {o.seq_id: o.token_ids for o in result.outputs}[2] == [65]
    ahead = runner.execute(StepPlan(step_id=1, decode_steps=2, scheduled=[
        ScheduledSeq(seq_id=2, num_tokens=1, new_block_ids=[5], token_mask=good),
        ScheduledSeq(seq_id=3, num_tokens=1, new_block_ids=[6])]))
    assert [f.seq_id for f in ahead.failures] == [2] and "decodes ahead" in ahead.failures[0].message
    assert [len(o.token_ids) for o in ahead.outputs] == [2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_token_masks_on_the_gpu_match_the_cpu_without_a_host_sync() -> None:
    logits = _logits(4, seed=11)
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=0.0, logit_bias=((5, 3.0),))]
    masks = [mask_of([1, 50, 69]), b"", mask_of([7, 8]), mask_of(list(range(0, V, 2)))]
    want = Sampler().sample(logits, params, [0] * 4, token_masks=masks)
    device_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = Sampler(device="cuda").sample(device_logits, params, [0] * 4, token_masks=masks)
        tokens = got.token_ids
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = tokens.cpu().tolist()
    assert [host[i] for i in (0, 1, 3)] == [int(want.token_ids[i]) for i in (0, 1, 3)]
    assert host[2] in (7, 8)
    lp, ref = got.logprobs[0], want.logprobs[0]
    assert lp is not None and ref is not None and lp.top_token_ids == ref.top_token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_masked_decodes_on_the_gpu_keep_to_their_masks_without_a_host_sync(gpu_checkpoint) -> None:  # noqa: ANN001
    """The runner on the GPU (decode graphs, async launches two deep): a prefill that samples under a mask,
    then masked decodes beside free ones, each step launched in sync-debug "error" mode."""
    from tests.dataplane.gpu_support import gpu_worker

    runner = gpu_worker(str(gpu_checkpoint)).runner
    vocab = runner.config.vocab_size
    prompts = [[3 + (7 * i + j) % 400 for j in range(20 + i)] for i in range(6)]
    news = [NewRequest(seq_id=i, token_ids=p, num_prompt_tokens=len(p), block_ids=list(range(i * 8, i * 8 + 8)),
                       sampling=SamplingParams(temperature=0.0 if i % 2 else 0.7, seed=i))
            for i, p in enumerate(prompts)]
    allowed = {step: list(range(100 + 13 * step, 100 + 13 * step + 9)) for step in range(8)}
    masked = {0, 1, 4}

    def entry(i: int, step: int, num_tokens: int) -> ScheduledSeq:
        mask = mask_of(allowed[step], vocab) if i in masked else b""
        return ScheduledSeq(seq_id=i, num_tokens=num_tokens, token_mask=mask)

    plans = [StepPlan(step_id=0, new_requests=news, scheduled=[entry(i, 0, len(p)) for i, p in enumerate(prompts)])]
    plans += [StepPlan(step_id=s, scheduled=[entry(i, s, 1) for i in range(6)]) for s in range(1, 8)]
    out: dict[int, list[int]] = {i: [] for i in range(6)}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = []
        for plan in plans:
            launched.append(runner.launch(plan))
            if len(launched) == 2:
                pending = launched.pop(0)
                while not pending.ready():
                    pass
                result = pending.result()
                assert not result.failures
                for o in result.outputs:
                    out[o.seq_id] += o.token_ids
        for pending in launched:
            while not pending.ready():
                pass
            for o in pending.result().outputs:
                out[o.seq_id] += o.token_ids
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(len(tokens) == 8 for tokens in out.values())
    for i in masked:
        assert all(token in allowed[step] for step, token in enumerate(out[i])), (i, out[i])
    assert any(token not in allowed[step] for i in set(range(6)) - masked for step, token in enumerate(out[i]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_masking_a_qwen3_sized_batch_does_not_wait_for_the_gpu() -> None:
    """64 rows of Qwen3's vocabulary: 1.2 MB of masks go up while the GPU is behind (a pageable copy that
    large may wait for the stream, which sync-debug mode does not flag), and mask as on the CPU."""
    from tests.dataplane.test_gpu_planning import returns_while_behind

    vocab, rows = 151936, 64
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(rows, vocab, generator=gen)
    masks = [mask_of(torch.randint(0, vocab, (50,), generator=gen).tolist(), vocab) for _ in range(rows)]
    device_logits = logits.cuda()
    apply_token_masks(device_logits, masks)  # the first pinned block allocated
    out: list[torch.Tensor] = []
    assert returns_while_behind(lambda: out.append(apply_token_masks(device_logits, masks))), "the masks waited"
    assert torch.equal(out[0].cpu(), apply_token_masks(logits, masks))
