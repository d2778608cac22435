"""Sampler semantics: greedy, filters, seeded reproducibility, penalties, logprobs."""

from __future__ import annotations

import pytest
import torch

from dataplane.sampler import Sampler, row_seed
from shared.messages import SamplingParams

V = 50


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def _sample(logits: torch.Tensor, params: list[SamplingParams], counts: list[int] | None = None,
            **kw: object) -> torch.Tensor:
    counts = counts if counts is not None else [0] * len(params)
    return Sampler(seed=123).sample(logits, params, counts, **kw).token_ids  # type: ignore[arg-type]


def test_greedy_is_argmax() -> None:
    logits = _logits(8)
    out = _sample(logits, [SamplingParams(temperature=0.0)] * 8)
    assert out.dtype == torch.long
    assert torch.equal(out, logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = _logits(6)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    out = _sample(logits, params)
    assert torch.equal(out[1::2], logits.argmax(-1)[1::2])


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(16, seed=3)
    greedy = logits.argmax(-1)
    assert torch.equal(_sample(logits, [SamplingParams(temperature=1.5, top_k=1)] * 16), greedy)
    assert torch.equal(_sample(logits, [SamplingParams(temperature=1.5, top_p=1e-9)] * 16), greedy)


def test_top_k_keeps_only_top_tokens() -> None:
    logits = _logits(1).expand(400, V).contiguous()
    out = _sample(logits, [SamplingParams(temperature=5.0, top_k=3)] * 400)
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(out.tolist()) <= allowed and len(set(out.tolist())) > 1


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.full((300, V), -10.0)
    logits[:, :4] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])) + 10.0
    out = _sample(logits, [SamplingParams(top_p=0.7)] * 300)
    assert set(out.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; token 2 is outside the nucleus


def test_min_p_filters() -> None:
    row = torch.full((V,), -20.0)
    row[0], row[1], row[2] = 0.0, -0.5, -3.0  # p ratios to max: 1, 0.61, 0.05
    logits = row.expand(500, V).contiguous()
    out = _sample(logits, [SamplingParams(min_p=0.2)] * 500)
    assert set(out.tolist()) == {0, 1}
    out_no_filter = _sample(logits, [SamplingParams()] * 500)
    assert 2 in set(out_no_filter.tolist())


def test_sampling_follows_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * (V - 3))
    logits = torch.log(probs.clamp_min(1e-30)).expand(4000, V).contiguous()
    out = _sample(logits, [SamplingParams()] * 4000)
    freq = torch.bincount(out, minlength=V)[:3].float() / 4000
    torch.testing.assert_close(freq, probs[:3], atol=0.03, rtol=0.0)


def test_seeded_rows_reproducible_alone_and_in_batch() -> None:
    logits = _logits(5, seed=7)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = Sampler(seed=1).sample(logits[2:3], [seeded], [9]).token_ids
    batch_params = [SamplingParams(), SamplingParams(seed=5), seeded, SamplingParams(), seeded]
    batch = Sampler(seed=99).sample(logits, batch_params, [0, 3, 9, 1, 9]).token_ids
    assert batch[2] == alone[0]
    # a different generated-token index draws different noise (over many steps the draws differ)
    draws = {int(Sampler().sample(logits[2:3], [seeded], [c]).token_ids[0]) for c in range(40)}
    assert len(draws) > 1


def test_row_seed_distinguishes_seed_and_count() -> None:
    seeds = {row_seed(s, c) for s in range(20) for c in range(20)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**63 for s in seeds)


def test_unseeded_sampler_generator_is_deterministic() -> None:
    logits = _logits(10)
    params = [SamplingParams()] * 10
    a = Sampler(seed=5).sample(logits, params, [0] * 10).token_ids
    b = Sampler(seed=5).sample(logits, params, [0] * 10).token_ids
    assert torch.equal(a, b)


