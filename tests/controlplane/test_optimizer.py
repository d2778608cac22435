"""Partition optimizer: hand cases and hypothesis properties (SLO never violated when feasible,
aggregated when the mixed batch fits, hysteresis bounded by its margin)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.optimizer import (Split, best_k, candidate_splits, decide, lookahead_used, optimize,
                                    useful_decode_tokens)
from shared.profiles import H100_DECLARED, partition_sizes
from shared.roofline import curve_at

SPLITS = candidate_splits(132, partition_sizes(132, 8, 8))


def phase_time(overhead: float, flops: float, nbytes: float):  # noqa: ANN201
    """A roofline-shaped time function of S on the declared H100 curves."""
    def t(sms: int) -> float:
        pi = curve_at(H100_DECLARED.sm_counts, H100_DECLARED.gemm_flops_per_s, sms)
        bw = curve_at(H100_DECLARED.sm_counts, H100_DECLARED.hbm_bytes_per_s, sms)
        return overhead + max(flops / pi, nbytes / bw) * 1e3
    return t


def test_candidate_splits_cover_hopper_granularity() -> None:
    assert SPLITS[0] == Split(124, 8) and SPLITS[-1] == Split(12, 120)
    assert all(s.prefill_sms + s.decode_sms == 132 and s.decode_sms % 8 == 0 for s in SPLITS)


def test_useful_decode_tokens_caps_each_request() -> None:
    # remaining 1, 3, 10 with max_k 4: k=1: 3; k=2: 1+2+2; k=3: 1+3+3; k=4: 1+3+4
    assert useful_decode_tokens([1, 3, 10], 4) == [0.0, 3.0, 5.0, 7.0, 8.0]


def test_best_k_balances_the_phases() -> None:
    # prefill 40 ms for 2000 tokens, decode 10 ms per step for 100 tokens: k=4 fills the prefill time.
    k, obj = best_k(40.0, 10.0, 2000, [0.0] + [100.0 * k for k in range(1, 9)])
    assert k == 4 and obj == pytest.approx((400 + 2000) / 40)


def test_hand_case_gives_decode_the_fewest_sms_that_meet_tbt() -> None:
    decode = phase_time(0.3, 0.5e12, 20e9)  # bandwidth-heavy
    prefill = phase_time(0.3, 40e12, 4e9)  # compute-heavy
    useful = useful_decode_tokens([100] * 128, 8)
    choice = decide(1e9, 20.0, SPLITS, prefill, decode, 2048, useful)
    assert choice is not None and choice.decode_ms <= 20.0
    feasible = [s.decode_sms for s in SPLITS if decode(s.decode_sms) <= 20.0]
    assert choice.split.decode_sms <= feasible[0] + 16  # near the smallest feasible decode share


times = st.tuples(st.floats(0.0, 2.0), st.floats(1e9, 1e14), st.floats(1e8, 1e11))


@settings(max_examples=200, deadline=None)
@given(dec=times, pre=times, mixed=st.floats(0.1, 500.0), tbt=st.floats(1.0, 200.0),
       remaining=st.lists(st.integers(1, 50), min_size=1, max_size=64), prefill_tokens=st.integers(1, 8192),
       max_k=st.integers(1, 8), margin=st.floats(0.0, 0.5), prev=st.sampled_from([None, *SPLITS]))
def test_decide_properties(dec: tuple, pre: tuple, mixed: float, tbt: float, remaining: list[int],
                           prefill_tokens: int, max_k: int, margin: float, prev: Split | None) -> None:
    decode, prefill = phase_time(*dec), phase_time(*pre)
    useful = useful_decode_tokens(remaining, max_k)
    choice = decide(mixed, tbt, SPLITS, prefill, decode, prefill_tokens, useful, prev, margin)
    feasible = [s for s in SPLITS if decode(s.decode_sms) <= tbt]
    if mixed <= tbt:
        assert choice is None  # aggregated whenever the mixed batch fits
        return
    assert (choice is not None) == bool(feasible)  # multiplexed exactly when a split meets the SLO
    if choice is None:
        return
    assert choice.decode_ms <= tbt and decode(choice.split.decode_sms) <= tbt  # never violates the SLO
    enough = lookahead_used(useful)  # passes past it emit nothing a request keeps
    assert 1 <= choice.k <= enough <= max_k
    if any(prefill(s.prefill_sms) <= enough * tbt for s in feasible):  # some split keeps time/token <= TBT
        assert choice.step_ms <= choice.k * tbt * (1 + 1e-9)
    best = optimize(feasible, prefill, decode, prefill_tokens, useful, tbt)
    assert best is not None
    assert choice.objective * (1 + margin) >= best.objective * (1 - 1e-9)  # hysteresis costs <= margin
    if prev is None:
        assert choice.objective == pytest.approx(best.objective)


def test_no_lookahead_past_the_tokens_the_requests_can_still_emit() -> None:
    """64 decoders with 2 tokens left each beside a long prefill: the strict tier would ask for
    k = ceil(t_p / TBT) = 8, but passes past 2 emit nothing a request keeps, so k stops at 2."""
    useful = useful_decode_tokens([2] * 64, 8)
    assert lookahead_used(useful) == 2
    choice = decide(600.0, 50.0, SPLITS, lambda sms: 400.0, lambda sms: 20.0, 6000, useful)
    assert choice is not None and choice.k == 2
