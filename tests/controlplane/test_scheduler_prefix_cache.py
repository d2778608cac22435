"""The scheduler with prefix caching, against the simulated runner keeping every KV slot's token
(`check_kv`): a sequence whose context slots hold other tokens fails the step, so a block shared or
reused wrongly cannot pass. Outputs must equal those of the same requests without the cache."""

from __future__ import annotations

from collections import deque

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.kv_blocks import BlockAllocator
from controlplane.prefix_cache import PrefixCachingAllocator, token_bytes
from controlplane.scheduler import Scheduler
from controlplane.sequence import FinishReason, SeqStatus, Sequence, StopParams
from controlplane.step_draft import StepDraft, trim_draft
from dataplane.sim import SimRunner
from shared.config import SchedulerConfig
from shared.messages import SamplingParams, SeqFailure, StepResult
from tests.controlplane.test_scheduler import EOS, VOCAB, drain, expected_tokens, step

SIZE = 4


def seq_with(seq_id: int, prompt: list[int], max_tokens: int = 3) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", prompt_token_ids=list(prompt),
                    sampling=SamplingParams(temperature=0.0), stop=StopParams(max_tokens=max_tokens),
                    arrival_time=float(seq_id))


def make(num_blocks: int = 64, budget: int = 32, cache: bool = True, async_scheduling: bool = True,
         max_seqs: int = 16) -> tuple[Scheduler, SimRunner]:
    config = SchedulerConfig(max_num_seqs=min(max_seqs, budget), max_num_batched_tokens=budget,
                             async_scheduling=async_scheduling)
    alloc = (PrefixCachingAllocator if cache else BlockAllocator)(num_blocks, SIZE)
    return Scheduler(config, alloc, 10_000, frozenset({EOS})), SimRunner(num_blocks, SIZE, VOCAB, check_kv=True)


PROMPT = [100 + i for i in range(20)]  # 5 full blocks


def test_a_later_prompt_with_the_same_start_computes_only_the_rest() -> None:
    sched, runner = make()
    first = seq_with(0, PROMPT)
    sched.add(first)
    drain(sched, runner)
    assert sched.allocator.num_cached == 5 and first.num_cached_tokens == 0
    second = seq_with(1, PROMPT[:16] + [7, 8, 9])
    sched.add(second)
    plan, _ = step(sched, runner)
    (new,) = plan.new_requests
    assert new.num_computed_tokens == 16 and plan.scheduled[0].num_tokens == 3
    assert new.block_ids[:4] == first_blocks(sched, PROMPT)
    drain(sched, runner)
    assert second.num_cached_tokens == 16
    assert second.output_token_ids == expected_tokens(second, 3)
    assert sched.allocator.num_free == sched.allocator.num_blocks


