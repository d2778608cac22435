"""Scheduler unit tests against the simulated runner (real bookkeeping, no math)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.kv_blocks import BlockAllocator
from controlplane.scheduler import Scheduler
from controlplane.sequence import FinishReason, Sequence, StopParams
from dataplane.sim import SimRunner, sim_token
from dataplane.sim_worker import SimGpu
from shared.config import SchedulerConfig
from shared.messages import SamplingParams, StepPlan, StepResult

VOCAB = 1000
EOS = 3


def make_seq(seq_id: int, prompt_len: int, max_tokens: int) -> Sequence:
    prompt = [(seq_id * 13 + i) % 500 + 16 for i in range(prompt_len)]
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", prompt_token_ids=prompt,
                    sampling=SamplingParams(temperature=0.0), stop=StopParams(max_tokens=max_tokens),
                    arrival_time=float(seq_id))


def make_scheduler(num_blocks: int = 64, block_size: int = 4, budget: int = 32, max_seqs: int = 16,
                   max_model_len: int = 10_000) -> tuple[Scheduler, SimRunner]:
    config = SchedulerConfig(max_num_seqs=min(max_seqs, budget), max_num_batched_tokens=budget)
    sched = Scheduler(config, BlockAllocator(num_blocks, block_size), max_model_len, frozenset({EOS}))
    return sched, SimRunner(num_blocks, block_size, VOCAB)


def step(sched: Scheduler, runner: SimRunner | SimGpu) -> tuple[StepPlan, StepResult]:
    plan = sched.schedule()
    assert plan is not None
    assert sum(s.num_tokens for s in plan.scheduled) <= sched.config.max_num_batched_tokens
    assert len(plan.scheduled) <= sched.config.max_num_seqs
    result = runner.execute(plan)
    assert not result.failures, result.failures
    sched.update(result)
    sched.check_invariants()
    return plan, result


def drain(sched: Scheduler, runner: SimRunner | SimGpu, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_work():
        step(sched, runner)
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def expected_tokens(seq: Sequence, n: int) -> list[int]:
    key = hash(tuple(seq.prompt_token_ids)) & 0xFFFFFFFF
    return [sim_token(key, seq.num_prompt_tokens + i, VOCAB) for i in range(n)]


def test_long_prompt_is_prefilled_in_chunks() -> None:
    sched, runner = make_scheduler(budget=32)
    seq = make_seq(0, 100, 3)
    sched.add(seq)
    chunks = [step(sched, runner)[0].scheduled[0].num_tokens for _ in range(4)]
    assert chunks == [32, 32, 32, 4]
    assert len(seq.output_token_ids) == 1  # sampled only at the end of the prompt
    drain(sched, runner)
    assert seq.output_token_ids == expected_tokens(seq, 3) and seq.finish_reason is FinishReason.LENGTH
    assert sched.allocator.num_free == sched.allocator.num_blocks


def test_decodes_go_first_and_prefill_takes_the_rest() -> None:
    sched, runner = make_scheduler(budget=8)
    decoders = [make_seq(i, 2, 50) for i in range(4)]
    for s in decoders:
        sched.add(s)
    step(sched, runner)  # all four prompts fit: 8 tokens
    assert all(s.is_decoding for s in decoders)
    sched.add(make_seq(9, 100, 2))
    plan, _ = step(sched, runner)
    by_id = {s.seq_id: s.num_tokens for s in plan.scheduled}
    assert [by_id[s.seq_id] for s in decoders] == [1, 1, 1, 1] and by_id[9] == 4
    assert [s.seq_id for s in plan.scheduled][:4] == [0, 1, 2, 3]


def test_preemption_recomputes_and_gives_the_same_tokens() -> None:
    sched, runner = make_scheduler(num_blocks=12, block_size=4, budget=64)
    seqs = [make_seq(i, 10, 12) for i in range(4)]  # each needs 6 blocks at the end, 24 in all
    for s in seqs:
        sched.add(s)
    drain(sched, runner)
    assert sched.num_preemptions > 0
    for s in seqs:
        assert s.output_token_ids == expected_tokens(s, 12)
    assert sched.allocator.num_free == 12


def test_a_decode_pass_that_preempts_ends_at_the_preempted_tail() -> None:
    """Three decodes that each start a block and no block free: the first preempts the last and
    takes its block, the second preempts itself, and the pass ends there (the last is not met)."""
    sched, runner = make_scheduler(num_blocks=3, block_size=4, budget=64)
    seqs = [make_seq(i, 4, 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    step(sched, runner)  # three 4-token prompts, one block each: all decoding, none free
    assert all(s.is_decoding for s in seqs) and sched.allocator.num_free == 0
    plan, _ = step(sched, runner)
    assert [e.seq_id for e in plan.scheduled] == [0]
    assert [s.seq_id for s in sched.waiting] == [1, 2] and sched.num_preemptions == 2
    drain(sched, runner)
    for s in seqs:
        assert s.output_token_ids == expected_tokens(s, 3)


def test_finish_frees_blocks_and_tells_the_worker() -> None:
    sched, runner = make_scheduler()
    a, b = make_seq(0, 10, 100), make_seq(1, 10, 100)
    sched.add(a)
    sched.add(b)
    step(sched, runner)
    used = sched.allocator.num_used
    assert used > 0
    sched.finish(0, FinishReason.ABORT)
    assert a.finish_reason is FinishReason.ABORT and not a.block_ids
    plan, _ = step(sched, runner)
    assert plan.finished_seq_ids == [0] and {s.seq_id for s in plan.scheduled} == {1}
    assert 0 not in runner.seqs
    assert sched.finish(0, FinishReason.ABORT) is None  # idempotent
    waiting = make_seq(2, 5, 5)
    sched.add(waiting)
    assert sched.finish(2, FinishReason.ABORT) is waiting and not sched.waiting


def test_eos_stops_unless_ignored_and_min_tokens_holds_it_back() -> None:
    sched, _ = make_scheduler()
    seq = make_seq(0, 3, 10)
    sched.add(seq)
    plan = sched.schedule()
    assert plan is not None
    from shared.messages import SeqOutput

    sched.update(StepResult(step_id=plan.step_id, outputs=[SeqOutput(seq_id=0, token_ids=[EOS])]))
    assert seq.finish_reason is FinishReason.STOP and sched.allocator.num_free == sched.allocator.num_blocks

    sched2, _ = make_scheduler()
    held = make_seq(1, 3, 10)
    held = dataclasses.replace(held, stop=StopParams(max_tokens=10, min_tokens=2))
    sched2.add(held)
    plan = sched2.schedule()
    assert plan is not None
    sched2.update(StepResult(step_id=plan.step_id, outputs=[SeqOutput(seq_id=1, token_ids=[EOS])]))
    assert not held.is_finished


def test_worker_failure_finishes_the_sequence_with_error() -> None:
    sched, _ = make_scheduler()
    seq = make_seq(0, 3, 10)
    sched.add(seq)
    plan = sched.schedule()
    assert plan is not None
    from shared.messages import SeqFailure

    sched.update(StepResult(step_id=plan.step_id, failures=[SeqFailure(seq_id=0, message="boom")]))
    assert seq.finish_reason is FinishReason.ERROR and seq.error == "boom"
    assert sched.allocator.num_free == sched.allocator.num_blocks
    assert sched.schedule() is None  # the worker already dropped it: nothing to tell


def test_missing_token_is_an_error_not_a_hang() -> None:
    sched, _ = make_scheduler()
    seq = make_seq(0, 3, 10)
    sched.add(seq)
    plan = sched.schedule()
    assert plan is not None
    sched.update(StepResult(step_id=plan.step_id))
    assert seq.finish_reason is FinishReason.ERROR and "no token" in (seq.error or "")


def test_a_short_lookahead_answer_is_an_error_not_a_hang() -> None:
    """A k=4 step answered with 2 tokens: the sequence's computed count ran ahead by the 2 never sent,
    so it could never be scheduled again; it ends with an error and frees its blocks."""
    from controlplane.policies import ModeDecision
    from shared.messages import SeqOutput

    sched, runner = make_scheduler(block_size=16)
    seq = make_seq(0, 4, 50)
    sched.add(seq)
    step(sched, runner)  # the prompt, and the first token
    sched.policy.decide = lambda batch, forecast: ModeDecision(decode_steps=4)  # type: ignore[method-assign]
    plan = sched.schedule()
    assert plan is not None and plan.decode_steps == 4
    full = runner.execute(plan)
    updates = sched.update(StepResult(step_id=plan.step_id, outputs=[
        SeqOutput(seq_id=0, token_ids=full.outputs[0].token_ids[:2])]))
    assert seq.finish_reason is FinishReason.ERROR and "2 tokens fewer" in (seq.error or "")
    assert updates and updates[-1].finished
    assert not sched.has_work() and sched.allocator.num_free == sched.allocator.num_blocks


def test_lookahead_tokens_are_accepted_until_a_stop() -> None:
    sched, runner = make_scheduler(block_size=16)
    seq = make_seq(0, 4, 5)
    sched.add(seq)
    step(sched, runner)
    plan = sched.schedule()
    assert plan is not None
    lookahead = StepPlan(step_id=plan.step_id, scheduled=plan.scheduled, decode_steps=8)
    result = runner.execute(lookahead)
    sched.update(result)
    assert len(result.outputs[0].token_ids) == 8
    assert len(seq.output_token_ids) == 5 and seq.finish_reason is FinishReason.LENGTH


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 30)), min_size=1, max_size=12),
    num_blocks=st.integers(23, 80),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(1, 96),
    max_seqs=st.integers(1, 8),
    abort_seed=st.integers(0, 1000),
)
def test_random_workloads_complete_with_invariants(
    lengths: list[tuple[int, int]], num_blocks: int, block_size: int, budget: int, max_seqs: int, abort_seed: int
) -> None:
    capacity = num_blocks * block_size
    lengths = [(p, o) for p, o in lengths if p + o <= capacity] or [(1, 1)]
    sched, runner = make_scheduler(num_blocks, block_size, budget, max_seqs)
    seqs = [make_seq(i, p, o) for i, (p, o) in enumerate(lengths)]
    run_random_workload(sched, runner, seqs, random.Random(abort_seed), abort_rate=0.05)


def run_random_workload(sched: Scheduler, runner: SimRunner | SimGpu, seqs: list[Sequence], rng: random.Random,
                        abort_rate: float, after_step: Callable[[Scheduler], None] | None = None) -> None:
    """Add `seqs` at random moments, step until all end, abort a random live one now and then; then
    every block is free, and each sequence that ran to its length has the simulated runner's tokens."""
    pending, steps = list(seqs), 0
    while pending or sched.has_work():
        if pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        if sched.has_work():
            step(sched, runner)
            if after_step is not None:
                after_step(sched)
            if rng.random() < abort_rate and sched.seqs:
                sched.finish(rng.choice(list(sched.seqs)), FinishReason.ABORT)
        steps += 1
        assert steps < 20_000
    assert sched.allocator.num_free == sched.allocator.num_blocks
    for seq in seqs:
        assert seq.is_finished
        if seq.finish_reason is FinishReason.LENGTH:
            assert seq.output_token_ids == expected_tokens(seq, seq.stop.max_tokens)
        else:
            assert seq.finish_reason is FinishReason.ABORT


