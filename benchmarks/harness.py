"""What several benchmarks share: a wall-clock timer with the device drained at both ends, the engine's
loop in one process (the real scheduler driving the real runner, no sockets) and the GPU's short name
for results files. It must not measure anything itself."""

from __future__ import annotations

import re
import time

import torch

from controlplane.scheduler import Scheduler


class Timer:
    """Wall time around device work, with the device drained at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> Timer:
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def drive(sched: Scheduler, runner, on_plan=None, on_updates=None) -> int:  # noqa: ANN001
    """The engine's loop in one process until the scheduler has no work: up to `max_inflight` plans
    out (async scheduling), results applied in order. `on_plan(plan)` sees each plan as it is sent,
    `on_updates(updates)` what each result did. Returns the steps run."""
    steps = 0
    inflight: list = []
    while sched.has_work() or inflight:
        while len(inflight) < sched.max_inflight:
            plan = sched.schedule()
            if plan is None:
                break
            if on_plan is not None:
                on_plan(plan)
            inflight.append(runner.launch(plan))
        if not inflight:
            raise RuntimeError("the scheduler has work but planned nothing")
        updates = sched.update(inflight.pop(0).wait())
        if on_updates is not None:
            on_updates(updates)
        steps += 1
    return steps


def gpu_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    match = re.search(r"(H100|H200|A100|L40S|B200)", name)
    return (match.group(1) if match else re.sub(r"\W+", "-", name)).lower()
