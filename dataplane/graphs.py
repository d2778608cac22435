"""CUDA graphs of the decode forward pass, one per padded batch-size bucket.

Each graph reads fixed input buffers (token ids, positions, KV slots) and writes a fixed hidden
state buffer; flashinfer's decode wrapper for that bucket is re-planned (host work plus an async
copy) before every replay. Padding rows attend to one scratch KV block nobody owns. A graph keeps
the SMs of the stream it was captured on, so capture on the stream the graph will serve.

This module must not decide batching and must not synchronise the host in `run`.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch
from torch import Tensor

from dataplane.attention.base import AttentionBatch, AttentionShape
from dataplane.attention.flashinfer_backend import WORKSPACE_BYTES, GraphDecodeAttention
from dataplane.models.dense import DenseForCausalLM

log = logging.getLogger(__name__)


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: padding waste stays under ~20%."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 513, 16)]
    out = sorted({s for s in sizes if s < max_batch} | {max_batch})
    return out


class DecodeGraphs:
    """Captured decode graphs for one stream (one SM partition)."""

    def __init__(
        self,
        model: DenseForCausalLM,
        kv_caches: list[Tensor],
        shape: AttentionShape,
        device: torch.device,
        *,
        block_size: int,
        max_pages_per_seq: int,
        scratch_block: int,
        buckets: list[int],
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = sorted(buckets)
        self.max_batch = self.buckets[-1]
        self.device = device
        self.stream = stream or torch.cuda.Stream(device)
        n = self.max_batch
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.blocks = torch.full((n,), scratch_block, **long)
        self.offsets = torch.zeros(n, **long)
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._backends: dict[int, GraphDecodeAttention] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, Tensor] = {}
        self._shape = shape
        self._max_pages_per_seq = max_pages_per_seq
        self.capture_seconds = 0.0
        self.pool_bytes = 0

    def bucket_for(self, batch_size: int) -> int | None:
        i = bisect.bisect_left(self.buckets, batch_size)
        return self.buckets[i] if i < len(self.buckets) else None

    def _padded(self, batch: AttentionBatch, size: int) -> AttentionBatch:
        pad = size - batch.num_seqs
        return AttentionBatch(
            query_lens=batch.query_lens + [1] * pad,
            context_lens=batch.context_lens + [0] * pad,
            block_tables=batch.block_tables + [[self.scratch_block]] * pad,
            block_size=batch.block_size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        start = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):
            backend = GraphDecodeAttention(
                self._shape, self.device, size, size * self._max_pages_per_seq, self._workspace,
                self.blocks[:size], self.offsets[:size],
            )
            dummy = self._padded(AttentionBatch([], [], [], self.block_size), size)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                backend.begin_step(dummy, self.device)
                for _ in range(2):  # warm up kernels and cuBLAS on this stream
                    self.model(self.input_ids[:size], self.positions[:size], backend, self.kv_caches)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                    out = self.model(self.input_ids[:size], self.positions[:size], backend, self.kv_caches)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._backends[size], self._graphs[size], self._outputs[size] = backend, graph, out
        torch.cuda.synchronize(self.device)
        self.blocks.fill_(self.scratch_block)
        self.offsets.zero_()
        self.capture_seconds = time.perf_counter() - start
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - before
        log.info("captured %d decode graphs in %.1f s (%.0f MiB)", len(self._graphs), self.capture_seconds,
                 self.pool_bytes / 2**20)

    def run(self, batch: AttentionBatch, input_ids: Tensor, positions: Tensor, slots: Tensor) -> Tensor:
        """Replay the bucket graph for a decode-only batch; returns hidden states [B, hidden].

        Inputs are device tensors of length B; the work is queued on the current stream.
        """
        b = batch.num_seqs
        size = self.bucket_for(b)
        if size is None or not batch.is_decode_only:
            raise ValueError(f"no decode graph for a batch of {b}")
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.blocks[:b].copy_(slots // self.block_size)
        self.offsets[:b].copy_(slots % self.block_size)
        if size > b:  # padding rows: token 0 at position 0 in the scratch block
            self.input_ids[b:size].zero_()
            self.positions[b:size].zero_()
            self.blocks[b:size].fill_(self.scratch_block)
            self.offsets[b:size].zero_()
        self._backends[size].begin_step(self._padded(batch, size), self.device)
        self._graphs[size].replay()
        return self._outputs[size][:b]
