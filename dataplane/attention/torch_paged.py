"""Paged attention in plain torch: the reference backend, and the one that runs on CPU.

Sequences that add one token (decodes) are attended together in one padded SDPA call; other
sequences (prefill chunks) are attended one by one. Correctness over speed: this module must not
import flashinfer or any GPU-only library, and must not keep state between steps beyond the
index tensors `begin_step` builds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dataplane.attention.base import AttentionBackend, AttentionBatch


@dataclass
class _DecodeGroup:
    """Sequences with one new token each, attended in one padded call."""

    token_idx: Tensor  # [Bd] long: their rows in T
    blocks: Tensor  # [Bd, L] long: cache block of each key position (padding -> 0)
    offsets: Tensor  # [Bd, L] long
    mask: Tensor  # [Bd, 1, 1, L] bool: key position valid


@dataclass
class _PrefillSeq:
    """One sequence with several new tokens."""

    start: int  # first row in T
    end: int  # one past its last row in T
    blocks: Tensor  # [L] long
    offsets: Tensor  # [L] long
    mask: Tensor | None  # [q, L] bool, or None when plain causal (no context)


class TorchPagedAttention(AttentionBackend):
    """Pure-torch paged attention over `[num_blocks, 2, block_size, hkv, d]` KV caches."""

    name = "torch"

    def __init__(self) -> None:
        self._block_size = 0
        self._new_blocks: Tensor | None = None
        self._new_offsets: Tensor | None = None
        self._decode: _DecodeGroup | None = None
        self._prefills: list[_PrefillSeq] = []

    def begin_step(self, batch: AttentionBatch, device: torch.device, slot_mapping: Tensor | None = None) -> None:
        bs = batch.block_size
        self._block_size = bs
        slots = batch.slot_mapping(device) if slot_mapping is None else slot_mapping
        self._new_blocks = slots // bs
        self._new_offsets = slots % bs
        tables = batch.block_table_tensor().long()
        starts = batch.query_start_loc
        decode_rows = [i for i, q in enumerate(batch.query_lens) if q == 1]
        self._decode = self._plan_decode(batch, tables, decode_rows, device) if decode_rows else None
        self._prefills = [
            self._plan_prefill(batch, tables, i, starts[i], device)
            for i, q in enumerate(batch.query_lens)
            if q > 1
        ]

    @staticmethod
    def _plan_decode(batch: AttentionBatch, tables: Tensor, rows: list[int],
                     device: torch.device) -> _DecodeGroup:
        seq_lens = torch.tensor([batch.seq_lens[i] for i in rows], dtype=torch.long)
        width = int(seq_lens.max())
        pos = torch.arange(width).expand(len(rows), width)
        mask = pos < seq_lens[:, None]
        pos = torch.where(mask, pos, 0)
        row_tables = tables[torch.tensor(rows, dtype=torch.long)]
        blocks = torch.gather(row_tables, 1, pos // batch.block_size)
        starts = batch.query_start_loc
        return _DecodeGroup(
            token_idx=torch.tensor([starts[i] for i in rows], dtype=torch.long, device=device),
            blocks=blocks.to(device),
            offsets=(pos % batch.block_size).to(device),
            mask=mask[:, None, None, :].to(device),
        )

    @staticmethod
    def _plan_prefill(batch: AttentionBatch, tables: Tensor, i: int, start: int,
                      device: torch.device) -> _PrefillSeq:
        q_len, ctx = batch.query_lens[i], batch.context_lens[i]
        pos = torch.arange(ctx + q_len)
        mask = None
        if ctx > 0:
            q_pos = torch.arange(ctx, ctx + q_len)
            mask = (pos[None, :] <= q_pos[:, None]).to(device)
        return _PrefillSeq(
            start=start,
            end=start + q_len,
            blocks=tables[i, pos // batch.block_size].to(device),
            offsets=(pos % batch.block_size).to(device),
            mask=mask,
        )

    def forward(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor) -> Tensor:
        if self._new_blocks is None or self._new_offsets is None:
            raise RuntimeError("TorchPagedAttention.forward called before begin_step")
        kv_cache[self._new_blocks, 0, self._new_offsets] = k.to(kv_cache.dtype)
        kv_cache[self._new_blocks, 1, self._new_offsets] = v.to(kv_cache.dtype)
        out = torch.empty_like(q)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if self._decode is not None:
            out[self._decode.token_idx] = self._attend_decode(self._decode, q, kv_cache, scale)
        for seq in self._prefills:
            out[seq.start : seq.end] = self._attend_prefill(seq, q, k, v, kv_cache, scale)
        return out

    @staticmethod
    def _attend_decode(group: _DecodeGroup, q: Tensor, kv_cache: Tensor, scale: float) -> Tensor:
        qd = q[group.token_idx].unsqueeze(2)  # [Bd, hq, 1, d]
        kd = kv_cache[group.blocks, 0, group.offsets].to(q.dtype).transpose(1, 2)  # [Bd, hkv, L, d]
        vd = kv_cache[group.blocks, 1, group.offsets].to(q.dtype).transpose(1, 2)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask, scale=scale,
                                           enable_gqa=True)
        return o.squeeze(2)

    @staticmethod
    def _attend_prefill(seq: _PrefillSeq, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor,
                        scale: float) -> Tensor:
        qs = q[seq.start : seq.end].transpose(0, 1)  # [hq, q, d]
        if seq.mask is None:  # no context: the keys are exactly this step's new ones
            ks = k[seq.start : seq.end].transpose(0, 1)
            vs = v[seq.start : seq.end].transpose(0, 1)
        else:
            ks = kv_cache[seq.blocks, 0, seq.offsets].to(q.dtype).transpose(0, 1)  # [hkv, L, d]
            vs = kv_cache[seq.blocks, 1, seq.offsets].to(q.dtype).transpose(0, 1)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seq.mask,
                                           is_causal=seq.mask is None, scale=scale,
                                           enable_gqa=True)
        return o.transpose(0, 1)
