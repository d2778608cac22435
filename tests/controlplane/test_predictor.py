"""The roofline predictor against hand-computed cases, and its online correction and error report."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.predictor import Correction, Predictor, StepEstimate, regime_of
from shared.messages import HardwareProfile
from shared.profiles import H100_DECLARED, H100_FLASHINFER_EXECUTION, H200_DECLARED, ExecutionProfile
from shared.roofline import ModelShape, Roofline, attention_flops_bytes, batch_cost, curve_at, linear_ms

# A toy model: with Pi = 1e3 FLOP/s and BW = 1e3 B/s one FLOP or one byte costs exactly 1 ms.
TOY = ModelShape(num_layers=2, hidden_size=4, intermediate_size=8, num_q_heads=2, num_kv_heads=1, head_dim=2,
                 vocab_size=10, bytes_per_elem=2)
UNIT = HardwareProfile(gpu="unit", sm_counts=[1], gemm_flops_per_s=[1e3], hbm_bytes_per_s=[1e3], source="declared")
QWEN3_8B = ModelShape(num_layers=36, hidden_size=4096, intermediate_size=12288, num_q_heads=32, num_kv_heads=8,
                      head_dim=128, vocab_size=151936, bytes_per_elem=2)


def test_linear_roofline_by_hand() -> None:
    # n=3 tokens, 4 -> 8: F = 2*3*4*8 = 192, B = 2*(3*4 + 4*8 + 3*8) = 136: compute-bound, 192 ms.
    assert linear_ms(3, 4, 8, 2, 1e3, 1e3) == pytest.approx(192.0)
    # One token: F = 64, B = 2*(4 + 32 + 8) = 88: memory-bound.
    assert linear_ms(1, 4, 8, 2, 1e3, 1e3) == pytest.approx(88.0)


def test_attention_cost_by_hand() -> None:
    # q=3 new over c=5 cached: F = 4*2*3*8*2 + 2*2*3*8 = 480; B = 2*(2*2*3*2 + 2*1*8*2) = 112.
    assert attention_flops_bytes(TOY, 3, 5) == (480.0, 112.0)
    # A decode (q=1, c=7): F = 4*2*1*8*2 + 2*2*1*8 = 160; B = 2*(2*2*1*2 + 2*1*8*2) = 80.
    assert attention_flops_bytes(TOY, 1, 7) == (160.0, 80.0)


def test_whole_step_by_hand() -> None:
    """One decode (c=7) plus one prefill chunk (q=3, c=5) that samples, on the unit device."""
    roof = Roofline(TOY, UNIT)
    cost = batch_cost(TOY, [7], [(3, 5, True)])
    assert (cost.num_tokens, cost.num_sampled) == (4, 2)
    n = 4
    # Projections 4->8 (QKV: (2+2)*2), 4->4 (O), 4->16 (gate+up), 8->4 (down), each max(F, B):
    qkv = max(2 * n * 4 * 8, 2 * (n * 4 + 4 * 8 + n * 8))  # 256 vs 176
    o = max(2 * n * 4 * 4, 2 * (n * 4 + 16 + n * 4))  # 128 vs 96
    gate_up = max(2 * n * 4 * 16, 2 * (n * 4 + 64 + n * 16))  # 512 vs 288
    down = max(2 * n * 8 * 4, 2 * (n * 8 + 32 + n * 4))  # 256 vs 160
    elementwise = 2 * n * (10 * 4 + 3 * 8 + 4 * 3 * 2 + 2 * 1 * 2)  # 2*4*92
    attention = max(480, 112) + max(160, 80)
    head = max(2 * 2 * 4 * 10, 2 * (2 * 4 + 40 + 2 * 10))  # two sampled rows: 160 vs 136
    model_io = 2 * n * 4 * 4
    expected = 2 * (qkv + o + gate_up + down + elementwise + attention) + head + model_io
    assert roof.step_ms(cost) == pytest.approx(expected)


@settings(max_examples=80, deadline=None)
@given(contexts=st.lists(st.integers(0, 20_000), max_size=40), ratio=st.floats(0.01, 1e4))
def test_decode_fast_path_equals_per_request_sum(contexts: list[int], ratio: float) -> None:
    """The O(log n) decode attention equals the plain sum of per-request rooflines."""
    pi, bw = 1e12 * ratio, 1e12
    roof = Roofline(QWEN3_8B, H100_DECLARED)
    fast = roof.attention_ms(batch_cost(QWEN3_8B, contexts, []), pi, bw)
    slow = sum(max(f / pi, b / bw) for f, b in (attention_flops_bytes(QWEN3_8B, 1, c) for c in contexts)) * 1e3
    assert fast == pytest.approx(slow, rel=1e-9, abs=1e-12)


def test_curve_interpolation() -> None:
    sms, vals = H100_DECLARED.sm_counts, H100_DECLARED.gemm_flops_per_s
    assert curve_at(sms, vals, 40) == pytest.approx((227e12 + 344e12) / 2)
    assert curve_at(sms, vals, 4) == pytest.approx(57e12 / 2)  # proportional below the first point
    assert curve_at(sms, vals, 132) == 803e12 and curve_at(sms, vals, 200) == 803e12


def test_qwen3_8b_single_decode_is_weight_bandwidth_bound() -> None:
    roof = Roofline(QWEN3_8B, H100_DECLARED)
    params = 36 * sum(di * do for di, do in QWEN3_8B.linear_shapes()) + 4096 * 151936
    floor_ms = 2 * params / 3.01e12 * 1e3 + H100_DECLARED.step_overhead_ms
    got = roof.step_ms(batch_cost(QWEN3_8B, [100], []))
    assert floor_ms <= got <= floor_ms * 1.02
    # Fewer SMs: slower; decode barely cares above the bandwidth knee, prefill scales with compute.
    decode = batch_cost(QWEN3_8B, [1000] * 64, [])
    prefill = batch_cost(QWEN3_8B, [], [(2048, 0, True)])
    assert roof.step_ms(decode, 64) < 1.15 * roof.step_ms(decode, 132)
    assert roof.step_ms(prefill, 64) > 1.6 * roof.step_ms(prefill, 132)


def test_regimes() -> None:
    assert regime_of(5, 0) == "decode" and regime_of(0, 2) == "prefill" and regime_of(3, 1) == "mixed"


def test_correction_learns_a_scale_and_a_fixed_cost() -> None:
    scale = Correction()
    for raw in (5.0, 9.0, 20.0) * 10:
        scale.update(raw, 1.5 * raw)
    assert scale.apply(12.0) == pytest.approx(18.0, rel=0.02)
    affine = Correction()
    rng = random.Random(0)
    for _ in range(60):
        raw = rng.uniform(2.0, 40.0)
        affine.update(raw, 3.0 + raw)
    assert affine.apply(10.0) == pytest.approx(13.0, rel=0.02)


def test_predictor_reports_its_error_before_learning() -> None:
    pred = Predictor(QWEN3_8B, H100_DECLARED)
    cost = pred.cost([500] * 32, [])
    raw = pred.raw_ms(cost)
    pred.observe("decode", raw, 2 * raw)  # the first prediction (uncorrected) is off by 50%
    report = pred.report()
    assert report.count == 1 and report.mape == pytest.approx(0.5) and report.raw_mape == pytest.approx(0.5)
    for _ in range(40):
        pred.observe("decode", raw, 2 * raw)
    assert pred.predict_ms(cost, "decode") == pytest.approx(2 * raw, rel=0.02)
    assert pred.report().by_regime["decode"][0] == 41 and "mixed" not in pred.report().by_regime
    assert pred.report().mape < 0.1


# ---------------------------------------------------------------------------------------- launch-aware model

TILED = ExecutionProfile(kernels_per_layer=3.0, kernels_per_step=4.0, kernel_us=1000.0, ragged_tile_rows=4,
                         ragged_fuses_gqa=False, eager_host_ms_per_layer=100.0, eager_host_ms_per_step=50.0,
                         graph_host_ms=7.0)


def test_ragged_attention_by_hand() -> None:
    """Every item of a batch with a chunk runs in the ragged kernel: rows padded to a 4-row tile per
    query head, and (no GQA fusion) each query head reads its own copy of the KV."""
    roof = Roofline(TOY, UNIT, TILED)
    cost = batch_cost(TOY, [7], [(3, 5, True)])
    assert cost.ragged and cost.num_seqs == 2
    # chunk q=3 over kv=8: F = (4*2+2) * 2 heads * 4 rows * 8 = 640; B = 2*(2*2*3*2 + 2*2*8*2) = 176
    # decode c=7 (x=8) as a full tile: F = 2*(4*2+2)*4 * 8 = 640; B = 2*2*2*2 + 2*2*2*2*8 = 144
    assert roof.ragged_attention_ms(cost, 1e3, 1e3) == pytest.approx(640 + 640)
    # without a chunk the decode kernel runs: the plain per-request roofline
    decode = batch_cost(TOY, [7], [])
    assert not decode.ragged
    assert roof.device_ms(decode) - roof.dense_ms(decode, 1e3, 1e3) - 2 * roof.attention_ms(decode, 1e3, 1e3) == \
        pytest.approx((2 * 3 + 4) * 1000 * 1e-3)  # 10 kernels of 1000 us each


def test_device_time_adds_kernel_and_replay_costs() -> None:
    roof = Roofline(TOY, UNIT, TILED)
    cost = batch_cost(TOY, [7, 9], [])
    assert roof.device_ms(cost, graph=True) - roof.device_ms(cost) == pytest.approx(7.0)
    assert roof.eager_floor_ms == pytest.approx(2 * 100 + 50)
    assert Roofline(TOY, UNIT).device_ms(cost) == pytest.approx(roof.step_ms(cost))  # neutral: the paper's model


def test_eager_steps_are_floored_and_learn_the_floor() -> None:
    fast = HardwareProfile(gpu="fast", sm_counts=[8, 16], gemm_flops_per_s=[1e15, 2e15],
                           hbm_bytes_per_s=[1e13, 2e13], source="declared")
    pred = Predictor(TOY, fast, TILED)
    cost = pred.cost([10] * 4, [])
    eager = pred.estimate(cost, "decode", graph=False)
    graph = pred.estimate(cost, "decode")
    assert (eager.path, graph.path) == ("eager-decode", "graph")
    assert pred.predict(eager, "decode") == pytest.approx(250.0)  # the declared host floor
    assert pred.predict(graph, "decode") < 50.0  # a graph replay has no host floor
    for _ in range(30):  # floor-bound steps that take 120 ms: the floor moves there
        pred.observe("decode", eager, 120.0)
    assert pred.predict(eager, "decode") == pytest.approx(120.0, rel=0.05)
    ragged = pred.estimate(pred.cost([], [(3, 0, True)]), "prefill")
    assert ragged.path == "eager-ragged" and pred.predict(ragged, "prefill") == pytest.approx(250.0)


def test_piecewise_passes_have_their_own_floor_on_the_whole_device_only() -> None:
    fast = HardwareProfile(gpu="fast", sm_counts=[8, 16], gemm_flops_per_s=[1e15, 2e15],
                           hbm_bytes_per_s=[1e13, 2e13], source="declared")
    pieces = dataclasses.replace(TILED, piecewise_host_ms_per_layer=10.0)
    pred = Predictor(TOY, fast, pieces, piecewise_max_tokens=64)
    small, big = pred.cost([5], [(3, 0, True)]), pred.cost([], [(100, 0, True)])
    replayed, eager, on_partition = (pred.estimate(small, "mixed"), pred.estimate(big, "prefill"),
                                     pred.estimate(small, "mixed", sms=8))
    assert (replayed.path, eager.path, on_partition.path) == ("piecewise", "eager-ragged", "eager-ragged")
    assert pred.predict(replayed, "mixed") == pytest.approx(2 * 10 + 50)  # layers x per-layer + per-step
    assert pred.predict(eager, "prefill") == pytest.approx(250.0) == pred.predict(on_partition, "mixed")
    assert pred.predict_ms(small, "mixed") == pytest.approx(70.0)
    for _ in range(30):  # piecewise passes that take 40 ms teach their own floor, not the eager one
        pred.observe("mixed", replayed, 40.0)
    assert pred.predict(replayed, "mixed") == pytest.approx(40.0, rel=0.05)
    assert pred.predict(eager, "prefill") == pytest.approx(250.0)
    assert Predictor(TOY, fast, pieces).estimate(small, "mixed").path == "eager-ragged"  # no pieces: eager


def test_corrections_are_kept_per_sm_bucket_with_a_pooled_fallback() -> None:
    pred = Predictor(QWEN3_8B, H100_DECLARED, min_key_samples=3)
    cost = pred.cost([1000] * 16, [])
    small, large = pred.estimate(cost, "decode", 16), pred.estimate(cost, "decode", 64)
    for _ in range(20):
        pred.observe("decode", small, 3 * small.device_ms)
    assert pred.predict(small, "decode") == pytest.approx(3 * small.device_ms, rel=0.05)
    # the 64-SM bucket has no data of its own: it borrows the pooled fit (learnt on 16 SMs only)
    assert pred.correction_for("decode", 64) is pred.corrections["decode"]
    for _ in range(20):
        pred.observe("decode", large, large.device_ms)
    assert pred.predict(large, "decode") == pytest.approx(large.device_ms, rel=0.05)
    assert pred.predict(small, "decode") == pytest.approx(3 * small.device_ms, rel=0.05)
    # a multiplexed decode phase with no data borrows the aggregated decode fit of its SM bucket
    assert pred.correction_for("mux_decode", 16) is pred.keyed[("decode", 16)]
    assert set(pred.report().by_key) == {"decode@16", "decode@64"}


# ---------------------------------------------------------------------------------------- terms of the fit


def test_device_terms_by_hand() -> None:
    """`device_terms`: device_ms, the dense FLOPs at Pi (each TOY token: 2 layers x 2 x 144 weights;
    each sampled row: 2 x 4 x 10 LM-head weights) and the ragged kernel's attention over L layers."""
    roof = Roofline(TOY, UNIT, TILED)
    decode = batch_cost(TOY, [7, 9], [])
    assert roof.device_terms(decode) == (pytest.approx(roof.device_ms(decode)), pytest.approx(2 * 576 + 2 * 80), 0.0)
    mixed = batch_cost(TOY, [7], [(3, 5, True)])
    device, compute, ragged = roof.device_terms(mixed)
    assert device == pytest.approx(roof.device_ms(mixed))
    assert compute == pytest.approx(4 * 576 + 2 * 80)
    assert ragged == pytest.approx(2 * roof.ragged_attention_ms(mixed, 1e3, 1e3))


