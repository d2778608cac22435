"""Paged attention on CUDA with flashinfer: FA3 batch prefill for prefill steps, the tensor-core
batch decode kernel for decode-only steps (its CUDA-core kernel up to `CUDA_CORE_MAX_BATCH` rows),
both in one mixed step (the decode kernel for its leading decode rows, FA3 for the chunks after them:
FA3 gives each one-token query a whole 128-row tile), and fixed-buffer decode wrappers for CUDA
graphs. Plans are made from host (CPU) index tensors once per step, so planning never waits on
the GPU. flashinfer is imported here only, and this module is imported only on CUDA.

It must not decide batching, and must not synchronise the host with the device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from dataplane.attention.base import AttentionBackend, AttentionBatch, AttentionShape
from dataplane.attention.plan_staging import shared_staging
from shared.profiles import FLASHINFER_SPLIT_MIN_DECODES

WORKSPACE_BYTES = 128 << 20


@dataclass
class HostPlan:
    """CPU int32 index tensors of one step, in flashinfer's paged layout."""

    qo_indptr: Tensor
    kv_indptr: Tensor
    kv_indices: Tensor
    kv_last_page_len: Tensor


def host_plan(batch: AttentionBatch, start: int = 0, stop: int | None = None) -> HostPlan:
    """Build flashinfer's page-table tensors on the host (no device work) for sequences
    `start:stop` of the batch (query offsets rebased to the first of them)."""
    bs = batch.block_size
    pages: list[int] = []
    kv_indptr = [0]
    last = []
    stop = batch.num_seqs if stop is None else stop
    for table, seq_len in zip(batch.block_tables[start:stop], batch.seq_lens[start:stop]):
        n = -(-seq_len // bs)
        pages.extend(table[:n])
        kv_indptr.append(len(pages))
        last.append(seq_len - (n - 1) * bs)
    qo = batch.query_start_loc[start : stop + 1]
    i32 = torch.int32
    return HostPlan(
        qo_indptr=torch.tensor([x - qo[0] for x in qo], dtype=i32),
        kv_indptr=torch.tensor(kv_indptr, dtype=i32),
        kv_indices=torch.tensor(pages, dtype=i32),
        kv_last_page_len=torch.tensor(last, dtype=i32),
    )


def leading_decodes(batch: AttentionBatch) -> int:
    """How many sequences at the front of the batch have one new token."""
    n = 0
    for q in batch.query_lens:
        if q != 1:
            break
        n += 1
    return n


def _prefill_backend(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "fa3" if major == 9 else "auto"


def write_kv(kv_cache: Tensor, blocks: Tensor, offsets: Tensor, k: Tensor, v: Tensor) -> None:
    """Scatter this step's keys and values into their pages (graph-capturable)."""
    kv_cache[blocks, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = v.to(kv_cache.dtype)


class FlashInferAttention(AttentionBackend):
    """Eager flashinfer attention: one plan per step, decode or prefill wrapper by step shape; a
    mixed step with at least `split_min_decodes` leading decode rows plans both and splits there."""

    name = "flashinfer"

    def __init__(self, shape: AttentionShape, device: torch.device,
                 split_min_decodes: int = FLASHINFER_SPLIT_MIN_DECODES) -> None:
        import flashinfer  # lazy: CUDA only

        self.shape = shape
        self.device = device
        self.split_min_decodes = split_min_decodes
        # one float workspace: the wrappers run one after the other on one stream; each keeps its
        # own plan (int workspace), staged through `plan_staging`'s pinned buffers
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._workspace, "NHD", backend=_prefill_backend(device)
        )
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD", use_tensor_cores=True)
        self._decode_cuda_cores: object | None = None  # decode-only steps up to CUDA_CORE_MAX_BATCH, built on use
        self._prefill_partition: object | None = None  # FA2, built on first use by `on_partition`
        self._step_prefill = self._prefill  # the prefill wrapper this step planned
        self._wrapper: object | None = None
        self._split = 0  # rows the decode wrapper takes in a split mixed step (0: not split)
        self._blocks: Tensor | None = None
        self._offsets: Tensor | None = None
        self.scale = 1.0 / math.sqrt(shape.head_dim)

    def _plan_decode(self, plan: HostPlan, block_size: int, wrapper: object | None = None) -> None:
        s = self.shape
        shared_staging().plan(
            wrapper or self._decode, plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len, s.num_q_heads,
            s.num_kv_heads, s.head_dim, block_size, q_data_type=s.dtype, kv_data_type=s.dtype, non_blocking=True,
        )

    def _plan_prefill(self, plan: HostPlan, block_size: int) -> None:
        s = self.shape
        shared_staging().plan(
            self._prefill, plan.qo_indptr, plan.kv_indptr, plan.kv_indices, plan.kv_last_page_len, s.num_q_heads,
            s.num_kv_heads, s.head_dim, block_size, causal=True, q_data_type=s.dtype,
            kv_data_type=s.dtype, non_blocking=True,
        )

    def _cuda_core_decode(self) -> object:
        if self._decode_cuda_cores is None:
            import flashinfer

            self._decode_cuda_cores = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_tensor_cores=False)
        return self._decode_cuda_cores

    @contextmanager
    def on_partition(self) -> Iterator[None]:
        """Prefill planned inside runs in FA2 (a CTA per tile): FA3's static schedule spreads its work
        over one CTA per device SM, so on a partition the CTAs past its SM count would run as a second
        wave. Where the prefill wrapper is FA2 already (not sm90), nothing changes."""
        if _prefill_backend(self.device) != "fa3":
            yield
            return
        if self._prefill_partition is None:
            import flashinfer

            self._prefill_partition = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD", backend="fa2")
        previous, self._prefill = self._prefill, self._prefill_partition
        try:
            yield
        finally:
            self._prefill = previous

    def begin_step(self, batch: AttentionBatch, device: torch.device, slot_mapping: Tensor | None = None) -> None:
        if slot_mapping is None:  # callers on the hot path pass a staged device tensor
            slot_mapping = batch.slot_mapping().to(device, non_blocking=True)
        self._blocks = slot_mapping // batch.block_size
        self._offsets = slot_mapping % batch.block_size
        self._split = 0
        if batch.is_decode_only:  # the kernel a decode graph of this batch would run (CUDA_CORE_MAX_BATCH)
            wrapper = self._cuda_core_decode() if uses_cuda_cores(batch.num_seqs) else self._decode
            self._plan_decode(host_plan(batch), batch.block_size, wrapper)
            self._wrapper = wrapper
            return
        self._step_prefill = self._prefill
        lead = leading_decodes(batch)
        if lead >= self.split_min_decodes:
            self._plan_decode(host_plan(batch, 0, lead), batch.block_size)
            self._plan_prefill(host_plan(batch, lead), batch.block_size)
            self._split = lead
        else:
            self._plan_prefill(host_plan(batch), batch.block_size)
        self._wrapper = self._prefill

    def forward(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor) -> Tensor:
        if self._wrapper is None or self._blocks is None or self._offsets is None:
            raise RuntimeError("FlashInferAttention.forward called before begin_step")
        write_kv(kv_cache, self._blocks, self._offsets, k, v)
        return self.attend(layer_idx, q.contiguous(), kv_cache)

    def kv_slots(self) -> tuple[Tensor, Tensor] | None:
        if self._blocks is None or self._offsets is None:
            raise RuntimeError("FlashInferAttention.kv_slots called before begin_step")
        return self._blocks, self._offsets

    def attend(self, layer_idx: int, q: Tensor, kv_cache: Tensor, out: Tensor | None = None) -> Tensor:
        d = self._split
        if not d:
            return self._wrapper.run(q, kv_cache, out=out)  # type: ignore[attr-defined]
        if out is None:
            out = torch.empty_like(q)
        self._decode.run(q[:d], kv_cache, out=out[:d])
        self._step_prefill.run(q[d:], kv_cache, out=out[d:])
        return out


# Decode graphs of at least this batch read each (request, KV head) in one program rather than split
# its KV across programs and merge (None: flashinfer's own split, every bucket). The kernel alone
# (`benchmarks/decode_attention.py`, results/decode-attention-h200.json) is 6% faster at B=64 and 3%
# at B=256 (1k context) and slower below B=16 at 4k; a whole decode step 5% and 2.5%
# (`engine.py --decode-only --unsplit-kv-min-batch 32` against 100000, one machine:
# results/engine-decode-h200-default-unsplit*.json). Graph replay equals eager on a 40-request bucket
# of mixed prompt lengths with it (test_gpu.py, H200); an earlier failure of that test was a cold
# flashinfer JIT build running past the test's time limit, which the split-KV run hit as well.
UNSPLIT_KV_MIN_BATCH: int | None = 32

# Decode batches of at most this many rows (a graph's bucket, or an eager decode-only step's batch) use
# flashinfer's CUDA-core decode kernel, larger ones its tensor-core decode (its prefill kernel with a
# one-row query tile per KV head group); 0: tensor cores everywhere. Keep it a graph bucket size
# (`graphs.default_buckets`): then every batch a bucket pads stands on the same side as the bucket, so a
# graph and the eager step it stands for run one kernel (tests/dataplane/test_paged_attention.py checks
# the default buckets). On an H100 at pages of 32 (results/decode-attention-h100-page32*.json, us a
# layer, CUDA cores / tensor cores, KV split): equal lengths B=16 1k 32.8 / 32.1, B=24 46.8 / 44.7; lengths
# spread +-75% B=16 1k 33.3 / 33.9, 4k 115.8 / 107.8, B=24 1k 46.7 / 45.2, 4k 153.4 / 137.1: tensor
# cores from 16 rows win (8 here), which also gives buckets 16 and 24 their unsplit twins (below;
# the full engine run with both: results/engine-h100-piecewise-cc8-twin-lease9.json). 8 is the default
# since the whole GPU suite passed with it (H100, 2026-12-07; 24 before, vouched for at 855a70e), and the
# engine run at the defaults gives B=16 1k 7.19 ms (results/engine-h100-piecewise.json). Decode rows of
# a mixed step keep the tensor-core kernel. `engine.py --cuda-core-max-batch N` runs the decode grid with another limit.
CUDA_CORE_MAX_BATCH: int = 8


def uses_cuda_cores(batch_size: int) -> bool:
    """Whether a decode-only batch (or graph bucket) of this many rows runs the CUDA-core kernel."""
    return batch_size <= CUDA_CORE_MAX_BATCH


# A whole-GPU decode graph bucket that splits KV (below `UNSPLIT_KV_MIN_BATCH`) on the tensor-core
# kernel also gets an unsplit twin, replayed when the batch is balanced: its longest KV at most this
# many times the mean (None: no twins). Unsplit, each (request, KV head) is one program, so the step
# lasts as long as the longest request's; split, the work is spread evenly and then merged. On an
# H100 at pages of 32 (`benchmarks/decode_attention.py`, results/decode-attention-h100-page32*.json):
# equal lengths, unsplit is 6% faster at B=16 and 9% at B=24 (1k context), 3% at B=16 at 4k; lengths
# spread +-75% (longest ~1.7x the mean), it is 9% slower at B=16 1k and 13% at 4k. Serving batches
# are rarely balanced and keep the split; equal-length batches (offline jobs, benchmarks) get the
# faster kernel. Decode-only steps at B=16, 1k context, equal lengths: 7.48 -> 7.23 ms with tensor
# cores and unsplit KV (results/engine-decode-h100-default-unsplit16-cc0-lease8.json). Buckets on
# CUDA cores (`CUDA_CORE_MAX_BATCH`: buckets 1 to 8) get no twins.
BALANCED_MAX_SKEW: float | None = 1.1


def splits_kv(batch_size: int) -> bool:
    """Whether a decode graph of this bucket splits KV across programs (`UNSPLIT_KV_MIN_BATCH`)."""
    return UNSPLIT_KV_MIN_BATCH is None or batch_size < UNSPLIT_KV_MIN_BATCH


def has_unsplit_twin(batch_size: int) -> bool:
    """Whether a whole-GPU decode graph bucket of this size also gets an unsplit twin (`BALANCED_MAX_SKEW`)."""
    return (BALANCED_MAX_SKEW is not None and UNSPLIT_KV_MIN_BATCH is not None
            and splits_kv(batch_size) and not uses_cuda_cores(batch_size))


def is_balanced(kv_lens: Sequence[int]) -> bool:
    """Whether the longest of these KV lengths is at most `BALANCED_MAX_SKEW` times their mean."""
    return (BALANCED_MAX_SKEW is not None and len(kv_lens) > 0
            and max(kv_lens) * len(kv_lens) <= BALANCED_MAX_SKEW * sum(kv_lens))


class GraphDecodeAttention(AttentionBackend):
    """Decode attention for one CUDA-graph batch bucket: fixed device buffers, re-planned per replay.

    `begin_step` only plans (host work plus an async copy into the wrapper's fixed buffers) and
    sets the slot tensors the captured graph reads; call it outside capture before each replay.
    Whether KV is split across programs (`UNSPLIT_KV_MIN_BATCH`, or `split_kv` for a bucket's unsplit
    twin) and which kernel reads it (`CUDA_CORE_MAX_BATCH`) are fixed per wrapper, so every plan of a
    wrapper launches the kernels its graph captured.
    """

    name = "flashinfer-graph"

    def __init__(self, shape: AttentionShape, device: torch.device, batch_size: int, max_pages: int,
                 workspace: Tensor, blocks: Tensor, offsets: Tensor, split_kv: bool | None = None) -> None:
        import flashinfer

        self.shape = shape
        self.batch_size = batch_size
        i32 = dict(dtype=torch.int32, device=device)
        self.tensor_cores = not uses_cuda_cores(batch_size)
        self._wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.tensor_cores,
            paged_kv_indptr_buffer=torch.zeros(batch_size + 1, **i32),
            paged_kv_indices_buffer=torch.zeros(max_pages, **i32),
            paged_kv_last_page_len_buffer=torch.ones(batch_size, **i32),
        )
        self._blocks = blocks  # views into the graph runner's static slot buffers
        self._offsets = offsets
        self.split_kv = splits_kv(batch_size) if split_kv is None else split_kv  # None: the bucket's default

    def begin_step(self, batch: AttentionBatch, device: torch.device, slot_mapping: Tensor | None = None) -> None:
        if batch.num_seqs != self.batch_size or not batch.is_decode_only:
            raise ValueError(f"graph bucket {self.batch_size} got a batch of {batch.num_seqs} (decode only)")
        plan = host_plan(batch)
        s = self.shape
        # flashinfer copies host-side page indices into its graph buffer with a blocking copy; hand it
        # a device tensor (moved by an async copy) so planning never waits on the GPU.
        indices = plan.kv_indices.to(device, non_blocking=True)
        shared_staging().plan(
            self._wrapper, plan.kv_indptr, indices, plan.kv_last_page_len, s.num_q_heads, s.num_kv_heads, s.head_dim,
            batch.block_size, q_data_type=s.dtype, kv_data_type=s.dtype, non_blocking=True,
            disable_split_kv=not self.split_kv,
        )

    def forward(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, kv_cache: Tensor) -> Tensor:
        write_kv(kv_cache, self._blocks, self._offsets, k, v)
        return self._wrapper.run(q.contiguous(), kv_cache)

    def kv_slots(self) -> tuple[Tensor, Tensor] | None:
        return self._blocks, self._offsets

    def attend(self, layer_idx: int, q: Tensor, kv_cache: Tensor, out: Tensor | None = None) -> Tensor:
        return self._wrapper.run(q, kv_cache, out=out)
