"""Token masks that follow their plan (`StepPlan.masks_follow`, then `TokenMasks`) on the data planes: the
forward runs at launch and the sampling waits for the masks; the tokens equal those of the same masks in
the plan (greedy, seeded, with logprobs and prompt logprobs); bad masks fail their sequence alone (no
output, no prompt logprobs) and a plan that cannot run so fails its sequences, on both data planes alike;
a plan that overtakes the masks before it stops the data plane, masks nobody awaits are dropped, a Hello
drops a step awaiting its masks, and such a step does not keep the serve loop busy; on a GPU no step
waits on the host (sync-debug "error") and a step's time leaves out its wait for the masks."""

from __future__ import annotations

import time

import pytest
import torch

from dataplane.sim_worker import SimGpu, SimWorker, sim_ready
from dataplane.worker import Worker, load_worker
from shared.config import DataplaneConfig
from shared.messages import (
    PROTOCOL_VERSION, Hello, NewRequest, SamplingParams, ScheduledSeq, SeqTokenMask, StepPlan, StepResult, TokenMasks,
    WorkerFatal, WorkerReady,
)
from tests.dataplane.test_plan_checks import make_runner
from tests.dataplane.test_token_masks import mask_of

V = 260  # the tiny model's vocabulary


def _new(seq_id: int, prompt: list[int], blocks: list[int], **sampling: object) -> NewRequest:
    return NewRequest(seq_id=seq_id, token_ids=prompt, num_prompt_tokens=len(prompt), block_ids=blocks,
                      sampling=SamplingParams(**sampling))  # type: ignore[arg-type]


def _run(runner, plan: StepPlan, masks: dict[int, bytes], follow: bool) -> StepResult:  # noqa: ANN001
    """One step with `masks` in its entries, or following it (both data planes)."""
    if not follow:
        scheduled = [ScheduledSeq(seq_id=e.seq_id, num_tokens=e.num_tokens, new_block_ids=e.new_block_ids,
                                  token_mask=masks.get(e.seq_id, b"")) for e in plan.scheduled]
        return runner.execute(StepPlan(step_id=plan.step_id, new_requests=plan.new_requests, scheduled=scheduled))
    message = TokenMasks(step_id=plan.step_id, masks=[SeqTokenMask(seq_id=s, mask=m) for s, m in masks.items()])
    plan = StepPlan(step_id=plan.step_id, new_requests=plan.new_requests, scheduled=plan.scheduled, masks_follow=True)
    return runner.execute(plan, message)


def _steps(which: str, follow: bool) -> list[StepResult]:
    runner = make_runner(which, sim_vocab=V)
    digits, letters = list(range(48, 58)), list(range(97, 123))
    first = StepPlan(step_id=0, new_requests=[
        _new(0, [1, 2, 3, 4, 5], [0, 1, 2], temperature=0.0, logprobs=3),
        _new(1, [6, 7], [3, 4], temperature=1.0, seed=7, prompt_logprobs=2),
        _new(2, [8, 9, 10], [5, 6], temperature=0.9, seed=3)],
        scheduled=[ScheduledSeq(seq_id=i, num_tokens=n) for i, n in ((0, 5), (1, 2), (2, 3))])
    results = [_run(runner, first, {0: mask_of(digits, V), 2: mask_of(letters, V)}, follow)]
    for step in range(1, 5):
        plan = StepPlan(step_id=step, scheduled=[ScheduledSeq(seq_id=i, num_tokens=1) for i in range(3)])
        results.append(_run(runner, plan, {0: mask_of(digits[step:], V), 1: mask_of(letters[:step + 1], V)}, follow))
    return results


