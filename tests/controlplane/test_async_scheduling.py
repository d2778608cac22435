"""Async scheduling: step i+1 planned while step i is in flight, against the simulated runner.

The outputs, finish reasons and KV accounting must equal the one-step-at-a-time schedule's for the
same requests, including stops that land while a later step already computes past them,
preemption of sequences with steps in flight, penalties (which wait for their tokens) and aborts.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.kv_blocks import BlockAllocator
from controlplane.scheduler import Scheduler
from controlplane.sequence import FinishReason, Sequence, StopParams
from dataplane.sim import SimRunner
from shared.config import SchedulerConfig
from controlplane.policies import BatchShape, ModeDecision
from shared.messages import SamplingParams, SeqOutput, StepProgress, StepResult
from tests.controlplane.test_scheduler import EOS, VOCAB, expected_tokens, make_seq


def split(result: StepResult, rng: random.Random) -> tuple[StepProgress | None, StepResult]:
    """What a worker may send for a running step: the first tokens of some outputs as a StepProgress
    (finished look-ahead passes), then a StepResult with the rest."""
    early, rest = [], []
    for out in result.outputs:
        cut = rng.randrange(len(out.token_ids) + 1)
        if cut:
            early.append(SeqOutput(seq_id=out.seq_id, token_ids=out.token_ids[:cut]))
        if cut < len(out.token_ids):
            rest.append(SeqOutput(seq_id=out.seq_id, token_ids=out.token_ids[cut:]))
    progress = StepProgress(step_id=result.step_id, outputs=early) if early else None
    return progress, msgspec.structs.replace(result, outputs=rest)


def run(seqs: list[Sequence], *, async_scheduling: bool, num_blocks: int = 64, block_size: int = 4,
        budget: int = 32, max_seqs: int = 16, aborts: dict[int, int] | None = None,
        progress_seed: int | None = None, lookahead: int = 1) -> dict:
    """Drive the scheduler with up to `max_inflight` plans outstanding; returns per-seq outcomes.

    With `progress_seed`, each result arrives in two parts (a StepProgress, then the StepResult);
    `lookahead` > 1 runs decode-only steps with that many look-ahead passes."""
    config = SchedulerConfig(max_num_seqs=min(max_seqs, budget), max_num_batched_tokens=budget,
                             async_scheduling=async_scheduling)
    sched = Scheduler(config, BlockAllocator(num_blocks, block_size), 10_000, frozenset({EOS}))
    if lookahead > 1:
        sched.policy = LookaheadPolicy(lookahead)  # type: ignore[assignment]
    runner = SimRunner(num_blocks, block_size, VOCAB)
    copies = [dataclasses.replace(s, output_token_ids=[], output_logprobs=[]) for s in seqs]
    for seq in copies:
        sched.add(seq)
    inflight: deque[StepResult] = deque()
    rng_progress = random.Random(progress_seed)
    steps = ahead = 0
    while sched.has_work() or inflight:
        while len(inflight) < sched.max_inflight:
            plan = sched.schedule()
            if plan is None:
                break
            ahead += bool(inflight) and any(sched.seqs[s.seq_id].num_inflight > 1 for s in plan.scheduled
                                             if s.seq_id in sched.seqs)
            result = runner.execute(plan)
            assert not result.failures, result.failures
            inflight.append(result)
        assert inflight, "work left but nothing schedulable"
        result = inflight.popleft()
        if progress_seed is not None:
            progress, result = split(result, rng_progress)
            if progress is not None:
                sched.progress(progress)
                sched.check_invariants()
        sched.update(result)
        sched.check_invariants()
        steps += 1
        for seq_id, at in (aborts or {}).items():
            if at == steps:
                sched.finish(seq_id, FinishReason.ABORT)
        assert steps < 20_000
    assert sched.allocator.num_free == num_blocks
    return {"outcomes": {s.seq_id: (s.output_token_ids, s.finish_reason) for s in copies}, "ahead": ahead,
            "preemptions": sched.num_preemptions, "steps": steps}


@dataclasses.dataclass
class LookaheadPolicy:
    """Decode-only batches run `k` look-ahead passes (aggregated), everything else one step."""

    k: int
    name: str = "lookahead"
    composition: str = "decode_first"

    def decide(self, batch: BatchShape, forecast: object) -> ModeDecision:
        return ModeDecision("aggregated", 0, 0, self.k) if not batch.chunks else ModeDecision()


def test_decodes_run_ahead_and_give_the_same_tokens() -> None:
    seqs = [make_seq(i, 5 + 3 * i, 12) for i in range(6)]
    sync, ahead = run(seqs, async_scheduling=False), run(seqs, async_scheduling=True)
    assert ahead["outcomes"] == sync["outcomes"]
    assert ahead["ahead"] > 0 and sync["ahead"] == 0
    for seq in seqs:
        assert ahead["outcomes"][seq.seq_id] == (expected_tokens(seq, 12), FinishReason.LENGTH)


def test_a_stop_inside_a_step_planned_ahead_drops_the_extra_token() -> None:
    seqs = [make_seq(i, 6, 20) for i in range(3)]
    stop_at = {0: 2, 1: 5}  # stop on the 3rd / 6th output token
    for seq_id, n in stop_at.items():
        stop_token = expected_tokens(seqs[seq_id], n + 1)[n]
        seqs[seq_id] = dataclasses.replace(seqs[seq_id], stop=StopParams(max_tokens=20,
                                                                         stop_token_ids=frozenset({stop_token})))
    out = run(seqs, async_scheduling=True)["outcomes"]
    for seq_id, n in stop_at.items():
        tokens, reason = out[seq_id]
        assert reason is FinishReason.STOP and tokens == expected_tokens(seqs[seq_id], n + 1)
    assert out[2] == (expected_tokens(seqs[2], 20), FinishReason.LENGTH)


def test_penalised_sequences_wait_for_their_tokens() -> None:
    seqs = [dataclasses.replace(make_seq(0, 4, 8), sampling=SamplingParams(temperature=0.0, repetition_penalty=1.2)),
            make_seq(1, 4, 8)]
    config = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=32)
    sched = Scheduler(config, BlockAllocator(32, 4), 10_000, frozenset({EOS}))
    runner = SimRunner(32, 4, VOCAB)
    for seq in seqs:
        sched.add(seq)
    first = sched.schedule()
    assert first is not None and len(first.scheduled) == 2  # both prefill
    second = sched.schedule()  # planned while the first is in flight
    assert second is not None and [s.seq_id for s in second.scheduled] == [1]
    for plan in (first, second):
        sched.update(runner.execute(plan))
    assert sched.seqs[0].num_inflight == 0 and len(seqs[0].output_token_ids) == 1
    assert len(seqs[1].output_token_ids) == 2


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=10),
    num_blocks=st.integers(20, 60),
    block_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_random_workloads_match_the_synchronous_schedule(lengths: list[tuple[int, int]], num_blocks: int,
                                                         block_size: int, budget: int, max_seqs: int,
                                                         seed: int) -> None:
    capacity = num_blocks * block_size
    lengths = [(p, o) for p, o in lengths if p + o <= capacity] or [(1, 1)]
    rng = random.Random(seed)
    seqs = [make_seq(i, p, o) for i, (p, o) in enumerate(lengths)]
    for i, seq in enumerate(seqs):  # some stop early on a token they will produce
        if rng.random() < 0.3 and seq.stop.max_tokens > 1:
            n = rng.randrange(seq.stop.max_tokens)
            seqs[i] = dataclasses.replace(seq, stop=StopParams(
                max_tokens=seq.stop.max_tokens, stop_token_ids=frozenset({expected_tokens(seq, n + 1)[n]})))
    sync = run(seqs, async_scheduling=False, num_blocks=num_blocks, block_size=block_size, budget=budget,
               max_seqs=max_seqs)
    ahead = run(seqs, async_scheduling=True, num_blocks=num_blocks, block_size=block_size, budget=budget,
                max_seqs=max_seqs)
    assert ahead["outcomes"] == sync["outcomes"]
    aborted = run(seqs, async_scheduling=True, num_blocks=num_blocks, block_size=block_size, budget=budget,
                  max_seqs=max_seqs, aborts={s.seq_id: rng.randrange(1, 30) for s in seqs if rng.random() < 0.3})
    for seq_id, (tokens, reason) in aborted["outcomes"].items():
        full = ahead["outcomes"][seq_id][0]
        assert tokens == full[: len(tokens)]
        assert reason is FinishReason.ABORT or (tokens, reason) == ahead["outcomes"][seq_id]


def test_preempting_sequences_with_steps_in_flight_keeps_their_tokens() -> None:
    seqs = [make_seq(i, 10, 30) for i in range(6)]
    kw = dict(num_blocks=24, block_size=4, budget=16, max_seqs=6)
    sync, ahead = run(seqs, async_scheduling=False, **kw), run(seqs, async_scheduling=True, **kw)
    assert ahead["preemptions"] > 0
    assert ahead["outcomes"] == sync["outcomes"]
    assert all(tokens == expected_tokens(s, 30) for s, (tokens, _) in zip(seqs, ahead["outcomes"].values()))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 20)), min_size=1, max_size=8),
    k=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_tokens_reported_before_the_step_ends_change_nothing(lengths: list[tuple[int, int]], k: int,
                                                             seed: int) -> None:
    """Look-ahead steps whose tokens arrive partly as a StepProgress and partly in the StepResult give
    the outputs of whole results, with stops (inside a progress message too) dropping later tokens."""
    rng = random.Random(seed)
    seqs = [make_seq(i, p, o) for i, (p, o) in enumerate(lengths)]
    for i, seq in enumerate(seqs):
        if rng.random() < 0.4 and seq.stop.max_tokens > 1:
            n = rng.randrange(seq.stop.max_tokens)
            seqs[i] = dataclasses.replace(seq, stop=StopParams(
                max_tokens=seq.stop.max_tokens, stop_token_ids=frozenset({expected_tokens(seq, n + 1)[n]})))
    kw = dict(num_blocks=200, block_size=4, budget=32, max_seqs=8, lookahead=k)
    whole = run(seqs, async_scheduling=True, **kw)
    parts = run(seqs, async_scheduling=True, progress_seed=seed, **kw)
    assert parts["outcomes"] == whole["outcomes"]
    assert whole["outcomes"] == run(seqs, async_scheduling=False, num_blocks=200, block_size=4, budget=32,
                                    max_seqs=8)["outcomes"]


def test_progress_for_a_step_that_is_not_the_oldest_is_refused() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=32), BlockAllocator(32, 4), 10_000,
                      frozenset({EOS}))
    sched.add(make_seq(0, 4, 8))
    first = sched.schedule()
    assert first is not None
    second = sched.schedule()
    assert second is not None
    try:
        sched.progress(StepProgress(step_id=second.step_id, outputs=[]))
    except RuntimeError as exc:
        assert "oldest" in str(exc)
    else:
        raise AssertionError("progress for the second step in flight was accepted")
