"""CUDA graphs of eager (prefill and mixed) forward passes, in pieces around attention.

An eager pass launches about nine kernels a layer from Python: on the 36-layer Qwen3-8B the host
needs 14-18 ms to launch one (results/profile-step-h200.json), more than the GPU needs for a few
hundred tokens, so small prefill and mixed steps wait on the host. Here each stretch of the fused
forward between two attention calls is one CUDA graph per padded token-count bucket (the embedding,
norms, projections, q/k-norm + RoPE + KV write and MLP); attention runs eagerly in between on the
step's real tokens, planned per step as before, since its shape changes every step. Padding tokens
write their K/V to the scratch block and their rows are ignored. Graphs are captured on the whole
GPU only: a multiplexed step's prefill on a partition stays eager.

Static inputs (ids, positions, KV slots), the residual stream, q, the attention output and the
hidden states live in buffers outside the graph pool; each piece's temporaries come from one shared
pool (pieces replay one at a time on one stream). `use_graphs=False` calls the pieces directly,
the same arithmetic without CUDA (the CPU tests). This module must not decide batching and must not
synchronise the host in `run`.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import Tensor

from dataplane.attention.base import AttentionBackend
from dataplane.models.config import ModelConfig
from dataplane.models.dense import DenseForCausalLM
from dataplane.models.fused import (
    after_attention,
    epilogue_after_attention,
    epilogue_norms_for,
    epilogue_project_q,
    layer_norm_weight,
    project_q,
)
from shared.profiles import MAX_PIECEWISE_TOKENS  # above it a pass's GPU time hides its launches

log = logging.getLogger(__name__)


def default_token_buckets(max_tokens: int) -> list[int]:
    """Every 16 tokens to 256, every 32 to 512, every 64 to 1024 (padding under ~12%), up to
    `max_tokens` (itself a bucket when it falls between)."""
    sizes = [*range(16, 257, 16), *range(288, 513, 32), *range(576, MAX_PIECEWISE_TOKENS + 1, 64)]
    cap = min(max_tokens, MAX_PIECEWISE_TOKENS)
    return sorted({s for s in sizes if s < cap} | ({cap} if cap >= 1 else set()))


def piecewise_reserve_bytes(cfg: ModelConfig, max_tokens: int, dtype: torch.dtype) -> int:
    """GPU memory the pieces hold beyond the eager pass's: the static buffers (residual, q, attention
    output, hidden states) and one piece's temporaries in the pool (qkv, gate/up, the activation, two
    hidden-sized), with a quarter on top for the allocator's rounding."""
    qkv = cfg.q_size + 2 * cfg.kv_size
    per_token = 4 * cfg.hidden_size + 2 * cfg.q_size + qkv + 3 * cfg.intermediate_size
    return int(per_token * dtype.itemsize * min(max_tokens, MAX_PIECEWISE_TOKENS) * 1.25)


def piecewise_possible(model: DenseForCausalLM, device: torch.device, backend_name: str, cuda_graphs: bool) -> bool:
    """Whether pieces can be built: CUDA graphs on, flashinfer attention, the fused path with Triton."""
    fused = getattr(model, "fused", None)
    return (device.type == "cuda" and cuda_graphs and backend_name == "flashinfer" and fused is not None
            and fused.triton is not None)


