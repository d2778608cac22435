"""Pinned host buffers for flashinfer's plans: each plan gets one that no queued copy still reads.

flashinfer's `plan()` writes its schedule into the wrapper's pinned host buffer and queues an async copy
of it to the device on the current stream. Planning the same wrapper again before that copy has run
rewrites the schedule an earlier launch is about to read, and its attention reads the wrong tiles. The
host runs ahead of the GPU whenever a step plans its look-ahead passes back to back, or the next step is
launched while this one still runs (async scheduling), so that is the normal case here. This pool hands
each plan a buffer whose last copy has completed (an event per buffer, polled), allocating another when
none has, so a plan never waits on the GPU.

It must not synchronise the host with the device, except when `max_buffers` buffers are all still being
copied from (then it waits for the oldest, and counts it in `waits`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

PIN_ATTR = "_pin_memory_int_workspace_buffer"  # the flashinfer wrappers' pinned staging buffer
INT_ATTR = "_int_workspace_buffer"  # the device buffer it is copied to (the same size)


class PlanStaging:
    """A pool of pinned host buffers, shared by every flashinfer wrapper of one device."""

    def __init__(self, max_buffers: int = 64, event_factory: Callable[[], Any] | None = None,
                 allocate: Callable[[int], torch.Tensor] | None = None) -> None:
        if max_buffers < 1:
            raise ValueError("max_buffers must be at least 1")
        self.max_buffers = max_buffers
        self._event = event_factory or torch.cuda.Event
        self._allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self._free: dict[int, list[torch.Tensor]] = {}  # bytes -> buffers no copy reads any more
        self._busy: list[tuple[Any, torch.Tensor]] = []  # (event after the copy, buffer), oldest first
        self.allocated = 0
        self.waits = 0  # plans that found every buffer in flight and waited for the oldest copy

    def plan(self, wrapper: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - flashinfer's wrappers
        """`wrapper.plan(*args, **kwargs)` with a pinned buffer of its own; the buffer is reused only
        once the copy this plan queued on the current stream has run."""
        nbytes = getattr(wrapper, INT_ATTR).nbytes
        buffer = self._take(nbytes)
        setattr(wrapper, PIN_ATTR, buffer)
        try:
            return wrapper.plan(*args, **kwargs)
        finally:
            event = self._event()
            event.record()  # the current stream: after the copy plan() queued there
            self._busy.append((event, buffer))

    def _take(self, nbytes: int) -> torch.Tensor:
        if not self._free.get(nbytes):  # poll the copies only when no buffer is known free
            self._reclaim()
        free = self._free.get(nbytes)
        if free:
            return free.pop()
        if self.allocated < self.max_buffers:
            self.allocated += 1
            return self._allocate(nbytes)
        # every buffer is in flight: wait for the oldest copy (the only host wait here)
        self.waits += 1
        for i, (event, buffer) in enumerate(self._busy):
            if buffer.nbytes == nbytes:
                event.synchronize()
                del self._busy[i]
                return buffer
        raise RuntimeError(f"{self.max_buffers} staging buffers are in flight and none holds {nbytes} bytes")

    def _reclaim(self) -> None:
        still: list[tuple[Any, torch.Tensor]] = []
        for event, buffer in self._busy:
            if event.query():
                self._free.setdefault(buffer.nbytes, []).append(buffer)
            else:
                still.append((event, buffer))
        self._busy = still

    @property
    def in_flight(self) -> int:
        return len(self._busy)


_shared: PlanStaging | None = None


def shared_staging() -> PlanStaging:
    """The process's pool (a data plane drives one device), made on first use."""
    global _shared
    if _shared is None:
        _shared = PlanStaging()
    return _shared
