"""The roofline predictor against hand-computed cases, and its online correction and error report."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.predictor import Correction, Predictor, regime_of
from shared.messages import HardwareProfile
from shared.profiles import H100_DECLARED
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
