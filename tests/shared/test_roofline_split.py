"""The roofline's model of a split mixed step: its decode items in the decode kernel, by hand."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import HardwareProfile
from shared.profiles import ExecutionProfile
from shared.roofline import ModelShape, Roofline, batch_cost

SHAPE = ModelShape(num_layers=1, hidden_size=64, intermediate_size=128, num_q_heads=4, num_kv_heads=2,
                   head_dim=16, vocab_size=100)
PROFILE = HardwareProfile(gpu="unit", sm_counts=[4], gemm_flops_per_s=[1e12], hbm_bytes_per_s=[1e11], source="declared")


def test_enough_decodes_leave_the_ragged_kernel_for_the_decode_kernel() -> None:
    tiles = dict(ragged_tile_rows=8, ragged_fuses_gqa=False, kernel_us=2.0)
    unsplit = Roofline(SHAPE, PROFILE, ExecutionProfile(**tiles))
    split = Roofline(SHAPE, PROFILE, ExecutionProfile(**tiles, split_min_decodes=3))
    pi, bw = 1e12, 1e11
    ragged_chunk = max(66 * 4 * 8 * 10 / pi, 2 * (2 * 4 * 5 * 16 + 2 * 4 * 10 * 16) / bw)  # q=5, kv=10
    three = batch_cost(SHAPE, [3, 7, 11], [(5, 5, True)])
    # decode items x = 4, 8, 12 in the decode kernel: max(66 * 4 * x / pi, (256 + 64 x) / bw), plus one kernel
    decode_kernel = sum(max(66 * 4 * x / pi, (2 * 2 * 4 * 16 + 2 * 2 * 2 * 16 * x) / bw) for x in (4, 8, 12))
    assert abs(split.ragged_attention_ms(three, pi, bw) - (ragged_chunk + decode_kernel + 2e-6) * 1e3) < 1e-9
    # in the ragged kernel each decode pays a whole 8-row tile and reads KV per query head
    ragged_decodes = sum(max(66 * 4 * 8 * x / pi, 2 * (2 * 4 * 16 + 2 * 4 * 16 * x) / bw) for x in (4, 8, 12))
    assert abs(unsplit.ragged_attention_ms(three, pi, bw) - (ragged_chunk + ragged_decodes) * 1e3) < 1e-9
    two = batch_cost(SHAPE, [3, 7], [(5, 5, True)])  # below the threshold: not split
    assert split.ragged_attention_ms(two, pi, bw) == unsplit.ragged_attention_ms(two, pi, bw)


def _decode_sum_over_x(roof: Roofline, contexts: list[int], pi: float, bw: float, rows: int, kv_heads: int) -> float:
    """`Roofline._decode_sum` as first written: bisect and prefix sums over the sorted x = c + 1."""
    from bisect import bisect_right
    from itertools import accumulate

    xs = sorted(c + 1 for c in contexts)
    prefix = list(accumulate(xs, initial=0))
    sh = roof.shape
    a = sh.num_q_heads * (4 * sh.head_dim + 2) * rows
    b0, b1 = sh.bytes_per_elem * 2 * sh.num_q_heads * sh.head_dim, sh.bytes_per_elem * 2 * kv_heads * sh.head_dim
    slope = a / pi - b1 / bw
    split = len(xs) if slope <= 0 else bisect_right(xs, (b0 / bw) / slope)
    return (b0 * split + b1 * prefix[split]) / bw + a * (prefix[-1] - prefix[split]) / pi


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=40), st.floats(1e6, 1e15), st.floats(1e6, 1e13),
       st.sampled_from([1, 8, 64]))
def test_decode_sum_over_sorted_contexts_equals_the_sum_over_x(contexts: list[int], pi: float, bw: float,
                                                               rows: int) -> None:
    roof = Roofline(SHAPE, PROFILE)
    cost = batch_cost(SHAPE, contexts, [])
    assert roof._decode_sum(cost, pi, bw, rows, 2) == _decode_sum_over_x(roof, contexts, pi, bw, rows, 2)  # to the bit
