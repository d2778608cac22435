"""Step policies inside the scheduler, against the simulated runner (real bookkeeping, no math)."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.kv_blocks import BlockAllocator
from controlplane.scheduler import Scheduler
from dataplane.sim import SimRunner
from dataplane.sim_worker import SimGpu, sim_ready
from shared.config import SchedulerConfig
from shared.messages import DeviceDescription, WorkerReady
from tests.controlplane.test_scheduler import VOCAB, EOS, drain, expected_tokens, make_seq, run_random_workload, step


def make(policy: str, *, num_blocks: int = 4096, block_size: int = 16, budget: int = 2048, max_seqs: int = 256,
         tbt: float = 30.0, worker: WorkerReady | None = None, **extra: object) -> tuple[Scheduler, SimGpu]:
    """A scheduler for a simulated H100 worker; its runner reports roofline times instantly."""
    config = SchedulerConfig(policy=policy, max_num_seqs=min(max_seqs, budget),  # type: ignore[arg-type]
                             max_num_batched_tokens=budget,
                             tbt_slo_ms=tbt, **extra)  # type: ignore[arg-type]
    worker = worker or sim_ready("qwen3-8b", "h100", block_size=block_size, num_kv_blocks=num_blocks)
    sched = Scheduler(config, BlockAllocator(num_blocks, block_size), 100_000, frozenset({EOS}), worker)
    gpu = SimGpu(worker, time_scale=0.0)
    gpu.runner = SimRunner(num_blocks, block_size, VOCAB)  # the tokens expected_tokens() knows
    return sched, gpu


def test_prefill_first_runs_prefill_only_batches_while_prompts_wait() -> None:
    sched, runner = make("prefill-first", budget=64)
    for i in range(4):
        sched.add(make_seq(i, 8, 20))
    step(sched, runner)  # four prompts, one batch
    sched.add(make_seq(10, 100, 5))
    kinds = []
    while 10 in sched.seqs and not sched.seqs[10].output_token_ids:
        plan, _ = step(sched, runner)
        kinds.append({s.seq_id for s in plan.scheduled})
    assert kinds == [{10}, {10}]  # 64 + 36 tokens, no decode interleaved
    plan, _ = step(sched, runner)
    assert {s.seq_id for s in plan.scheduled} == {0, 1, 2, 3, 10}  # nothing waits: decode batch
    drain(sched, runner)


def test_static_multiplexes_when_both_phases_exist_and_reserves_lookahead_blocks() -> None:
    sched, runner = make("static", block_size=4, static_decode_sms=32, static_lookahead=4)
    decoders = [make_seq(i, 5, 30) for i in range(3)]
    for s in decoders:
        sched.add(s)
    first, _ = step(sched, runner)
    assert first.mode == "aggregated"  # prompts only
    sched.add(make_seq(9, 50, 4))
    plan = sched.schedule()
    assert plan is not None and plan.mode == "multiplexed"
    assert (plan.prefill_sms, plan.decode_sms, plan.decode_steps) == (100, 32, 4)
    for s in decoders:  # 6 cached + 4 look-ahead tokens need 3 blocks of 4
        assert len(s.block_ids) == 3
    sched.update(runner.execute(plan))
    assert all(len(s.output_token_ids) == 5 for s in decoders)
    drain(sched, runner)
    for s in decoders:
        assert s.output_token_ids == expected_tokens(s, 30)
    assert sched.allocator.num_free == sched.allocator.num_blocks and sched.stats.steps["multiplexed"] >= 1


def test_lookahead_shrinks_when_blocks_are_short() -> None:
    sched, runner = make("static", num_blocks=7, block_size=4, static_lookahead=8)
    a, b = make_seq(0, 3, 10), make_seq(1, 3, 10)
    sched.add(a)
    sched.add(b)
    step(sched, runner)
    sched.add(make_seq(2, 8, 2))  # 2 blocks; a and b hold 1 each: 3 free, k=8 would need 4
    plan = sched.schedule()
    assert plan is not None and plan.mode == "multiplexed" and plan.decode_steps == 5
    sched.update(runner.execute(plan))
    drain(sched, runner)
    assert a.output_token_ids == expected_tokens(a, 10) and b.output_token_ids == expected_tokens(b, 10)


def test_duet_switches_modes_with_load_and_keeps_its_split() -> None:
    sched, runner = make("duet", tbt=25.0, duet_slo="tbt")  # the paper's per-step rule
    seqs = [make_seq(i, 200, 400) for i in range(64)]
    for seq in seqs:
        sched.add(seq)
    modes = [step(sched, runner)[0].mode for _ in range(10)]
    assert modes[-1] == "aggregated"  # 64 decodes alone fit 25 ms
    for i in range(100, 104):
        sched.add(make_seq(i, 4000, 4))  # long prompts: a mixed 2048-token step breaks 25 ms
    plans = [step(sched, runner)[0] for _ in range(6)]
    mux = [p for p in plans if p.mode == "multiplexed"]
    assert mux and all(p.decode_steps >= 2 for p in mux)
    assert len({(p.prefill_sms, p.decode_sms) for p in mux}) <= 2  # hysteresis: no flapping
    pred = sched.predictor
    assert pred is not None
    predicted = pred.raw_ms(pred.cost([200] * 64, []), mux[0].decode_sms)
    assert predicted <= 25.0  # the SLO holds on the decode partition
    drain(sched, runner)
    assert sched.allocator.num_free == sched.allocator.num_blocks and sched.stats.switches >= 2
    assert all(s.output_token_ids == expected_tokens(s, 400) for s in seqs)


def test_multiplexing_policies_stay_aggregated_on_a_worker_that_cannot_split() -> None:
    cpu = msgspec.structs.replace(sim_ready("qwen3-8b", num_kv_blocks=4096), supports_multiplexing=False,
                                  partition_sm_counts=[])
    for policy in ("static", "duet"):
        sched, runner = make(policy, worker=cpu, tbt=0.001)
        for i in range(6):
            sched.add(make_seq(i, 300, 6))
        while sched.has_work():
            assert step(sched, runner)[0].mode == "aggregated"


def test_duet_on_a_cpu_data_plane_keeps_whole_chunks() -> None:
    """Duet (the default) on a CPU data plane is plain aggregated: a step that breaks the budget, as
    every CPU step does, keeps its prompt chunk whole (trimming cut each one to MIN_TRIMMED_PREFILL, so
    a 4000-token prompt took 16 steps instead of 2). A GPU that cannot split still trims (below)."""
    cpu = msgspec.structs.replace(sim_ready("qwen3-8b", num_kv_blocks=4096), supports_multiplexing=False,
                                  partition_sm_counts=[], device=DeviceDescription(kind="cpu", name="cpu"))
    sched, runner = make("duet", worker=cpu, tbt=0.001)  # no step can fit this budget
    for i in range(4):
        sched.add(make_seq(i, 50, 200))
    for _ in range(3):
        step(sched, runner)
    sched.add(make_seq(99, 4000, 4))
    chunks = [sum(s.num_tokens for s in step(sched, runner)[0].scheduled if s.num_tokens > 1) for _ in range(3)]
    assert chunks == [2044, 1956, 0], chunks


def test_sim_gpu_times_plans_by_the_roofline() -> None:
    sched, gpu = make("static", static_lookahead=4)
    for i in range(3):
        sched.add(make_seq(i, 5, 30))
    plan = sched.schedule()
    assert plan is not None
    sched.update(gpu.execute(plan))
    sched.add(make_seq(9, 1000, 4))
    plan = sched.schedule()
    assert plan is not None and plan.mode == "multiplexed"
    timings = gpu.timings(plan)
    assert timings.source == "simulated" and timings.total_ms == max(timings.prefill_ms, timings.decode_ms)
    assert timings.prefill_ms > timings.decode_ms / 4 > 0


@settings(max_examples=40, deadline=None)
@given(
    policy=st.sampled_from(["aggregated", "prefill-first", "static", "duet"]),
    lengths=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 30)), min_size=1, max_size=10),
    num_blocks=st.integers(23, 80),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(1, 96),
    lookahead=st.integers(1, 8),
    seed=st.integers(0, 1000),
)
def test_random_workloads_complete_under_every_policy(policy: str, lengths: list[tuple[int, int]], num_blocks: int,
                                                     block_size: int, budget: int, lookahead: int, seed: int) -> None:
    capacity = num_blocks * block_size
    lengths = [(p, o) for p, o in lengths if p + o + 8 <= capacity] or [(1, 1)]
    sched, runner = make(policy, num_blocks=num_blocks, block_size=block_size, budget=budget, max_seqs=8,
                         tbt=0.5, static_lookahead=lookahead, max_lookahead=lookahead)
    seqs = [make_seq(i, p, o) for i, (p, o) in enumerate(lengths)]
    run_random_workload(sched, runner, seqs, random.Random(seed), abort_rate=0.03)


def test_tpot_step_budget_by_hand() -> None:
    from controlplane.policies import TPOT_TARGET, BatchShape, DuetPolicy

    assert TPOT_TARGET == 0.9
    policy = DuetPolicy([], tbt_slo_ms=50.0, max_lookahead=8, hysteresis=0.0, slo="tpot", horizon=4)
    batch = BatchShape(decode_contexts=[10, 10], decode_remaining=[100, 2], decode_outputs=[11, 10],
                       decode_age_ms=[150.0, 250.0], ahead_ms=10.0)
    # target 45 ms; item 0 (m = 4): (45 * 14 - 150 - 10) / 4 = 117.5; item 1 (m = 2): (45 * 11 - 260) / 2 = 117.5
    assert policy.step_budget_ms(batch) == pytest.approx(117.5)
    fresh = BatchShape(decode_contexts=[10, 10], decode_remaining=[100, 100], decode_outputs=[11, 1],
                       decode_age_ms=[150.0, 0.0])
    assert policy.step_budget_ms(fresh) == pytest.approx(45.0)  # a new request allows the target
    late = BatchShape(decode_contexts=[10], decode_remaining=[1], decode_outputs=[5], decode_age_ms=[300.0])
    assert policy.step_budget_ms(late) == pytest.approx(45.0)  # 45 * 5 - 300 < 45: in debt, one step at the target
    tbt = DuetPolicy([], tbt_slo_ms=50.0, max_lookahead=8, hysteresis=0.0, slo="tbt")
    assert not tbt.wants_slack and tbt.step_budget_ms(batch) == 50.0


def _step_budget_reference(target: float, h: int, batch: object) -> float:
    """The TPOT step budget item by item, as first written (before its map fast path)."""
    items = list(zip(batch.decode_outputs, batch.decode_age_ms, batch.decode_remaining))  # type: ignore[attr-defined]
    least = min((target * n - age for n, age, r in items if r >= h), default=None)
    allowed = (least + target * (h - 1) - batch.ahead_ms) / h if least is not None else float("inf")  # type: ignore[attr-defined]
    for n, age, r in items:
        if r < h:
            allowed = min(allowed, (target * (n + r - 1) - age - batch.ahead_ms) / r)  # type: ignore[attr-defined]
    return allowed if allowed > target else target


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 500), st.floats(0.0, 20_000.0), st.integers(1, 40)), min_size=1, max_size=30),
       st.floats(0.0, 200.0), st.integers(1, 16))
def test_tpot_step_budget_matches_the_item_by_item_rule(items: list[tuple[int, float, int]], ahead: float,
                                                        horizon: int) -> None:
    from controlplane.policies import TPOT_TARGET, BatchShape, DuetPolicy

    policy = DuetPolicy([], tbt_slo_ms=30.0, max_lookahead=8, hysteresis=0.0, slo="tpot", horizon=horizon)
    outputs, ages, remaining = (list(v) for v in zip(*items))
    batch = BatchShape(decode_contexts=[100] * len(items), decode_remaining=remaining, decode_outputs=outputs,
                       decode_age_ms=ages, ahead_ms=ahead)
    assert policy.step_budget_ms(batch) == _step_budget_reference(30.0 * TPOT_TARGET, horizon, batch)  # bit for bit


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _decoders_then_long_prompt(duet_slo: str, seconds_per_step: float, trim: bool = True) -> list:
    """64 decodes run 30 steps on a clock advancing `seconds_per_step` a step; then long prompts
    arrive; the plans of the next 4 steps."""
    sched, runner = make("duet", tbt=25.0, duet_slo=duet_slo, tpot_horizon=4, duet_trim=trim)
    clock = FakeClock()
    sched.slo_clock = clock
    for i in range(64):
        sched.add(make_seq(i, 200, 400))
    for _ in range(30):
        clock.t += seconds_per_step
        step(sched, runner)
    assert all(s.first_token_at > 0 for s in sched.running)
    for i in range(100, 104):
        sched.add(make_seq(i, 4000, 4))  # a mixed 2048-token step predicts well over 25 ms
    plans = []
    for _ in range(4):
        clock.t += seconds_per_step
        plans.append(step(sched, runner)[0])
    drain(sched, runner)
    assert sched.allocator.num_free == sched.allocator.num_blocks
    return plans


def _prefill_tokens(plan) -> int:  # noqa: ANN001
    return sum(s.num_tokens for s in plan.scheduled if s.num_tokens > 1)


def test_tpot_budget_runs_a_long_mixed_step_aggregated_while_requests_have_slack() -> None:
    fast = _decoders_then_long_prompt("tpot", 0.005)  # 5 ms a token against a 22.5 ms target: time banked
    assert fast[0].mode == "aggregated" and _prefill_tokens(fast[0]) == 2048 - 64  # the whole chunk
    paper = _decoders_then_long_prompt("tbt", 0.005, trim=False)
    assert paper[0].mode == "multiplexed"  # the same batch breaks the paper's per-step rule
    slow = _decoders_then_long_prompt("tpot", 0.030)  # 30 ms a token: every request is in debt
    assert slow[0].mode == "multiplexed" or _prefill_tokens(slow[0]) < 2048 - 64


def test_trimmed_chunks_give_back_blocks_and_requeue_what_they_drop() -> None:
    """Duet cuts a mixed step's chunks to fit the budget (here on a worker that cannot split, where
    that is its only move): the cut prompt continues later, a prompt admitted and then dropped goes
    back to the queue's front with no blocks, and every token comes out right."""
    cpu = msgspec.structs.replace(sim_ready("qwen3-8b", "h100", num_kv_blocks=4096), supports_multiplexing=False,
                                  partition_sm_counts=[])
    sched, runner = make("duet", tbt=25.0, duet_slo="tbt", worker=cpu)
    decoders = [make_seq(i, 100, 60) for i in range(40)]
    for seq in decoders:
        sched.add(seq)
    for _ in range(3):
        step(sched, runner)
    late = [make_seq(100 + i, 900, 5) for i in range(3)]
    for seq in late:
        sched.add(seq)
    trims = sched.stats.trimmed
    plan = sched.schedule()
    assert plan is not None and plan.mode == "aggregated"
    chunk = {s.seq_id: s.num_tokens for s in plan.scheduled if s.num_tokens > 1}
    assert 256 <= sum(chunk.values()) < 2048 - 40  # trimmed, not the whole budget
    dropped = [s for s in late if s.seq_id not in chunk]
    assert dropped and all(s.block_ids == [] for s in dropped) and list(sched.waiting) == dropped
    assert sched.stats.summary()["trimmed_steps"] == trims + 1
    for s in late:
        if s.seq_id in chunk:
            assert len(s.block_ids) == -(-chunk[s.seq_id] // 16)  # blocks for what it runs, no more
    sched.check_invariants()
    sched.update(runner.execute(plan))
    drain(sched, runner)
    for seq in decoders + late:
        assert seq.output_token_ids == expected_tokens(seq, seq.stop.max_tokens)
    assert sched.allocator.num_free == sched.allocator.num_blocks


@settings(max_examples=30, deadline=None)
@given(num_decode=st.integers(1, 256), chunks=st.lists(st.tuples(st.integers(1, 2048), st.integers(0, 4000)),
                                                       min_size=1, max_size=4),
       budget=st.floats(5.0, 120.0))
def test_trimmed_candidate_fits_the_budget_and_keeps_nearly_all_it_can(num_decode: int, chunks: list, budget: float) -> None:
    from controlplane.policies import MIN_TRIMMED_PREFILL, BatchShape, StepForecast, trim_chunks

    sched, _ = make("duet", tbt=50.0)
    policy, pred = sched.policy, sched.predictor
    batch = BatchShape(decode_contexts=[500] * num_decode, decode_remaining=[100] * num_decode,
                       chunks=[(q, c, True) for q, c in chunks])
    forecast = StepForecast(pred, batch)

    def ms(cap: int) -> float:
        return pred.predict_ms(forecast.decode.merge(pred.cost([], trim_chunks(batch.chunks, cap))), "mixed")

    got = policy.trimmed(batch, forecast, budget)
    total = batch.prefill_tokens
    if got is None:
        assert total <= MIN_TRIMMED_PREFILL or ms(MIN_TRIMMED_PREFILL) > budget
        return
    cap, cap_ms, rate = got
    assert MIN_TRIMMED_PREFILL <= cap <= total and cap_ms == pytest.approx(ms(cap)) and cap_ms <= budget
    assert rate == pytest.approx((num_decode + cap) / cap_ms)
    slack = max(cap // 16, 16)
    assert cap == total or cap + slack >= total or ms(cap + slack + 1) > budget  # within ~6% of the most that fits
    kept = trim_chunks(batch.chunks, cap)
    assert sum(q for q, _, _ in kept) == cap
    for (q, c, samples), (q0, c0, _) in zip(kept, batch.chunks):  # a prefix; only a cut chunk stops sampling
        assert c == c0 and samples == (q == q0)


def test_lookahead_never_takes_a_decoder_past_the_model_context() -> None:
    """k is cut so that the decoder nearest the context's end computes its last position inside it
    (the data plane has no RoPE row past it); a lowered k keeps the step's prediction."""
    from controlplane.policies import ModeDecision
    from controlplane.step_draft import StepDraft

    sched, gpu = make("static", num_blocks=64, block_size=4)
    sched.max_model_len = 12
    a, b = make_seq(0, 3, 10), make_seq(1, 7, 10)
    sched.add(a)
    sched.add(b)
    step(sched, gpu)  # both prefilled: 3 and 7 tokens computed
    assert (a.num_computed_tokens, b.num_computed_tokens) == (3, 7)
    out = sched._reserve_lookahead(StepDraft(budget=8), [a, b], ModeDecision("multiplexed", 100, 32, 8, 30.0))
    assert out.decode_steps == 12 - 7 and out.predicted_ms == 30.0  # b's passes: positions 7..11
    assert len(b.block_ids) * 4 >= 12 and len(a.block_ids) * 4 >= 3 + out.decode_steps
    sched.max_model_len = 9  # b holds 8 tokens: its token (position 7) and one look-ahead pass (8)
    out = sched._reserve_lookahead(StepDraft(budget=8), [a, b], ModeDecision("multiplexed", 100, 32, 8, 30.0))
    assert out.decode_steps == 2


def test_duet_reviewer_regressions() -> None:
    """Three holes a review found: a lowered look-ahead lost the step's prediction; with no split and
    not even the smallest trimmed step in budget, duet ran the whole batch; a term seen only tiny
    took a huge coefficient in the predictor's fit; one hiccup set a new SM bucket's host floor."""
    from controlplane.policies import MIN_TRIMMED_PREFILL, ModeDecision
    from controlplane.predictor import Predictor
    from controlplane.step_draft import StepDraft
    from shared.profiles import H100_FLASHINFER_EXECUTION

    sched, gpu = make("static", num_blocks=4, block_size=4)
    a, b = make_seq(0, 3, 10), make_seq(1, 3, 10)
    sched.add(a)
    sched.add(b)
    step(sched, gpu)
    out = sched._reserve_lookahead(StepDraft(budget=8), [a, b], ModeDecision("multiplexed", 100, 32, 8, 30.0))
    assert 1 <= out.decode_steps < 8 and out.predicted_ms == 30.0

    cpu = msgspec.structs.replace(sim_ready("qwen3-8b", "h100", num_kv_blocks=4096), supports_multiplexing=False,
                                  partition_sm_counts=[])
    sched, runner = make("duet", tbt=6.0, duet_slo="tbt", worker=cpu)
    for i in range(200):
        sched.add(make_seq(i, 100, 40))
    for _ in range(3):
        step(sched, runner)
    sched.add(make_seq(999, 3000, 2))
    plan = sched.schedule()
    assert plan is not None
    assert sum(s.num_tokens for s in plan.scheduled if s.num_tokens > 1) == MIN_TRIMMED_PREFILL
    sched.update(runner.execute(plan))
    drain(sched, runner)

    ready = sim_ready("qwen3-8b", "h100", block_size=16, num_kv_blocks=4096)
    p = Predictor(ready.model, ready.profile)
    small, big = p.cost([], [(8, 0, True)]), p.cost([], [(2048, 0, True)])

    def truth(cost) -> float:  # noqa: ANN001
        return 1.15 * p.estimate(cost, "prefill").device_ms + 0.5

    for _ in range(6):
        p.observe("prefill", p.estimate(small, "prefill"), truth(small))
    assert p.predict_ms(big, "prefill") < 2 * truth(big)
    p.observe("prefill", p.estimate(small, "prefill"), float("nan"))  # a broken timing teaches nothing
    assert p.predict_ms(big, "prefill") < 2 * truth(big) and p.report().count == 6

    p = Predictor(ready.model, ready.profile, H100_FLASHINFER_EXECUTION)
    tiny = p.cost([], [(8, 0, True)])
    for _ in range(30):
        p.observe("prefill", p.estimate(tiny, "prefill", with_roofline=True), 12.5)
    p.observe("mux_prefill", p.estimate(tiny, "mux_prefill", 66, with_roofline=True), 60.0)
    assert p.predict_ms(tiny, "mux_prefill", 66) < 20.0
