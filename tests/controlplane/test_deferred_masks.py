"""Structured outputs with `defer_token_masks`: a step is planned while the step before it still samples a
structured output's token, with `masks_follow`, and its masks are due once that result is applied. Against
the simulated data plane (grammars beside free sequences: test_structured_output's, both ways): the same
outputs either way, grammars followed through preemption, a mask-blind data plane and an abort between a
plan and its masks; a structured output decodes every step while the steps overlap (one with penalties
one step at a time); a step whose masks follow is aggregated with no look-ahead whatever the policy
asked, as the policy would run it aggregated (duet: its chunks cut to its step budget)."""

from __future__ import annotations

import re

import pytest

from controlplane.kv_blocks import BlockAllocator
from controlplane.policies import BatchShape, ModeDecision
from controlplane.scheduler import Scheduler
from controlplane.sequence import FinishReason
from controlplane.structured_output import GrammarCompiler, GrammarSpec
from controlplane.tokenizer import ByteTokenizer
from dataplane.sim import SimRunner
from shared.config import SchedulerConfig
from shared.messages import SamplingParams
from tests.controlplane.test_structured_output import EOS, VOCAB, MaskBlindRunner, allowed, drive, seq, text


@pytest.fixture(scope="module")
def byte_grammars() -> GrammarCompiler:
    return GrammarCompiler(ByteTokenizer(), VOCAB, [EOS])


def scheduler(defer: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, defer_token_masks=defer),
                     BlockAllocator(64, 4), 10_000, frozenset({EOS}))


def test_the_same_outputs_with_masks_in_the_plan_or_following_it(byte_grammars: GrammarCompiler) -> None:
    """The simulated model's token is a function of the position and the mask: the two ways must agree."""
    def run(defer: bool) -> list[list[int]]:
        seqs = [seq(i, byte_grammars, GrammarSpec("regex", "[a-z]{5,12}[0-9]{3}") if i % 2 == 0 else None)
                for i in range(6)]
        drive(seqs, SimRunner(64, 4, VOCAB), defer=defer, lookahead=1)
        return [s.output_token_ids for s in seqs]

    assert run(True) == run(False)


def test_a_structured_sequence_survives_preemption_with_masks_that_follow(byte_grammars: GrammarCompiler) -> None:
    seqs = [seq(i, byte_grammars, GrammarSpec("regex", "[a-f]{30}") if i % 2 else None, max_tokens=36)
            for i in range(6)]
    counts = drive(seqs, SimRunner(12, 4, VOCAB), num_blocks=12, lookahead=1, defer=True)
    assert sum(s.num_preemptions for s in seqs) > 0 and counts["masks_follow"] > 0
    for s in seqs[1::2]:
        assert re.fullmatch(r"[a-f]{30}", text(s)) and s.finish_reason is FinishReason.STOP


def test_a_refused_token_fails_its_sequence_alone_with_masks_that_follow(byte_grammars: GrammarCompiler) -> None:
    seqs = [seq(0, byte_grammars, GrammarSpec("regex", "[0-9]{5}")), seq(1, None, None, max_tokens=8)]
    drive(seqs, MaskBlindRunner(64, 4, VOCAB), defer=True)
    assert seqs[0].finish_reason is FinishReason.ERROR and "breaks the request's grammar" in (seqs[0].error or "")
    assert seqs[1].finish_reason is FinishReason.LENGTH and len(seqs[1].output_token_ids) == 8


def test_a_structured_sequence_decodes_every_step_and_the_steps_overlap(byte_grammars: GrammarCompiler) -> None:
    """The next step is planned while a structured output's token is in flight (its masks follow); no
    plan overtakes masks still due; the sequence gets a token every step, as without deferral."""
    seqs = [seq(0, byte_grammars, GrammarSpec("regex", "[a-z]{20}")), seq(1, None, None, max_tokens=20)]
    sched, runner = scheduler(), SimRunner(64, 4, VOCAB)
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert first is not None and not first.masks_follow and first.scheduled[0].token_mask
    result = runner.execute(first)
    plans, overlapped = 1, 0
    while sched.has_work():
        plan = sched.schedule()  # planned while the step before it is in flight
        if plan is None:
            break
        plans += 1
        overlapped += plan.masks_follow
        assert {e.seq_id for e in plan.scheduled} <= {0, 1} and not any(e.token_mask for e in plan.scheduled)
        assert sched.token_masks_due() is None  # not before the result before it
        sched.update(result)
        masks = sched.token_masks_due()
        assert masks is not None and masks.step_id == plan.step_id
        if 0 in sched.seqs:
            assert [m.seq_id for m in masks.masks] == [0]
            assert set(allowed(masks.masks[0].mask)) == set(range(ord("a"), ord("z") + 1))
        assert sched.token_masks_due() is None  # sent once
        result = runner.execute(plan, masks)
    sched.update(result)
    assert len(seqs[0].output_token_ids) == 20 and seqs[0].finish_reason is FinishReason.STOP
    assert len(seqs[1].output_token_ids) == 20
    # one step a token for both, each planned behind the one before; the last plan, made while the token
    # that completed the grammar was in flight, computes one token past the end (dropped, as a free
    # sequence's under async scheduling)
    assert plans == 21 and overlapped == 20