@pytest.mark.parametrize("which", ["runner", "sim"])
def test_masks_that_follow_give_the_tokens_of_masks_in_the_plan(which: str) -> None:
    inline, follow = _steps(which, False), _steps(which, True)
    assert [r.outputs for r in follow] == [r.outputs for r in inline]
    assert not any(r.failures for r in follow)
    tokens = {i: [t for r in follow for o in r.outputs if o.seq_id == i for t in o.token_ids] for i in range(3)}
    assert tokens[0][0] in range(48, 58) and all(t in range(48 + s, 58) for s, t in enumerate(tokens[0][1:], 1))
    assert tokens[2][0] in range(97, 123) and all(t in range(97, 98 + s) for s, t in enumerate(tokens[1][1:], 1))
    if which == "runner":  # logprobs over the allowed tokens, prompt logprobs from the held-back pass
        outputs = {o.seq_id: o for o in follow[0].outputs}
        lp = outputs[0].logprobs
        assert lp is not None and set(lp[0].top_token_ids) <= set(range(48, 58))
        assert outputs[1].prompt_logprobs is not None and len(outputs[1].prompt_logprobs) == 1


@pytest.mark.parametrize("which", ["runner", "sim"])
def test_a_bad_mask_that_follows_fails_its_sequence_alone(which: str) -> None:
    runner = make_runner(which, sim_vocab=V)
    good = mask_of([65], V)
    plan = StepPlan(step_id=0, masks_follow=True,
                    new_requests=[_new(i, [1 + i, 2, 3, 4], [i], temperature=0.0, prompt_logprobs=1) for i in range(6)],
                    scheduled=[ScheduledSeq(seq_id=0, num_tokens=2), ScheduledSeq(seq_id=1, num_tokens=4),
                               ScheduledSeq(seq_id=2, num_tokens=4), ScheduledSeq(seq_id=3, num_tokens=4),
                               ScheduledSeq(seq_id=4, num_tokens=2), ScheduledSeq(seq_id=5, num_tokens=3)])
    masks = TokenMasks(step_id=0, masks=[
        SeqTokenMask(seq_id=0, mask=good),  # a chunk that samples no token
        SeqTokenMask(seq_id=1, mask=good[:-4]),  # the wrong size
        SeqTokenMask(seq_id=2, mask=good),
        SeqTokenMask(seq_id=4, mask=b""),  # empty: no mask, as in a plan entry
        SeqTokenMask(seq_id=5, mask=good[:-4]),  # both: the size is named first
        SeqTokenMask(seq_id=9, mask=good)])  # in no step: ignored
    result = runner.execute(plan, masks)
    failed = {f.seq_id: f.message for f in result.failures}
    assert set(failed) == {0, 1, 5}
    assert "samples no token" in failed[0] and "needs 36" in failed[1] and "needs 36" in failed[5]
    outputs = {o.seq_id: o for o in result.outputs}
    assert outputs[2].token_ids == [65] and len(outputs[3].token_ids) == 1  # seq 3: not listed, unmasked
    if which == "runner":  # a failed sequence has no output, not even its prompt logprobs (the sim has none)
        assert set(outputs) == {2, 3, 4} and outputs[4].token_ids == [] and outputs[4].prompt_logprobs is not None
    else:
        assert set(outputs) == {2, 3}


@pytest.mark.parametrize("which", ["runner", "sim"])
@pytest.mark.parametrize("plan, says", [
    (dict(decode_steps=2), "one aggregated pass, not aggregated with 2 decode steps"),
    (dict(mode="multiplexed", prefill_sms=8, decode_sms=8), "one aggregated pass, not multiplexed"),
    (dict(scheduled=[ScheduledSeq(seq_id=0, num_tokens=3, token_mask=mask_of([7], V)),
                     ScheduledSeq(seq_id=1, num_tokens=3)]), "yet an entry carries one"),
])
def test_a_plan_that_cannot_hold_its_sampling_fails_its_sequences(which: str, plan: dict, says: str) -> None:
    runner = make_runner(which, sim_vocab=V)
    fields = {"scheduled": [ScheduledSeq(seq_id=i, num_tokens=3) for i in range(2)], **plan}
    step = StepPlan(step_id=3, masks_follow=True, new_requests=[_new(i, [5, 6, 7], [i]) for i in range(2)],
                    **fields)  # type: ignore[arg-type]
    result = runner.execute(step, TokenMasks(step_id=3))
    assert sorted(f.seq_id for f in result.failures) == [0, 1] and not result.outputs
    assert all(says in f.message for f in result.failures)