def test_decode_pass_items_then_chunks_then_one_token_prompt() -> None:
    """The decode pass notes its decode items for the batch shape and the plan; a later item that is
    also a decode item (a one-token prompt, admitted after a running prompt's last chunk) must be
    planned once, after that chunk, and seen by the policy as a decode item."""
    sched, runner = make_scheduler(budget=32)
    sched.add(make_seq(0, 5, 50))
    sched.add(make_seq(1, 5, 50))
    step(sched, runner)
    sched.add(make_seq(2, 40, 5))
    plan, _ = step(sched, runner)
    assert [(s.seq_id, s.num_tokens) for s in plan.scheduled] == [(0, 1), (1, 1), (2, 30)]
    sched.add(make_seq(3, 1, 5))
    seen = []
    decide = sched.policy.decide

    def watched(batch, forecast):  # noqa: ANN001, ANN202
        seen.append(batch)
        return decide(batch, forecast)

    sched.policy.decide = watched  # type: ignore[method-assign]
    plan, _ = step(sched, runner)
    assert [(s.seq_id, s.num_tokens) for s in plan.scheduled] == [(0, 1), (1, 1), (2, 10), (3, 1)]
    assert seen[0].decode_contexts == [6, 6, 0] and seen[0].chunks == [(10, 30, True)]
    assert [s.seq_id for s in plan.new_requests] == [3]
    drain(sched, runner)
