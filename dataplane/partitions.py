"""Green-context SM partitions: for each split on the menu, two disjoint green contexts built from
ONE split of the device's SM resource (a group plus its remainder), with a non-blocking stream each.

Streams are wrapped as torch ExternalStreams; the contexts and streams live until `close()`.
Kernels launched on a partition's stream run on that partition's SMs only; memory is shared.
This module builds partitions; it does not choose between them and never makes a context current.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from dataplane.partition_menu import Split

log = logging.getLogger(__name__)


def _ok(result: tuple) -> object:  # noqa: ANN401 - the driver returns (err, *outs)
    from cuda.bindings import driver as drv

    err = result[0]
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {err!r}")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


@dataclass
class Partition:
    split: Split
    decode_stream: torch.cuda.ExternalStream
    prefill_stream: torch.cuda.ExternalStream
    actual_decode_sms: int
    actual_prefill_sms: int
    _raw: list = field(default_factory=list)  # (green ctx, stream) handles for teardown


class PartitionSet:
    """Every split on the menu, built at start-up (about 3 ms each), keyed by the decode SM count each
    realised (what `describe` advertises and plans ask for); a split realising a size already built is
    dropped. If building one fails, those built are destroyed before the error is raised."""

    def __init__(self, device: torch.device, splits: list[Split]) -> None:
        from cuda.bindings import driver as drv

        self._drv = drv
        self.device = device
        torch.cuda.init()
        torch.empty(1, device=device)  # the primary context must exist first
        self._dev = _ok(drv.cuDeviceGet(device.index or 0))
        start = time.perf_counter()
        self.partitions: dict[int, Partition] = {}
        self._build_all(splits)
        self.build_seconds = time.perf_counter() - start
        log.info("built %d green-context splits in %.0f ms", len(self.partitions), self.build_seconds * 1000)

    def _build_all(self, splits: list[Split]) -> None:
        try:
            for split in splits:
                self._add(self._build(split))
        except BaseException:
            for part in self.partitions.values():  # nothing ran on them yet
                self._destroy(part)
            self.partitions.clear()
            raise

    def _add(self, part: Partition) -> None:
        if part.actual_decode_sms in self.partitions:
            log.warning("split %s realises %d decode SMs, like one built before: dropped", part.split,
                        part.actual_decode_sms)
            self._destroy(part)
            return
        self.partitions[part.actual_decode_sms] = part

    def _green_stream(self, resource: object, priority: int) -> tuple[object, object, int]:
        drv = self._drv
        desc = _ok(drv.cuDevResourceGenerateDesc([resource], 1))
        ctx = _ok(drv.cuGreenCtxCreate(desc, self._dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        stream = _ok(drv.cuGreenCtxStreamCreate(ctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, priority))
        return ctx, stream, resource.sm.smCount  # type: ignore[attr-defined]

    def _build(self, split: Split) -> Partition:
        drv = self._drv
        full = _ok(drv.cuDeviceGetDevResource(self._dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        groups, _, rest = _ok(drv.cuDevSmResourceSplitByCount(1, full, 0, split.decode_sms))  # type: ignore[misc]
        dec_ctx, dec_stream, dec_sms = self._green_stream(groups[0], -1)  # decode gets the higher priority
        try:
            pre_ctx, pre_stream, pre_sms = self._green_stream(rest, 0)
        except BaseException:
            drv.cuStreamDestroy(dec_stream)
            drv.cuGreenCtxDestroy(dec_ctx)
            raise
        as_torch = lambda s: torch.cuda.ExternalStream(int(s), device=self.device)  # noqa: E731
        part = Partition(split, as_torch(dec_stream), as_torch(pre_stream), dec_sms, pre_sms,
                         [(dec_ctx, dec_stream), (pre_ctx, pre_stream)])
        if (dec_sms, pre_sms) != (split.decode_sms, split.prefill_sms):
            log.warning("split %s realised as %dp/%dd SMs", split, pre_sms, dec_sms)
        return part

    def get(self, decode_sms: int) -> Partition:
        try:
            return self.partitions[decode_sms]
        except KeyError:
            raise ValueError(f"no partition with {decode_sms} decode SMs; built: {sorted(self.partitions)}") from None

    def streams_by_size(self) -> dict[int, torch.cuda.ExternalStream]:
        """A stream running on exactly S SMs, for every realised partition size S (either side)."""
        streams: dict[int, torch.cuda.ExternalStream] = {}
        for part in self.partitions.values():
            streams.setdefault(part.actual_decode_sms, part.decode_stream)
            streams.setdefault(part.actual_prefill_sms, part.prefill_stream)
        return streams

    def describe(self) -> list[tuple[int, int]]:
        """(prefill SMs, decode SMs) actually realised for each split, for WorkerReady."""
        return [(p.actual_prefill_sms, p.actual_decode_sms) for p in self.partitions.values()]

    def _destroy(self, part: Partition) -> None:
        for ctx, stream in part._raw:
            self._drv.cuStreamDestroy(stream)
            self._drv.cuGreenCtxDestroy(ctx)

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        for part in self.partitions.values():
            self._destroy(part)
        self.partitions.clear()
