"""Automatic prefix caching: a KV block allocator whose full blocks outlive their sequences, so a
later prompt that starts with the same tokens reuses their KV instead of recomputing it (vLLM's
automatic prefix caching, SGLang's radix cache).

A full block whose KV is computed is *registered* under its key: the entry id of the block before
it in its sequence (0 for the first) and its own tokens, as bytes (`token_bytes`: a slice of bytes
keeps its hash, where a tuple of ints is hashed again at every lookup). Entry ids are never reused, so a key names
one exact token prefix; a lookup walks a prompt's blocks from the first and stops at the first miss.
Blocks are reference-counted: a cached block may sit in many sequences' block tables. When no
sequence holds a cached block it is *idle*: still findable, and counted as free. Allocation takes
never-cached blocks first and then evicts idle ones, least recently released first (a sequence
releases its tail before its head, so the ends of prompts go before the prefixes they share).
Evicting a block makes the blocks registered after it unreachable; they are evicted in their turn.

Only full blocks are shared, and a sequence only ever writes KV past its cached prefix, so a shared
block is never written. Like `kv_blocks`, this module holds ids only: no tensors, no I/O; the
scheduler decides when KV is computed (and so when a block may be registered).
"""

from __future__ import annotations

from array import array
from collections import Counter, OrderedDict

from controlplane.kv_blocks import BlockAllocator, OutOfBlocks

Key = tuple[int, bytes]  # (entry id of the block before, this block's tokens as token_bytes)


def token_bytes(token_ids: list[int]) -> bytes:
    """Token ids as the index keys them: 4 bytes each (ids are below the vocabulary size)."""
    return array("I", token_ids).tobytes()