def first_blocks(sched: Scheduler, tokens: list[int]) -> list[int]:
    cache = sched.allocator
    assert isinstance(cache, PrefixCachingAllocator)
    return cache.match(token_bytes(tokens), len(tokens) // SIZE)[0][:4]


def test_a_prompt_cached_whole_still_computes_its_last_block() -> None:
    sched, runner = make()
    sched.add(seq_with(0, PROMPT))
    drain(sched, runner)
    again = seq_with(1, PROMPT)
    sched.add(again)
    plan, _ = step(sched, runner)
    assert plan.new_requests[0].num_computed_tokens == 16 and plan.scheduled[0].num_tokens == 4
    drain(sched, runner)
    assert again.output_token_ids == expected_tokens(again, 3) and again.num_cached_tokens == 16


def test_a_running_prompt_shares_its_prefill_once_the_chunk_is_back() -> None:
    sched, runner = make(budget=8, async_scheduling=False)
    first = seq_with(0, PROMPT, max_tokens=20)
    sched.add(first)
    step(sched, runner)  # 8 of its 20 tokens: 2 blocks registered with the result
    assert sched.allocator.num_cached == 2
    second = seq_with(1, PROMPT[:12] + [5, 6])
    sched.add(second)
    while not second.on_worker:
        plan, _ = step(sched, runner)
    # step 2 computed the first's next 8 tokens, so step 3 admits the second with 3 of its 4 blocks
    # (12 of its 14 tokens; the last one is computed) beside the first's last 4 prompt tokens
    assert plan.step_id == 2 and plan.new_requests[0].num_computed_tokens == 12
    assert second.block_ids[:3] == first.block_ids[:3] and second.block_ids[3] not in first.block_ids
    drain(sched, runner)
    assert first.output_token_ids == expected_tokens(first, 20)
    assert second.output_token_ids == expected_tokens(second, 3)


def test_generated_tokens_are_cached_for_the_next_turn() -> None:
    sched, runner = make()
    turn = seq_with(0, PROMPT[:10], max_tokens=10)
    sched.add(turn)
    drain(sched, runner)
    history = turn.prompt_token_ids + turn.output_token_ids  # 20 tokens: 5 full blocks, 4 computed
    follow_up = seq_with(1, history + [42, 43])
    sched.add(follow_up)
    plan, _ = step(sched, runner)
    assert plan.new_requests[0].num_computed_tokens == 16  # the last output's KV was never computed
    drain(sched, runner)
    assert follow_up.output_token_ids == expected_tokens(follow_up, 3)


def test_only_kv_a_result_confirmed_is_registered() -> None:
    """A request ended while its chunk is in flight registers nothing of that chunk (the step might
    still fail it), nor does an error; a chunk whose result is back stays cached after an abort."""
    for reason in (FinishReason.ERROR, FinishReason.ABORT):
        sched, runner = make(budget=8, async_scheduling=False)
        sched.add(seq_with(0, PROMPT))
        plan = sched.schedule()  # the first chunk, 8 tokens, in flight
        assert plan is not None
        sched.finish(0, reason)
        sched.update(runner.execute(plan))
        sched.check_invariants()
        assert sched.allocator.num_cached == 0 and sched.allocator.num_free == sched.allocator.num_blocks
    sched, runner = make(budget=8, async_scheduling=False)
    sched.add(seq_with(0, PROMPT))
    step(sched, runner)  # the first chunk's result is back: 2 blocks confirmed
    sched.finish(0, FinishReason.ABORT)
    assert sched.allocator.num_cached == 2


def test_a_chunk_the_data_plane_failed_is_not_shared() -> None:
    """Two chunks in flight (async); the second fails on the data plane. The first chunk's blocks
    were confirmed by its result, the second's never are, so a later prompt reuses only the first."""
    sched, runner = make(budget=8, async_scheduling=True)
    sched.add(seq_with(0, PROMPT))
    first, second = sched.schedule(), sched.schedule()
    assert first is not None and second is not None
    first_result = runner.execute(first)
    runner._drop(0)  # the data plane drops the sequence instead of running its second chunk
    failed = msgspec.structs.replace(runner.execute(msgspec.structs.replace(second, scheduled=[])),
                                     failures=[SeqFailure(seq_id=0, message="injected")])
    sched.update(first_result)
    assert sched.allocator.num_cached == 2  # the second chunk (in flight then) is not registered
    sched.update(failed)
    assert sched.seqs == {} and sched.allocator.num_cached == 2
    again = seq_with(1, PROMPT)
    sched.add(again)
    plan, _ = step(sched, runner)  # the simulated runner fails a step reading unwritten KV
    assert plan.new_requests[0].num_computed_tokens == 8
    drain(sched, runner)
    assert again.output_token_ids == expected_tokens(again, 3)


def test_a_token_the_data_plane_never_sent_shares_nothing() -> None:
    sched, runner = make(async_scheduling=False)
    sched.add(seq_with(0, PROMPT[:8]))
    plan = sched.schedule()
    assert plan is not None
    runner.execute(plan)
    sched.update(StepResult(step_id=plan.step_id))  # no token and no failure: the sequence errs
    assert sched.seqs == {} and sched.allocator.num_cached == 0


def test_a_trimmed_admission_goes_back_to_the_queue_as_it_was() -> None:
    sched, runner = make()
    sched.add(seq_with(0, PROMPT))
    drain(sched, runner)
    seq = seq_with(1, PROMPT[:16] + [1, 2, 3])
    sched.add(seq)
    draft = StepDraft(budget=32)
    sched._admit_waiting(draft)
    assert seq.num_computed_tokens == 16 and seq.num_cached_tokens == 16 and draft.tokens == {1: 3}
    trim_draft(draft, 0, sched.seqs, sched.allocator, sched.running, sched.waiting)
    assert seq.status is SeqStatus.WAITING and sched.waiting == deque([seq])
    assert (seq.num_computed_tokens, seq.num_cached_tokens, seq.block_ids) == (0, 0, [])
    sched.check_invariants()
    drain(sched, runner)  # admitted again, with the same hit
    assert seq.num_cached_tokens == 16 and seq.output_token_ids == expected_tokens(seq, 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 30), st.integers(1, 12), st.integers(0, 3)),
                min_size=1, max_size=14),
       st.integers(12, 40), st.sampled_from([4, 8, 32]), st.booleans(), st.booleans())
