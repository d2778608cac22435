"""The prefix-caching block allocator alone: matching, reference counts, eviction order, the index
after evictions, and a random walk of operations checked against a shadow of every block's tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.kv_blocks import OutOfBlocks
from controlplane.prefix_cache import PrefixCachingAllocator, token_bytes

SIZE = 4


def match(alloc: PrefixCachingAllocator, tokens: list[int], max_blocks: int) -> tuple[list[int], int]:
    return alloc.match(token_bytes(tokens), max_blocks)


def register(alloc: PrefixCachingAllocator, blocks: list[int], tokens: list[int], start: int, end: int,
             parent: int) -> int:
    return alloc.register(blocks, token_bytes(tokens), start, end, parent)


def cache_seq(alloc: PrefixCachingAllocator, seq_id: int, tokens: list[int]) -> list[int]:
    """Allocate blocks for `tokens` and register every full one, as a finished prefill would."""
    blocks = alloc.allocate(seq_id, alloc.blocks_for_tokens(len(tokens)))
    register(alloc, blocks, tokens, 0, len(tokens) // SIZE, 0)
    return blocks


def test_reset_forgets_every_prefix_and_keeps_held_blocks_held() -> None:
    alloc = PrefixCachingAllocator(12, SIZE)
    tokens = list(range(100, 116))  # 4 full blocks
    done = cache_seq(alloc, 0, tokens)
    alloc.free(0, done)  # idle: cached, counted free
    running = alloc.allocate(1, 4)
    parent = register(alloc, running, list(range(500, 516)), 0, 2, 0)  # half its blocks computed so far
    assert alloc.num_cached == 6 and alloc.num_free == 8
    epoch = alloc.epoch
    assert alloc.reset() == 6
    assert alloc.num_cached == 0 and alloc.num_free == 8 and alloc.epoch > epoch
    assert match(alloc, tokens, 4) == ([], 0)
    alloc.check_invariants({1: running})
    # the running sequence completes its next blocks under the forgotten prefix: not registered
    assert register(alloc, running, list(range(500, 516)), 2, 4, parent) == parent
    assert alloc.num_cached == 0 and match(alloc, list(range(500, 516)), 4) == ([], 0)
    alloc.free(1, running)
    assert alloc.num_free == 12  # nothing idle: every block is back on the free list
    alloc.check_invariants({})
    again = cache_seq(alloc, 2, tokens)  # the cache fills again from scratch
    assert match(alloc, tokens, 4)[0] == again and alloc.reset() == 4


def test_a_registered_prefix_is_found_block_by_block() -> None:
    alloc = PrefixCachingAllocator(16, SIZE)
    tokens = list(range(100, 114))  # 3 full blocks and 2 tokens
    blocks = cache_seq(alloc, 0, tokens)
    assert alloc.num_cached == 3
    found, parent = match(alloc, tokens, 3)
    assert found == blocks[:3] and parent > 0
    assert match(alloc, tokens, 2)[0] == blocks[:2]  # at most max_blocks
    other = tokens[:4] + [7] + tokens[5:]  # the second block differs: the walk stops there
    assert match(alloc, other, 3)[0] == blocks[:1]
    assert match(alloc, [1, 2, 3, 4] + tokens[4:], 3) == ([], 0)  # the same later blocks after another first
    alloc.check_invariants({0: blocks})


def test_shared_blocks_are_counted_and_go_idle_when_nobody_holds_them() -> None:
    alloc = PrefixCachingAllocator(8, SIZE)
    tokens = list(range(8))
    a = cache_seq(alloc, 0, tokens)
    found, _ = match(alloc, tokens + [9], 2)
    alloc.acquire(1, found)
    b = found + alloc.allocate(1, 1)
    alloc.check_invariants({0: a, 1: b})
    assert alloc.num_free == 5
    alloc.free(0, a)
    alloc.check_invariants({1: b})
    assert alloc.num_free == 5  # still held by seq 1
    alloc.free(1, b)
    alloc.check_invariants({})
    assert alloc.num_free == 8 and alloc.num_cached == 2  # idle, still findable, counted as free
    assert alloc.num_idle(found) == 2
    again, _ = match(alloc, tokens, 2)
    alloc.acquire(2, again)
    assert again == a and alloc.num_free == 6
    with pytest.raises(RuntimeError, match="held by no sequence"):
        alloc.free(3, [b[2]])  # b[2] went back to the free list


def test_allocation_takes_uncached_blocks_before_evicting_the_oldest_idle() -> None:
    alloc = PrefixCachingAllocator(6, SIZE)
    first = cache_seq(alloc, 0, list(range(8)))  # 2 cached blocks
    second = cache_seq(alloc, 1, list(range(50, 58)))  # 2 more
    alloc.free(0, first)  # tail first: first[1] is evicted before first[0]
    alloc.free(1, second)
    fresh = alloc.allocate(2, 2)
    assert not set(fresh) & set(first + second) and alloc.evictions == 0
    assert alloc.allocate_one(3) == first[1]
    assert alloc.allocate(4, 2) == [first[0], second[1]]
    assert alloc.evictions == 3 and alloc.num_cached == 1
    assert match(alloc, list(range(50, 58)), 2)[0] == [second[0]]
    with pytest.raises(OutOfBlocks):
        alloc.allocate(5, 2)
    alloc.check_invariants({2: fresh, 3: [first[1]], 4: [first[0], second[1]]})


def test_an_evicted_block_cuts_off_the_blocks_after_it() -> None:
    alloc = PrefixCachingAllocator(3, SIZE)  # no uncached block left: the next allocation evicts
    tokens = list(range(12))
    blocks = cache_seq(alloc, 0, tokens)
    alloc.free(0, [blocks[0]])  # the head goes idle first and is evicted first
    alloc.free(0, blocks[1:])
    (reused,) = alloc.allocate(1, 1)
    assert reused == blocks[0]
    # the reused block gets other tokens under the same (empty) prefix; the old chain must not resume
    register(alloc, [reused], [90, 91, 92, 93], 0, 1, 0)
    assert match(alloc, [90, 91, 92, 93] + tokens[4:], 3)[0] == [reused]
    assert match(alloc, tokens, 3) == ([], 0)


def test_a_duplicate_block_stays_uncached_and_the_chain_goes_on_through_the_cached_one() -> None:
    alloc = PrefixCachingAllocator(8, SIZE)
    tokens = list(range(8))
    a = cache_seq(alloc, 0, tokens)
    b = alloc.allocate(1, 3)  # the same prompt, computed beside it, plus one more block
    longer = tokens + [20, 21, 22, 23]
    register(alloc, b, longer, 0, 3, 0)
    assert alloc.num_cached == 3  # b's first two duplicate a's
    assert match(alloc, longer, 3)[0] == a + [b[2]]
    alloc.free(1, b)
    assert alloc.num_free == 6 and alloc.num_idle(b) == 1  # b[0], b[1] uncached: free; b[2] idle
    alloc.check_invariants({0: a})


def test_misuse_is_refused() -> None:
    alloc = PrefixCachingAllocator(4, SIZE)
    blocks = alloc.allocate(0, 2)
    with pytest.raises(RuntimeError, match="not cached"):
        alloc.acquire(1, blocks)
    with pytest.raises(RuntimeError, match="held by no sequence"):
        register(alloc, [3], [1, 2, 3, 4], 0, 1, 0)
    register(alloc, blocks, list(range(8)), 0, 2, 0)
    with pytest.raises(RuntimeError, match="cached already"):
        register(alloc, blocks, list(range(50, 58)), 0, 1, 0)
    with pytest.raises(ValueError):
        PrefixCachingAllocator(0, SIZE)
    alloc._idle[blocks[0]] = None  # a held block also idle: the invariant check notices
    with pytest.raises(AssertionError):
        alloc.check_invariants()


OPS = st.lists(st.tuples(st.sampled_from(["admit", "admit", "free", "free", "reset"]), st.integers(0, 3),
                         st.integers(1, 14)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_walk_never_matches_a_block_holding_other_tokens(ops: list[tuple[str, int, int]]) -> None:
    """Prompts from four families sharing prefixes, admitted (match + acquire + allocate + register)
    and freed at random through 10 blocks: a matched block always holds the tokens it was found for,
    and the invariants hold after every operation."""
    alloc = PrefixCachingAllocator(10, SIZE)
    written: dict[int, tuple[int, ...]] = {}  # block -> the tokens its KV was computed for
    live: dict[int, list[int]] = {}
    next_id = 0
    for op, family, length in ops:
        if op == "free":
            if live:
                seq_id = sorted(live)[family % len(live)]
                alloc.free(seq_id, live.pop(seq_id))
        elif op == "reset":
            alloc.reset()
            assert alloc.num_cached == 0
        else:
            tokens = [family * 1000 + (i if i < 6 else family + i) for i in range(length)]
            found, parent = match(alloc, tokens, (length - 1) // SIZE)
            for i, block in enumerate(found):
                assert written[block] == tuple(tokens[i * SIZE:(i + 1) * SIZE])
            need = alloc.blocks_for_tokens(length) - len(found)
            if need + alloc.num_idle(found) > alloc.num_free:
                continue
            alloc.acquire(next_id, found)
            blocks = found + alloc.allocate(next_id, need)
            for i in range(len(found), len(blocks)):  # the sequence computes its own blocks' KV
                written[blocks[i]] = tuple(tokens[i * SIZE:(i + 1) * SIZE])
            register(alloc, blocks, tokens, len(found), length // SIZE, parent)
            live[next_id] = blocks
            next_id += 1
        alloc.check_invariants(live)
    for seq_id, blocks in live.items():
        alloc.free(seq_id, blocks)
    alloc.check_invariants({})
    assert alloc.num_free == alloc.num_blocks