def _prob_of(logits: torch.Tensor, params: SamplingParams, token: int, n: int = 3000,
             **kw: object) -> float:
    big = logits.expand(n, V).contiguous()
    reps = {k: [v[0]] * n for k, v in kw.items()}  # type: ignore[index]
    out = _sample(big, [params] * n, **reps)
    return float((out == token).float().mean())


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.full((1, V), 0.5)
    logits[0, :2] = torch.tensor([2.0, -1.0])  # one positive, one negative seen token
    prompt, output = [torch.tensor([0])], [torch.tensor([1])]
    greedy = SamplingParams(temperature=0.0, repetition_penalty=100.0)
    out = Sampler().sample(logits, [greedy], [1], prompt_token_ids=prompt, output_token_ids=output)
    assert int(out.token_ids[0]) not in (0, 1)
    base = _prob_of(logits, SamplingParams(), 0)
    pen = _prob_of(logits, SamplingParams(repetition_penalty=3.0), 0,
                   prompt_token_ids=prompt, output_token_ids=output)
    assert pen < base - 0.03  # about 0.084 -> 0.024


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(1, V)
    logits[0, 3] = 2.0
    output = [torch.tensor([3, 3, 3])]
    prompt = [torch.tensor([], dtype=torch.long)]
    base = _prob_of(logits, SamplingParams(), 3)
    pres = _prob_of(logits, SamplingParams(presence_penalty=1.0), 3,
                    prompt_token_ids=prompt, output_token_ids=output)
    freq = _prob_of(logits, SamplingParams(frequency_penalty=1.0), 3,
                    prompt_token_ids=prompt, output_token_ids=output)
    assert freq < pres < base
    neg = _prob_of(logits, SamplingParams(presence_penalty=-2.0), 3,
                   prompt_token_ids=prompt, output_token_ids=output)
    assert neg > base


def test_penalties_without_token_history_raise() -> None:
    with pytest.raises(ValueError, match="output_token_ids"):
        Sampler().sample(_logits(1), [SamplingParams(presence_penalty=1.0)], [0])


def test_logprobs_match_log_softmax() -> None:
    logits = _logits(4, seed=11)
    params = [SamplingParams(temperature=0.0, logprobs=0), SamplingParams(logprobs=3),
              SamplingParams(), SamplingParams(temperature=0.7, top_k=5, logprobs=5)]
    out = Sampler().sample(logits, params, [0] * 4)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        lp = out.logprobs[i]
        assert lp is not None
        assert lp.logprob == pytest.approx(float(ref[i, out.token_ids[i]]), abs=1e-5)
        n = params[i].logprobs or 0
        top = ref[i].topk(n) if n else None
        assert len(lp.top_token_ids) == n and len(lp.top_logprobs) == n
        if top is not None:
            assert lp.top_token_ids == top.indices.tolist()
            assert lp.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-5)
        assert lp.rank == int((ref[i] >= ref[i, out.token_ids[i]]).sum())  # vLLM's rank
    assert out.logprobs[0] is not None and out.logprobs[0].rank == 1  # greedy: the most likely
    forced = Sampler().sample(logits[:1], [SamplingParams(temperature=0.0, logprobs=1, logit_bias=[(7, 100.0)])], [0])
    lp = forced.logprobs[0]
    assert lp is not None and forced.token_ids.tolist() == [7]
    assert lp.rank == int((ref[0] >= ref[0, 7]).sum()) and lp.rank > 1  # the rank under the raw logits


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError):
        Sampler().sample(_logits(2), [SamplingParams()], [0, 0])


# ---------------------------------------------------------------- token rules (logit_bias, allowed_token_ids)


def test_logit_bias_forces_and_bans_tokens_greedily() -> None:
    logits = _logits(3, seed=5)
    top2 = logits.topk(2, dim=-1).indices
    weakest = int(logits[0].argmin())
    params = [SamplingParams(temperature=0.0, logit_bias=((weakest, 100.0),)),
              SamplingParams(temperature=0.0, logit_bias=((int(top2[1, 0]), -100.0),)),
              SamplingParams(temperature=0.0)]
    out = _sample(logits, params)
    assert out.tolist() == [weakest, int(top2[1, 1]), int(logits[2].argmax())]


def test_logit_bias_adds_to_the_logits_before_temperature() -> None:
    logits = torch.zeros(1, V)
    bias = tuple((t, 2.0) for t in range(5))
    draws = [int(Sampler(seed=s).sample(logits, [SamplingParams(logit_bias=bias)], [0]).token_ids[0])
             for s in range(400)]
    share = sum(d < 5 for d in draws) / len(draws)
    expected = 5 * torch.e**2 / (5 * torch.e**2 + V - 5)  # softmax of the biased logits
    assert abs(share - expected) < 0.08