@pytest.mark.parametrize("abort", [False, True])
def test_no_plan_overtakes_masks_still_due(byte_grammars: GrammarCompiler, abort: bool) -> None:
    sched, runner = scheduler(), SimRunner(64, 4, VOCAB)
    sched.add(seq(0, byte_grammars, GrammarSpec("regex", "[a-z]{20}")))
    sched.add(seq(1, None, None))
    first = sched.schedule()
    second = sched.schedule()
    assert first is not None and second is not None and second.masks_follow
    if abort:  # no structured output left: the masks are still due
        sched.finish(0, FinishReason.ABORT)
    sched.update(runner.execute(first))
    assert sched.schedule() is None  # the masks of `second` are due first
    masks = sched.token_masks_due()
    assert masks is not None and sched.schedule() is not None


def test_an_abort_between_a_plan_and_its_masks_leaves_the_sequence_out(byte_grammars: GrammarCompiler) -> None:
    seqs = [seq(0, byte_grammars, GrammarSpec("regex", "[a-z]{20}")), seq(1, byte_grammars,
                                                                            GrammarSpec("regex", "[0-9]{20}"))]
    sched, runner = scheduler(), SimRunner(64, 4, VOCAB)
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    second = sched.schedule()
    assert first is not None and second is not None and second.masks_follow
    sched.finish(0, FinishReason.ABORT)
    sched.update(runner.execute(first))
    masks = sched.token_masks_due()
    assert masks is not None and [m.seq_id for m in masks.masks] == [1]
    sched.update(runner.execute(second, masks))  # seq 0's tokens come back: dropped
    assert seqs[0].output_token_ids == [] and seqs[0].finish_reason is FinishReason.ABORT
    while sched.has_work():  # one step at a time: with none in flight, a plan carries its masks
        plan = sched.schedule()
        assert plan is not None and not plan.masks_follow
        sched.update(runner.execute(plan))
    assert re.fullmatch(r"[0-9]{20}", text(seqs[1])) and sched.allocator.num_free == 64


class MultiplexingPolicy:
    """Multiplexed with four look-ahead steps whenever it can (what a split policy may ask for)."""

    name = "multiplexing"
    composition = "decode_first"

    def decide(self, batch: BatchShape, forecast: object) -> ModeDecision:
        return ModeDecision("multiplexed", 66, 66, 4)


def test_a_step_whose_masks_follow_is_aggregated_whatever_the_policy_asks(byte_grammars: GrammarCompiler) -> None:
    seqs = [seq(i, byte_grammars, GrammarSpec("regex", "[a-f]{12}") if i < 2 else None) for i in range(4)]
    counts = drive(seqs, SimRunner(64, 4, VOCAB), defer=True, policy=MultiplexingPolicy())
    assert counts["masks_follow"] > 0  # drive checks each is aggregated with one decode step
    for s in seqs[:2]:
        assert re.fullmatch(r"[a-f]{12}", text(s))


def test_a_step_without_a_structured_output_in_flight_keeps_the_policys_split(byte_grammars: GrammarCompiler) -> None:
    """A structured output whose last token is in flight is not in the next step (it cannot run past its
    length): that step carries no masks and runs as the policy asked, split."""
    seqs = [seq(0, byte_grammars, GrammarSpec("regex", "[a-z]{20}"), max_tokens=2),
            seq(1, None, None, max_tokens=10), seq(2, None, None, max_tokens=10)]
    sched, runner = scheduler(), SimRunner(64, 4, VOCAB)
    sched.policy = MultiplexingPolicy()  # type: ignore[assignment]
    for s in seqs:
        sched.add(s)
    first, second = sched.schedule(), sched.schedule()
    assert first is not None and second is not None
    assert second.masks_follow and second.mode == "aggregated" and 0 in {e.seq_id for e in second.scheduled}
    sched.update(runner.execute(first))
    masks = sched.token_masks_due()
    assert masks is not None
    third = sched.schedule()  # seq 0's last token is in flight in `second`
    assert third is not None and 0 not in {e.seq_id for e in third.scheduled}
    assert not third.masks_follow and third.mode == "multiplexed"


