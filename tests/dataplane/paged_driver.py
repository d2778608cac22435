"""Test helper: drive a `DenseForCausalLM` over several sequences in chunks with a paged KV cache.

Keeps per-sequence block tables (random, non-contiguous physical blocks) and computed-token counts,
the way the worker will. Test-only; dataplane code must not import it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dataplane.attention import AttentionBackend, AttentionBatch, make_backend
from dataplane.kv_cache import allocate_kv_cache
from dataplane.models.dense import DenseForCausalLM


class PagedDriver:
    """Runs steps of (seq index, number of new tokens) and returns each chunk's logits."""

    def __init__(self, model: DenseForCausalLM, seqs: list[list[int]], block_size: int = 4,
                 num_blocks: int = 64, seed: int = 0, backend: AttentionBackend | None = None) -> None:
        self.model = model
        self.seqs = seqs
        self.block_size = block_size
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.kv = allocate_kv_cache(model.cfg, num_blocks, block_size, dtype, self.device)
        self.attention = backend or make_backend("torch", self.device)
        gen = torch.Generator().manual_seed(seed)
        free = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables: list[list[int]] = []
        for s in seqs:
            need = -(-len(s) // block_size)
            self.tables.append(free[:need])
            free = free[need:]
        self.done = [0] * len(seqs)

    @torch.inference_mode()
    def step(self, work: list[tuple[int, int]]) -> list[Tensor]:
        """Compute the next `n` tokens of each listed sequence; returns [n, vocab] logits per item."""
        ids: list[int] = []
        for i, n in work:
            ids += self.seqs[i][self.done[i] : self.done[i] + n]
        batch = AttentionBatch(
            query_lens=[n for _, n in work],
            context_lens=[self.done[i] for i, _ in work],
            block_tables=[self.tables[i] for i, _ in work],
            block_size=self.block_size,
        )
        self.attention.begin_step(batch, self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), batch.positions(self.device),
                            self.attention, self.kv)
        logits = self.model.compute_logits(hidden)
        for i, n in work:
            self.done[i] += n
        return list(logits.split(batch.query_lens))