def test_allowed_token_ids_restrict_greedy_and_sampled_rows() -> None:
    logits = _logits(4, seed=9)
    allowed = (3, 17, 41)
    params = [SamplingParams(temperature=0.0, allowed_token_ids=allowed),
              SamplingParams(temperature=1.5, allowed_token_ids=allowed, seed=1),
              SamplingParams(temperature=1.0, top_k=2, allowed_token_ids=allowed),
              SamplingParams(temperature=0.0)]
    out = _sample(logits, params)
    best = max(allowed, key=lambda t: float(logits[0, t]))
    assert int(out[0]) == best
    assert int(out[1]) in allowed and int(out[2]) in allowed
    assert int(out[3]) == int(logits[3].argmax())  # a row without rules is untouched
    for s in range(50):
        row = Sampler(seed=s).sample(logits[1:2], [SamplingParams(temperature=2.0, allowed_token_ids=allowed)], [0])
        assert int(row.token_ids[0]) in allowed


def test_a_bias_cannot_revive_a_token_that_is_not_allowed() -> None:
    logits = _logits(1, seed=2)
    params = [SamplingParams(temperature=0.0, allowed_token_ids=(4, 5), logit_bias=((9, 100.0),))]
    assert int(_sample(logits, params)[0]) in (4, 5)


def test_token_rules_leave_logprobs_raw_and_combine_with_penalties() -> None:
    logits = _logits(2, seed=13)
    raw = logits.clone()
    seen = int(logits[0].argmax())
    params = [SamplingParams(temperature=0.0, logprobs=2, presence_penalty=2.0, logit_bias=((seen, 1.0),)),
              SamplingParams(temperature=0.0, allowed_token_ids=(seen,), logprobs=0)]
    out = Sampler().sample(logits, params, [1, 0], prompt_token_ids=[torch.tensor([1]), torch.tensor([1])],
                           output_token_ids=[torch.tensor([seen]), torch.tensor([], dtype=torch.long)])
    assert torch.equal(logits, raw)  # the caller's logits are not changed in place
    ref = torch.log_softmax(raw, -1)
    shifted = raw[0].clone()
    shifted[seen] += 1.0 - 2.0
    assert int(out.token_ids[0]) == int(shifted.argmax())
    assert int(out.token_ids[1]) == seen
    for i in (0, 1):
        lp = out.logprobs[i]
        assert lp is not None and lp.logprob == pytest.approx(float(ref[i, out.token_ids[i]]), abs=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_token_rules_on_the_gpu_match_the_cpu_without_a_host_sync() -> None:
    logits = _logits(7, seed=21)
    params = [SamplingParams(temperature=0.0, logit_bias=((7, 100.0), (8, -3.0))),
              SamplingParams(temperature=0.0, allowed_token_ids=(1, 2, 30)),
              SamplingParams(temperature=0.0, logprobs=3),  # logprobs and their ranks, also without a sync
              SamplingParams(temperature=0.0, allowed_token_ids=(11,), logit_bias=((11, -5.0),)),
              SamplingParams(temperature=0.9, allowed_token_ids=(5, 6), seed=4),
              SamplingParams(temperature=0.0, logit_bias=((int(logits[5].argmax()), -100.0),)),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(int(logits[6].argmax()),))]
    want = Sampler().sample(logits, params, [0] * 7).token_ids
    device_logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampled = Sampler(device="cuda").sample(device_logits, params, [0] * 7)
        got = sampled.token_ids
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got_host = got.cpu()
    lp = sampled.logprobs[2]
    assert lp is not None and lp.rank == 1 and len(lp.top_token_ids) == 3  # greedy: the most likely
    assert got_host[[0, 1, 2, 3, 5, 6]].tolist() == want[[0, 1, 2, 3, 5, 6]].tolist()
    assert int(want[6]) != int(logits[6].argmax())  # the stop token was masked
    assert int(got_host[4]) in (5, 6)


def test_token_rule_rows_are_built_once_and_refuse_ids_outside_the_vocabulary() -> None:
    sampler = Sampler()
    p = SamplingParams(temperature=0.0, allowed_token_ids=tuple(range(0, V, 2)), logit_bias=((3, 5.0),))
    first = sampler.rules.row(p, V, torch.device("cpu"))
    assert sampler.rules.row(p, V, torch.device("cpu")) is first  # cached for the request's params
    assert float(first[3]) == float("-inf") and float(first[4]) == 0.0  # a bias cannot revive 3
    assert int(sampler.sample(_logits(1), [p], [0]).token_ids[0]) % 2 == 0
    small = type(sampler.rules)(capacity=2)
    rows = [SamplingParams(logit_bias=((i, 1.0),)) for i in range(3)]
    for r in rows:
        small.row(r, V, torch.device("cpu"))
    assert len(small._rows) == 2  # the least recently used went
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Sampler().sample(_logits(2), [SamplingParams(logit_bias=((V, 5.0),)), SamplingParams()], [0, 0])


