"""The logical block allocator never hands one block to two sequences and never leaks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.kv_blocks import BlockAllocator, OutOfBlocks


def test_allocate_free_and_blocks_for_tokens() -> None:
    alloc = BlockAllocator(8, 16)
    assert [alloc.blocks_for_tokens(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
    a = alloc.allocate(1, 3)
    b = alloc.allocate(2, 5)
    assert not set(a) & set(b) and alloc.num_free == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate(3, 1)
    alloc.check_invariants({1: a, 2: b})
    with pytest.raises(RuntimeError, match="owned by"):
        alloc.free(2, a)
    alloc.free(1, a)
    alloc.free(2, b)
    assert alloc.num_free == 8
    alloc.check_invariants({})
    with pytest.raises(ValueError):
        BlockAllocator(0, 16)


def test_invariant_check_catches_a_mismatch() -> None:
    alloc = BlockAllocator(4, 16)
    a = alloc.allocate(1, 2)
    with pytest.raises(AssertionError):
        alloc.check_invariants({1: a[:1]})


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 4)), max_size=200))
def test_random_operations_keep_invariants(ops: list[tuple[bool, int, int]]) -> None:
    alloc = BlockAllocator(16, 4)
    live: dict[int, list[int]] = {}
    for is_alloc, seq, n in ops:
        if is_alloc and alloc.can_allocate(n):
            live.setdefault(seq, []).extend(alloc.allocate(seq, n))
        elif not is_alloc and seq in live:
            alloc.free(seq, live.pop(seq))
        alloc.check_invariants(live)
    assert alloc.num_used == sum(len(b) for b in live.values())


def test_allocate_one_gives_the_block_allocate_would() -> None:
    one, many = BlockAllocator(4, 16), BlockAllocator(4, 16)
    for alloc in (one, many):  # the same free list on both: a few blocks out and back
        alloc.free(9, alloc.allocate(9, 3)[1:2])
    assert [one.allocate_one(1) for _ in range(2)] == [many.allocate(1, 1)[0] for _ in range(2)]
    assert one._owner == many._owner and one.num_free == many.num_free == 0
    with pytest.raises(OutOfBlocks):
        one.allocate_one(2)
    one.check_invariants()
