"""Host-side index arithmetic of one forward pass: the position and KV-cache slot of every token.

A prefill chunk of n tokens needs n positions and n slots (`block_table[pos // B] * B + pos % B`);
a per-token Python loop costs about 0.3 us a token, a millisecond for a 2k-token chunk on the
critical path of every eager step. Long items are computed with numpy instead; short ones (decode
items) stay in Python, where a numpy call would cost more than it saves. Pure arithmetic over plain
lists: no torch, no device, no decisions (the runner moves the result to the device in one copy).
"""

from __future__ import annotations

import numpy as np

VECTOR_MIN_TOKENS = 32  # items with at least this many tokens go through numpy

Span = tuple[int, int, list[int]]  # (first position, end position, the sequence's block table)


def positions_and_slots(spans: list[Span], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 positions and slots of every token of `spans`, in order."""
    pos_parts: list[np.ndarray] = []
    slot_parts: list[np.ndarray] = []
    small_pos: list[int] = []
    small_slots: list[int] = []

    def flush() -> None:
        if small_pos:
            pos_parts.append(np.asarray(small_pos, dtype=np.int64))
            slot_parts.append(np.asarray(small_slots, dtype=np.int64))
            small_pos.clear()
            small_slots.clear()

    for start, end, table in spans:
        if end - start < VECTOR_MIN_TOKENS:
            for pos in range(start, end):
                small_pos.append(pos)
                small_slots.append(table[pos // block_size] * block_size + pos % block_size)
            continue
        flush()
        pos = np.arange(start, end, dtype=np.int64)
        first = start // block_size
        blocks = np.asarray(table[first : (end - 1) // block_size + 1], dtype=np.int64)
        pos_parts.append(pos)
        slot_parts.append(blocks[pos // block_size - first] * block_size + pos % block_size)
    flush()
    if not pos_parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    return np.concatenate(pos_parts), np.concatenate(slot_parts)