def test_without_async_scheduling_each_plan_carries_its_masks(byte_grammars: GrammarCompiler) -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, async_scheduling=False,
                                      defer_token_masks=True), BlockAllocator(64, 4), 10_000, frozenset({EOS}))
    runner = SimRunner(64, 4, VOCAB)
    sched.add(seq(0, byte_grammars, GrammarSpec("regex", "[a-z]{8}")))
    while sched.has_work():
        plan = sched.schedule()
        assert plan is not None and not plan.masks_follow and plan.scheduled[0].token_mask
        sched.update(runner.execute(plan))
    assert sched.stats.masks_followed == 0 and len(sched.seqs) == 0


def test_a_penalised_structured_output_still_decodes_every_step(byte_grammars: GrammarCompiler) -> None:
    """A sequence with penalties cannot run ahead (they count its tokens on the host): while its token is in
    flight the steps go one at a time, as without deferral, rather than leaving it out of every other step."""
    penalised = seq(0, byte_grammars, GrammarSpec("regex", "[a-z]{20}"))
    penalised.sampling = SamplingParams(temperature=0.0, repetition_penalty=1.1)
    seqs = [penalised, seq(1, None, None, max_tokens=20)]
    sched, runner = scheduler(), SimRunner(64, 4, VOCAB)
    for s in seqs:
        sched.add(s)
    plans = 0
    while sched.has_work():
        plan = sched.schedule()
        assert plan is not None and not plan.masks_follow
        plans += 1
        if 0 in sched.seqs:
            assert sched.schedule() is None  # its token is in flight
        sched.update(runner.execute(plan))
    assert len(penalised.output_token_ids) == 20 and plans == 20


def test_a_duet_step_whose_masks_follow_runs_aggregated_within_its_step_budget() -> None:
    """Where duet would split the SMs, a step whose masks follow runs aggregated, its prompt chunks cut to
    the step budget (`DuetPolicy.aggregated`), not the whole mixed batch."""
    from controlplane.sequence import Sequence, StopParams
    from shared.messages import SamplingParams
    from tests.controlplane.test_policies import make
    from tests.controlplane.test_scheduler import EOS as SCHED_EOS
    from tests.controlplane.test_scheduler import VOCAB as SCHED_VOCAB
    from tests.controlplane.test_scheduler import make_seq

    sched, gpu = make("duet", tbt=25.0, duet_slo="tbt")
    regex = GrammarCompiler(ByteTokenizer(), SCHED_VOCAB, [SCHED_EOS]).compile(GrammarSpec("regex", "[a-z]{400}"))
    structured = Sequence(seq_id=999, request_id="r999", prompt_token_ids=[17] * 200,
                          sampling=SamplingParams(temperature=0.0), stop=StopParams(max_tokens=400), arrival_time=0.0,
                          grammar=regex.new_matcher())
    for s in [make_seq(i, 200, 400) for i in range(63)] + [structured]:
        sched.add(s)
    sent: list = []
    results: dict = {}
    plans = []

    def run(steps: int) -> None:
        for _ in range(steps):
            while len(sent) < sched.max_inflight and (plan := sched.schedule()) is not None:
                sent.append(plan)
                plans.append((plan, sched.inflight[-1].decision))
                if not plan.masks_follow:
                    results[plan.step_id] = gpu.execute(plan)  # roofline times: the predictor learns from them
            sched.update(results.pop(sent.pop(0).step_id))
            masks = sched.token_masks_due()
            if masks is not None:
                results[masks.step_id] = gpu.execute(sent[0], masks)

    run(10)
    for i in range(100, 104):
        sched.add(make_seq(i, 4000, 4))  # long prompts: a mixed 2048-token step breaks 25 ms
    run(12)
    mixed = [(p, d) for p, d in plans if any(e.seq_id >= 100 and e.seq_id != 999 for e in p.scheduled)]
    assert mixed and all(p.masks_follow and p.mode == "aggregated" and p.decode_steps == 1 for p, _ in mixed)
    for plan, decision in mixed:  # cut to fit, where duet alone would have split the SMs
        assert decision.prefill_tokens is not None and sum(e.num_tokens for e in plan.scheduled) < 2048
        assert decision.predicted_ms <= 25.0
    assert all(t in range(ord("a"), ord("z") + 1) for t in structured.output_token_ids)