def test_random_requests_give_the_same_tokens_with_and_without_the_cache(
        requests: list[tuple[int, int, int, int]], num_blocks: int, budget: int, async_scheduling: bool,
        abort_one: bool) -> None:
    """Prompts from three families sharing prefixes, arriving a few steps apart, through few blocks
    (preemptions, evictions): each request's tokens equal its expected ones, no KV slot a step
    reads holds another token, every block is free at the end."""
    outputs = {}
    for cache in (False, True):
        sched, runner = make(num_blocks=num_blocks, budget=budget, cache=cache, async_scheduling=async_scheduling)
        pending = [(i, seq_with(i, [fam * 1000 + (j if j < 9 else fam + j) for j in range(length)], max_tokens))
                   for i, (fam, length, max_tokens, _) in enumerate(requests)]
        delays = deque(gap for *_, gap in requests)
        seqs: list[Sequence] = []
        executed: deque = deque()  # results of the steps in flight, oldest first
        steps = 0
        while pending or sched.has_work() or executed:
            while pending and (not delays[0] or not sched.has_work()):
                delays.popleft()
                seqs.append(pending.pop(0)[1])
                sched.add(seqs[-1])
            if delays:
                delays[0] -= 1
            if abort_one and steps == 3 and not seqs[0].is_finished:
                sched.finish(seqs[0].seq_id, FinishReason.ABORT)
            while len(sched.inflight) < sched.max_inflight:  # up to two planned ahead, as the engine does
                plan = sched.schedule()
                if plan is None:
                    break
                executed.append(runner.execute(plan))
                assert not executed[-1].failures, executed[-1].failures
            if executed:
                sched.update(executed.popleft())
            sched.check_invariants()
            steps += 1
            assert steps < 5000, "no progress"
        assert sched.allocator.num_free == sched.allocator.num_blocks
        outputs[cache] = [(s.finish_reason, s.output_token_ids) for s in seqs]
        for s in seqs:
            if s.finish_reason is FinishReason.LENGTH:
                assert s.output_token_ids == expected_tokens(s, len(s.output_token_ids))
    assert outputs[True] == outputs[False]