def test_correction_learns_the_compute_term() -> None:
    """Small-M GEMMs add their FLOPs to the weight reads: a fit with the compute term finds it."""
    fit = Correction()
    rng = random.Random(1)
    for _ in range(80):
        device, compute = rng.uniform(5.0, 30.0), rng.uniform(0.0, 8.0)
        fit.update(device, 1.1 * device + 0.8 * compute, compute)
    assert fit.coef[2] == pytest.approx(0.8, abs=0.05)
    assert fit.apply(10.0, 6.0) == pytest.approx(11.0 + 4.8, rel=0.02)
    assert fit.apply(10.0) == pytest.approx(11.0, rel=0.02)  # no compute, no compute term


def test_correction_fits_relative_error() -> None:
    """Small steps count as much as large ones (the MAPE's view): a 1 ms step that an affine law
    cannot fit together with 100-200 ms ones keeps a small relative error."""
    fit = Correction()
    for _ in range(10):
        for device, measured in ((1.0, 2.0), (2.0, 3.0), (3.0, 4.0), (100.0, 100.0), (150.0, 150.0), (200.0, 200.0)):
            fit.update(device, measured)
    assert fit.apply(1.0) == pytest.approx(2.0, rel=0.02)  # unweighted, the same fit is 7% off
    assert fit.apply(150.0) == pytest.approx(150.0, rel=0.01)