def test_the_data_plane_refuses_a_request_whose_rules_leave_the_vocabulary() -> None:
    """A NewRequest is checked on arrival (as its token ids are), so a bad rule fails that request
    alone, not the step's sampling pass."""
    from dataplane.worker import load_worker
    from shared.config import DataplaneConfig
    from shared.messages import NewRequest, ScheduledSeq, StepPlan

    run = load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=16, block_size=4)).runner
    bad = NewRequest(seq_id=0, token_ids=[5, 6], num_prompt_tokens=2, block_ids=[0],
                     sampling=SamplingParams(allowed_token_ids=(1, 100_000)))
    good = NewRequest(seq_id=1, token_ids=[5, 6], num_prompt_tokens=2, block_ids=[1],
                      sampling=SamplingParams(temperature=0.0, logit_bias=((7, 100.0),)))
    result = run.execute(StepPlan(step_id=0, new_requests=[bad, good],
                                  scheduled=[ScheduledSeq(seq_id=0, num_tokens=2), ScheduledSeq(seq_id=1, num_tokens=2)]))
    assert [f.seq_id for f in result.failures] == [0] and "allowed_token_ids" in result.failures[0].message
    assert [(o.seq_id, o.token_ids) for o in result.outputs] == [(1, [7])]


def test_min_tokens_keep_the_stop_tokens_out_until_reached() -> None:
    logits = torch.zeros(4, V)
    logits[:, 7] = 50.0  # the stop token is everyone's argmax
    logits[:, 9] = 10.0
    held = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(7,), logprobs=0)
    params = [held, held, SamplingParams(temperature=0.8, min_tokens=3, stop_token_ids=(7, 12), seed=1),
              SamplingParams(temperature=0.0)]
    out = Sampler().sample(logits, params, [0, 3, 2, 0])
    assert out.token_ids.tolist() == [9, 7, out.token_ids[2].item(), 7]  # row 1 has 3 generated: free
    assert out.token_ids[2].item() not in (7, 12)
    lp = out.logprobs[0]
    assert lp is not None and lp.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[9]))


def test_stop_ids_outside_the_logits_are_ignored() -> None:
    logits = _logits(1, seed=5)
    top = int(logits[0].argmax())
    params = [SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=(top, V + 3))]
    assert int(_sample(logits, params)[0]) == int(logits[0].topk(2).indices[1])


def test_logit_bias_comes_before_the_repetition_penalty() -> None:
    logits = torch.tensor([[-1.0, 2.5, 0.0, 0.0]])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias=((0, 5.0),))
    out = Sampler().sample(logits, [p], [0], [torch.tensor([0])], [torch.tensor([], dtype=torch.long)])
    assert int(out.token_ids[0]) == 1  # (-1 + 5) / 2 = 2 < 2.5; penalised first it would be 3


def test_min_p_comes_before_top_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().expand(200, 4).contiguous()
    params = [SamplingParams(top_p=0.6, min_p=0.3, seed=i) for i in range(200)]
    # min-p leaves {0: 0.625, 1: 0.375}; top-p 0.6 of that is token 0 alone
    assert set(_sample(logits, params).tolist()) == {0}


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, -5.0]).expand(300, 5).contiguous()
    out = _sample(logits, [SamplingParams(temperature=100.0, top_k=2, seed=i) for i in range(300)])
    assert set(out.tolist()) == {0, 1, 2, 3}


def test_an_overflowing_penalty_never_samples_a_token_the_rules_forbid() -> None:
    """repetition_penalty 1e-40 divides a positive logit to +inf: the softmax would be NaN and the race
    would pick id 0. The row is capped, so the allowed token (or the seen one, greedy) still wins."""
    logits = _logits(3, seed=9).abs() + 0.5  # positive: divided by the penalty
    seen = [torch.tensor([4]), torch.tensor([4]), torch.tensor([4])]
    outs = [torch.tensor([], dtype=torch.long)] * 3
    params = [SamplingParams(temperature=0.0, repetition_penalty=1e-40, allowed_token_ids=(4,)),
              SamplingParams(temperature=0.7, repetition_penalty=1e-40, allowed_token_ids=(4,), seed=1),
              SamplingParams(temperature=0.7, repetition_penalty=1e-40, seed=2)]
    tokens = Sampler().sample(logits, params, [0, 0, 0], seen, outs).token_ids.tolist()
    assert tokens == [4, 4, 4]  # row 3: the seen token's logit overflowed to the cap, far above the rest
