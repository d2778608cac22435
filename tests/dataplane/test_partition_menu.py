"""SM split arithmetic (no GPU needed) and the CPU worker's answer: no multiplexing, plans still run."""

from __future__ import annotations

import pytest

from dataplane.partition_menu import Split, candidate_splits, choose_menu, granularity_for
from dataplane.worker import load_worker
from shared.config import DataplaneConfig
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan


def test_hopper_splits_are_multiples_of_eight_with_an_unrounded_remainder() -> None:
    splits = candidate_splits(132, major=9)
    assert splits[0] == Split(decode_sms=8, prefill_sms=124)
    assert splits[-1] == Split(decode_sms=120, prefill_sms=12)
    assert len(splits) == 15
    assert all(s.decode_sms % 8 == 0 and s.decode_sms + s.prefill_sms == 132 for s in splits)
    assert granularity_for(8) == (4, 2) and granularity_for(7) == (2, 2)


def test_menu_picks_listed_sizes_and_rejects_impossible_ones() -> None:
    splits = candidate_splits(132)
    assert [s.decode_sms for s in choose_menu(splits, [16, 32])] == [16, 32]
    assert choose_menu(splits, None) == splits
    with pytest.raises(ValueError, match="not allowed"):
        choose_menu(splits, [12])


def test_cpu_worker_reports_no_multiplexing_and_runs_multiplexed_plans_aggregated() -> None:
    loaded = load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=64))
    assert not loaded.ready.supports_multiplexing and loaded.ready.partition_sm_counts == []
    runner = loaded.runner
    new = NewRequest(seq_id=1, token_ids=[5, 6, 7], num_prompt_tokens=3, block_ids=[0, 1],
                     sampling=SamplingParams(temperature=0.0))
    aggregated = runner.execute(StepPlan(step_id=0, new_requests=[new], scheduled=[ScheduledSeq(seq_id=1, num_tokens=3)]))
    plan = StepPlan(step_id=1, mode="multiplexed", prefill_sms=100, decode_sms=32, decode_steps=4,
                    scheduled=[ScheduledSeq(seq_id=1, num_tokens=1)])
    result = runner.execute(plan)
    assert len(result.outputs[0].token_ids) == 4  # look-ahead still honoured, on the CPU path
    assert aggregated.outputs[0].token_ids[0] == runner.seqs[1].token_ids[3]


def test_lookahead_equals_single_steps_on_cpu() -> None:
    """k look-ahead passes fed on-device give the tokens of k separate steps (seeded sampling too)."""
    prompts = {1: [5, 6, 7], 2: [9, 10, 11, 12, 13]}
    outs = []
    for k in (1, 5):
        runner = load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=64)).runner
        news = [NewRequest(seq_id=i, token_ids=p, num_prompt_tokens=len(p), block_ids=[2 * i, 2 * i + 1],
                           sampling=SamplingParams(temperature=0.9, seed=i)) for i, p in prompts.items()]
        runner.execute(StepPlan(step_id=0, new_requests=news,
                                scheduled=[ScheduledSeq(seq_id=i, num_tokens=len(p)) for i, p in prompts.items()]))
        for step in range(1, 10 // k + 1):
            runner.execute(StepPlan(step_id=step, decode_steps=k,
                                    scheduled=[ScheduledSeq(seq_id=i, num_tokens=1) for i in prompts]))
        outs.append({i: runner.seqs[i].token_ids[:16] for i in prompts})
    assert outs[0] == outs[1]