def test_correction_is_scale_free() -> None:
    """Priors in the data's own units: milliseconds or microseconds give the same relative predictions."""
    ms, us = Correction(), Correction()
    rng = random.Random(2)
    for _ in range(12):
        device, compute = rng.uniform(2.0, 40.0), rng.uniform(0.0, 5.0)
        measured = 2.0 + 1.2 * device + 0.5 * compute + rng.uniform(-1.0, 1.0)
        ms.update(device, measured, compute)
        us.update(1e3 * device, 1e3 * measured, 1e3 * compute)
    assert us.apply(1e4, 2e3) == pytest.approx(1e3 * ms.apply(10.0, 2.0), rel=1e-9)


def _decode_law(pred: Predictor, sms: int, batch: int) -> tuple[StepEstimate, float]:
    est = pred.estimate(pred.cost([512] * batch, []), "decode", sms)
    return est, 1.05 * est.device_ms + 0.8 * est.compute_ms


def test_a_new_sm_bucket_starts_from_what_the_regime_learnt() -> None:
    """The compute term's weight is the same on every SM count: a bucket's fit is pulled towards the
    regime's pooled fit, so three samples on 64 SMs already predict a large batch there."""
    pred = Predictor(QWEN3_8B, H100_DECLARED, min_key_samples=3)
    rng = random.Random(3)
    for _ in range(40):
        pred.observe("decode", *_decode_law(pred, 16, rng.choice([1, 8, 32, 64, 128, 256])))
    fresh = Correction()
    for batch in (1, 4, 8):  # small batches: they say little about the compute term
        est, measured = _decode_law(pred, 64, batch)
        pred.observe("decode", est, measured)
        fresh.update(est.device_ms, measured, est.compute_ms)
    keyed = pred.correction_for("decode", 64)
    assert keyed is pred.keyed[("decode", 64)] and keyed.parent is pred.corrections["decode"]
    big, truth = _decode_law(pred, 64, 256)
    assert pred.predict(big, "decode") == pytest.approx(truth, rel=0.03)
    assert abs(fresh.apply(big.device_ms, big.compute_ms) - truth) > 2 * abs(pred.predict(big, "decode") - truth)


