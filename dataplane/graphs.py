"""CUDA graphs of the decode forward pass, one per padded batch-size bucket.

Each graph reads fixed input buffers (token ids, positions, KV slots) and writes a fixed hidden
state buffer; flashinfer's decode wrapper for that bucket is re-planned (host work plus an async
copy, staged through `plan_staging`'s pinned buffers) before every replay. Padding rows attend to
one scratch KV block nobody owns. A graph keeps the SMs of the stream it was captured on, so capture
on the stream the graph will serve.

This module must not decide batching and must not synchronise the host in `run`.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from collections.abc import Iterator

import torch
from torch import Tensor

from dataplane.attention.base import AttentionBatch, AttentionShape
from dataplane.attention import flashinfer_backend as fib
from dataplane.attention.flashinfer_backend import WORKSPACE_BYTES, GraphDecodeAttention
from dataplane.kernels.l2_prefetch import L2Prefetch
from dataplane.models.dense import DenseForCausalLM

log = logging.getLogger(__name__)


@contextlib.contextmanager
def preferred_blas(library: str) -> Iterator[None]:
    """torch's GEMMs on `library` (cublas | cublaslt) inside, the library before restored after;
    "default" changes nothing. Process-wide while inside: use around warm-up and capture only."""
    if library == "default":
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def default_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, then every 16: padding waste stays under ~20%."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 513, 16)]
    out = sorted({s for s in sizes if s < max_batch} | {max_batch})
    return out


GraphKey = tuple[object, int, bool]  # (stream key, bucket, KV split)


class DecodeGraphs:
    """Decode graphs keyed by (stream key, bucket, KV split), sharing static inputs and a pool.

    Stream key "full" is the whole GPU; a partition's key is its decode SM count. Every look-ahead
    pass of a step replays the same graph: each replay's plan is staged in a pinned buffer of its own
    (`plan_staging`) and copied in stream order, so k passes (and the next step) can be planned while
    the GPU is still behind. A whole-GPU bucket that splits KV may have an unsplit twin
    (`flashinfer_backend.has_unsplit_twin`), captured beside it and replayed for balanced batches.
    The whole GPU's graphs are captured at start-up, a partition's on its first use (which waits for
    the GPU once); past `max_graphs` none is captured and `ensure` says so (the caller runs eagerly).
    """

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
        max_graphs: int = 512,
        blas_library: str = "default",
        l2_prefetch_bytes: int = 0,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = sorted(buckets)
        self.max_batch = self.buckets[-1]
        self.device = device
        self.max_graphs = max_graphs
        self.blas_library = blas_library  # the library the graphs' GEMMs are captured with
        n = self.max_batch
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.blocks = torch.full((n,), scratch_block, **long)
        self.offsets = torch.zeros(n, **long)
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._shape = shape
        self._max_pages_per_seq = max_pages_per_seq
        self._wrappers: dict[tuple[int, bool], GraphDecodeAttention] = {}  # (bucket, KV split)
        self._graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.over_budget = 0  # captures refused because `max_graphs` graphs exist
        self._pool = torch.cuda.graph_pool_handle()
        self._side_stream = torch.cuda.Stream(device)
        self.capture_seconds = 0.0
        self.capture_bytes = 0  # device memory the captures reserved (graphs, their outputs, new wrappers)
        self.unsplit_twin_replays = 0  # replays of a bucket's unsplit twin (balanced batches)
        self.l2_prefetch = self._prefetcher(l2_prefetch_bytes)

    def _prefetcher(self, nbytes: int) -> L2Prefetch | None:
        """The whole-GPU graphs' L2 prefetch of each projection's first `nbytes` (0: none). Needs the
        fused path with Triton; a partition's graphs never prefetch (its side stream would leave the
        partition's SMs)."""
        if nbytes <= 0:
            return None
        fused = getattr(self.model, "fused", None)
        if fused is None or fused.triton is None:
            log.warning("l2 prefetch of %d bytes needs the fused path with Triton; decode graphs run without it",
                        nbytes)
            return None
        if fused.decode_gemms is not None:
            log.warning("passes of at most %d rows run the folded decode GEMMs, which do not prefetch into L2",
                        fused.decode_gemms.max_rows)
        if fused.unit_norm is not None:
            log.warning("passes of at most %d rows run their norms in the projections' epilogues: with no small "
                        "kernel before QKV and gate/up, only down's weights are prefetched into L2",
                        fused.epilogue_norm_rows)
        return L2Prefetch(self.device, nbytes)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

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

    def _wrapper(self, size: int, split: bool) -> GraphDecodeAttention:
        key = (size, split)
        if key not in self._wrappers:
            self._wrappers[key] = GraphDecodeAttention(
                self._shape, self.device, size, size * self._max_pages_per_seq, self._workspace,
                self.blocks[:size], self.offsets[:size], split_kv=split,
            )
        return self._wrappers[key]

    @staticmethod
    def variants(stream_key: object, size: int) -> tuple[bool, ...]:
        """The KV-split settings a bucket's graphs are captured with: its default, then an unsplit twin
        on the whole GPU where `has_unsplit_twin` says so (a partition's fewer SMs keep the split)."""
        default = fib.splits_kv(size)
        return (default, False) if stream_key == "full" and fib.has_unsplit_twin(size) else (default,)

    @classmethod
    def split_for(cls, stream_key: object, size: int, kv_lens: list[int]) -> bool:
        """The KV split of the graph a batch with these KV lengths (padding rows left out) replays: the
        unsplit twin when there is one and the batch is balanced (`flashinfer_backend.is_balanced`)."""
        splits = cls.variants(stream_key, size)
        return splits[-1] if len(splits) > 1 and fib.is_balanced(kv_lens) else splits[0]

    @torch.inference_mode()
    def ensure(self, stream_key: object, stream: torch.cuda.Stream | None, size: int) -> bool:
        """Capture graph (stream_key, size) and its twin on `stream` unless they exist; False when one
        is missing and the graph budget is spent (replay nothing then: run the pass eagerly). `stream`
        None: a side stream for the whole GPU, the current stream for a partition. Not during other
        capture."""
        missing = [s for s in self.variants(stream_key, size) if (stream_key, size, s) not in self._graphs]
        if len(self._graphs) + len(missing) > self.max_graphs:
            if self.over_budget == 0:
                log.warning("decode graph budget of %d spent: batches of %d on %s run eagerly",
                            self.max_graphs, size, stream_key)
            self.over_budget += 1
            return False
        for split in missing:
            self._capture(stream_key, stream, size, split)
        return True

    def _capture(self, stream_key: object, stream: torch.cuda.Stream | None, size: int, split: bool) -> None:
        start = time.perf_counter()
        reserved = torch.cuda.memory_reserved(self.device)  # the allocator's count: no device sync
        if stream is None:
            stream = self._side_stream if stream_key == "full" else torch.cuda.current_stream(self.device)
        backend = self._wrapper(size, split)
        dummy = self._padded(AttentionBatch([], [], [], self.block_size), size)
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream), preferred_blas(self.blas_library):
            # warm-up and capture write K/V of padding rows only: aim every row at the scratch block
            self.blocks[:size].fill_(self.scratch_block)
            self.offsets[:size].zero_()
            backend.begin_step(dummy, self.device)
            # warm up kernels and cuBLAS on this stream (and its SMs) for this batch size
            with self._prefetching(stream_key):
                for _ in range(2):
                    self.model(self.input_ids[:size], self.positions[:size], backend, self.kv_caches)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    out = self.model(self.input_ids[:size], self.positions[:size], backend, self.kv_caches)
        current.wait_stream(stream)
        self._graphs[(stream_key, size, split)] = (graph, out)
        self.capture_seconds += time.perf_counter() - start
        self.capture_bytes += max(0, torch.cuda.memory_reserved(self.device) - reserved)
        if stream_key != "full":  # a partition's graphs are captured while serving: say what they cost
            log.info("captured the decode graph of %d rows on %s SMs: %d graphs, %.0f MiB reserved by captures",
                     size, stream_key, len(self._graphs), self.capture_bytes / 2**20)

    @contextlib.contextmanager
    def _prefetching(self, stream_key: object) -> Iterator[None]:
        """The fused path prefetches weights into L2 while a whole-GPU graph is captured (when asked)."""
        if self.l2_prefetch is None or stream_key != "full":
            yield
            return
        self.model.fused.prefetch = self.l2_prefetch
        try:
            yield
        finally:
            self.model.fused.prefetch = None

    def capture(self, stream_key: object = "full", stream: torch.cuda.Stream | None = None) -> None:
        """Capture every bucket (largest first)."""
        before = self.capture_seconds
        for size in reversed(self.buckets):
            self.ensure(stream_key, stream, size)
        log.info("captured decode graphs for %s in %.1f s (%d in all, %.0f MiB reserved by captures)", stream_key,
                 self.capture_seconds - before, len(self._graphs), self.capture_bytes / 2**20)

    def run(self, batch: AttentionBatch, input_ids: Tensor, positions: Tensor, slots: Tensor,
            stream_key: object = "full") -> Tensor:
        """Replay on the current stream (which must be the stream the graph was captured for).

        Inputs are device tensors of length B; returns hidden states [B, hidden], valid until the next
        replay on this stream (read them on it before)."""
        b = batch.num_seqs
        size = self.bucket_for(b)
        if size is None or not batch.is_decode_only:
            raise ValueError(f"no decode graph for a batch of {b}")
        split = self.split_for(stream_key, size, batch.seq_lens)
        self.unsplit_twin_replays += split != fib.splits_kv(size)  # the bucket's default: variants()[0]
        graph, out = self._graphs[(stream_key, size, split)]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.blocks[:b].copy_(slots // self.block_size)
        self.offsets[:b].copy_(slots % self.block_size)
        if size > b:  # padding rows: token 0 at position 0 in the scratch block
            self.input_ids[b:size].zero_()
            self.positions[b:size].zero_()
            self.blocks[b:size].fill_(self.scratch_block)
            self.offsets[b:size].zero_()
        self._wrapper(size, split).begin_step(self._padded(batch, size), self.device)
        graph.replay()
        return out[:b]
