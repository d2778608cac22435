"""A multiplexed step: prefill eagerly on one green-context partition while the decode batch runs
`k` look-ahead steps as CUDA-graph replays on the other, each feeding on the previous step's
tokens on the device. The two streams are ordered behind the step's start by events and joined by
events; nothing here waits on the GPU. It executes the plan's split and k; it chooses neither.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch

from dataplane.partition_kernels import sm_count_target
from dataplane.partitions import Partition, PartitionSet

if TYPE_CHECKING:
    from dataplane.runner import ModelRunner, PendingStep, _Item
    from shared.messages import StepPlan

log = logging.getLogger(__name__)


class PhaseEvents:
    """Timing events of one phase on one stream."""

    def __init__(self) -> None:
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def elapsed_ms(self) -> float:
        return self.start.elapsed_time(self.end)


class Multiplexer:
    """`partition_kernels`: size GEMMs for the partition they run on (`dataplane.partition_kernels`)
    rather than the whole device, and with `fa2_prefill` plan the partition's prefill attention with
    FA2; `device_sms` is the whole device's SM count."""

    def __init__(self, partitions: PartitionSet, partition_kernels: bool = False, device_sms: int = 0,
                 fa2_prefill: bool = True) -> None:
        if partition_kernels and device_sms < 1:
            raise ValueError("partition-sized kernels need the device's SM count")
        self.partitions = partitions
        self.partition_kernels = partition_kernels
        self.fa2_prefill = partition_kernels and fa2_prefill
        self.device_sms = device_sms

    def sized(self, sms: int) -> AbstractContextManager[None]:
        return sm_count_target(sms, self.device_sms) if self.partition_kernels else nullcontext()

    def run(self, runner: ModelRunner, items: list[_Item], plan: StepPlan, pending: PendingStep) -> None:
        part = self.partitions.get(plan.decode_sms)
        decode = [it for it in items if it.state.is_decode(it.num_tokens)]
        prefill = [it for it in items if not it.state.is_decode(it.num_tokens)]
        graphs = runner.graphs
        bucket = graphs.bucket_for(len(decode)) if graphs is not None and decode else None
        key = part.actual_decode_sms
        if decode:
            with self.sized(part.actual_decode_sms):  # a capture keeps the GEMMs it chose
                # capture before any eager work is in flight
                captured = graphs is not None and bucket is not None and graphs.ensure(key, part.decode_stream, bucket)
            if not captured:
                log.warning("decode batch of %d has no graph on %d SMs; running the step aggregated",
                            len(decode), key)
                runner._run(items, plan.decode_steps, pending)
                return
        start = torch.cuda.Event()
        start.record()
        phases = {}
        if decode:
            phases["decode"] = self._on(part.decode_stream, start,
                                        lambda: self._sized_decode(runner, decode, plan, pending, part))
        if prefill:
            phases["prefill"] = self._on(part.prefill_stream, start, lambda: self._prefill(runner, prefill, pending, part))
        current = torch.cuda.current_stream()
        for ev in phases.values():
            current.wait_event(ev.end)
        pending.phases = phases

    @staticmethod
    def _on(stream: torch.cuda.ExternalStream, start: torch.cuda.Event, work) -> PhaseEvents:  # noqa: ANN001
        ev = PhaseEvents()
        with torch.cuda.stream(stream):
            stream.wait_event(start)
            ev.start.record(stream)
            work()
            ev.end.record(stream)
        return ev

    def _sized_decode(self, runner: ModelRunner, decode: list[_Item], plan: StepPlan, pending: PendingStep,
                      part: Partition) -> None:
        with self.sized(part.actual_decode_sms):  # the eager lm_head and sampling of each pass
            self._decode(runner, decode, plan, pending, part.actual_decode_sms)

    def _prefill(self, runner: ModelRunner, prefill: list[_Item], pending: PendingStep, part: Partition) -> None:
        attention = runner.backend.on_partition() if self.fa2_prefill else nullcontext()
        with self.sized(part.actual_prefill_sms), attention:
            runner._run(prefill, 1, pending, eager=True)

    @staticmethod
    def _decode(runner: ModelRunner, decode: list[_Item], plan: StepPlan, pending: PendingStep, key: object) -> None:
        first = runner._forward_and_sample(decode, key, 0)
        pending.passes.append(first)
        runner.lookahead([it.state for it in decode], first, plan.decode_steps - 1, pending, key)
