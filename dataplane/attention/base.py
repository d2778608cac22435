"""The attention-backend interface and the per-step batch layout every backend reads.

A step's new tokens are flattened into one dimension T, sequence after sequence in batch order;
`AttentionBatch` says how many belong to each sequence, how many tokens each already has in the
paged KV cache, and where its pages are. Backends write the new K/V into the cache and attend.
This module must not decide anything about scheduling, and must not import a GPU-only library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor


@dataclass
class AttentionBatch:
    """Layout of one forward step over several sequences (per-sequence lists in batch order).

    `query_lens[i]` new tokens of sequence i sit contiguously in the flattened T dimension;
    `context_lens[i]` tokens of it are in the KV cache before this step; `block_tables[i]`
    lists its physical KV blocks, enough to hold `context_lens[i] + query_lens[i]` tokens.
    """

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int

    def __post_init__(self) -> None:
        n = len(self.query_lens)
        if len(self.context_lens) != n or len(self.block_tables) != n:
            raise ValueError("query_lens, context_lens and block_tables must have one entry per sequence")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        for i, (q, c, table) in enumerate(zip(self.query_lens, self.context_lens, self.block_tables)):
            if q < 1 or c < 0:
                raise ValueError(f"sequence {i}: query_len must be >= 1 and context_len >= 0")
            if len(table) * self.block_size < q + c:
                raise ValueError(f"sequence {i}: {len(table)} blocks of {self.block_size} cannot "
                                 f"hold {q + c} tokens")

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        """T: the number of new tokens in the step."""
        return sum(self.query_lens)

    @property
    def seq_lens(self) -> list[int]:
        """Tokens each sequence holds after this step (context + new)."""
        return [c + q for c, q in zip(self.context_lens, self.query_lens)]

    @property
    def query_start_loc(self) -> list[int]:
        """Offsets of each sequence's first new token in T, plus T at the end (length B + 1)."""
        return [0, *accumulate(self.query_lens)]

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """Tensor[T] long: the position of each new token in its sequence (context_len + i)."""
        qlens = torch.tensor(self.query_lens, dtype=torch.long)
        starts = torch.tensor(self.context_lens, dtype=torch.long)
        offsets = torch.arange(self.num_tokens) - torch.repeat_interleave(
            torch.tensor(self.query_start_loc[:-1], dtype=torch.long), qlens)
        return (torch.repeat_interleave(starts, qlens) + offsets).to(device)

    def block_table_tensor(self, device: torch.device | str = "cpu", pad: int = 0) -> Tensor:
        """Tensor[B, max_blocks] int32 of the block tables, right-padded with `pad`."""
        width = max((len(t) for t in self.block_tables), default=0)
        out = torch.full((self.num_seqs, max(width, 1)), pad, dtype=torch.int32)
        for i, table in enumerate(self.block_tables):
            out[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        return out.to(device)

    def token_slots(self, device: torch.device | str = "cpu") -> Tensor:
        """Tensor[S] long: the cache slot of every token of every sequence after this step.

        Sequence i's slots for positions 0..seq_len-1 come in order, sequences in batch order.
        """
        seq_lens = torch.tensor(self.seq_lens, dtype=torch.long)
        seq_idx = torch.repeat_interleave(torch.arange(self.num_seqs), seq_lens)
        starts = torch.tensor([0, *accumulate(self.seq_lens)][:-1], dtype=torch.long)
        pos = torch.arange(int(seq_lens.sum())) - torch.repeat_interleave(starts, seq_lens)
        return self._slots(seq_idx, pos).to(device)

    def slot_mapping(self, device: torch.device | str = "cpu") -> Tensor:
        """Tensor[T] long: block_table[pos // bs] * bs + pos % bs for each new token."""
        qlens = torch.tensor(self.query_lens, dtype=torch.long)
        seq_idx = torch.repeat_interleave(torch.arange(self.num_seqs), qlens)
        return self._slots(seq_idx, self.positions()).to(device)

    def _slots(self, seq_idx: Tensor, pos: Tensor) -> Tensor:
        tables = self.block_table_tensor().long()
        blocks = tables[seq_idx, pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size


@dataclass(frozen=True)
class AttentionShape:
    """What a kernel library needs to know about the model's attention."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


class AttentionBackend(ABC):
    """Paged causal attention over a flattened varlen batch.

    Use: `begin_step(batch, device)` once per forward (before any layer), then `forward` per
    layer. The KV cache of one layer is `[num_blocks, 2, block_size, num_kv_heads, head_dim]`
    (index 0 = keys, 1 = values), see `dataplane.kv_cache`.
    """

    name: str = "abstract"

    @abstractmethod
    def begin_step(self, batch: AttentionBatch, device: torch.device, slot_mapping: Tensor | None = None) -> None:
        """Prepare index tensors for this step's layout; called once per forward, before layers.

        `slot_mapping` (Tensor[T] long on `device`), when given, is `batch.slot_mapping()` already
        staged on the device, so the backend need not copy it itself.
        """

    @abstractmethod
    def forward(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor) -> Tensor:
        """Write k, v of the new tokens into `kv_cache` at their slots and attend.

        q: [T, hq, d]; k, v: [T, hkv, d]. Returns [T, hq, d]: for each new token, softmax
        attention (scale 1/sqrt(d)) over its own sequence's cached tokens and the new tokens up
        to and including itself.
        """

    def kv_slots(self) -> tuple[Tensor, Tensor] | None:
        """(blocks, offsets) [T] long on the device for this step, when a caller may write the new
        K/V into the cache itself and then call `attend`; None when only `forward` is supported."""
        return None

    def attend(self, layer_idx: int, q: Tensor, kv_cache: Tensor, out: Tensor | None = None) -> Tensor:
        """Like `forward`, but this step's K/V are already in `kv_cache` at `kv_slots()`; writes into
        `out` (q's shape, contiguous) when given and returns it."""
        raise NotImplementedError(f"{self.name} attention writes K/V itself; call forward")

    def on_partition(self) -> AbstractContextManager[None]:
        """Steps begun inside this block run on an SM partition: a backend whose kernels assume
        every SM of the device picks ones that do not (`dataplane.partition_kernels`). Default: no change."""
        return nullcontext()
