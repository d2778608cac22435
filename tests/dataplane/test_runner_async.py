"""The runner launching step i+1 before step i's result is collected (async scheduling).

A decode whose input token is still "in flight" is fed from the previous step's sampled tokens on
the device; the tokens must equal those of running the steps one at a time, seeded sampling too.
"""

from __future__ import annotations

import pytest

from dataplane.worker import load_worker
from shared.config import DataplaneConfig
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan


def plans(num_steps: int) -> list[StepPlan]:
    """Two prompts prefilled in step 0, a third joining in step 2; decodes every step after."""
    sampling = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, seed=7),
                SamplingParams(temperature=0.0)]
    prompts = [[5, 9, 13, 17, 21], [30, 31, 32], [7, 8, 9, 10, 11, 12, 13]]
    blocks = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    out = []
    for step in range(num_steps):
        new = [NewRequest(seq_id=i, token_ids=prompts[i], num_prompt_tokens=len(prompts[i]), block_ids=blocks[i],
                          sampling=sampling[i]) for i in ((0, 1) if step == 0 else (2,) if step == 2 else ())]
        scheduled = [ScheduledSeq(seq_id=i, num_tokens=len(prompts[i]) if step == (0 if i < 2 else 2) else 1)
                     for i in range(3) if step >= (0 if i < 2 else 2)]
        out.append(StepPlan(step_id=step, new_requests=new, scheduled=scheduled))
    return out


def tokens_of(results) -> dict[int, list[int]]:  # noqa: ANN001
    seen: dict[int, list[int]] = {}
    for result in results:
        assert not result.failures, result.failures
        for output in result.outputs:
            seen.setdefault(output.seq_id, []).extend(output.token_ids)
    return seen


@pytest.mark.parametrize("depth", [2, 3])
def test_launching_ahead_gives_the_same_tokens(depth: int) -> None:
    config = DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=16, block_size=4)
    one_by_one = load_worker(config).runner
    expected = tokens_of([one_by_one.execute(p) for p in plans(8)])

    runner = load_worker(config).runner
    pending, results = [], []
    for plan in plans(8):
        pending.append(runner.launch(plan))
        if len(pending) == depth:  # collect only once `depth` steps are out
            results.append(pending.pop(0).wait())
    results += [p.wait() for p in pending]
    assert tokens_of(results) == expected
    assert all(len(t) == n for t, n in zip(expected.values(), (8, 8, 6)))
    assert all(s.num_inflight == 0 for s in runner.seqs.values())


def test_a_chunk_cannot_reach_tokens_still_on_the_device() -> None:
    runner = load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=16, block_size=4)).runner
    first = plans(1)[0]
    runner.launch(first)  # its tokens are not collected
    runner.seqs[0].num_computed -= 1  # as if a plan had left the last prompt token for later
    bad = StepPlan(step_id=1, scheduled=[ScheduledSeq(seq_id=0, num_tokens=2)])
    result = runner.launch(bad).wait()
    assert result.failures and "not sampled yet" in result.failures[0].message


def _one_token_from_the_end(runner, extra: list[NewRequest], scheduled: list[ScheduledSeq]) -> int:  # noqa: ANN001
    """Admit seq 0 with limit - 2 prompt tokens, all but the last cached (prefix reuse), and compute that
    one (position limit - 3) in one step with `extra`; returns the model's positions (limit)."""
    limit = runner.config.max_position_embeddings
    near = [3 + i % 200 for i in range(limit - 2)]
    first = runner.execute(StepPlan(step_id=0, new_requests=[
        NewRequest(seq_id=0, token_ids=near, num_prompt_tokens=len(near), num_computed_tokens=len(near) - 1,
                   block_ids=list(range(-(-limit // 4) + 1)), sampling=SamplingParams(temperature=0.0)), *extra],
        scheduled=[ScheduledSeq(seq_id=0, num_tokens=1), *scheduled]))
    assert not first.failures, first.failures
    return limit


def test_a_step_past_the_model_positions_fails_that_sequence_only() -> None:
    """Look-ahead passes that would run past the model's RoPE table fail the sequence with a message
    (on a GPU the read past the table is an illegal address that ends every request); others run."""
    runner = load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=1100, block_size=4)).runner
    other = NewRequest(seq_id=1, token_ids=[5, 6, 7], num_prompt_tokens=3, block_ids=[1050, 1051],
                       sampling=SamplingParams(temperature=0.0))
    limit = _one_token_from_the_end(runner, [other], [ScheduledSeq(seq_id=1, num_tokens=3)])
    ahead = StepPlan(step_id=1, scheduled=[ScheduledSeq(seq_id=0, num_tokens=1), ScheduledSeq(seq_id=1, num_tokens=1)],
                     decode_steps=4)  # seq 0 would reach position limit + 1
    result = runner.execute(ahead)
    assert [f.seq_id for f in result.failures] == [0]
    assert f"passes the model's {limit} positions" in result.failures[0].message
    assert [o.seq_id for o in result.outputs] == [1] and len(result.outputs[0].token_ids) == 4


def test_a_step_to_the_last_position_runs() -> None:
    """The boundary: a decode and one look-ahead pass ending at position limit - 1 compute both tokens."""
    runner = load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=1100, block_size=4)).runner
    _one_token_from_the_end(runner, [], [])
    result = runner.execute(StepPlan(step_id=1, scheduled=[ScheduledSeq(seq_id=0, num_tokens=1)], decode_steps=2))
    assert not result.failures, result.failures  # positions limit - 2 and limit - 1
    assert len(result.outputs[0].token_ids) == 2


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 50.0, "presence_penalty": 50.0},
                                     {"repetition_penalty": 1e6}])
def test_lookahead_passes_penalise_the_tokens_of_the_passes_before(penalty: dict[str, float]) -> None:
    """One step of 4 look-ahead decode passes gives the tokens of 4 single steps when penalties apply:
    each pass counts the tokens the step's earlier passes sampled, still on the device. A penalised
    seq beside an unpenalised one, so the rows' in-flight tokens must stay with their rows."""
    config = DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=32, block_size=4)
    samplings = [SamplingParams(temperature=0.0, **penalty), SamplingParams(temperature=0.0)]
    prompts = [[5, 9, 13, 17, 21], [30, 31, 32]]
    news = [NewRequest(seq_id=i, token_ids=prompts[i], num_prompt_tokens=len(prompts[i]),
                       block_ids=list(range(8 * i, 8 * i + 8)), sampling=samplings[i]) for i in range(2)]

    def run(decode_steps: int) -> dict[int, list[int]]:
        runner = load_worker(config).runner
        results = [runner.execute(StepPlan(step_id=0, new_requests=news, scheduled=[
            ScheduledSeq(seq_id=i, num_tokens=len(prompts[i])) for i in range(2)]))]
        for step in range(1, 1 + 8 // decode_steps):
            results.append(runner.execute(StepPlan(step_id=step, decode_steps=decode_steps, scheduled=[
                ScheduledSeq(seq_id=i, num_tokens=1) for i in range(2)])))
        return tokens_of(results)

    one_at_a_time = run(1)
    assert len(one_at_a_time[0]) == 9 and len(set(one_at_a_time[0])) == 9  # the penalty bites: no repeats
    assert run(4) == one_at_a_time