def _plan(step: int, masks_follow: bool, first: bool = False) -> StepPlan:
    news = [_new(0, [1, 2, 3], [0, 1], temperature=0.0)] if first else []
    return StepPlan(step_id=step, new_requests=news, masks_follow=masks_follow,
                    scheduled=[ScheduledSeq(seq_id=0, num_tokens=3 if first else 1)])


def _workers() -> list:
    loaded = load_worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=32, block_size=4))
    real = Worker(DataplaneConfig(model="tiny", device="cpu", num_kv_blocks=32, block_size=4), loaded)
    sim = SimWorker("ipc:///unused", SimGpu(sim_ready("tiny", "h100", num_kv_blocks=32, block_size=4), 0.0))
    return [real, sim]


def _collect(worker, want: int) -> list:  # noqa: ANN001
    out: list = []
    for _ in range(10_000):
        out += worker._collect()
        if len(out) >= want:
            return out
    raise AssertionError(f"{len(out)} of {want} messages")


def _tokens(messages: list) -> list[int]:
    return [t for m in messages for o in m.outputs for t in o.token_ids]


def _greedy_steps(worker, follow: bool) -> list[int]:  # noqa: ANN001
    """Four greedy steps of one sequence, masks in each plan or following it (each planned while the step
    before it is in flight, its masks sent once that step's result is collected)."""
    allowed = list(range(40, 90))
    assert worker._dispatch(_plan(0, False, first=True)) is None
    tokens: list[int] = []
    for step in (1, 2, 3):
        mask = mask_of(allowed[10 * step:], V)
        if follow:
            assert worker._dispatch(_plan(step, True)) is None
            tokens += _tokens(_collect(worker, 1))  # the step before it
            assert not worker.busy() and worker._collect() == []  # waiting on the control plane only
            assert worker._dispatch(TokenMasks(step_id=step, masks=[SeqTokenMask(seq_id=0, mask=mask)])) is None
        else:
            tokens += _tokens(_collect(worker, 1))
            entry = ScheduledSeq(seq_id=0, num_tokens=1, token_mask=mask)
            assert worker._dispatch(StepPlan(step_id=step, scheduled=[entry])) is None
    tokens += _tokens(_collect(worker, 1))
    assert all(t in allowed[10 * s:] for s, t in enumerate(tokens[1:], 1)), tokens
    return tokens


def test_both_workers_sample_the_tokens_of_masks_in_the_plan_once_the_masks_follow() -> None:
    for follow, inline in zip(_workers(), _workers()):
        assert _greedy_steps(follow, True) == _greedy_steps(inline, False)


def test_both_workers_wait_for_the_masks_and_refuse_a_plan_that_overtakes_them(
        caplog: pytest.LogCaptureFixture) -> None:
    for worker in _workers():
        assert worker._dispatch(_plan(0, False, first=True)) is None
        assert worker._dispatch(_plan(1, True)) is None
        assert _collect(worker, 1)[0].step_id == 0 and worker._collect() == []  # step 1 waits for its masks
        assert worker._dispatch(TokenMasks(step_id=7, masks=[])) is None  # awaited by no step: dropped
        assert "awaits none" in caplog.text
        assert worker._dispatch(TokenMasks(step_id=1, masks=[])) is None
        assert _collect(worker, 1)[0].step_id == 1
        assert worker._dispatch(_plan(2, True)) is None
        fatal = worker._dispatch(_plan(3, False))
        assert isinstance(fatal, WorkerFatal) and "before the token masks of step 2" in fatal.reason
        caplog.clear()


