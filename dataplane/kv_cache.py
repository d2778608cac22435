"""Physical paged KV cache: the per-layer tensor layout, its size, and allocating it.

Layout per layer: `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (flashinfer's NHD paged
layout; index 0 on dim 1 holds keys, 1 holds values). This module sizes and allocates memory only:
it must not decide how many blocks to use (the worker does, from a memory budget) nor assign
blocks to sequences (the control plane does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dataplane.models.config import ModelConfig


def kv_block_shape(cfg: ModelConfig, block_size: int) -> tuple[int, int, int, int]:
    """Shape of one block of one layer: (2, block_size, num_kv_heads, head_dim)."""
    return (2, block_size, cfg.num_kv_heads, cfg.head_dim)


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    elem = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem
    return per_layer * cfg.num_layers


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> list[Tensor]:
    """One zeroed `[num_blocks, 2, block_size, num_kv_heads, head_dim]` tensor per layer."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    shape = (num_blocks, *kv_block_shape(cfg, block_size))
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
