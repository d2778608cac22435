"""Logical KV-cache block allocator: which block ids each sequence holds. No tensors here.

The data plane owns the physical pages; this allocator hands out their ids and must never hand
one id to two live sequences. `check_invariants()` proves that after any sequence of operations.
"""

from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # LIFO free list: recently freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._owner: dict[int, int] = {}  # block id -> seq id

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_new_blocks: int) -> bool:
        return num_new_blocks <= len(self._free)

    def allocate(self, seq_id: int, num_new_blocks: int) -> list[int]:
        """`num_new_blocks` blocks from the top of the free list, the last freed first (as popping them
        one by one would give them); taken in one slice, since a prompt chunk takes a hundred at once."""
        free = self._free
        if num_new_blocks > len(free):
            raise OutOfBlocks(f"need {num_new_blocks} blocks, {len(free)} free")
        start = len(free) - num_new_blocks
        taken = free[start:]
        del free[start:]
        taken.reverse()
        self._owner.update(dict.fromkeys(taken, seq_id))
        return taken

    def allocate_one(self, seq_id: int) -> int:
        """One block, the one `allocate(seq_id, 1)` would give: what a decode takes every
        `block_size` tokens, without the list."""
        if not self._free:
            raise OutOfBlocks("need 1 block, 0 free")
        block = self._free.pop()
        self._owner[block] = seq_id
        return block

    def free(self, seq_id: int, block_ids: list[int]) -> None:
        """Give `block_ids` back (all or none: each must be owned by `seq_id`)."""
        owner = self._owner
        if block_ids and set(map(owner.get, block_ids)) != {seq_id}:  # a block someone else owns, or nobody
            for block in block_ids:
                if owner.get(block) != seq_id:
                    raise RuntimeError(f"block {block} freed by seq {seq_id} but owned by {owner.get(block)}")
        free = self._free
        for block in block_ids:
            del owner[block]
            free.append(block)

    def check_invariants(self, live: dict[int, list[int]] | None = None) -> None:
        """Every block is either free or owned, never both, never twice; `live` must match owners."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        if free & self._owner.keys():
            raise AssertionError("a block is both free and owned")
        if len(free) + len(self._owner) != self.num_blocks:
            raise AssertionError("blocks leaked: neither free nor owned")
        if live is not None:
            expected = {b: sid for sid, blocks in live.items() for b in blocks}
            if expected != self._owner:
                raise AssertionError("owned blocks differ from the live sequences' block tables")
