"""The runner on the CPU given a request whose first blocks already hold its prefix's KV (a prefix
cache hit): it computes only the rest, and samples what computing the whole prompt samples."""

from __future__ import annotations

import pytest

from dataplane.worker import load_worker
from shared.config import DataplaneConfig
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan

GREEDY = SamplingParams(temperature=0.0, logprobs=3)
PREFIX = [5, 9, 13, 17, 21, 25, 29, 33]  # two blocks of 4


def runner():  # noqa: ANN201
    return load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=16, block_size=4)).runner


def request(seq_id: int, tokens: list[int], blocks: list[int], cached: int = 0) -> NewRequest:
    return NewRequest(seq_id=seq_id, token_ids=tokens, num_prompt_tokens=len(tokens), block_ids=blocks,
                      sampling=GREEDY, num_computed_tokens=cached)


def test_a_cached_prefix_is_read_not_recomputed() -> None:
    run = runner()
    first = request(0, PREFIX + [40, 41], [0, 1, 2])
    run.execute(StepPlan(step_id=0, new_requests=[first], scheduled=[ScheduledSeq(seq_id=0, num_tokens=10)]))
    tail = [50, 51, 52]
    hit = request(1, PREFIX + tail, [0, 1, 3], cached=8)  # blocks 0 and 1 hold PREFIX's KV
    whole = request(2, PREFIX + tail, [4, 5, 6])
    both = [ScheduledSeq(seq_id=1, num_tokens=3), ScheduledSeq(seq_id=2, num_tokens=11)]
    result = run.execute(StepPlan(step_id=1, new_requests=[hit, whole], scheduled=both))
    assert not result.failures, result.failures
    by_seq = {o.seq_id: o for o in result.outputs}
    assert by_seq[1].token_ids == by_seq[2].token_ids
    assert by_seq[1].logprobs[0].top_token_ids == by_seq[2].logprobs[0].top_token_ids
    assert by_seq[1].logprobs[0].logprob == pytest.approx(by_seq[2].logprobs[0].logprob, abs=1e-4)
    assert run.seqs[1].num_computed == 11


@pytest.mark.parametrize("cached", [-1, 11, 12])
def test_a_cached_count_not_below_the_tokens_is_refused(cached: int) -> None:
    run = runner()
    bad = request(0, PREFIX + [1, 2, 3], [0, 1, 2], cached=cached)
    result = run.execute(StepPlan(step_id=0, new_requests=[bad], scheduled=[ScheduledSeq(seq_id=0, num_tokens=1)]))
    assert [f.seq_id for f in result.failures] == [0]
    assert "num_computed_tokens" in result.failures[0].message


def test_the_simulated_runner_refuses_unsafe_sharing() -> None:
    """The simulated data plane the scheduler tests run against catches the control plane's
    prefix-caching mistakes: a block shared before its KV is written, a cached count that is not
    whole blocks, a shared block holding other tokens, a shared block handed out for writing."""
    from dataplane.sim import SimRunner

    def new(seq_id: int, tokens: list[int], blocks: list[int], cached: int, n: int) -> str:
        plan = StepPlan(step_id=seq_id, new_requests=[NewRequest(
            seq_id=seq_id, token_ids=tokens, num_prompt_tokens=len(tokens), block_ids=blocks, sampling=GREEDY,
            num_computed_tokens=cached)], scheduled=[ScheduledSeq(seq_id=seq_id, num_tokens=n)])
        failures = sim.execute(plan).failures
        return failures[0].message if failures else ""

    sim = SimRunner(16, 4, 1000, check_kv=True)
    assert new(0, PREFIX + [1, 2], [0, 1, 2], 0, 4) == ""  # block 0 computed, block 1 not yet
    assert "still being written" in new(1, PREFIX + [3], [0, 1, 3], 8, 1)
    assert "not whole blocks" in new(2, PREFIX + [3], [0, 4, 5], 6, 3)
    assert "computed for token" in new(3, [99] * 4 + PREFIX[4:] + [3], [0, 6, 7], 4, 5)
    assert new(4, PREFIX[:4] + [7, 7, 7], [0, 8], 4, 3) == ""  # block 0 shared rightly
    sim.execute(StepPlan(step_id=9, finished_seq_ids=[0]))  # its writer is gone; seq 4 still reads it
    assert "cached prefix of seq 4" in new(5, [1, 2, 3], [0], 0, 3)


def test_prompt_logprobs_cover_the_prompt_only_in_chunks_and_after_a_preemption() -> None:
    """Row j of a chunk predicts token j + 1: chunks send their part of the prompt's logprobs (a chunk
    that does not sample too), and a recomputed sequence (prompt + its earlier outputs) sends them for
    prompt tokens only -- the same values as computing the prompt whole."""
    asked = SamplingParams(temperature=0.0, prompt_logprobs=2)
    prompt = PREFIX + [40, 41]
    whole = runner()
    out = whole.execute(StepPlan(step_id=0, new_requests=[NewRequest(
        seq_id=0, token_ids=prompt, num_prompt_tokens=10, block_ids=[0, 1, 2], sampling=asked)],
        scheduled=[ScheduledSeq(seq_id=0, num_tokens=10)])).outputs[0]
    assert out.prompt_logprobs_start == 1 and len(out.prompt_logprobs) == 9 and len(out.token_ids) == 1
    chunked = runner()
    plan = StepPlan(step_id=0, new_requests=[NewRequest(seq_id=0, token_ids=prompt, num_prompt_tokens=10,
                                                        block_ids=[0, 1, 2], sampling=asked)],
                    scheduled=[ScheduledSeq(seq_id=0, num_tokens=6)])
    first = chunked.execute(plan).outputs[0]
    assert first.token_ids == [] and first.prompt_logprobs_start == 1 and len(first.prompt_logprobs) == 6
    second = chunked.execute(StepPlan(step_id=1, scheduled=[ScheduledSeq(seq_id=0, num_tokens=4)])).outputs[0]
    assert second.prompt_logprobs_start == 7 and len(second.prompt_logprobs) == 3
    joined = first.prompt_logprobs + second.prompt_logprobs
    assert [e.logprob for e in joined] == pytest.approx([e.logprob for e in out.prompt_logprobs], abs=1e-4)
    assert [e.top_token_ids for e in joined] == [e.top_token_ids for e in out.prompt_logprobs]
    again = runner().execute(StepPlan(step_id=0, new_requests=[NewRequest(
        seq_id=0, token_ids=prompt + [7, 8], num_prompt_tokens=10, block_ids=[0, 1, 2], sampling=asked)],
        scheduled=[ScheduledSeq(seq_id=0, num_tokens=12)])).outputs[0]
    assert again.prompt_logprobs_start == 1 and len(again.prompt_logprobs) == 9  # not for the outputs
    assert [e.logprob for e in again.prompt_logprobs] == pytest.approx([e.logprob for e in out.prompt_logprobs],
                                                                        abs=1e-4)
