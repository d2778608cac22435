"""Plan-level checks on both data planes (the real runner on the CPU, and the simulated one): a plan
listing a sequence twice, or asking for fewer than one decode step, fails those sequences as
SeqFailures and runs the rest; neither raises (a raise inside a step is fatal to the worker process)."""

from __future__ import annotations

import pytest

from dataplane.sim import SimRunner
from dataplane.worker import load_worker
from shared.config import DataplaneConfig
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan

GREEDY = SamplingParams(temperature=0.0)


def make_runner(which: str, sim_vocab: int = 256):  # noqa: ANN201 - a ModelRunner or a SimRunner
    """The tiny model's runner on the CPU (vocabulary 260), or the simulated one with `sim_vocab` ids."""
    if which == "sim":
        return SimRunner(num_blocks=32, block_size=4, vocab_size=sim_vocab)
    return load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=32, block_size=4)).runner


def new(seq_id: int, prompt: list[int], blocks: list[int]) -> NewRequest:
    return NewRequest(seq_id=seq_id, token_ids=prompt, num_prompt_tokens=len(prompt), block_ids=blocks,
                      sampling=GREEDY)


@pytest.mark.parametrize("which", ["runner", "sim"])
def test_a_sequence_scheduled_twice_fails_alone(which: str) -> None:
    runner = make_runner(which)
    result = runner.execute(StepPlan(step_id=0, new_requests=[new(0, [1, 2, 3, 4, 5], [0, 1]), new(1, [6, 7], [2])],
                                     scheduled=[ScheduledSeq(seq_id=0, num_tokens=3), ScheduledSeq(seq_id=1, num_tokens=2),
                                                ScheduledSeq(seq_id=0, num_tokens=2)]))
    assert [(f.seq_id, "more than once" in f.message) for f in result.failures] == [(0, True)]
    assert [(o.seq_id, len(o.token_ids)) for o in result.outputs] == [(1, 1)]


@pytest.mark.parametrize("which", ["runner", "sim"])
def test_fewer_than_one_decode_step_fails_the_plans_sequences(which: str) -> None:
    runner = make_runner(which)
    first = runner.execute(StepPlan(step_id=0, new_requests=[new(0, [1, 2, 3, 4], [0])],
                                    scheduled=[ScheduledSeq(seq_id=0, num_tokens=4)]))
    assert not first.failures and len(first.outputs[0].token_ids) == 1
    result = runner.execute(StepPlan(step_id=1, decode_steps=0, scheduled=[ScheduledSeq(seq_id=0, num_tokens=1)]))
    assert [f.seq_id for f in result.failures] == [0] and "decode steps" in result.failures[0].message
    assert not result.outputs
