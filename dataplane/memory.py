"""The GPU memory plan: weights and peak activations are measured, the rest (a configurable share of
the card) becomes KV pages. On the CPU the KV cache is a fixed byte budget.

This module measures and divides memory; it does not decide batching (the token budget it profiles
with comes from config) and it never runs at serving time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dataplane.attention.base import AttentionBackend, AttentionBatch
from dataplane.kv_cache import allocate_kv_cache, kv_bytes_per_block
from dataplane.models.config import ModelConfig
from dataplane.models.dense import DenseForCausalLM

log = logging.getLogger(__name__)

GRAPH_RESERVE_BYTES = 768 << 20  # decode graphs, flashinfer workspaces and plan buffers


@dataclass(frozen=True)
class MemoryPlan:
    total_bytes: int
    weight_bytes: int
    activation_bytes: int
    reserve_bytes: int
    kv_block_bytes: int
    num_kv_blocks: int

    def describe(self) -> str:
        gib = 2**30
        return (f"GPU {self.total_bytes / gib:.1f} GiB: weights {self.weight_bytes / gib:.2f}, peak activations "
                f"{self.activation_bytes / gib:.2f}, reserve {self.reserve_bytes / gib:.2f}, KV "
                f"{self.num_kv_blocks * self.kv_block_bytes / gib:.2f} GiB in {self.num_kv_blocks} blocks")


def profile_batch(num_tokens: int, max_seq_len: int, block_size: int) -> AttentionBatch:
    """The prefill the memory plan profiles: `num_tokens` new tokens in as few sequences as the model's
    positions allow (each at most `max_seq_len` tokens: no position past the RoPE table), each on
    pages of its own, numbered from 0."""
    if num_tokens < 1 or max_seq_len < 1:
        raise ValueError(f"profile_batch: {num_tokens} tokens in sequences of at most {max_seq_len}")
    full, rest = divmod(num_tokens, max_seq_len)
    lens = [max_seq_len] * full + ([rest] if rest else [])
    tables, first = [], 0
    for n in lens:
        pages = -(-n // block_size)
        tables.append(list(range(first, first + pages)))
        first += pages
    return AttentionBatch(lens, [0] * len(lens), tables, block_size)


@torch.inference_mode()
def profile_activations(model: DenseForCausalLM, cfg: ModelConfig, backend: AttentionBackend, *, num_tokens: int,
                        num_logit_rows: int, block_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Peak bytes above the weights for one prefill of `num_tokens` plus logits for `num_logit_rows`.
    A budget past the model's context is profiled as several sequences: one sequence of it would read
    positions past the RoPE table (an illegal address on a GPU, surfacing as pages moved it)."""
    batch = profile_batch(num_tokens, cfg.max_position_embeddings, block_size)
    blocks = sum(len(t) for t in batch.block_tables)
    scratch_kv = allocate_kv_cache(cfg, blocks, block_size, dtype, device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.randint(0, cfg.vocab_size, (num_tokens,), device=device)
    backend.begin_step(batch, device, batch.slot_mapping(device))
    hidden = model(ids, batch.positions(device), backend, scratch_kv)
    rows = hidden[-min(num_logit_rows, num_tokens):].repeat(-(-num_logit_rows // num_tokens), 1)[:num_logit_rows]
    logits = model.compute_logits(rows)
    torch.softmax(logits, dim=-1).sort(dim=-1)  # the sampler's worst case (top-p)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del scratch_kv, hidden, logits
    torch.cuda.empty_cache()
    return peak


def plan_gpu_memory(cfg: ModelConfig, *, utilization: float, activation_bytes: int, block_size: int,
                    dtype: torch.dtype, device: torch.device, num_kv_blocks: int | None,
                    extra_reserve_bytes: int = 0) -> MemoryPlan:
    """`extra_reserve_bytes`: graphs beyond the decode ones (piecewise graphs' buffers and pool)."""
    free, total = torch.cuda.mem_get_info(device)
    used = total - free  # weights, the CUDA context and anything else on the card
    weight_bytes = torch.cuda.memory_allocated(device)
    per_block = kv_bytes_per_block(cfg, block_size, dtype)
    reserve = GRAPH_RESERVE_BYTES + extra_reserve_bytes
    budget = int(total * utilization) - used - activation_bytes - reserve
    blocks = num_kv_blocks if num_kv_blocks is not None else budget // per_block
    if blocks < 1:
        raise RuntimeError(f"no GPU memory left for the KV cache (budget {budget / 2**20:.0f} MiB)")
    return MemoryPlan(total, weight_bytes, activation_bytes, reserve, per_block, blocks)


def plan_cpu_memory(cfg: ModelConfig, *, kv_bytes: int, block_size: int, dtype: torch.dtype,
                    num_kv_blocks: int | None) -> MemoryPlan:
    per_block = kv_bytes_per_block(cfg, block_size, dtype)
    blocks = num_kv_blocks if num_kv_blocks is not None else kv_bytes // per_block
    if blocks < 1:
        raise RuntimeError(f"cpu_kv_cache_bytes {kv_bytes} holds no KV block of {per_block} bytes")
    return MemoryPlan(0, 0, 0, 0, per_block, blocks)
