"""Which decode graph a batch replays: a bucket's KV-split default, or its unsplit twin for a balanced
batch on the whole GPU (no CUDA or flashinfer needed: the choice is host-side)."""

from __future__ import annotations

import pytest

from dataplane.attention import flashinfer_backend as fib
from dataplane.graphs import DecodeGraphs, default_buckets


@pytest.fixture(autouse=True)
def _defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the three settings the choice reads, so a test of the rule does not move with the tuning."""
    monkeypatch.setattr(fib, "UNSPLIT_KV_MIN_BATCH", 32)
    monkeypatch.setattr(fib, "CUDA_CORE_MAX_BATCH", 8)
    monkeypatch.setattr(fib, "BALANCED_MAX_SKEW", 1.1)


def test_balanced_means_the_longest_kv_within_the_skew_of_the_mean() -> None:
    assert fib.is_balanced([1025] * 16)
    assert fib.is_balanced([1000] * 15 + [1100])  # 1100 / 1006.25 = 1.093
    assert not fib.is_balanced([1000] * 15 + [1200])  # 1200 / 1012.5 = 1.185
    assert not fib.is_balanced([1] * 15 + [2])  # ratios count, not token differences
    assert not fib.is_balanced([])


def test_no_skew_means_nothing_is_balanced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fib, "BALANCED_MAX_SKEW", None)
    assert not fib.is_balanced([1024] * 16)


def test_twins_only_for_tensor_core_buckets_that_split_kv() -> None:
    twins = [b for b in default_buckets(256) if fib.has_unsplit_twin(b)]
    assert twins == [16, 24]  # 1-8: CUDA-core kernel; from 32: unsplit already
    assert [b for b in default_buckets(256) if not fib.splits_kv(b)] == [b for b in default_buckets(256) if b >= 32]


@pytest.mark.parametrize("setting", [("UNSPLIT_KV_MIN_BATCH", None), ("BALANCED_MAX_SKEW", None),
                                     ("CUDA_CORE_MAX_BATCH", 24)])
def test_settings_that_turn_the_bucket_16_twin_off(monkeypatch: pytest.MonkeyPatch,
                                                   setting: tuple[str, object]) -> None:
    monkeypatch.setattr(fib, *setting)
    assert not fib.has_unsplit_twin(16)
    assert DecodeGraphs.variants("full", 16) == (True,)


def test_variants_whole_gpu_and_partition() -> None:
    assert DecodeGraphs.variants("full", 16) == (True, False)  # default first, then the twin
    assert DecodeGraphs.variants("full", 8) == (True,)
    assert DecodeGraphs.variants("full", 64) == (False,)
    assert DecodeGraphs.variants(64, 16) == (True,)  # a 64-SM decode partition keeps the split


def test_a_balanced_batch_replays_the_twin_and_a_skewed_one_the_default() -> None:
    assert DecodeGraphs.split_for("full", 16, [1025] * 16) is False
    assert DecodeGraphs.split_for("full", 16, [1025] * 12) is False  # 12 rows in bucket 16: padding left out
    assert DecodeGraphs.split_for("full", 16, [256 + 64 * i for i in range(16)]) is True
    assert DecodeGraphs.split_for(64, 16, [1025] * 16) is True  # no twin on a partition
    assert DecodeGraphs.split_for("full", 64, [1025] * 64) is False  # unsplit by default
    assert DecodeGraphs.split_for("full", 64, [256 + 64 * i for i in range(64)]) is False
