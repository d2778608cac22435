"""The memory plan's profiled prefill stays inside the model's positions (CPU)."""

from __future__ import annotations

import pytest

from dataplane.memory import profile_batch


@pytest.mark.parametrize(("tokens", "max_len", "block", "lens"), [
    (4096, 2048, 32, [2048, 2048]),  # the GPU suite's large bucket on its 2048-position test model
    (4096, 40960, 16, [4096]),  # fits: one sequence, as before
    (5000, 2048, 16, [2048, 2048, 904]),
    (7, 3, 4, [3, 3, 1]),
])
def test_profile_batch_splits_a_budget_past_the_model_positions(tokens: int, max_len: int, block: int,
                                                                 lens: list[int]) -> None:
    batch = profile_batch(tokens, max_len, block)
    assert batch.query_lens == lens and batch.num_tokens == tokens
    assert int(batch.positions().max()) == min(tokens, max_len) - 1  # never past the RoPE table
    pages = [p for table in batch.block_tables for p in table]
    assert pages == list(range(len(pages)))  # each sequence on pages of its own, numbered from 0
    assert all(len(t) == -(-n // block) for t, n in zip(batch.block_tables, lens))
    slots = batch.slot_mapping()
    assert len(set(slots.tolist())) == tokens  # no two tokens share a KV slot


def test_profile_batch_refuses_an_empty_budget() -> None:
    with pytest.raises(ValueError, match="0 tokens"):
        profile_batch(0, 2048, 16)
