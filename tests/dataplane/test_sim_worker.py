"""The simulated data plane's timing models: the paper's roofline, and the declared launch model of
the flashinfer data plane (CUDA-graph decode, eager steps floored by the host's launch time)."""

from __future__ import annotations

import pytest

from controlplane.policies import make_predictor
from dataplane.sim_worker import SIM_FLASHINFER, SimGpu, sim_ready
from shared.messages import NewRequest, SamplingParams, ScheduledSeq, StepPlan, StepProgress
from shared.profiles import H100_FLASHINFER_EXECUTION, H200_DECLARED, NEUTRAL_EXECUTION, gpu_spec
from shared.roofline import batch_cost

GREEDY = SamplingParams(temperature=0.0)


def _prefill_then_decode(gpu: SimGpu, prompt: int, n: int) -> tuple[StepPlan, StepPlan]:
    """Prefill n prompts of `prompt` tokens (executed), then the plan of their first decode step."""
    per_seq = -(-(prompt + 16) // gpu.ready.block_size)
    news = [NewRequest(seq_id=i, token_ids=list(range(1, prompt + 1)), num_prompt_tokens=prompt,
                       block_ids=list(range(i * per_seq, (i + 1) * per_seq)), sampling=GREEDY) for i in range(n)]
    prefill = StepPlan(step_id=0, new_requests=news, scheduled=[ScheduledSeq(seq_id=i, num_tokens=prompt)
                                                                  for i in range(n)])
    decode = StepPlan(step_id=1, scheduled=[ScheduledSeq(seq_id=i, num_tokens=1) for i in range(n)])
    return prefill, decode


def test_roofline_execution_is_the_plain_roofline() -> None:
    ready = sim_ready("qwen3-8b", "h100", num_kv_blocks=512)
    gpu = SimGpu(ready, time_scale=0.0)
    assert gpu.execution is NEUTRAL_EXECUTION and ready.attention_backend == "sim"
    prefill, _ = _prefill_then_decode(gpu, 64, 2)
    expected = gpu.roofline.step_ms(batch_cost(gpu.roofline.shape, [], [(64, 0, True)] * 2))
    assert gpu.timings(prefill).total_ms == pytest.approx(expected)


def test_flashinfer_execution_floors_eager_steps_and_replays_decode_graphs() -> None:
    ready = sim_ready("qwen3-8b", "h200", num_kv_blocks=512, execution="flashinfer", piecewise_graphs=False)
    gpu = SimGpu(ready, time_scale=0.0)
    assert ready.attention_backend == SIM_FLASHINFER and gpu.execution == H100_FLASHINFER_EXECUTION
    prefill, decode = _prefill_then_decode(gpu, 16, 2)
    small = gpu.timings(prefill).total_ms  # 32 tokens: the host's launch time dominates
    assert small == pytest.approx(gpu.roofline.eager_floor_ms)
    assert small > 2 * gpu.roofline.step_ms(batch_cost(gpu.roofline.shape, [], [(16, 0, True)] * 2))
    pieces = SimGpu(sim_ready("qwen3-8b", "h200", num_kv_blocks=512, execution="flashinfer"), time_scale=0.0)
    replayed = pieces.timings(_prefill_then_decode(pieces, 16, 2)[0]).total_ms  # as piecewise graphs (default)
    assert pieces.roofline.piecewise_floor_ms <= replayed < small / 2
    gpu.runner.execute(prefill)
    graph = gpu.timings(decode).total_ms  # a decode-only step replays a graph: below the eager floor
    assert graph < gpu.roofline.eager_floor_ms
    cost = batch_cost(gpu.roofline.shape, [16, 16], [])
    assert graph == pytest.approx(gpu.roofline.device_ms(cost, graph=True))
    # a multiplexed step: the prefill phase eager on its partition, the decode phase as graphs
    mux = StepPlan(step_id=1, scheduled=decode.scheduled, mode="multiplexed", prefill_sms=100, decode_sms=32,
                   decode_steps=3)
    t = gpu.timings(mux)
    assert t.decode_ms == pytest.approx(sum(gpu.roofline.device_ms(batch_cost(gpu.roofline.shape, [16 + j] * 2, []),
                                                                   32, graph=True) for j in range(3)))


def test_the_control_plane_predicts_a_simulated_flashinfer_plane_with_its_launch_model() -> None:
    ready = sim_ready("qwen3-8b", "h200", num_kv_blocks=512, execution="flashinfer")
    pred = make_predictor(ready)
    assert pred is not None and pred.execution == H100_FLASHINFER_EXECUTION and pred.decode_graphs
    assert ready.profile == H200_DECLARED == gpu_spec("h200").profile
    plain = make_predictor(sim_ready("qwen3-8b", "h200", num_kv_blocks=512))
    assert plain is not None and plain.execution is NEUTRAL_EXECUTION


def test_unknown_execution_is_refused() -> None:
    with pytest.raises(ValueError, match="execution"):
        sim_ready("qwen3-8b", "h200", execution="magic")


def test_look_ahead_passes_are_reported_as_they_end() -> None:
    """A multiplexed step whose decode phase ends before its prefill: each decode pass's tokens are
    due as a StepProgress at that pass's end; the result (at the step's end) carries the rest, and
    together they are exactly the whole step's tokens."""
    ready = sim_ready("qwen3-8b", "h200", num_kv_blocks=2048, execution="flashinfer")
    plans = []
    for gpu in (SimGpu(ready, time_scale=1e-3), SimGpu(ready, time_scale=1e-3)):
        prefill, decode = _prefill_then_decode(gpu, 16, 4)
        gpu.runner.execute(prefill)
        big = NewRequest(seq_id=9, token_ids=list(range(1, 4001)), num_prompt_tokens=4000,
                         block_ids=list(range(1000, 1251)), sampling=GREEDY)
        plans.append((gpu, StepPlan(step_id=1, new_requests=[big], scheduled=[*decode.scheduled,
                                    ScheduledSeq(seq_id=9, num_tokens=4000)], mode="multiplexed",
                                    prefill_sms=100, decode_sms=32, decode_steps=4)))
    (whole_gpu, plan), (gpu, same) = plans
    whole = whole_gpu.execute(plan)
    events = gpu.launch(same)
    *progress, (due, final) = events
    assert len(progress) == 4 and all(isinstance(m, StepProgress) for _, m in progress)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress) and progress[-1][0] < due
    got: dict[int, list[int]] = {}
    for _, message in [*progress, (due, final)]:
        for out in message.outputs:
            got.setdefault(out.seq_id, []).extend(out.token_ids)
    assert got == {o.seq_id: o.token_ids for o in whole.outputs}
    assert [o.seq_id for o in final.outputs] == [9]  # only the prefill's token is left for the end