def test_a_waiting_head_is_matched_again_only_when_the_index_changed() -> None:
    sched, runner = make(num_blocks=48, budget=128, async_scheduling=False)
    sched.add(seq_with(0, PROMPT))
    drain(sched, runner)  # 5 cached blocks, idle
    runner_up = seq_with(1, list(range(500, 560)), max_tokens=16)  # 15 blocks, growing to 19
    sched.add(runner_up)
    step(sched, runner)
    head = seq_with(2, PROMPT[:16] + list(range(600, 720)))  # 4 cached + 30 new blocks: too many for now
    sched.add(head)
    cache = sched.allocator
    assert isinstance(cache, PrefixCachingAllocator)
    calls = []
    real = cache.match
    cache.match = lambda *a: calls.append(cache.epoch) or real(*a)  # type: ignore[method-assign]
    for _ in range(10):
        step(sched, runner)
    assert head.status is SeqStatus.WAITING and runner_up.output_token_ids
    assert len(calls) == len(set(calls))  # one match per epoch of the index at most
    assert len(calls) < 10
    drain(sched, runner)
    assert head.num_cached_tokens == 16 and head.output_token_ids == expected_tokens(head, 3)


def test_prompt_logprobs_arrive_once_across_a_recompute_and_skip_the_cache() -> None:
    """The scheduler keeps a sequence's prompt logprobs in order, drops positions it already holds (a
    preempted sequence's chunks send them again) and admits such a sequence without cached blocks."""
    from controlplane.prefix_cache import PrefixCachingAllocator
    from controlplane.scheduler import Scheduler
    from shared.config import SchedulerConfig
    from shared.messages import SamplingParams, SeqOutput, StepResult, StepTimings, TokenLogprobs
    from tests.controlplane.test_scheduler import EOS, make_seq

    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4), PrefixCachingAllocator(32, 4), 1000,
                      frozenset({EOS}))
    donor = make_seq(0, 12, 1)
    sched.add(donor)
    while sched.has_work():  # serve it whole with tokens from a fake data plane
        plan = sched.schedule()
        outs = [SeqOutput(seq_id=e.seq_id, token_ids=[9]) for e in plan.scheduled
                if donor.num_computed_tokens >= donor.num_tokens]
        sched.update(StepResult(step_id=plan.step_id, outputs=outs, timings=StepTimings(total_ms=1.0)))
    seq = make_seq(1, 12, 2)
    seq.prompt_token_ids = list(donor.prompt_token_ids)
    seq.sampling = SamplingParams(temperature=0.0, prompt_logprobs=0)
    sched.add(seq)
    plan = sched.schedule()
    assert seq.num_cached_tokens == 0 and [r.num_computed_tokens for r in plan.new_requests] == [0]
    lp = [TokenLogprobs(logprob=-float(i)) for i in range(1, 12)]
    sched.update(StepResult(step_id=plan.step_id, outputs=[
        SeqOutput(seq_id=1, token_ids=[], prompt_logprobs=lp[:4], prompt_logprobs_start=1)],
        timings=StepTimings(total_ms=1.0)))
    plan = sched.schedule()
    sched.update(StepResult(step_id=plan.step_id, outputs=[  # 1..8, as a recompute would: only 5..8 are new
        SeqOutput(seq_id=1, token_ids=[], prompt_logprobs=lp[:8], prompt_logprobs_start=1)],
        timings=StepTimings(total_ms=1.0)))
    assert [e.logprob for e in seq.prompt_logprobs] == [e.logprob for e in lp[:8]]
    plan = sched.schedule()
    sched.update(StepResult(step_id=plan.step_id, outputs=[
        SeqOutput(seq_id=1, token_ids=[5], prompt_logprobs=lp[8:], prompt_logprobs_start=9)],
        timings=StepTimings(total_ms=1.0)))
    assert [e.logprob for e in seq.prompt_logprobs] == [e.logprob for e in lp] and seq.output_token_ids == [5]
    # a sequence that holds them all (as one preempted after its first token does) is recomputed
    # from the cache and does not ask the data plane again
    again = make_seq(2, 12, 2)
    again.prompt_token_ids = list(donor.prompt_token_ids)
    again.sampling = SamplingParams(temperature=0.0, prompt_logprobs=0)
    again.prompt_logprobs = list(lp)
    sched.add(again)
    plan = sched.schedule()
    new = {r.seq_id: r for r in plan.new_requests}[2]
    assert new.sampling.prompt_logprobs is None and new.num_computed_tokens == 8  # two cached blocks of 4