class PiecewiseGraphs:
    """Per token bucket, num_layers + 1 graphs: piece 0 embeds and projects layer 0's q; piece i
    finishes layer i-1 from its attention output and projects layer i's q; the last piece finishes
    the last layer and the final norm."""

    def __init__(self, model: DenseForCausalLM, kv_caches: list[Tensor], device: torch.device, *,
                 block_size: int, scratch_block: int, buckets: list[int], use_graphs: bool = True) -> None:
        kernels = model.fused
        if kernels is None or kernels.triton is None:
            raise ValueError("piecewise graphs need the fused path with its Triton kernels")
        if not buckets:
            raise ValueError("piecewise graphs need at least one token bucket")
        cfg = model.cfg
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = sorted(buckets)
        self.use_graphs = use_graphs
        self.num_layers = len(model.model.layers)
        n = self.buckets[-1]
        dtype = model.model.embed_tokens.weight.dtype
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.blocks = torch.full((n,), scratch_block, **long)
        self.offsets = torch.zeros(n, **long)
        self.residual = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=device)
        self.q = torch.zeros(n, cfg.num_q_heads, cfg.head_dim, dtype=dtype, device=device)
        self.o = torch.zeros_like(self.q)
        self.out = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=device)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None
        self.capture_seconds = 0.0

    @property
    def max_tokens(self) -> int:
        """The largest pass replayed (the last bucket)."""
        return self.buckets[-1]

    @property
    def num_graphs(self) -> int:
        return sum(len(g) for g in self._graphs.values())

    def bucket_for(self, num_tokens: int) -> int | None:
        i = bisect.bisect_left(self.buckets, num_tokens)
        return self.buckets[i] if i < len(self.buckets) and num_tokens >= 1 else None

    def _piece(self, i: int, size: int) -> None:
        """Piece i on the first `size` rows of the static buffers."""
        model = self.model
        kernels = model.fused
        if epilogue_norms_for(kernels, size):  # as an eager pass of this many tokens runs them
            self._epilogue_piece(i, size)
            return
        layers = model.model.layers
        residual = self.residual[:size]
        if i == 0:
            residual.copy_(model.model.embed_tokens(self.input_ids[:size]))
            first = layers[0].input_layernorm
            h = kernels.rms_norm(residual, layer_norm_weight(kernels, first), first.eps)
        else:
            h = after_attention(layers[i - 1], self.o[:size], residual, kernels)
            if i == self.num_layers:
                norm = model.model.norm
                h, _ = kernels.add_rms_norm(h, residual, norm.weight, norm.eps)
                self.out[:size].copy_(h)
                return
            norm = layers[i].input_layernorm
            h, _ = kernels.add_rms_norm(h, residual, layer_norm_weight(kernels, norm), norm.eps)
        project_q(layers[i], h, self.positions[:size], kernels, self.kv_caches[i], self.blocks[:size],
                  self.offsets[:size], out=self.q[:size])

    def _epilogue_piece(self, i: int, size: int) -> None:
        """Piece i with the layers' norms in the projections' epilogues (`fused._epilogue_forward`'s stretch)."""
        model = self.model
        kernels = model.fused
        layers = model.model.layers
        residual = self.residual[:size]
        if i == 0:
            residual.copy_(model.model.embed_tokens(self.input_ids[:size]))
        else:
            epilogue_after_attention(layers[i - 1], self.o[:size], residual, kernels)
            if i == self.num_layers:
                norm = model.model.norm
                self.out[:size].copy_(kernels.rms_norm(residual, norm.weight, norm.eps))
                return
        epilogue_project_q(layers[i], residual, self.positions[:size], kernels, self.kv_caches[i], self.blocks[:size],
                           self.offsets[:size], out=self.q[:size])

    def _pad(self, start: int, size: int) -> None:
        """Rows start..size-1 are padding: token 0 at position 0, K/V into the scratch block."""
        if size > start:
            self.input_ids[start:size].zero_()
            self.positions[start:size].zero_()
            self.blocks[start:size].fill_(self.scratch_block)
            self.offsets[start:size].zero_()

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, on a side stream (warming each piece once before)."""
        if not self.use_graphs:
            self._graphs = {size: [] for size in self.buckets}
            return
        start = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for size in reversed(self.buckets):
                self._pad(0, size)
                pieces = []
                for i in range(self.num_layers + 1):
                    self._piece(i, size)  # warm-up: cuBLAS heuristics, Triton compilation
                    graph = torch.cuda.CUDAGraph()
                    graph.capture_begin(pool=self._pool)
                    try:
                        self._piece(i, size)
                    finally:
                        graph.capture_end()
                    pieces.append(graph)
                self._graphs[size] = pieces
        current.wait_stream(stream)
        torch.cuda.empty_cache()  # the warm-ups' blocks, cached for the side stream only; the pool stays
        self.capture_seconds = time.perf_counter() - start
        log.info("captured %d piecewise graphs (%d token buckets up to %d) in %.1f s", self.num_graphs,
                 len(self.buckets), self.buckets[-1], self.capture_seconds)

    def run(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend) -> Tensor:
        """One forward of T tokens (device tensors [T]); `attention` has begun this step and gives its
        KV slots. Returns the final-normed hidden states [T, hidden] (a view of a static buffer, valid
        until the next run)."""
        t = input_ids.shape[0]
        size = self.bucket_for(t)
        slots = attention.kv_slots()
        if size is None or size not in self._graphs or slots is None:
            raise ValueError(f"no piecewise graphs for {t} tokens" if slots is not None else
                             f"{attention.name} attention does not expose its KV slots")
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        self.blocks[:t].copy_(slots[0])
        self.offsets[:t].copy_(slots[1])
        self._pad(t, size)
        pieces = self._graphs[size]
        for i in range(self.num_layers + 1):
            if self.use_graphs:
                pieces[i].replay()
            else:
                self._piece(i, size)
            if i < self.num_layers:
                attention.attend(i, self.q[:t], self.kv_caches[i], out=self.o[:t])
        return self.out[:t]