class PrefixCachingAllocator:
    """The `BlockAllocator` interface (allocate, allocate_one, free, num_free, check_invariants)
    with reference counts and a prefix index: `match`, `acquire` and `register` on top."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never cached (or evicted): LIFO
        # cached, held by nobody, oldest first: an OrderedDict, whose front pops in O(1) (a dict's
        # first key, after many deletions at its front, is found by scanning the holes they left)
        self._idle: OrderedDict[int, None] = OrderedDict()
        self._refs: dict[int, int] = {}  # held block -> how many sequences hold it
        self._index: dict[Key, int] = {}
        self._key: dict[int, Key] = {}  # cached block -> its key
        self._entry: dict[int, int] = {}  # cached block -> its entry id
        self._next_entry = 1
        self._floor = 1  # entry ids below this were forgotten by `reset`
        self.evictions = 0  # cached blocks taken for new KV
        self.epoch = 0  # moves whenever the index changes: a `match` made at the same epoch still holds

    # ------------------------------------------------------------------ the BlockAllocator interface

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never-cached ones and idle cached ones."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks registered in the index (held or idle)."""
        return len(self._key)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_new_blocks: int) -> bool:
        return num_new_blocks <= self.num_free

    def allocate(self, seq_id: int, num_new_blocks: int) -> list[int]:
        """`num_new_blocks` blocks for `seq_id`: never-cached ones first (the last freed first), then
        idle cached ones, evicted oldest first."""
        free = self._free
        if num_new_blocks > len(free) + len(self._idle):
            raise OutOfBlocks(f"need {num_new_blocks} blocks, {self.num_free} free")
        from_free = min(num_new_blocks, len(free))
        start = len(free) - from_free
        taken = free[start:]
        del free[start:]
        taken.reverse()
        for _ in range(num_new_blocks - from_free):
            taken.append(self._evict())
        self._refs.update(dict.fromkeys(taken, 1))
        return taken

    def allocate_one(self, seq_id: int) -> int:
        """One block, the one `allocate(seq_id, 1)` would give (a decode's next block)."""
        if self._free:
            block = self._free.pop()
        elif self._idle:
            block = self._evict()
        else:
            raise OutOfBlocks("need 1 block, 0 free")
        self._refs[block] = 1
        return block

    def free(self, seq_id: int, block_ids: list[int]) -> None:
        """`seq_id` lets go of `block_ids` (all or none: each must be held). A block nobody holds any
        more goes idle if it is cached, else back to the free list; the table's tail goes idle first."""
        refs = self._refs
        for block in block_ids:
            if block not in refs:
                raise RuntimeError(f"block {block} freed by seq {seq_id} but held by no sequence")
        key, idle, free = self._key, self._idle, self._free
        for block in reversed(block_ids):
            left = refs[block] - 1
            if left:
                refs[block] = left
                continue
            del refs[block]
            if block in key:
                idle[block] = None
            else:
                free.append(block)

    def check_invariants(self, live: dict[int, list[int]] | None = None) -> None:
        """Every block is free, idle or held, exactly once; idle blocks are cached; the index and its
        reverse maps agree; `live` (seq id -> block table) holds exactly the held references."""
        free, idle, refs = set(self._free), set(self._idle), self._refs
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        if free & idle or free & refs.keys() or idle & refs.keys():
            raise AssertionError("a block is in two of free, idle and held")
        if len(free) + len(idle) + len(refs) != self.num_blocks:
            raise AssertionError("blocks leaked: neither free, idle nor held")
        if any(n < 1 for n in refs.values()):
            raise AssertionError("a held block has no holder")
        if not idle <= self._key.keys() or free & self._key.keys():
            raise AssertionError("an idle block is not cached, or a free one is")
        if len(self._index) != len(self._key) or any(self._index.get(k) != b for b, k in self._key.items()):
            raise AssertionError("the prefix index and its reverse map disagree")
        if self._entry.keys() != self._key.keys():
            raise AssertionError("a cached block has no entry id, or an entry id no block")
        if live is not None:
            expected = Counter(b for blocks in live.values() for b in blocks)
            if expected != Counter(refs):
                raise AssertionError("held blocks differ from the live sequences' block tables")

    # ------------------------------------------------------------------ the prefix index

    def match(self, tokens: bytes, max_blocks: int) -> tuple[list[int], int]:
        """The cached blocks that hold the first blocks of `tokens` (`token_bytes`; at most
        `max_blocks`), in order, and the entry id of the last one (0: none). Nothing is taken:
        `acquire` them to hold them."""
        stride, index, entry = 4 * self.block_size, self._index, self._entry
        blocks: list[int] = []
        parent = 0
        for i in range(max_blocks):
            block = index.get((parent, tokens[i * stride:(i + 1) * stride]))
            if block is None:
                break
            blocks.append(block)
            parent = entry[block]
        return blocks, parent

    def num_idle(self, block_ids: list[int]) -> int:
        """How many of `block_ids` are idle (acquiring them takes that many from `num_free`)."""
        idle = self._idle
        return sum(1 for b in block_ids if b in idle)

    def acquire(self, seq_id: int, block_ids: list[int]) -> None:
        """Hold cached blocks `match` found (an idle one stops being evictable)."""
        refs, idle, key = self._refs, self._idle, self._key
        for block in block_ids:
            if block not in key:
                raise RuntimeError(f"seq {seq_id} acquires block {block}, which is not cached")
        for block in block_ids:
            if block in idle:
                del idle[block]
            refs[block] = refs.get(block, 0) + 1

    def register(self, block_ids: list[int], tokens: bytes, start: int, end: int, parent: int) -> int:
        """Register a sequence's blocks `start..end-1` (full, their KV computed) under the prefix its
        first `start` blocks end in (entry id `parent`); returns the entry id the last one ends in.
        A block whose prefix is cached already (under another block) stays uncached, and the chain
        goes on from the cached one. A block may be registered once. Under a prefix `reset` forgot
        nothing is registered (nothing could find it): the forgotten entry id is returned."""
        if 0 < parent < self._floor:
            return parent
        stride, index, key_of, entry, refs = 4 * self.block_size, self._index, self._key, self._entry, self._refs
        next_entry = self._next_entry
        for i in range(start, end):
            block = block_ids[i]
            if block not in refs:
                raise RuntimeError(f"block {block} registered but held by no sequence")
            if block in key_of:
                raise RuntimeError(f"block {block} is cached already")
            key = (parent, tokens[i * stride:(i + 1) * stride])
            found = index.setdefault(key, block)  # one hash of the key (a tuple's hash is not kept)
            if found == block:
                self.epoch += 1
                key_of[block] = key
                parent = entry[block] = next_entry
                next_entry += 1
            else:
                parent = entry[found]
        self._next_entry = next_entry
        return parent

    def reset(self) -> int:
        """Forget every cached prefix (vLLM's reset_prefix_cache, SGLang's flush_cache); returns how
        many blocks left the index. Idle blocks go back to the free list; held ones stay with their
        sequences, findable no more, and what those sequences complete later under the forgotten
        prefixes is not registered. KV itself is untouched: blocks are only ids here."""
        dropped = len(self._key)
        self._free.extend(self._idle)
        self._idle.clear()
        self._index.clear()
        self._key.clear()
        self._entry.clear()
        self._floor = self._next_entry
        self.epoch += 1
        return dropped

    def _evict(self) -> int:
        block, _ = self._idle.popitem(last=False)
        self._uncache(block)
        self.evictions += 1
        return block

    def _uncache(self, block: int) -> None:
        self.epoch += 1
        key = self._key.pop(block)
        del self._index[key], self._entry[block]


Allocator = BlockAllocator | PrefixCachingAllocator


def make_allocator(num_blocks: int, block_size: int, prefix_caching: bool) -> Allocator:
    """The scheduler's allocator: with prefix caching, or the plain one."""
    return (PrefixCachingAllocator if prefix_caching else BlockAllocator)(num_blocks, block_size)