def test_a_hello_drops_a_step_awaiting_its_masks(caplog: pytest.LogCaptureFixture) -> None:
    for worker in _workers():
        assert worker._dispatch(_plan(0, False, first=True)) is None
        assert worker._dispatch(_plan(1, True)) is None
        _collect(worker, 1)
        assert isinstance(worker._dispatch(Hello(protocol_version=PROTOCOL_VERSION)), WorkerReady)
        assert worker._dispatch(TokenMasks(step_id=1, masks=[])) is None and "awaits none" in caplog.text
        assert not worker.busy() and worker._collect() == []
        assert worker._dispatch(_plan(0, False, first=True)) is None  # a fresh start: the sequence anew
        assert _collect(worker, 1)[0].step_id == 0
        caplog.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_masks_that_follow_on_the_gpu_match_masks_in_the_plan_without_a_host_sync(
        gpu_checkpoint) -> None:  # noqa: ANN001
    """The runner on the GPU (decode graphs): each step launched with its masks to follow while the step before
    it runs, the masks applied once that step's tokens are in, in sync-debug "error" mode; the greedy rows'
    tokens equal those of the same masks in the plan, and every masked row keeps to its mask. A step whose
    masks come 300 ms late reports its GPU time without the wait."""
    from tests.dataplane.gpu_support import gpu_worker

    runner = gpu_worker(str(gpu_checkpoint)).runner
    vocab = runner.config.vocab_size
    prompts = [[3 + (7 * i + j) % 400 for j in range(20 + i)] for i in range(6)]
    allowed = {step: list(range(100 + 13 * step, 100 + 13 * step + 9)) for step in range(8)}
    masked = {0, 1, 4}

    def plans(offset: int) -> list[StepPlan]:
        news = [NewRequest(seq_id=offset + i, token_ids=p, num_prompt_tokens=len(p),
                           block_ids=list(range((offset + i) * 8, (offset + i) * 8 + 8)),
                           sampling=SamplingParams(temperature=0.0 if i % 2 else 0.7, seed=i))
                for i, p in enumerate(prompts)]
        out = [StepPlan(step_id=0, new_requests=news,
                        scheduled=[ScheduledSeq(seq_id=offset + i, num_tokens=len(p)) for i, p in enumerate(prompts)])]
        out += [StepPlan(step_id=s, scheduled=[ScheduledSeq(seq_id=offset + i, num_tokens=1) for i in range(6)])
                for s in range(1, 8)]
        return out

    def masks(offset: int, step: int) -> dict[int, bytes]:
        return {offset + i: mask_of(allowed[step], vocab) for i in masked}

    inline: dict[int, list[int]] = {}
    for step, plan in enumerate(plans(0)):
        for o in _run(runner, plan, masks(0, step), follow=False).outputs:
            inline.setdefault(o.seq_id, []).extend(o.token_ids)
    follow: dict[int, list[int]] = {}
    results = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        previous = None
        for step, plan in enumerate(plans(6)):
            pending = runner.launch(StepPlan(step_id=step, new_requests=plan.new_requests, scheduled=plan.scheduled,
                                             masks_follow=True))
            if previous is not None:
                while not previous.ready():
                    pass
                results.append(previous.result())
            message = TokenMasks(step_id=step,
                                 masks=[SeqTokenMask(seq_id=s, mask=m) for s, m in masks(6, step).items()])
            if step == 5:
                time.sleep(0.3)  # the control plane late: the GPU idles, and the step's time must not count it
            runner.apply_masks(pending, message)
            previous = pending
        while not previous.ready():
            pass
        results.append(previous.result())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for result in results:
        for o in result.outputs:
            follow.setdefault(o.seq_id - 6, []).extend(o.token_ids)
    assert all(r.timings.source == "cuda_events" and 0 < r.timings.total_ms < 100 for r in results), \
        [r.timings.total_ms for r in results]
    assert all(len(follow[i]) == 8 for i in range(6))
    for i in masked:
        assert all(token in allowed[step] for step, token in enumerate(follow[i])), (i, follow[i])
    for i in range(1, 6, 2):  # greedy rows: the same tokens either way
        assert follow[i] == inline[i], i