def test_a_bucket_floor_is_used_from_its_second_floor_bound_step() -> None:
    fast = HardwareProfile(gpu="fast", sm_counts=[8, 16], gemm_flops_per_s=[1e15, 2e15],
                           hbm_bytes_per_s=[1e13, 2e13], source="declared")
    pred = Predictor(TOY, fast, TILED)
    cost = pred.cost([10] * 4, [])
    whole, part = pred.estimate(cost, "decode", 16, graph=False), pred.estimate(cost, "decode", 8, graph=False)
    for _ in range(30):
        pred.observe("decode", whole, 120.0)
    learnt = pred.floor_for("eager-decode", 16).value  # type: ignore[union-attr]
    pred.observe("decode", part, 70.0)  # one floor-bound step on the partition could be a hiccup
    assert pred.floor_for("eager-decode", 8) is pred.floors["eager-decode"]
    pred.observe("decode", part, 70.0)  # a second one: the partition's own floor, which moved at once
    assert pred.floor_for("eager-decode", 8) is pred.keyed_floors[("eager-decode", 8)]
    assert pred.predict(part, "decode") == pytest.approx((0.5 * learnt + 0.95 * 70.0 + 70.0) / (0.5 + 1.95))
    assert pred.predict(whole, "decode") == pytest.approx(learnt)  # the whole device keeps its own


def test_predict_ms_is_predict_of_the_estimate() -> None:
    """The scheduler's fast path builds no estimate: it must give the same number."""
    pred = Predictor(QWEN3_8B, H200_DECLARED, H100_FLASHINFER_EXECUTION)
    rng = random.Random(4)
    shapes = [([500] * 64, []), ([2000] * 8, [(256, 0, True)]), ([], [(1024, 512, True)]), ([100], [])]
    for _ in range(60):
        decode, chunks = rng.choice(shapes)
        cost, sms = pred.cost(decode, chunks), rng.choice([None, 32, 64, 100])
        regime = regime_of(len(decode), len(chunks))
        pred.observe(regime, pred.estimate(cost, regime, sms), rng.uniform(5.0, 60.0))
    for decode, chunks in shapes:
        cost, regime = pred.cost(decode, chunks), regime_of(len(decode), len(chunks))
        for sms in (None, 32, 64, 100):
            for graph in (None, False):
                est = pred.estimate(cost, regime, sms, graph)
                assert pred.predict_ms(cost, regime, sms, graph) == pred.predict(est, regime)
